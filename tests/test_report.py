"""The report: plots with a line per run, a summary naming what differs, the command."""

import os

import pytest

import jaxtrain
from jaxtrain import losses, report
from tests import commands, helpers


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, digits):
  root = tmp_path_factory.mktemp("runs")
  for name, lr in (("a", 1e-3), ("b", 3e-3)):
    stop = {
      "early_stop.metric": "eval/loss",
      "early_stop.patience": 1,
      "early_stop.min_delta": 10.0,
    }
    config = helpers.tiny_config(**{"optim.lr": lr, **stop})
    jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=root / name)
  return root


def _labelled(fig):
  return [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")]


def test_each_plot_has_a_line_per_run_and_series(two_runs):
  runs = [report.load(two_runs / "a"), report.load(two_runs / "b")]
  figures = report.figures(runs)
  assert set(figures) == {"loss", "loss_time", "eval_accuracy", "lr", "throughput", "data_wait"}
  assert _labelled(figures["loss"]) == ["a train loss", "a eval loss", "b train loss",
                                        "b eval loss"]  # fmt: skip
  for stem in ("eval_accuracy", "lr", "throughput", "data_wait"):
    assert _labelled(figures[stem]) == ["a", "b"], stem
  ax = figures["loss"].axes[0]
  assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats)"
  assert figures["loss_time"].axes[0].get_xlabel().startswith("wall time")
  # the first evaluation (step 20) is each run's best; the next one stops it (patience 1)
  marks = lambda label: [x.get_xdata()[0] for x in ax.lines if x.get_label() == label]  # noqa: E731
  assert (marks("_best"), marks("_stopped")) == ([20, 20], [40, 40])


def test_the_summary_names_the_differing_keys_and_how_runs_ended(two_runs):
  runs = [report.load(two_runs / "a"), report.load(two_runs / "b")]
  assert report.differences(runs) == {"optim.lr": [1e-3, 3e-3]}
  text = report.summary(runs, ["loss"])
  assert "| `optim.lr` | 0.001 | 0.003 |" in text
  assert text.count("| stopped_early |") == 2 and "![loss](loss.png)" in text


def test_the_command_writes_pngs_and_the_summary(two_runs):
  result = commands.run(["jaxtrain.report", "a", "b"], cwd=two_runs, timeout=120,
                        env=dict(os.environ, PYTHONPATH=helpers.ROOT))  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  out = two_runs / "report"
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert pngs == sorted(f"{s}.png" for s in ("loss", "loss_time", "eval_accuracy", "lr",
                                             "throughput", "data_wait"))  # fmt: skip
  for png in out.glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert "optim.lr" in (out / "summary.md").read_text()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
  result = commands.run(["jaxtrain.report", str(tmp_path)], cwd=helpers.ROOT, timeout=60,
                        env=dict(os.environ, PYTHONPATH=helpers.ROOT))  # fmt: skip
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: {tmp_path}: not a run's workdir")
  assert len(result.stderr.strip().splitlines()) == 1
