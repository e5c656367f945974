"""Real processes (jax.distributed on 127.0.0.1) train exactly like one, resume on any count,
and never wait forever on a peer."""

import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

import jaxtrain
from jaxtrain import losses
from tests import commands, helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "train.steps": 60,
  "train.batch_size": 32,
  "train.steps_per_loop": 10,
  "train.log_every": 10,
  "eval.every_steps": 30,
  "eval.batch_size": 48,
}


def _start(workdir, overrides, num_processes=2, devices_per_process=4, *, flags=(), start=None,
           module="experiments.digits"):  # fmt: skip
  """Starts the processes (`start`: only those ids) of a job with the distributed flags."""
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(num_processes) if start is None else start:
    env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      XLA_FLAGS=commands.xla_flags(devices_per_process),
    )
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
             f"--process_id={pid}", *flags]  # fmt: skip
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", module, f"--workdir={workdir}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def _finish(procs, timeout=240):
  """Waits for every process (each under a timeout: a dead peer makes the others hang)."""
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outputs


def _launch(workdir, overrides=OVERRIDES):
  return _finish(_start(workdir, overrides))


def _lines(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, digits):
  """Also with early stopping: both processes stop at one step and restore the same best."""
  overrides = {
    **OVERRIDES,
    "eval.every_steps": 10,
    "early_stop.metric": "eval/loss",
    "early_stop.min_delta": 100.0,  # only the first evaluation improves
    "early_stop.patience": 2,  # stops at step 30, the second evaluation without improvement
    "early_stop.restore_best": True,
  }
  codes, outputs = _launch(tmp_path / "multi", overrides)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  run = json.loads((tmp_path / "multi" / "run.json").read_text())
  assert run["environment"]["process_count"] == 2
  assert run["environment"]["device_count"] == 8
  assert (run["status"], run["final_step"], run["best_step"]) == ("stopped_early", 30, 10)

  config = helpers.tiny_config(**overrides)
  config.model.hidden = (128,)
  jaxtrain.train(
    config, helpers.mlp((128,)), digits, losses.classification, workdir=tmp_path / "single"
  )
  single_run = json.loads((tmp_path / "single" / "run.json").read_text())
  assert run["eval"] == pytest.approx(single_run["eval"], abs=1e-5)  # the best step's metrics
  multi, single = _lines(tmp_path / "multi"), _lines(tmp_path / "single")
  assert [(x["step"], x["split"]) for x in multi] == [(x["step"], x["split"]) for x in single]
  for a, b in zip(multi, single, strict=True):
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path, digits):
  """The stop vote in the compiled chunk: every process saves the same step, then resumes."""
  overrides = {
    **OVERRIDES,
    "train.steps": 300,
    "ckpt.every_steps": 100,
    "eval.every_steps": 150,
    "train.log_every": 50,
  }
  workdir = tmp_path / "multi"
  procs = _start(workdir, overrides)
  deadline = time.monotonic() + 120
  while not (workdir / "checkpoints" / "100").is_dir():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.01)
  procs[0].send_signal(signal.SIGTERM)  # the notice reaches one process only
  codes, outputs = _finish(procs)
  assert codes == [3, 3], outputs[0][-3000:] + outputs[1][-3000:]
  run = json.loads((workdir / "run.json").read_text())
  stopped_at = run["final_step"]
  assert run["status"] == "preempted" and 100 <= stopped_at < 300
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()

  codes, outputs = _launch(workdir, overrides)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  run = json.loads((workdir / "run.json").read_text())
  assert run["status"] == "completed" and run["resumed_from"] == stopped_at

  config = helpers.tiny_config(**overrides)
  config.model.hidden = (128,)
  jaxtrain.train(
    config, helpers.mlp((128,)), digits, losses.classification, workdir=tmp_path / "single"
  )
  multi, single = _lines(workdir), _lines(tmp_path / "single")
  assert [(x["step"], x["split"]) for x in multi] == [(x["step"], x["split"]) for x in single]
  for a, b in zip(multi, single, strict=True):
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def _single(tmp_path, digits, overrides, name="single"):
  """The uninterrupted one-process run on this process's 8 devices; its metric lines."""
  config = helpers.tiny_config(**overrides)
  config.model.hidden = (128,)
  jaxtrain.train(config, helpers.mlp((128,)), digits, losses.classification,
                 workdir=tmp_path / name)  # fmt: skip
  return _lines(tmp_path / name)


@pytest.fixture(scope="module")
def single(tmp_path_factory, digits):
  """The metric lines of the uninterrupted one-process run with OVERRIDES, shared read-only."""
  return _single(tmp_path_factory.mktemp("single"), digits, OVERRIDES)


def _assert_same_run(lines, single):
  assert [(x["step"], x["split"]) for x in lines] == [(x["step"], x["split"]) for x in single]
  for a, b in zip(lines, single, strict=True):
    for key in ("loss", "accuracy"):
      if key in b:
        assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)


def test_saved_on_two_processes_resumes_on_one(tmp_path, digits, single):
  workdir = tmp_path / "run"
  codes, outputs = _launch(workdir, {**OVERRIDES, "train.steps": 30})
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  config = helpers.tiny_config(**OVERRIDES)
  config.model.hidden = (128,)
  result = jaxtrain.train(config, helpers.mlp((128,)), digits, losses.classification,
                          workdir=workdir)  # fmt: skip
  assert result.status == "completed"
  run = json.loads((workdir / "run.json").read_text())
  assert (run["resumed_from"], run["environment"]["process_count"]) == (30, 1)
  _assert_same_run(_lines(workdir), single)


