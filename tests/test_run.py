"""`jaxtrain.Run`: a run a notebook steps chunk by chunk, and populations on the same loop."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import jaxtrain
from experiments import digits as digits_experiment
from jaxtrain import metrics
from tests import commands, helpers


def _config(**overrides):
  config = helpers.tiny_config(**{"ckpt.every_steps": 0, "ckpt.async": False, **overrides})
  config.model = digits_experiment.get_config().model
  config.model.hidden = (16,)
  return config


def _lines(path):
  return [{k: v for k, v in x.items() if k != "time"} for x in metrics.read_jsonl(path)]


def _untimed(path):
  """The lines without their timings (throughput and data wait)."""
  timed = ("per_sec", "wait")
  return [{k: v for k, v in x.items() if not any(t in k for t in timed)} for x in _lines(path)]


class Collect:
  """A `metrics.Writer` that keeps what it is given."""

  def __init__(self):
    self.lines, self.closed = [], False

  def write(self, step, split, values):
    self.lines.append({"step": step, "split": split, **values})

  def close(self):
    self.closed = True


def test_a_notebook_steps_a_run_stops_saves_and_resumes_it_exactly(tmp_path):
  config = _config()
  task = digits_experiment.task(config)
  collect, ticks = Collect(), []
  with jaxtrain.Run(config, *task, workdir=tmp_path / "nb", writers=[collect]) as run:
    for tick in run:
      ticks.append(tick)
      if tick.step == 15:
        assert run.save() == 15
        break
  assert [t.step for t in ticks] == [5, 10, 15] and not any(t.stopping for t in ticks)
  assert run.result.status == "interrupted" and run.result.step == 15
  assert json.loads((tmp_path / "nb/run.json").read_text())["status"] == "interrupted"
  assert collect.closed and collect.lines == [x for t in ticks for x in t.lines]

  resumed = jaxtrain.train(config, *task, workdir=tmp_path / "nb")
  straight = jaxtrain.train(config, *task, workdir=tmp_path / "straight")
  assert resumed.status == "completed" and resumed.step == 40
  assert helpers.max_abs_diff(resumed.state.params, straight.state.params) == 0
  assert _untimed(tmp_path / "nb/metrics.jsonl") == _untimed(tmp_path / "straight/metrics.jsonl")


def test_ticks_carry_every_line_and_say_when_the_run_stops(tmp_path):
  config = _config()
  collect = Collect()
  with jaxtrain.Run(config, *digits_experiment.task(config), workdir=tmp_path,
                    writers=[collect]) as run:  # fmt: skip
    ticks = list(run)
  assert [t.step for t in ticks] == list(range(5, 45, 5))
  assert [t.stopping for t in ticks] == [False] * 7 + [True]
  written = _lines(tmp_path / "metrics.jsonl")
  assert [x for t in ticks for x in t.lines] == written == collect.lines
  assert [(x["step"], x["split"]) for x in written] == [
    (10, "train"),
    (20, "train"),
    (20, "eval"),
    (30, "train"),
    (40, "train"),
    (40, "eval"),
  ]
  assert run.result.status == "completed"


def test_a_population_killed_mid_run_resumes_exactly(tmp_path):
  command = [sys.executable, os.path.join(helpers.ROOT, "tests", "population_job.py")]
  env = helpers.subprocess_env()
  proc = subprocess.Popen([*command, str(tmp_path / "pop")], cwd=helpers.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
  ckpts, deadline = tmp_path / "pop/checkpoints", time.time() + 240
  saved = lambda: [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]  # noqa: E731
  while not (ckpts.exists() and max(saved(), default=0) >= 30):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert json.loads((tmp_path / "pop/run.json").read_text())["status"] == "running"
  # The runs nothing signals go through the fork server, the job as a module.
  job = lambda name: commands.run(["tests.population_job", str(tmp_path / name)],  # noqa: E731
                                  cwd=helpers.ROOT, env=env, timeout=300)  # fmt: skip
  done = job("pop")
  assert done.returncode == 0, done.stderr[-3000:]
  rec = json.loads((tmp_path / "pop/run.json").read_text())
  assert rec["status"] == "completed" and rec["attempt"] == 2 and rec["resumed_from"] >= 30

  straight = job("straight")
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed, alone = (json.loads((tmp_path / d / "run.json").read_text())["population"]
                   for d in ("pop", "straight"))  # fmt: skip
  assert killed["best_values"] == alone["best_values"]
  assert killed["best_member"] == alone["best_member"]
  assert _lines(tmp_path / "pop/metrics.jsonl") == _lines(tmp_path / "straight/metrics.jsonl")
  best = json.loads((tmp_path / "pop/best/run.json").read_text())
  assert best["final_step"] == 60 and np.isfinite(best["eval"]["loss"])
