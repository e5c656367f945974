"""Metric sinks: real Weights & Biases (offline) and real MLflow (local stores), read back."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

import jaxtrain
from jaxtrain import ConfigError, losses, metrics, sinks
from jaxtrain.config import flatten_dict
from tests import commands, helpers

CONFIG = {
  "optim": {"lr": 0.001, "name": "adam", "betas": [0.9, 0.999]},
  "model": {"hidden": [128, 64], "dropout": 0.0},
  "data": {"name": "digits", "dir": "", "note": "x" * 7000},  # past MLflow's 6000
  "train": {"steps": 600, "bf16": False, "seed": None},
}
LINES = [
  (10, "train", {"loss": 2.25, "lr": 1e-3, "steps_per_sec": 80.5}),
  (10, "eval", {"loss": 2.0, "accuracy": 0.25}),
  (20, "train", {"loss": float("nan"), "lr": 1e-3, "steps_per_sec": 81.0, "flag": True}),
  (30, "train", {"loss": 1.5, "lr": 5e-4, "steps_per_sec": float("inf")}),
  (30, "eval", {"loss": 1.25, "accuracy": 0.5}),
]
TIMING = ("steps_per_sec", "samples_per_sec", "data_wait_frac")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
  """W&B offline, its own files in a temporary folder; MLflow's file store allowed.

  The current folder is a temporary one too: a SQLite store puts artifacts in ./mlruns.
  """
  home = tmp_path_factory.mktemp("wandb-home")
  env = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB__DISABLE_STATS": "true",  # no system-metrics sampler (settings.x_disable_stats)
    "WANDB_DIR": str(home),
    "WANDB_CONFIG_DIR": str(home / "config"),
    "WANDB_CACHE_DIR": str(home / "cache"),
    "WANDB_DATA_DIR": str(home / "data"),
    "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
    "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps the file store behind this opt-in
  }
  with pytest.MonkeyPatch.context() as m:
    for key, value in env.items():
      m.setenv(key, value)
    m.chdir(home)
    yield


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
  """One SQLite store for the module: making its tables takes a second or two."""
  return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "file"])
def store(request, sqlite_store, tmp_path, monkeypatch):
  """An MLflow store (MLflow's default kind, SQLite, and the file store) with an experiment."""
  uri = sqlite_store if request.param == "sqlite" else (tmp_path / "mlruns").as_uri()
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"{request.node.name}-{time.time_ns()}")
  return uri


def expected(lines):
  """The `split/name: value` of each step that a sink should hold: finite numbers only."""
  out = {}
  for step, split, values in lines:
    for name, value in values.items():
      if isinstance(value, float) and math.isfinite(value):
        out.setdefault(step, {})[f"{split}/{name}"] = value
  return out


def jsonl_lines(workdir):
  """`metrics.jsonl` as `(step, split, values)`."""
  lines = metrics.read_jsonl(workdir / "metrics.jsonl")
  keep = ("step", "split", "time")
  return [(x["step"], x["split"], {k: v for k, v in x.items() if k not in keep}) for x in lines]


def without_timing(by_step):
  return {s: {k: v for k, v in row.items() if k.split("/")[1] not in TIMING}
          for s, row in by_step.items()}  # fmt: skip


# W&B: its offline transaction logs read back with `wandb leet inspect --json`.


def wandb_records(workdir):
  """Each attempt's records, oldest first: one list of JSON records a `.wandb` file."""
  out = []
  for path in {p.resolve() for p in (workdir / "wandb").glob("*/run-*.wandb")}:  # latest-run links
    shown = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                           capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    out.append([json.loads(line) for line in shown.stdout.splitlines()])
  return sorted(out, key=lambda records: _of(records, "run")[0]["start_time"])


def _of(records, kind):
  return [r[kind] for r in records if r["type"] == kind]


def wandb_history(records):
  """`{step: {key: value}}` of the history rows, W&B's own `_` keys left out."""
  out = {}
  for row in _of(records, "history"):
    step = row["step"]["num"]
    assert step not in out  # one row a step
    out[step] = {k: v for k, v in row["item"].items() if not k.startswith("_")}
  return out


