"""Precision policies: dtypes in the state and inside the compiled step, loss scaling, accuracy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxtrain
from jaxtrain import losses, models, precision
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from tests import helpers

B = 32


def _setup(policy, digits, model_fn=None):
  mesh = helpers.mesh((1, 1, 1), n=1)
  tx = optax.adam(1e-2)
  graphdef, state = state_lib.create_state(
    model_fn or helpers.mlp(), tx, seed=0, mesh=mesh, policy=policy
  )
  step_fn = functools.partial(
    step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=losses.classification, policy=policy
  )
  batch = helpers.take(helpers.global_batches(digits.train, B, 1), 0)
  return state, step_fn, batch


def _dots(step_fn, state, batch):
  """The input dtypes of every matrix product in the step's jaxpr, sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax.extend.core.subjaxprs(jaxpr):
      walk(sub)

  walk(jax.make_jaxpr(step_fn)(state, batch).jaxpr)
  return found


def test_bf16_mixed_keeps_f32_params_and_computes_in_bf16(digits):
  policy = precision.get_policy("bf16-mixed")
  state, step_fn, batch = _setup(policy, digits)
  dots = _dots(step_fn, state, batch)
  assert len(dots) == 5  # 2 forward; the kernel gradients of both layers and one input gradient
  assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
  for _ in range(3):
    state, metrics = jax.jit(step_fn)(state, batch)
  leaves = jax.tree.leaves((state.params, state.opt_state))
  assert {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {"float32"}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_f32_modules_override_stays_in_f32(digits):
  policy = precision.get_policy("bf16-mixed", f32_modules=("^head",))
  state, step_fn, batch = _setup(policy, digits)
  dots = _dots(step_fn, state, batch)
  assert ("float32", "float32") in dots and ("bfloat16", "bfloat16") in dots
  f32_state, f32_step, _ = _setup(precision.get_policy("f32"), digits)
  assert all(d == ("float32", "float32") for d in _dots(f32_step, f32_state, batch))


def test_bf16_stores_params_and_optimizer_state_in_bf16(digits):
  state, step_fn, batch = _setup(precision.get_policy("bf16"), digits)
  state, _ = jax.jit(step_fn)(state, batch)
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim > 0]
  assert {str(x.dtype) for x in floats} == {"bfloat16"}


