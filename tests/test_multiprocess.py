"""Two real processes (jax.distributed on 127.0.0.1) train exactly like one."""

import json
import os
import subprocess
import sys

import portpicker
import pytest

import jaxtrain
from jaxtrain import losses
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "train.steps": 60,
  "train.batch_size": 32,
  "train.steps_per_loop": 10,
  "train.log_every": 10,
  "eval.every_steps": 30,
  "eval.batch_size": 48,
}


def _launch(workdir, num_processes=2, devices_per_process=4, timeout=240):
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(num_processes):
    env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(pid),
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    )
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outputs


def _lines(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, digits):
  codes, outputs = _launch(tmp_path / "multi")
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  run = json.loads((tmp_path / "multi" / "run.json").read_text())
  assert run["environment"]["process_count"] == 2
  assert run["environment"]["device_count"] == 8

  config = helpers.tiny_config(**OVERRIDES)
  config.model.hidden = (128,)
  jaxtrain.train(
    config, helpers.mlp((128,)), digits, losses.classification, workdir=tmp_path / "single"
  )
  multi, single = _lines(tmp_path / "multi"), _lines(tmp_path / "single")
  assert [(x["step"], x["split"]) for x in multi] == [(x["step"], x["split"]) for x in single]
  for a, b in zip(multi, single, strict=True):
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