def test_wandb_logs_each_line_and_the_config_and_a_resume_continues_its_run(tmp_path):
  started = time.perf_counter()
  writer = sinks.wandb_writer(tmp_path, CONFIG, resumed=False)
  for line in LINES:
    writer.write(*line)
  writer.close()
  seconds = time.perf_counter() - started
  (first,) = wandb_records(tmp_path)
  run_id = _of(first, "run")[0]["run_id"]
  assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": run_id, "step": 30}
  assert _of(first, "run")[0]["config"]["update"] == {"_wandb": {}, **CONFIG}
  assert wandb_history(first) == expected(LINES)  # NaN, inf and the bool left out
  assert seconds < 10, seconds

  # A resume from step 20's checkpoint: step 30 comes again (with new timings), then 40.
  again = [(30, "train", {"loss": 1.5, "lr": 5e-4, "steps_per_sec": 99.0}),
           (30, "eval", {"loss": 1.25, "accuracy": 0.5}),
           (40, "train", {"loss": 1.0, "lr": 5e-4, "steps_per_sec": 90.0})]  # fmt: skip
  writer = sinks.wandb_writer(tmp_path, CONFIG, resumed=True)
  for line in again:
    writer.write(*line)
  writer.close()
  first, second = wandb_records(tmp_path)
  assert _of(second, "run")[0]["run_id"] == run_id and _of(second, "run")[0]["resume"]
  assert wandb_history(second) == expected(again[2:])  # step 30 is not sent twice
  held = {**wandb_history(first), **wandb_history(second)}
  assert held == expected([*LINES, *again[2:]])
  assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": run_id, "step": 40}

  # A fresh start (no checkpoint to resume) is a new W&B run.
  writer = sinks.wandb_writer(tmp_path, CONFIG, resumed=False)
  writer.close()
  assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] not in (run_id, None)


def test_wandb_keeps_a_step_the_kill_left_unfinished(tmp_path):
  """A step whose row W&B had not committed is not recorded as held: a resume sends it."""
  writer = sinks.wandb_writer(tmp_path, CONFIG, resumed=False)
  writer.write(10, "train", {"loss": 2.0})
  writer.write(20, "train", {"loss": 1.0})  # commits step 10's row; 20's stays open
  assert json.loads((tmp_path / "wandb_run.json").read_text())["step"] == 10
  writer.run.finish()  # as a kill leaves the record: the writer never closed
  writer = sinks.wandb_writer(tmp_path, CONFIG, resumed=True)
  writer.write(20, "train", {"loss": 1.0})
  writer.write(20, "eval", {"accuracy": 0.75})
  writer.close()
  first, second = wandb_records(tmp_path)
  assert wandb_history(first)[10] == {"train/loss": 2.0}
  assert wandb_history(second) == {20: {"train/loss": 1.0, "eval/accuracy": 0.75}}


# MLflow: read back through MlflowClient.


def mlflow_history(run_id, keys):
  """`{step: {key: value}}`, asserting one value a step."""
  client, out = mlflow.MlflowClient(), {}
  for key in keys:
    for m in client.get_metric_history(run_id, key):
      row = out.setdefault(m.step, {})
      assert key not in row, (key, m.step)
      row[key] = m.value
  return out


def experiment_runs():
  client = mlflow.MlflowClient()
  found = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
  return client.search_runs([found.experiment_id]) if found else []


