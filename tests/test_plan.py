"""The memory plan: its state bytes are the sharded state's, its peak the run's, its CLI."""

import functools
import json
import os

import pytest

import jaxtrain
from jaxtrain import losses, models, plan
from jaxtrain import parts as parts_lib
from tests import commands, helpers


@pytest.mark.parametrize(
  "mesh,rules", [((1, 8, 1), "fsdp"), ((1, 4, 2), "fsdp_tp"), ((8, 1, 1), "dp")]
)
def test_plan_bytes_are_what_the_sharded_state_holds(digits, mesh, rules):
  config = helpers.tiny_config(**{"mesh.rules": rules, **dict(zip(
    ("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh, strict=True))})  # fmt: skip
  model = functools.partial(models.MLP, 64, (128, 64), 10)
  spec = parts_lib.prepare(config, model, digits, losses.classification)
  planned = plan.state_bytes(spec.abstract)
  state = parts_lib.assemble(spec).state
  assert planned["params"] == helpers.bytes_per_device(state.params)
  assert planned["opt_state"] == helpers.bytes_per_device(state.opt_state)
  assert sum(planned.values()) == helpers.bytes_per_device(state)


def test_plan_peak_is_the_one_the_run_records(tmp_path, digits):
  config = helpers.tiny_config(**{"mesh.fsdp": 8, "mesh.data": 1})
  model = helpers.mlp((128,))
  spec = parts_lib.prepare(config, model, digits, losses.classification)
  planned = plan.chunk_memory(spec)
  jaxtrain.train(config, model, digits, losses.classification, workdir=tmp_path)
  recorded = json.loads((tmp_path / "run.json").read_text())["memory"]
  assert recorded == planned
  assert planned["temp"] > 0 and planned["peak"] >= planned["argument"]


def test_larger_batches_need_more_memory(digits):
  peaks = []
  for batch in (32, 256):
    config = helpers.tiny_config(**{"train.batch_size": batch})
    peaks.append(plan.chunk_memory(parts_lib.prepare(config, helpers.mlp((512,)), digits,
                                                     losses.classification))["peak"])  # fmt: skip
  assert peaks[1] > peaks[0]


def test_parse_bytes():
  assert plan.parse_bytes("80GB") == 80 * 10**9
  assert plan.parse_bytes("16GiB") == 16 * 2**30
  assert plan.parse_bytes("1.5 MiB") == int(1.5 * 2**20)
  with pytest.raises(jaxtrain.ConfigError, match="must be a size such as 80GB"):
    plan.parse_bytes("lots")


def _plan(*args):
  return commands.run(["jaxtrain.plan", *args], cwd=helpers.ROOT, timeout=300,
                      env=dict(os.environ, PYTHONPATH=helpers.ROOT))  # fmt: skip


def test_plan_command_prints_bytes_and_the_largest_batch_that_fits(tmp_path):
  result = _plan("experiments.digits", "--config.mesh.fsdp=8", "--config.mesh.data=1",
                 "--device_memory=2MiB")  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("plan for experiments.digits on 8 cpu devices")
  parameters = next(x for x in lines if x.strip().startswith("parameters"))
  sharded, replicated = 64 * 128, 128 + 128 * 10 + 10  # the first kernel's embed axis
  assert parameters.split()[1:3] == [f"{(sharded / 8 + replicated) * 4 / 1024:.2f}", "KiB"]
  batch = next(x for x in lines if x.strip().startswith("remat -")).split()
  assert int(batch[3]) >= 64 and batch[-1] in ("memory)", "records)")


def test_plan_command_plans_the_preset_with_the_overrides_after_it():
  cut = ["--config.model.d_model=32", "--config.model.layers=2", "--config.model.heads=2",
         "--config.model.kv_heads=1", "--config.model.mlp=64", "--config.model.seq_len=64",
         "--config.train.batch_size=8", "--config.data.name=python_stdlib",
         "--config.data.tokenizer=byte", "--config.data.limit_bytes=100000",
         "--config.loss.chunk=16"]  # fmt: skip
  result = _plan("experiments.lm", "--config=experiments/lm.py:gpu", *cut)
  assert result.returncode == 0, result.stderr[-3000:]
  settings = result.stdout.splitlines()[1]  # the preset's policy and remat, the override's batch
  assert settings.endswith("batch 8, 10 steps per chunk, precision bf16-mixed, remat dots-saveable")
  saving = result.stdout.splitlines()[-1]
  assert saving.startswith("loss.chunk=16: peak ") and "the whole [B, T, vocab] logits" in saving


@pytest.mark.parametrize(
  "args,expected",
  [
    (["experiments.lm", "--config=experiments/lm.py:nope"],
     "error: --config=experiments/lm.py:nope: preset 'nope' is not one of cpu, gpu"),
    (["experiments.digits", "--device_memory=lots"],
     "error: --device_memory='lots' must be a size such as 80GB or 16GiB"),
    (["experiments.nothing"], "error: cannot import experiment 'experiments.nothing': "
     "No module named 'experiments.nothing'"),
    (["experiments.digits", "--config.mesh.fsdp=3"],
     "error: mesh mesh.data=-1 x mesh.fsdp=3 x mesh.tensor=1 does not match the 8 devices"),
  ],
  ids=["bad-preset", "bad-size", "no-experiment", "bad-mesh"],
)  # fmt: skip
def test_plan_mistakes_are_one_line(args, expected):
  result = _plan(*args)
  assert (result.returncode, result.stderr.strip()) == (2, expected)
