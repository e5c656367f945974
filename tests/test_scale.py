"""Scale out: logical-axis presets shard the language model and train exactly like one device."""

import functools
import math

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import data, losses, models
from tests import helpers

LM = dict(vocab=256, seq_len=32, d_model=64, layers=2, heads=4, kv_heads=4, mlp=128)
PRESETS = {  # mesh.rules: (data, fsdp, tensor)
  "fsdp": (1, 8, 1),
  "tp": (2, 1, 4),
  "fsdp_tp": (1, 4, 2),
}


@pytest.fixture(scope="module")
def corpus():
  return data.python_stdlib(32, eval_fraction=0.05, limit_bytes=200_000)


def _config(rules, shape, **overrides):
  config = helpers.tiny_config(
    **{
      "data.name": "python_stdlib",
      "train.steps": 5,
      "train.steps_per_loop": 5,
      "train.log_every": 5,
      "train.batch_size": 16,
      "eval.batch_size": 16,
      # SGD: Adam divides tiny gradients by their own size, which turns float32 rounding
      # in the sharded sums into 1e-4 parameter differences within five steps.
      "optim.name": "sgd",
      "optim.lr": 0.5,
      "optim.momentum": 0.9,
      "mesh.rules": rules,
      **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), shape, strict=True)),
      **overrides,
    }
  )
  return config


def _five_steps(corpus, rules, shape, devices=None):
  """Builds the LM under `rules` on a mesh of `shape`; returns its parts, losses and params."""
  model = functools.partial(models.Transformer, **LM)
  parts = jaxtrain.build(_config(rules, shape), model, corpus, losses.next_token, devices=devices)
  with parts.batches() as batches:
    state, metrics = parts.chunk(parts.state, next(batches))
  return parts, np.asarray(metrics["loss"]), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def one_device(corpus):
  return _five_steps(corpus, "auto", (1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("rules", list(PRESETS))
def test_preset_trains_like_one_device(corpus, one_device, rules):
  _, losses_1, params_1, _ = one_device
  parts, losses_n, params_n, state = _five_steps(corpus, rules, PRESETS[rules])
  np.testing.assert_allclose(losses_n, losses_1, atol=1e-5)
  assert helpers.max_abs_diff(params_n, params_1) < 1e-5
  assert parts.chunk.compilations() == 1
  kernel = state.params["blocks"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
  expected = {"fsdp": (None, "fsdp", None), "tp": (None, None, "tensor"),
              "fsdp_tp": (None, "fsdp", "tensor")}  # fmt: skip
  assert tuple(kernel.sharding.spec) == expected[rules]
  trace = state.opt_state[0].trace["blocks"]["mlp"]["up"]["kernel"]  # momentum, placed alike
  assert trace.sharding.spec == kernel.sharding.spec


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device(corpus):
  parts = jaxtrain.build(_config("fsdp", (1, 8, 1)), functools.partial(models.Transformer, **LM),
                         corpus, losses.next_token)  # fmt: skip
  held = (parts.state.params, parts.state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(held))
  assert helpers.bytes_per_device(held) <= total / 8 * 1.05


def test_a_rule_that_does_not_divide_names_the_parameter(corpus):
  model = functools.partial(models.Transformer, **{**LM, "mlp": 98})
  with pytest.raises(jaxtrain.ConfigError) as e:
    jaxtrain.build(_config("tp", (2, 1, 4)), model, corpus, losses.next_token)
  assert str(e.value) == (
    "mesh.rules=tp: params/blocks/mlp/down/kernel dimension 1 (mlp, size 98) does not divide "
    "over mesh.tensor=4; choose mesh sizes that divide it, or other mesh.rules"
  )


def test_activation_that_does_not_divide_is_reported_before_compiling(corpus):
  """4 heads of width 16: the kernels (64 wide) divide over 8 devices, the heads do not."""
  model = functools.partial(models.Transformer, **LM)
  expected = r"\(16, 32, 4, 16\) dimension 2 \(heads, size 4\) does not divide"
  with pytest.raises(jaxtrain.ConfigError, match=expected):
    jaxtrain.build(_config("tp", (1, 1, 8)), model, corpus, losses.next_token)


def test_unnamed_models_keep_fsdp_by_the_largest_dimension(digits):
  config = helpers.tiny_config(**{"mesh.fsdp": 8, "mesh.data": 1})
  parts = jaxtrain.build(config, _plain_mlp, digits, losses.classification)
  kernel = parts.state.params["hidden"][0]["kernel"]  # 64 x 128
  assert tuple(kernel.sharding.spec) == (None, "fsdp")


def _plain_mlp(rngs):
  """An MLP without axis names."""
  from flax import nnx  # noqa: PLC0415

  class Plain(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.List([nnx.Linear(64, 128, rngs=rngs)])
      self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x, rngs=None):
      return self.head(nnx.relu(self.hidden[0](x.reshape(x.shape[0], -1))))

  return Plain(rngs)


def test_named_mlp_shards_by_its_names(digits):
  config = helpers.tiny_config(**{"mesh.rules": "fsdp_tp", "mesh.fsdp": 4, "mesh.tensor": 2,
                                  "mesh.data": 1})  # fmt: skip
  parts = jaxtrain.build(config, helpers.mlp((128,)), digits, losses.classification)
  specs = jax.tree.map(lambda x: tuple(x.sharding.spec), parts.state.params)
  assert specs["hidden"][0] == {"kernel": ("fsdp", "tensor"), "bias": ("tensor",)}
  assert specs["head"] == {"kernel": ("tensor", None), "bias": (None,)}
  assert math.isfinite(parts.evaluate(parts.state)["loss"])


def test_the_training_chunk_itself_constrains_the_activations(corpus):
  """Traced by jit outside any context mesh, as the loop runs it."""
  model = functools.partial(models.Transformer, **LM)
  parts = jaxtrain.build(_config("tp", (2, 1, 4)), model, corpus, losses.next_token)
  with parts.batches() as batches:
    chunk = next(batches)
  text = parts.chunk.jitted.lower(parts.state, chunk, helpers.no_votes(parts.spec.mesh)).as_text()
  assert text.count("sharding_constraint") >= 8  # tokens, rows, q, k, v, MLP, blocks, logits


def test_factored_optimizer_state_is_not_taken_for_its_parameter(corpus):
  """Adafactor's row and column moments end with a parameter's path but are shaped otherwise."""
  model = functools.partial(models.Transformer, **LM)
  adafactor = {"optim.name": "adafactor", "optim.momentum": 0.0, "optim.lr": 1e-2}
  parts = jaxtrain.build(_config("fsdp", (1, 8, 1), **adafactor), model,
                         corpus, losses.next_token)  # fmt: skip
  with parts.batches() as batches:
    _, metrics = parts.chunk(parts.state, next(batches))
  assert np.isfinite(np.asarray(metrics["loss"])).all()