def test_mlflow_logs_each_line_and_the_config_and_a_resume_continues_its_run(
  tmp_path, store, caplog
):
  writer = sinks.mlflow_writer(tmp_path, CONFIG, resumed=False)
  for line in LINES:
    writer.write(*line)
  writer.close()
  (run,) = experiment_runs()
  run_id = run.info.run_id
  assert json.loads((tmp_path / "mlflow_run.json").read_text()) == {"id": run_id}
  assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
  assert set(run.data.metrics) == {"train/loss", "train/lr", "train/steps_per_sec",
                                   "eval/loss", "eval/accuracy"}  # fmt: skip
  assert mlflow_history(run_id, run.data.metrics) == expected(LINES)
  params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten_dict(CONFIG).items()}
  params["data.note"] = "x" * 5997 + "..."
  assert run.data.params == params
  assert params["optim.betas"] == "[0.9, 0.999]" and params["train.seed"] == "null"
  config_json = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
  assert config_json == CONFIG  # the long value whole

  # A resume from step 20's checkpoint, with one config value changed.
  again = [(30, "train", {"loss": 1.5, "lr": 5e-4, "steps_per_sec": 99.0}),
           (30, "eval", {"loss": 1.25, "accuracy": 0.5}),
           (40, "train", {"loss": 1.0, "lr": 5e-4, "steps_per_sec": 90.0})]  # fmt: skip
  changed = {**CONFIG, "train": {**CONFIG["train"], "steps": 800, "new_key": 1}}
  with caplog.at_level(logging.WARNING):
    writer = sinks.mlflow_writer(tmp_path, changed, resumed=True)
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert (
    warning == f"MLflow run {run_id} keeps its params; changed since: train.steps (see config.json)"
  )
  assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
  for line in again:
    writer.write(*line)
  writer.close()
  (run,) = experiment_runs()  # the same run, not a second one
  assert run.info.run_id == run_id and run.info.status == "FINISHED"
  # Each metric once a step: step 30's steps_per_sec was inf, so the resume's is the first.
  assert mlflow_history(run_id, run.data.metrics) == expected([*LINES, *again])
  assert run.data.params == {**params, "train.new_key": "1"}  # MLflow keeps train.steps=600
  assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json") == changed

  writer = sinks.mlflow_writer(tmp_path, CONFIG, resumed=False)  # a fresh start: a new run
  writer.close()
  assert len(experiment_runs()) == 2


def test_mlflow_resume_keeps_a_metric_the_kill_left_out(tmp_path, store):
  """Killed between step 20's train and eval lines: the resume sends only the eval one."""
  writer = sinks.mlflow_writer(tmp_path, CONFIG, resumed=False)
  writer.write(20, "train", {"loss": 1.0})
  writer = sinks.mlflow_writer(tmp_path, CONFIG, resumed=True)
  writer.write(20, "train", {"loss": 1.0})
  writer.write(20, "eval", {"accuracy": 0.75})
  writer.close()
  (run,) = experiment_runs()
  assert mlflow_history(run.info.run_id, run.data.metrics) == {
    20: {"train/loss": 1.0, "eval/accuracy": 0.75}
  }


def test_mlflow_refuses_a_recorded_run_its_store_lacks(tmp_path, store, monkeypatch):
  sinks.mlflow_writer(tmp_path, CONFIG, resumed=False).close()
  monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
  with pytest.raises(ConfigError, match="is not in the store MLFLOW_TRACKING_URI picks") as e:
    sinks.mlflow_writer(tmp_path, CONFIG, resumed=True)
  assert "\n" not in str(e.value)


def test_writers_send_each_line_to_extra_writers_in_process_0_only(tmp_path, store):
  extra = sinks.from_flags(tmp_path, CONFIG, wandb=False, mlflow=True, resumed=False)
  writers = metrics.Writers(tmp_path, enabled=True, extra=extra)
  for line in LINES:
    writers.write(*line)
  assert writers.lines_at(30) == [x for x in metrics.read_jsonl(tmp_path / "metrics.jsonl")
                                  if x["step"] == 30]  # fmt: skip
  writers.close()
  (run,) = experiment_runs()
  assert run.info.status == "FINISHED"
  assert mlflow_history(run.info.run_id, run.data.metrics) == expected(jsonl_lines(tmp_path))

  other = tmp_path / "process1"
  other.mkdir()
  extra = sinks.from_flags(other, CONFIG, wandb=False, mlflow=True, resumed=False)
  writers = metrics.Writers(other, enabled=False, extra=extra)
  writers.write(*LINES[0])
  writers.close()
  run = mlflow.MlflowClient().get_run(extra[0].run_id)
  assert run.data.metrics == {} and run.info.status == "FINISHED"  # closed, given nothing
  assert sinks.from_flags(tmp_path, CONFIG, wandb=False, mlflow=False, resumed=False) == []


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, name):
  monkeypatch.setitem(sys.modules, name, None)  # as if not installed
  with pytest.raises(ConfigError) as e:
    sinks.from_flags(tmp_path, CONFIG, wandb=True, mlflow=True, resumed=False)
  assert str(e.value) == (
    f"logging.{name}=true needs the {name} package: pip install 'jaxtrain[{name}]'"
  )
  assert not list(tmp_path.iterdir())  # checked before either run started


