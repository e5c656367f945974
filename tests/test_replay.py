"""Replay: a run reruns from its record and matches step by step; changed code or data refuse."""

import json
import os
import subprocess
import sys

import pytest

from jaxtrain import replay
from tests import commands, helpers


def _git(cwd, *args):
  subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", *args], cwd=cwd, check=True,
                 capture_output=True)  # fmt: skip


def _run(cwd, *args):
  env = dict(os.environ, XLA_FLAGS=commands.xla_flags())  # one device, like a laptop
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=240, check=False, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
  """A clean git checkout holding a finished digits run in runs/a."""
  root = tmp_path_factory.mktemp("project")
  (root / "notes.md").write_text("v1\n")
  _git(root, "init", "-q")
  _git(root, "add", "notes.md")
  _git(root, "commit", "-qm", "v1")
  (root / ".gitignore").write_text("runs/\n.gitignore\n")
  result = _run(root, "experiments.digits", "--workdir", "runs/a", "--config.train.steps=100",
                "--config.train.log_every=20", "--config.eval.every_steps=50")  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  return root


def test_replay_of_a_clean_run_matches_exactly(project):
  result = _run(project, "jaxtrain.replay", "runs/a")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "replay matches the run: 7 metric lines, every value equal"
  assert json.loads((project / "runs/a_replay/run.json").read_text())["status"] == "completed"


def test_changed_code_is_refused_unless_forced(project):
  (project / "notes.md").write_text("v2\n")
  try:
    result = _run(project, "jaxtrain.replay", "runs/a", "--out", "runs/changed")
    assert result.returncode == 2
    assert result.stderr.strip() == (
      "error: not replaying runs/a: the uncommitted changes differ from the run's git.diff "
      "(--force replays anyway)"
    )
    assert not (project / "runs/changed").exists()
    forced = _run(project, "jaxtrain.replay", "runs/a", "--out", "runs/changed", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "warning: the uncommitted changes differ" in forced.stderr
  finally:
    (project / "notes.md").write_text("v1\n")


def test_changed_data_is_refused(project, tmp_path):
  record = json.loads((project / "runs/a/run.json").read_text())
  record["data"]["train_fingerprint"] = "0" * 64
  (project / "runs/b").mkdir()
  for name in ("config.json", "metrics.jsonl"):
    (project / "runs/b" / name).write_text((project / "runs/a" / name).read_text())
  (project / "runs/b/run.json").write_text(json.dumps(record))
  result = _run(project, "jaxtrain.replay", "runs/b")
  assert result.returncode == 2
  assert "the train data's fingerprint is " in result.stderr
  assert ", the run's 000000000000" in result.stderr


def test_compare_names_the_first_differing_value():
  run = [{"step": 10, "split": "train", "loss": 1.0, "time": 5.0, "steps_per_sec": 3.0}]
  same = [{"step": 10, "split": "train", "loss": 1.0, "time": 9.0, "steps_per_sec": 4.0}]
  assert replay.compare(run, same) == []
  other = [{"step": 10, "split": "train", "loss": 1.5}]
  assert replay.compare(run, other) == ["step 10 train: loss 1.0 in the run, 1.5 now"]
  assert replay.compare(run, other, atol=0.6) == []
  assert replay.compare(run, []) == ["step 10 train: missing from the replay"]


def test_a_run_from_python_names_no_module(tmp_path, digits):
  import jaxtrain  # noqa: PLC0415
  from jaxtrain import losses  # noqa: PLC0415

  jaxtrain.train(helpers.tiny_config(), helpers.mlp(), digits, losses.classification,
                 workdir=tmp_path / "run")  # fmt: skip
  result = _run(tmp_path, "jaxtrain.replay", "run")
  assert result.returncode == 2 and "names no experiment module" in result.stderr