def test_fp16_overflow_skips_the_step_and_halves_the_scale(digits):
  policy = precision.get_policy("fp16-mixed")
  state, step_fn, batch = _setup(policy, digits)
  step_fn = jax.jit(step_fn)
  state, metrics = step_fn(state, batch)  # a normal step first
  assert float(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == 2.0**15
  before = jax.device_get(state)
  huge = {**batch, "image": np.full_like(batch["image"], 7e4, dtype=np.float32)}  # > fp16 max
  after, metrics = step_fn(state, huge)
  assert float(metrics["skipped"]) == 1
  assert helpers.max_abs_diff(after.params, before.params) == 0
  assert helpers.max_abs_diff(after.opt_state, before.opt_state) == 0
  assert float(after.loss_scale.scale) == 2.0**14
  after, metrics = step_fn(after, batch)
  assert float(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == 2.0**14


def test_loss_scaling_rescues_a_gradient_that_underflows_in_fp16():
  """d/dp of 1e-9 * sum(p * x), computed in fp16: the cotangent 1e-9 is below fp16's range."""
  x = jnp.linspace(0.5, 2.0, 8)
  params = jnp.ones(8)

  def loss_fn(p):
    y = jnp.sum(p.astype(jnp.float16) * x.astype(jnp.float16))
    return y.astype(jnp.float32) * 1e-9

  plain = jax.grad(loss_fn)(params)
  assert float(jnp.max(jnp.abs(plain))) == 0.0  # lost without scaling
  ls = precision.loss_scale_init()
  grads = precision.unscale(ls, jax.grad(lambda p: precision.scale_loss(ls, loss_fn(p)))(params))
  np.testing.assert_allclose(grads, 1e-9 * x, rtol=2e-3)
  assert bool(precision.all_finite(grads))


def test_loss_scale_adjusts():
  ls = precision.loss_scale_init(8.0)
  for expected in (8.0, 8.0, 16.0):  # grows after `period` finite steps
    ls = precision.adjust(ls, jnp.array(True), period=3)
    assert float(ls.scale) == expected
  ls = precision.adjust(ls, jnp.array(False), period=3)
  assert float(ls.scale) == 8.0 and int(ls.good_steps) == 0
  small = precision.loss_scale_init(1.0)
  assert float(precision.adjust(small, jnp.array(False), min_scale=1.0).scale) == 1.0


def test_bf16_mixed_matches_f32_accuracy_on_digits(tmp_path, digits):
  from experiments import digits as digits_experiment  # noqa: PLC0415

  accuracy = {}
  for policy in ("f32", "bf16-mixed"):
    config = digits_experiment.get_config()
    config.precision.policy = policy
    result = jaxtrain.train(
      config, helpers.mlp((128,)), digits, losses.classification, workdir=tmp_path / policy
    )
    accuracy[policy] = result.eval_metrics["accuracy"]
  assert accuracy["f32"] >= 0.95
  assert abs(accuracy["bf16-mixed"] - accuracy["f32"]) <= 0.01, accuracy
  assert jax.tree.leaves(result.state.params)[0].dtype == jnp.float32


class RawModel(nnx.Module):
  """A user model with no `dtype` attribute: raw matrix products on its own parameters."""

  def __init__(self, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (64, 10)) * 0.1)

  def __call__(self, x, *, rngs=None):
    return x.reshape(x.shape[0], -1) @ self.w[...]


def test_a_user_model_without_dtypes_computes_in_bf16(digits):
  state, step_fn, batch = _setup(precision.get_policy("bf16-mixed"), digits, RawModel)
  assert _dots(step_fn, state, batch) == [("bfloat16", "bfloat16")] * 2  # forward, kernel grad
  state, metrics = jax.jit(step_fn)(state, batch)
  assert state.params["w"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_transformer_trains_in_bf16_mixed():
  policy = precision.get_policy("bf16-mixed")
  mesh = helpers.mesh((1, 1, 1), n=1)
  tx = optax.adam(3e-3)
  model_fn = functools.partial(models.Transformer, 16, 8, 32, 2, 2)
  graphdef, state = state_lib.create_state(model_fn, tx, seed=0, mesh=mesh, policy=policy)
  step_fn = jax.jit(
    functools.partial(
      step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=losses.next_token, policy=policy
    )
  )
  tokens = np.tile(np.arange(9) % 4, (8, 1)).astype(np.int32)  # a repeating pattern
  first = None
  for _ in range(30):
    state, metrics = step_fn(state, {"tokens": tokens})
    first = first or float(metrics["loss"])
  dots = _dots(step_fn, state, {"tokens": tokens})
  assert dots and all(d == ("bfloat16", "bfloat16") for d in dots)
  assert float(metrics["loss"]) < 0.3 * first
  assert float(metrics["bits_per_byte"]) == pytest.approx(float(metrics["loss"]) / np.log(2))


def _sgd_step(policy, digits):
  mesh = helpers.mesh((1, 1, 1), n=1)
  tx = optax.sgd(0.1)
  graphdef, state = state_lib.create_state(helpers.mlp(), tx, seed=0, mesh=mesh, policy=policy)
  step_fn = functools.partial(
    step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=losses.classification, policy=policy
  )
  return state, jax.jit(step_fn), helpers.take(helpers.global_batches(digits.train, B, 1), 0)


def test_fp16_mixed_update_matches_f32_through_the_scaling(digits):
  """SGD is not scale-invariant: a scale left in, or unscaled twice, would show."""
  start, f32_step, batch = _sgd_step(precision.get_policy("f32"), digits)
  want, _ = f32_step(start, batch)
  state, fp16_step, _ = _sgd_step(precision.get_policy("fp16-mixed"), digits)
  got, metrics = fp16_step(state, batch)
  assert float(metrics["skipped"]) == 0
  moved = helpers.max_abs_diff(want.params, start.params)
  assert moved > 1e-3
  assert helpers.max_abs_diff(got.params, want.params) < 0.01 * moved


def test_a_scale_overflow_is_skipped_but_not_counted_as_a_failure(digits):
  state, step_fn, batch = _sgd_step(precision.get_policy("fp16-mixed"), digits)
  state = state.replace(loss_scale=precision.loss_scale_init(2.0**40))  # overflows fp16
  before = jax.device_get(state.params)
  state, metrics = step_fn(state, batch)
  assert float(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))
  assert int(metrics["skipped_in_a_row"]) == 0  # routine for loss scaling, not a failure
  assert float(state.loss_scale.scale) == 2.0**39
  assert helpers.max_abs_diff(state.params, before) == 0


def test_f32_modules_match_module_paths(digits):
  policy = precision.get_policy("bf16-mixed", f32_modules=("^hidden/0$",))
  state, step_fn, batch = _setup(policy, digits)
  compute = policy.compute_params(state.params)
  assert compute["hidden"][0]["kernel"].dtype == jnp.float32
  assert compute["head"]["kernel"].dtype == jnp.bfloat16
  dots = _dots(step_fn, state, batch)
  assert dots.count(("float32", "float32")) == 2  # the first layer's forward and kernel grad