# Training end to end (`train(writers=...)`, and `logging.mlflow=true` through a kill).


def test_train_sends_wandb_exactly_the_lines_of_metrics_jsonl(tmp_path, digits):
  config = helpers.tiny_config()
  writer = sinks.wandb_writer(tmp_path, config.to_dict(), resumed=False)
  jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path,
                 writers=[writer])  # fmt: skip
  (records,) = wandb_records(tmp_path)
  lines = jsonl_lines(tmp_path)
  assert {s for s, _, _ in lines} == {10, 20, 30, 40}
  assert wandb_history(records) == expected(lines)
  assert _of(records, "run")[0]["config"]["update"]["train"]["steps"] == 40


def test_train_sends_mlflow_exactly_the_lines_of_metrics_jsonl(tmp_path, digits, store):
  config = helpers.tiny_config()
  writer = sinks.mlflow_writer(tmp_path, config.to_dict(), resumed=False)
  jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path,
                 writers=[writer])  # fmt: skip
  (run,) = experiment_runs()
  lines = jsonl_lines(tmp_path)
  assert {s for s, _, _ in lines} == {10, 20, 30, 40}
  assert mlflow_history(run.info.run_id, run.data.metrics) == expected(lines)
  assert run.data.params["train.steps"] == "40" and run.info.status == "FINISHED"


def test_mlflow_run_continues_through_a_sigkill_and_rerun(tmp_path, sqlite_store, monkeypatch):
  monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store)
  monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"kill-{time.time_ns()}")
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}",
             "--config.logging.mlflow=true", "--config.ckpt.every_steps=50",
             "--config.train.log_every=10", "--config.train.steps=200",
             "--config.eval.every_steps=100"]  # fmt: skip
  env = dict(os.environ, PYTHONPATH=helpers.ROOT)
  proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
  helpers.wait_for((workdir / "checkpoints" / "50").is_dir, proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(s for s, _, _ in jsonl_lines(workdir))  # what the killed attempt logged last
  rerun_started = time.time() * 1000
  done = commands.run(command[2:], cwd=tmp_path, env=env, timeout=300)  # not signalled: forked
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads((workdir / "run.json").read_text())
  assert record["attempt"] == 2 and record["resumed_from"] >= 50

  (run,) = experiment_runs()  # one MLflow run for both attempts
  assert json.loads((workdir / "mlflow_run.json").read_text()) == {"id": run.info.run_id}
  assert run.info.status == "FINISHED"
  held = mlflow_history(run.info.run_id, run.data.metrics)  # one value a step, asserted
  lines = expected(jsonl_lines(workdir))
  assert sorted(held) == sorted(lines) == list(range(10, 201, 10))
  # The steps both attempts logged hold the first one's values: equal, timings aside.
  assert without_timing(held) == without_timing(lines)
  # Both attempts' metrics: the first logged every step to the checkpoint resumed from.
  client = mlflow.MlflowClient()
  stamps = {m.step: m.timestamp for m in client.get_metric_history(run.info.run_id, "train/loss")}
  first = [t for s, t in stamps.items() if s <= record["resumed_from"]]
  second = [t for s, t in stamps.items() if s > killed_at]
  assert killed_at < 200 and max(first) < rerun_started < min(second)