def test_saved_on_one_process_resumes_on_two(tmp_path, digits, single):
  workdir = tmp_path / "run"
  config = helpers.tiny_config(**{**OVERRIDES, "train.steps": 30})
  config.model.hidden = (128,)
  jaxtrain.train(config, helpers.mlp((128,)), digits, losses.classification, workdir=workdir)
  codes, outputs = _launch(workdir)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  run = json.loads((workdir / "run.json").read_text())
  assert (run["resumed_from"], run["environment"]["process_count"]) == (30, 2)
  _assert_same_run(_lines(workdir), single)


def test_saved_on_one_device_resumes_on_eight(tmp_path, digits, single):
  workdir = tmp_path / "run"
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": 30}.items()]
  one = commands.run(["experiments.digits", f"--workdir={workdir}", *args], cwd=ROOT,
                     env=helpers.subprocess_env(), timeout=240)  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  assert json.loads((workdir / "run.json").read_text())["environment"]["device_count"] == 1
  config = helpers.tiny_config(**OVERRIDES)
  config.model.hidden = (128,)
  jaxtrain.train(config, helpers.mlp((128,)), digits, losses.classification, workdir=workdir)
  run = json.loads((workdir / "run.json").read_text())
  assert (run["resumed_from"], run["environment"]["device_count"]) == (30, 8)
  _assert_same_run(_lines(workdir), single)


def test_a_killed_peer_ends_the_other_within_the_peer_timeout(tmp_path):
  overrides = {**OVERRIDES, "train.steps": 100_000, "eval.every_steps": 0, "ckpt.every_steps": 0}
  workdir = tmp_path / "run"
  procs = _start(workdir, overrides, flags=["--peer_timeout=5"])
  deadline = time.monotonic() + 120
  while not (workdir / "metrics.jsonl").exists() or not _lines(workdir):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  codes, outputs = _finish(procs, timeout=60)
  waited = time.monotonic() - killed
  assert codes[0] != 0 and waited < 30, (codes, waited, outputs[0][-3000:])
  # JAX's heartbeat check ends it, or gloo does first when the peer dies mid-collective.
  assert any(s in outputs[0] for s in ("stopped sending heartbeats", "Socket closed", "gloo"))


def test_a_peer_that_never_starts_ends_the_other_in_one_line(tmp_path):
  started = time.monotonic()
  procs = _start(tmp_path / "run", OVERRIDES, flags=["--init_timeout=3"], start=[0])
  codes, outputs = _finish(procs, timeout=60)
  assert codes == [1] and time.monotonic() - started < 30, outputs[0][-3000:]
  assert outputs[0].strip().splitlines()[-1] == (
    "error: process 0 of 2 could not join the coordinator at "
    f"{_address(outputs[0])} within --init_timeout=3 s; is every process started, with the same "
    "address and --num_processes?"
  )
  assert not (tmp_path / "run").exists()


def _address(output):
  return output.split("the coordinator at ")[1].split(" ")[0]


@pytest.mark.parametrize(
  "flags,expected",
  [
    (["--coordinator_address=127.0.0.1:1234"], "set all of --coordinator_address, "
     "--num_processes and --process_id, or none (JAX then detects the cluster)"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     "process id 2 must be in [0, 2) for 2 processes"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
     "coordinator address 'localhost' must be host:port"),
  ],
  ids=["partial", "bad-id", "no-port"],
)  # fmt: skip
def test_bad_distributed_flags_are_one_line(tmp_path, flags, expected):
  result = helpers.digits_cli(tmp_path / "run", *flags)
  assert (result.returncode, result.stderr.strip()) == (2, f"error: {expected}")


LM = {
  "model.d_model": 64,
  "model.layers": 2,
  "model.heads": 4,
  "model.kv_heads": 4,
  "model.mlp": 128,
  "model.seq_len": 32,
  "train.steps": 10,
  "train.steps_per_loop": 5,
  "train.log_every": 5,
  "train.batch_size": 16,
  "eval.every_steps": 0,
  "eval.batch_size": 64,
  "optim.warmup_steps": 2,
  "data.limit_bytes": 200_000,  # the first sources, not all 12 MB: the same run, sooner
}


def test_the_language_model_on_two_processes_matches_one_device(tmp_path):
  """The same `python -m experiments.lm` command: 2 processes x 4 devices, FSDP x TP."""
  sharded = {**LM, "mesh.rules": "fsdp_tp", "mesh.fsdp": 4, "mesh.tensor": 2}
  procs = _start(tmp_path / "two", sharded, module="experiments.lm", flags=["--sample_tokens=4"])
  codes, outputs = _finish(procs)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  args = [f"--config.{k}={v}" for k, v in LM.items()]
  one = commands.run(["experiments.lm", f"--workdir={tmp_path / 'one'}", "--sample_tokens=4",
                      *args], cwd=ROOT, env=helpers.subprocess_env(),
                     timeout=240)  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  run = json.loads((tmp_path / "two" / "run.json").read_text())
  assert run["environment"]["device_count"] == 8 and run["environment"]["process_count"] == 2
  _assert_same_run(_lines(tmp_path / "two"), _lines(tmp_path / "one"))
