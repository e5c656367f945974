"""The training loop end to end: convergence, workdir files, compile-once."""

import json

import numpy as np
import optax
import pytest

import jaxtrain
from experiments import digits as digits_experiment
from jaxtrain import losses
from tests import helpers


def _lines(workdir, split):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [x for x in lines if x["split"] == split]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits):
  """The digits experiment's own config, on the 8 simulated devices."""
  config = digits_experiment.get_config()
  workdir = tmp_path_factory.mktemp("digits")
  model = helpers.mlp(config.model.hidden)
  result = jaxtrain.train(config, model, digits, losses.classification, workdir=workdir)
  return config, workdir, result


def test_digits_mlp_converges(digits_run):
  config, workdir, result = digits_run
  assert result.eval_metrics["accuracy"] >= 0.95
  train = _lines(workdir, "train")
  assert [x["step"] for x in train] == list(range(50, config.train.steps + 1, 50))
  assert train[-1]["loss"] < 0.25 * train[0]["loss"]
  evals = _lines(workdir, "eval")
  assert [x["step"] for x in evals] == [200, 400, 600]
  assert evals[-1]["accuracy"] == pytest.approx(result.eval_metrics["accuracy"])
  assert evals[-1]["loss"] < evals[0]["loss"]


def test_workdir_files(digits_run):
  config, workdir, result = digits_run
  run = json.loads((workdir / "run.json").read_text())
  assert run["status"] == "completed"
  assert run["final_step"] == config.train.steps == int(result.state.step) == result.step
  assert run["train_chunk_compilations"] == 1  # 60 chunks, one executable
  assert run["environment"]["device_count"] == 8
  assert run["environment"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert run["data"]["train_size"] + run["data"]["eval_size"] == 1797
  assert len(run["data"]["train_fingerprint"]) == 64
  assert run["versions"]["jax"] and run["seeds"] == {"train.seed": 0, "data.seed": 0}
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
    jaxtrain.config.to_json(config)
  )
  train = _lines(workdir, "train")
  for key in ("loss", "lr", "steps_per_sec", "samples_per_sec", "data_wait_frac", "accuracy"):
    assert all(np.isfinite(x[key]) for x in train), key
  assert all(x["lr"] == pytest.approx(config.optim.lr) for x in train)
  assert all(0 <= x["data_wait_frac"] <= 1 for x in train)


def test_same_seed_same_run_on_another_mesh(tmp_path, digits):
  """A full loop on 8 data-parallel devices equals the loop on an FSDP mesh."""
  results = []
  for i, (data, fsdp) in enumerate([(8, 1), (2, 4)]):
    config = helpers.tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp})
    results.append(
      jaxtrain.train(
        config, helpers.mlp(), digits, losses.classification, workdir=tmp_path / str(i)
      )
    )
  assert helpers.max_abs_diff(results[0].state.params, results[1].state.params) < 1e-5
  assert results[0].eval_metrics["loss"] == pytest.approx(results[1].eval_metrics["loss"], abs=1e-5)


def test_bad_config_raises_before_writing(tmp_path, digits):
  config = helpers.tiny_config(**{"train.batch_size": 30})
  with pytest.raises(jaxtrain.ConfigError, match=r"train\.batch_size=30"):
    jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path / "w")
  assert not (tmp_path / "w").exists()


class _DiskGoesAway:
  """The digits, until the third batch read: then the disk fails."""

  def __init__(self, source):
    self.arrays, self.name, self.reads = source.arrays, "flaky", 0

  def __len__(self):
    return len(self.arrays["label"])

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}

  def read(self, indices):
    self.reads += 1
    if self.reads == 3:
      raise OSError("the disk went away")
    return {k: v[indices] for k, v in self.arrays.items()}


def test_failure_is_recorded_in_run_json(tmp_path, digits):
  flaky = jaxtrain.data.Dataset("flaky", _DiskGoesAway(digits.train), digits.eval)
  with pytest.raises(OSError, match="disk went away"):
    jaxtrain.train(
      helpers.tiny_config(), helpers.mlp(), flaky, losses.classification, workdir=tmp_path
    )
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["status"] == "failed"
  assert run["reason"] == "OSError: the disk went away"
  assert run["final_step"] == 10  # two chunks of 5 trained


def test_recompilation_is_reported_and_recorded(tmp_path, caplog, digits):
  """A chunk of another shape compiles a second executable: warned and in run.json."""
  from jaxtrain import record, sharding, step  # noqa: PLC0415

  mesh = helpers.mesh((8, 1, 1))
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step.make_train_chunk(step_fn, shardings, mesh)
  run = record.RunRecord(tmp_path, True, {"train_chunk_compilations": 0})
  batches = helpers.global_batches(digits.train, 32, 5)
  compiled = []
  for k in (5, 5, 2):
    chunk = sharding.put_batch(helpers.take(batches, slice(0, k)), mesh, 32, 1)
    state, _ = chunk_fn(state, chunk, helpers.no_votes(mesh))
    compiled.append(run.count_compilations(step.compilations(chunk_fn), 10))
  assert compiled == [True, False, True]
  assert json.loads((tmp_path / "run.json").read_text())["train_chunk_compilations"] == 2
  assert "train_chunk compiled again at step 10 (2 executables)" in caplog.text


def test_config_freeze_and_lr_groups(tmp_path, digits):
  """optim.freeze keeps the first layer at its initial values; the rest trains."""
  config = helpers.tiny_config(
    **{"optim.freeze": ("^hidden/0/",), "optim.lr_groups": ("^head/=0.5",), "optim.lr": 1e-2}
  )
  result = jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)
  mesh = jaxtrain.sharding.make_mesh((8, 1, 1))
  _, init = jaxtrain.create_state(helpers.mlp(), optax.adam(1e-2), seed=0, mesh=mesh)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(
      result.state.params["hidden"][0][name], init.params["hidden"][0][name]
    )
    assert helpers.max_abs_diff(result.state.params["head"][name], init.params["head"][name]) > 1e-3


def test_custom_tx_reports_its_injected_learning_rate(tmp_path, digits):
  sched = optax.linear_schedule(1e-2, 1e-3, 40)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=sched)
  config = helpers.tiny_config(**{"train.log_every": 5})
  result = jaxtrain.train(
    config, helpers.mlp(), digits, losses.classification, workdir=tmp_path, tx=tx
  )
  lr = {x["step"]: x["lr"] for x in _lines(tmp_path, "train")}
  assert lr == pytest.approx({s: float(sched(s - 1)) for s in range(5, 41, 5)})
  assert result.eval_metrics["accuracy"] > 0.5


def test_custom_tx_misuse_is_refused(tmp_path, digits):
  config = helpers.tiny_config(**{"early_stop.metric": "eval/loss", "plateau.factor": 0.5})
  tx = jaxtrain.optim.optimizer(optax.adam, 1e-3, multiplier=True)
  with pytest.raises(jaxtrain.ConfigError, match="must not hold one"):
    jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path, tx=tx)
  with pytest.raises(ValueError, match="pass tx= too"):
    jaxtrain.train(
      helpers.tiny_config(),
      helpers.mlp(),
      digits,
      losses.classification,
      workdir=tmp_path,
      schedule=optax.constant_schedule(1e-3),
    )
