"""The workdir as users name and reuse it: paths, the lock, what a rerun may change, the output."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import jaxtrain
from jaxtrain import config as config_lib
from jaxtrain import losses, resume, workdir
from tests import commands, helpers
from tests import test_checkpoint as damage

ROOT = pathlib.Path(helpers.ROOT)


def _cli(args, cwd, env=None, timeout=180, fresh=False):
  """Runs `python -m experiments.digits ARGS` through the fork server.

  `fresh`: in a new interpreter instead, where a test asserts all that the command prints.
  """
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
  if not fresh:
    return commands.run(["experiments.digits", *args], cwd=cwd, env=env, timeout=timeout)
  return subprocess.run([sys.executable, "-m", "experiments.digits", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=cwd, env=env, check=False)  # fmt: skip


QUICK = ["--config.train.steps=20", "--config.train.log_every=10", "--config.eval.every_steps=10"]


def test_resolve_makes_paths_absolute_once(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert workdir.resolve("runs/a") == tmp_path / "runs" / "a"
  assert workdir.resolve(".") == tmp_path
  assert workdir.resolve("~/runs/b") == tmp_path / "home" / "runs" / "b"
  assert workdir.resolve(None) is None
  for empty in ("", "  "):
    with pytest.raises(jaxtrain.ConfigError, match="workdir is empty"):
      workdir.resolve(empty)
  for bad in (123, b"runs/a", ["runs"], "runs/\0x"):
    with pytest.raises(jaxtrain.ConfigError, match="workdir"):
      workdir.resolve(bad)
  assert list(tmp_path.iterdir()) == []  # resolving creates nothing


def test_relative_dot_and_home_workdirs_from_the_command_line(tmp_path):
  home, here = tmp_path / "home", tmp_path / "here"
  home.mkdir()
  here.mkdir()
  for args, where in ((["--workdir=."], here), (["--workdir=~/runs/x"], home / "runs" / "x")):
    result = _cli([*args, *QUICK], cwd=here, env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((where / "run.json").read_text())
    assert run["status"] == "completed" and run["workdir"] == str(where)
    assert [int(p.name) for p in (where / "checkpoints").iterdir()] == [20]
  assert not (here / "~").exists()  # `~` is expanded, never made a folder


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", "import sys, time; from jaxtrain import workdir as w; "
     f"w.Lock(w.resolve({str(tmp_path / 'run')!r})); print('held', flush=True); time.sleep(60)"],
    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(jaxtrain.ConfigError, match=rf"in use by process {holder.pid} on "):
      workdir.Lock(tmp_path / "run")
    result = _cli(["--workdir=run", *QUICK], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"workdir {tmp_path / 'run'} is in use by process {holder.pid}" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
  finally:
    holder.kill()
    holder.wait()
  lock = workdir.Lock(tmp_path / "run")  # the dead holder's lock is gone with it
  lock.release()
  assert not (tmp_path / "run" / ".lock").exists()


def test_a_lock_on_a_new_folder_leaves_nothing_when_released(tmp_path):
  lock = workdir.Lock(tmp_path / "a" / "b")
  assert (tmp_path / "a" / "b" / ".lock").is_file()
  lock.release()
  assert list(tmp_path.iterdir()) == []


def _train(path, digits, resume="auto", **overrides):
  config = helpers.tiny_config(**{"ckpt.every_steps": 20, **overrides})
  return jaxtrain.train(
    config, helpers.mlp(), digits, losses.classification, workdir=path, resume=resume
  )


def test_a_changed_config_is_refused_naming_every_changed_key(tmp_path, digits):
  _train(tmp_path, digits)
  snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(jaxtrain.ConfigError) as refused:
    _train(tmp_path, digits, **{"optim.lr": 0.01, "train.seed": 3, "train.steps": 60})
  message = str(refused.value)
  assert message.startswith("the config differs from the checkpoint at step 40: ")
  assert "optim.lr 0.001 -> 0.01, train.seed 0 -> 3;" in message  # train.steps may change
  assert "\n" not in message
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_what_a_resume_may_change(tmp_path, digits):
  _train(tmp_path, digits)
  allowed = {
    "train.steps": 60,
    "train.log_every": 20,
    "eval.every_steps": 40,
    "ckpt.every_steps": 60,
    "ckpt.keep": 2,
    "data.workers": 0,
    "mesh.data": 2,
    "mesh.fsdp": 4,
  }
  assert set(allowed) <= set(resume.RESUMABLE)
  result = _train(tmp_path, digits, **allowed)
  run = json.loads((tmp_path / "run.json").read_text())
  assert (run["status"], run["resumed_from"], run["final_step"]) == ("completed", 40, 60)
  assert run["forced_changes"] is None and result.status == "completed"


def test_resume_never_and_force(tmp_path, digits):
  first = _train(tmp_path, digits)
  with pytest.raises(
    jaxtrain.ConfigError, match=r"holds checkpoints \(20, 40\) and resume is never"
  ):
    _train(tmp_path, digits, resume="never")
  forced = _train(tmp_path, digits, resume="force", **{"optim.lr": 0.01, "train.steps": 60})
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["forced_changes"] == {"optim.lr": [0.001, 0.01]}
  assert (run["resumed_from"], run["final_step"]) == (40, 60)
  assert helpers.max_abs_diff(forced.state.params, first.state.params) > 0
  with pytest.raises(jaxtrain.ConfigError, match="resume='sometimes' must be one of"):
    _train(tmp_path / "other", digits, resume="sometimes")
  assert not (tmp_path / "other").exists()


def test_no_workdir_trains_into_a_fresh_temporary_folder(digits):
  result = jaxtrain.train(helpers.tiny_config(), helpers.mlp(), digits, losses.classification)
  try:
    assert result.workdir.is_absolute() and result.workdir.name.startswith("jaxtrain-")
    assert json.loads((result.workdir / "run.json").read_text())["status"] == "completed"
    shown = repr(result)
    assert shown.startswith("TrainResult(status='completed', step=40, eval_metrics={'accuracy': ")
    assert shown.endswith(f"workdir='{result.workdir}')") and len(shown) < 200
  finally:
    shutil.rmtree(result.workdir)


def test_a_normal_run_prints_only_its_bar_and_the_help_lists_every_key(tmp_path):
  result = _cli(["--workdir=run", *QUICK], cwd=tmp_path, fresh=True)
  assert result.returncode == 0, result.stderr[-3000:]
  logged = [line for line in re.split(r"[\r\n]", result.stderr) if re.match(r"[IWE]\d{4} ", line)]
  assert logged == []  # no INFO (or other) log lines of jax, jaxtrain or Orbax
  again = _cli(["--workdir=run", *QUICK], cwd=tmp_path, fresh=True)  # one note, no bar
  assert again.stderr.strip() == (
    f"resuming from the checkpoint at step 20 in {tmp_path / 'run'}\n"
    "step 20 is train.steps=20: nothing to train (raise it to go on)"
  )
  shown = _cli(["--help"], cwd=tmp_path)
  assert shown.returncode == 0
  from experiments import digits  # noqa: PLC0415

  for key, value in config_lib.flatten(digits.get_config()):
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith(f"{key}="))
    assert line.strip().startswith(f"{key}={value!r}")
    meaning = (
      config_lib.DEFAULTS[key][1]
      if key in config_lib.DEFAULTS
      else digits.MODEL_HELP[key.removeprefix("model.")]
    )
    assert meaning in shown.stdout, key
  assert "--resume: <auto|never|force>" in shown.stdout


def test_an_override_written_with_a_space(tmp_path):
  result = _cli(["--workdir=run", "--config.train.steps", "30", "--config.train.log_every=10"],
                cwd=tmp_path)  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / "run" / "run.json").read_text())["final_step"] == 30


EIGHT = {"XLA_FLAGS": commands.xla_flags(8)}
SHARDED = ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.ckpt.every_steps=10", *QUICK]


@pytest.fixture(scope="module")
def saved_twice(tmp_path_factory):
  """A run on an FSDP mesh of 8 devices with steps 10 and 20 saved (sharded arrays)."""
  path = tmp_path_factory.mktemp("saved") / "run"
  result = _cli([f"--workdir={path}", *SHARDED], cwd=ROOT, env=EIGHT)
  assert result.returncode == 0, result.stderr[-3000:]
  return path


@pytest.mark.parametrize(
  "harm",
  [damage._truncate, damage._zero, damage._delete, damage._torn_meta],
  ids=["truncated", "zeroed", "deleted-file", "torn-metadata"],
)
def test_a_damaged_step_is_reported_in_one_line(saved_twice, tmp_path, harm):
  path = tmp_path / "run"
  shutil.copytree(saved_twice, path)
  harm(path / "checkpoints" / "20")
  result = _cli([f"--workdir={path}", *SHARDED, "--config.train.steps=30"], cwd=ROOT, env=EIGHT)
  assert result.returncode == 0, result.stderr[-3000:]
  progress = lambda x: "step/s" in x or x.startswith("step ")  # noqa: E731 (bar or plain lines)
  lines = [x for x in re.split(r"[\r\n]", result.stderr) if x.strip() and not progress(x)]
  assert len(lines) == 2, lines  # the damaged step, then where the run resumes
  assert "checkpoint step 20 is unreadable (" in lines[0] and "set aside as 20.corrupt" in lines[0]
  assert lines[1] == f"resuming from the checkpoint at step 10 in {path}"


def test_only_set_aside_steps_keep_refusing_a_fresh_start(saved_twice, tmp_path):
  path = tmp_path / "run"
  shutil.copytree(saved_twice, path)
  for step in ("10", "20"):
    damage._torn_meta(path / "checkpoints" / step)
  metrics = (path / "metrics.jsonl").read_bytes()
  for attempt in range(2):  # the first sets the steps aside, the second finds them so
    result = _cli([f"--workdir={path}", *SHARDED], cwd=ROOT, env=EIGHT)
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "every step is set aside as unreadable (10.corrupt, 20.corrupt)" in errors[0]
    assert "move those folders out of checkpoints/" in errors[0]
    run = json.loads((path / "run.json").read_text())
    assert run["status"] == "failed" and "CheckpointError" in run["reason"], attempt
    assert (path / "metrics.jsonl").read_bytes() == metrics  # the records are kept
  for folder in (path / "checkpoints").glob("*.corrupt"):
    shutil.move(folder, tmp_path / folder.name)
  result = _cli([f"--workdir={path}", *SHARDED], cwd=ROOT, env=EIGHT)  # moved away: afresh
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((path / "run.json").read_text())["resumed_from"] is None


def test_checkpoints_saved_before_configs_were_recorded_still_resume(tmp_path, digits):
  """An older checkpoint's record holds only the data order: that is what a resume checks."""
  _train(tmp_path, digits)
  for meta_file in (tmp_path / "checkpoints").glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["data_order"] = {"train.batch_size": 32, "train.seed": 0}
    del meta["config"]
    meta_file.write_text(json.dumps(meta))
  with pytest.raises(jaxtrain.ConfigError, match=r"train\.batch_size=64 differs from 32"):
    _train(tmp_path, digits, **{"train.batch_size": 64})
  resumed = _train(tmp_path, digits, **{"optim.lr": 0.01, "train.steps": 60})
  run = json.loads((tmp_path / "run.json").read_text())
  assert (run["resumed_from"], run["final_step"], resumed.status) == (40, 60, "completed")


def test_a_failed_metric_write_names_the_file():
  writer = jaxtrain.metrics.JsonlWriter(pathlib.Path("/dev/full"))  # every write: ENOSPC
  with pytest.raises(OSError, match=r"^could not write /dev/full: No space left on device$"):
    writer.write(10, "train", {"loss": 1.0})


def test_the_compile_cache_folder_is_chosen_once_and_can_be_off(tmp_path, monkeypatch):
  import jax  # noqa: PLC0415

  from jaxtrain import cache  # noqa: PLC0415

  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert cache.enable("off") is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("JAXTRAIN_COMPILE_CACHE", str(tmp_path / "env"))
    assert cache.enable("") == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache.enable(str(tmp_path / "other")) == tmp_path / "env"  # JAX's own setting wins
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
