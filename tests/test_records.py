"""The run's records: TensorBoard scalars equal to metrics.jsonl, plain progress lines."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
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
    step, split, _ = row.pop("step"), row.pop("split"), row.pop("time")
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


def _git(cwd, *args):
  subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_the_record_names_the_code_the_machine_and_the_weights(tmp_path, digits, monkeypatch):
  project = tmp_path / "project"
  project.mkdir()
  (project / "train.py").write_text("print('v1')\n")
  _git(project, "init", "-q")
  _git(project, "-c", "user.email=a@b", "-c", "user.name=a", "add", "train.py")
  _git(project, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "v1")
  (project / "train.py").write_text("print('v2')\n")  # a change not committed
  (project / "notes.txt").write_text("new\n")
  monkeypatch.chdir(project)
  workdir = tmp_path / "run"
  _train(digits, workdir)
  run = json.loads((workdir / "run.json").read_text())
  assert run["git"]["dirty"] is True and len(run["git"]["commit"]) == 40
  diff = (workdir / run["git"]["diff_file"]).read_text()
  assert "-print('v1')" in diff and "+print('v2')" in diff and "untracked: notes.txt" in diff
  assert run["packages"]["jax"] == jax.__version__
  assert run["packages"]["optax"] == importlib.metadata.version("optax")
  assert run["environment"]["host"]["cpu"] and run["environment"]["host"]["cpu_count"] >= 1
  assert run["environment"]["argv"][0] == sys.executable
  assert run["sharding"]["name"] == "auto" and ["embed", "fsdp"] in run["sharding"]["table"]
  assert run["initial_weights"] == {"source": "fresh", "seed": 0}
  assert run["memory"]["peak"] > 0 and run["first_chunk_seconds"] > 0
  assert run["data"]["train_fingerprint"] and run["seeds"] == {"train.seed": 0, "data.seed": 0}
  _git(project, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qam", "v2")
  (project / "notes.txt").unlink()
  _train(digits, workdir, **{"train.steps": 60})
  run = json.loads((workdir / "run.json").read_text())
  assert run["git"]["dirty"] is False and "diff_file" not in run["git"]
  assert not (workdir / "git.diff").exists()
  assert run["initial_weights"] == {"source": "resumed", "step": 40}


def test_a_profiled_run_leaves_a_trace_the_profiler_opens(tmp_path, digits):
  _train(digits, tmp_path, **{"profile.start_step": 12, "profile.steps": 10})
  window = json.loads((tmp_path / "run.json").read_text())["profile"]
  assert (window["start_step"], window["end_step"]) == (15, 25)  # whole chunks of 5 steps
  folder = pathlib.Path(window["folder"])
  assert folder.parent == tmp_path / "tb" / "plugins" / "profile"
  assert list(folder.glob("*.trace.json.gz"))  # for Perfetto
  data = jax.profiler.ProfileData.from_file(str(next(folder.glob("*.xplane.pb"))))
  names = {event.name for plane in data.planes for line in plane.lines for event in line.events}
  assert "train_chunk" in names


def test_a_full_disk_under_tensorboard_is_one_named_error(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                        capture_output=True, check=False)  # fmt: skip
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
  try:
    writer = metrics.TensorBoardWriter(mount / "tb")
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
      while True:
        os.write(fd, b"\0" * 4096)
    os.close(fd)
    with pytest.raises(
      OSError, match=rf"^could not write {mount / 'tb'}: No space left on device$"
    ):
      for step in range(1, 2000):  # a page of events fills the last free space
        writer.write(step, "train", {"loss": 1.0, "lr": 0.1})
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)
