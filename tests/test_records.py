"""The run's records: TensorBoard scalars equal to metrics.jsonl, plain progress lines."""

import json
import shutil

import pytest
from tensorboard.backend.event_processing import event_accumulator

import jaxtrain
from jaxtrain import losses, metrics
from tests import helpers


def _scalars(folder):
  """Every scalar TensorBoard's own reader finds under `folder`: {(tag, step): value}."""
  ea = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
  ea.Reload()
  return {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}


def _expected(workdir):
  """The numeric values of metrics.jsonl as TensorBoard tags."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    step, split = row.pop("step"), row.pop("split")
    out.update({(f"{split}/{k}", step): v for k, v in row.items() if isinstance(v, int | float)})
  return out


def _train(digits, workdir, **overrides):
  config = helpers.tiny_config(**{"early_stop.metric": "eval/loss", **overrides})
  return jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=workdir)


def test_tensorboard_holds_the_same_scalars_as_the_jsonl(tmp_path, digits):
  _train(digits, tmp_path)
  expected, found = _expected(tmp_path), _scalars(tmp_path / "tb")
  assert set(found) == set(expected)
  tags = {tag for tag, _ in found}
  assert tags >= {"train/loss", "train/lr", "train/samples_per_sec", "train/data_wait_frac",
                  "train/skipped", "eval/accuracy", "eval/monitor_best",
                  "eval/monitor_patience_left"}  # fmt: skip
  for key, value in expected.items():
    assert found[key] == pytest.approx(value, rel=1e-6), key


def test_a_resumed_run_replaces_the_steps_it_trains_again(tmp_path, digits):
  _train(digits, tmp_path, **{"ckpt.every_steps": 20})
  shutil.rmtree(tmp_path / "checkpoints" / "40")  # as if killed before the last save
  _train(digits, tmp_path, **{"ckpt.every_steps": 20})
  assert len(list((tmp_path / "tb").iterdir())) == 2  # one event file per attempt
  expected, found = _expected(tmp_path), _scalars(tmp_path / "tb")
  assert set(found) == set(expected)  # steps 21-40 once, from the second attempt
  for key, value in expected.items():
    assert found[key] == pytest.approx(value, rel=1e-6), key


def test_plain_progress_lines_off_a_terminal(capsys):
  progress = metrics.Progress(100, 0, enabled=True, every=20, terminal=False)
  progress.update(10, loss=2.0)
  progress.update(10, loss=1.5)
  progress.update(0, eval_accuracy=0.75)
  progress.update(20, loss=1.0)
  progress.close()
  lines = capsys.readouterr().err.splitlines()
  assert [x.split(" eta ")[0] for x in lines] == [
    "step 20/100 (20%) loss=1.5",
    "step 20/100 (20%) loss=1.5 eval_accuracy=0.75",
    "step 40/100 (40%) loss=1 eval_accuracy=0.75",
  ]
  assert all(" eta " in x for x in lines)


def test_the_command_line_prints_no_carriage_returns_off_a_terminal(tmp_path):
  result = helpers.digits_cli(tmp_path / "run", "--config.train.steps=100")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "\r" not in result.stderr
  steps = [x.split()[1] for x in result.stderr.splitlines() if x.startswith("step ")]
  assert steps[0] == "50/100" and steps[-1] == "100/100"
