"""Killed, preempted and resumed runs, as real processes, equal an uninterrupted run."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import digits as digits_experiment
from jaxtrain import checkpoint, models, optim, parts
from jaxtrain import state as state_lib
from tests import commands, helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["--config.ckpt.every_steps=100", "--config.train.log_every=50"]
TIMING = ("steps_per_sec", "samples_per_sec", "data_wait_frac", "time")


def _start(workdir, *extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *ARGS, *extra],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _run(workdir, *extra, fresh=False):
  """Runs `_start`'s command to its end, through the fork server (nothing signals it).

  `fresh`: in a new interpreter instead, where a test asserts all of its stderr.
  """
  if fresh:
    proc = _start(workdir, *extra)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err
  done = commands.run(["experiments.digits", f"--workdir={workdir}", *ARGS, *extra], cwd=ROOT,
                      env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=180)  # fmt: skip
  return done.returncode, done.stderr


def _lines(workdir):
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out.append({k: v for k, v in record.items() if k not in TIMING})
  return out


def _final_state(workdir):
  config = digits_experiment.get_config()
  tx, _ = optim.from_settings(parts.optim_settings(config), multiplier=False)  # the experiment's
  model = functools.partial(models.MLP, 64, config.model.hidden, 10)
  _, abstract = state_lib.abstract_state(model, tx, seed=0, mesh=helpers.mesh((1, 1, 1), n=1))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
  restored = ckpt.restore(abstract)
  ckpt.close()
  return restored


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  code, err = _run(workdir)
  assert code == 0, err[-3000:]
  return workdir, _final_state(workdir), _lines(workdir)


def _assert_same_run(workdir, reference):
  _, ref_state, ref_lines = reference
  restored = _final_state(workdir)
  assert restored.step == ref_state.step == 600
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(ref_state.state), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # bit-exact
  assert _lines(workdir) == ref_lines  # every logged value, timing aside
  run = json.loads((workdir / "run.json").read_text())
  assert run["status"] == "completed" and run["final_step"] == 600
  assert run["train_chunk_compilations"] == 1


@pytest.mark.parametrize("kill_after", [100, 300])
def test_sigkill_then_rerun_is_bit_exact(tmp_path, reference, kill_after):
  proc = _start(tmp_path)
  helpers.wait_for((tmp_path / "checkpoints" / str(kill_after)).is_dir, proc)
  proc.kill()
  proc.wait()
  code, err = _run(tmp_path)
  assert code == 0, err[-3000:]
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["attempt"] == 2 and run["resumed_from"] >= kill_after
  _assert_same_run(tmp_path, reference)


def test_sigkill_before_the_first_checkpoint(tmp_path, reference):
  proc = _start(tmp_path)
  metrics = tmp_path / "metrics.jsonl"
  helpers.wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc)
  proc.kill()
  proc.wait()
  assert not list((tmp_path / "checkpoints").iterdir())
  code, err = _run(tmp_path)
  assert code == 0, err[-3000:]
  assert json.loads((tmp_path / "run.json").read_text())["resumed_from"] is None
  _assert_same_run(tmp_path, reference)


def test_sigkill_during_an_async_save(tmp_path, reference):
  """Saving every chunk, the kill lands while a step is still a temporary folder."""
  every_chunk = "--config.ckpt.every_steps=10"
  proc = _start(tmp_path, every_chunk)
  folder = tmp_path / "checkpoints"
  caught = []

  def saving():
    if (folder / "200").is_dir():
      caught.extend(p.name for p in folder.glob("*orbax-checkpoint-tmp*"))
    return bool(caught)

  helpers.wait_for(saving, proc)
  proc.kill()
  proc.wait()
  assert caught  # a save was in flight when the process died
  code, err = _run(tmp_path, every_chunk)
  assert code == 0, err[-3000:]
  assert not list(folder.glob("*tmp*"))
  _assert_same_run(tmp_path, reference)


def test_resumed_twice(tmp_path, reference):
  for kill_after in (100, 300):
    proc = _start(tmp_path)
    helpers.wait_for(lambda k=kill_after: (tmp_path / "checkpoints" / str(k)).is_dir(), proc)
    proc.kill()
    proc.wait()
  code, err = _run(tmp_path)
  assert code == 0, err[-3000:]
  assert json.loads((tmp_path / "run.json").read_text())["attempt"] == 3
  _assert_same_run(tmp_path, reference)


def test_sigterm_saves_and_exits_then_resumes(tmp_path, reference):
  proc = _start(tmp_path)
  helpers.wait_for((tmp_path / "checkpoints" / "100").is_dir, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 3, err[-3000:]
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["status"] == "preempted" and "SIGTERM" in run["reason"]
  stopped_at = run["final_step"]
  assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
  assert stopped_at < 600
  code, err = _run(tmp_path)
  assert code == 0, err[-3000:]
  assert json.loads((tmp_path / "run.json").read_text())["resumed_from"] == stopped_at
  _assert_same_run(tmp_path, reference)


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs, where mounting is allowed (root)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
  )
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_run_and_keeps_the_saved_steps(small_disk, tmp_path, reference):
  workdir, args = small_disk / "run", ("--config.ckpt.keep=20", "--config.ckpt.every_steps=50")
  code, err = _run(workdir, *args, fresh=True)
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 1 and len(errors) == 1, err[-3000:]
  # Orbax's thread tracebacks go to log.txt: the terminal has the progress and our one line.
  assert [x for x in err.splitlines() if x and not x.startswith("step ")] == errors, err[-3000:]
  # Whichever write meets the full disk first (a checkpoint or a metric line) is named.
  assert errors[0].startswith(("error: checkpoint save failed", "error: could not write")), errors
  assert "No space left" in errors[0]
  run = json.loads((workdir / "run.json").read_text())
  assert run["status"] == "failed" and "No space left" in run["reason"]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 600
  # Move the run to a roomier disk: it resumes from the last saved step and ends the same.
  moved = tmp_path / "moved"
  subprocess.run(["cp", "-r", str(workdir), str(moved)], check=True)
  code, err = _run(moved, *args)
  assert code == 0, err[-3000:]
  assert json.loads((moved / "run.json").read_text())["resumed_from"] == saved[-1]
  _assert_same_run(moved, reference)


def test_ctrl_c_saves_and_exits_130_then_resumes(tmp_path, reference):
  proc = _start(tmp_path)
  helpers.wait_for((tmp_path / "checkpoints" / "100").is_dir, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("interrupted: Ctrl-C at step") and "rerun the same command" in last
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["status"] == "interrupted" and run["reason"] in last
  stopped_at = run["final_step"]
  assert stopped_at < 600 and (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
  code, err = _run(tmp_path)
  assert code == 0, err[-3000:]
  assert json.loads((tmp_path / "run.json").read_text())["resumed_from"] == stopped_at
  _assert_same_run(tmp_path, reference)


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_temporary_folder(tmp_path):
  """Chunks of a slow source take a second to come: the second Ctrl-C lands while waiting."""
  args = ["--case=slow", "--config.train.steps=200", "--config.ckpt.every_steps=10"]
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-m", "tests.user_experiment", f"--workdir={workdir}", *args],
    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  helpers.wait_for((workdir / "checkpoints" / "20").is_dir, proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == (
    "error: stopped at once by Ctrl-C; rerun the same command to resume"
  )
  run = json.loads((workdir / "run.json").read_text())
  assert run["status"] == "interrupted" and "a second Ctrl-C" in run["reason"]
  assert run["final_step"] < 200
  assert not list((workdir / "checkpoints").glob("*tmp*"))
  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir())
  rerun = commands.run(["tests.user_experiment", f"--workdir={workdir}", *args], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=180)  # fmt: skip
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  run = json.loads((workdir / "run.json").read_text())
  assert (run["status"], run["resumed_from"], run["final_step"]) == ("completed", saved, 200)
