"""Dropout (its own rng stream, on in training, off in eval), label smoothing, accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import losses, models, optim
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from tests import helpers

B = 32


def _dropout_mlp(rate):
  return functools.partial(models.MLP, 64, (64,), 10, dropout=rate)


def test_dropout_draws_from_its_own_stream_in_training():
  model = _dropout_mlp(0.5)(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
  key = jax.random.PRNGKey(7)
  model.train()
  out = model(x, rngs=step_lib.step_rngs(key))
  manual = model(x, rngs=nnx.Rngs(dropout=jax.random.fold_in(key, step_lib.DROPOUT_STREAM)))
  np.testing.assert_array_equal(out, manual)  # the dropout stream, not `default`
  other = model(x, rngs=step_lib.step_rngs(jax.random.fold_in(key, 1)))
  assert float(jnp.max(jnp.abs(out - other))) > 1e-3  # another step, another mask
  model.eval()
  plain = _dropout_mlp(0.0)(rngs=nnx.Rngs(0))  # same parameters, no dropout
  np.testing.assert_array_equal(model(x, rngs=None), plain(x))
  assert float(jnp.max(jnp.abs(out - plain(x)))) > 1e-3


def test_dropout_is_on_in_the_train_step_and_off_in_the_eval_step(digits):
  mesh = helpers.mesh((1, 1, 1), n=1)
  batch = helpers.take(helpers.global_batches(digits.train, B, 1), 0)
  tx = optax.sgd(0.0)  # the parameters stay put: only the masks differ between steps
  schedule = optax.constant_schedule(0.0)
  for rate, differs in ((0.5, True), (0.0, False)):
    graphdef, state = state_lib.create_state(_dropout_mlp(rate), tx, seed=0, mesh=mesh)
    step_fn = jax.jit(
      functools.partial(
        step_lib.train_step,
        graphdef=graphdef,
        tx=tx,
        loss_fn=losses.classification,
        schedule=schedule,
      )
    )
    s1, m1 = step_fn(state, batch)
    _, m2 = step_fn(s1, batch)
    assert (float(m1["loss"]) != float(m2["loss"])) == differs, rate
    eval_fn = jax.jit(
      functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=losses.classification)
    )
    eval_batch = {**batch, "mask": np.ones(B, np.int32)}
    e1, e2 = eval_fn(state, eval_batch), eval_fn(s1, eval_batch)
    assert float(e1["loss"]) == float(e2["loss"])  # deterministic in evaluation
  plain_eval = float(e1["loss"])  # rate 0
  graphdef, state = state_lib.create_state(_dropout_mlp(0.5), tx, seed=0, mesh=mesh)
  eval_fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=losses.classification)
  assert float(jax.jit(eval_fn)(state, eval_batch)["loss"]) == pytest.approx(plain_eval, rel=1e-6)


def test_label_smoothing_matches_its_formula():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])

  class Fixed(nnx.Module):
    def __call__(self, x, *, rngs=None):
      return logits

  batch = {"image": jnp.zeros((2, 1)), "label": jnp.array([0, 1])}
  smooth = losses.classification(Fixed(), batch, None, label_smoothing=0.1)
  plain = losses.classification(Fixed(), batch, None)
  log_p = jax.nn.log_softmax(logits)
  ce = -log_p[jnp.arange(2), batch["label"]]
  expected = 0.9 * ce + 0.1 * (-log_p.mean(axis=-1))
  np.testing.assert_allclose(smooth["loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(plain["loss"], ce, rtol=1e-6)
  np.testing.assert_array_equal(smooth["accuracy"], [1.0, 0.0])


def test_accumulation_equals_one_k_times_larger_batch(digits):
  """Four micro-batches of 8 with accum_steps=4 give the update of one batch of 32."""
  mesh = helpers.mesh((1, 1, 1), n=1)
  big = helpers.take(helpers.global_batches(digits.train, B, 3), slice(None))
  results = []
  for accum in (1, 4):
    adamw = functools.partial(optim.base, "adamw", weight_decay=1e-3)
    tx = optim.optimizer(adamw, 1e-2, accum_steps=accum, clip_norm=1.0)
    graphdef, state = state_lib.create_state(helpers.mlp(), tx, seed=0, mesh=mesh)
    step_fn = jax.jit(
      functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=losses.classification
      )
    )
    for k in range(3):  # three updates
      batch = helpers.take(big, k)
      for micro in range(accum):
        rows = slice(micro * B // accum, (micro + 1) * B // accum)
        state, _ = step_fn(state, helpers.take(batch, rows))
    results.append(state.params)
  moved = helpers.max_abs_diff(results[0], state_lib.create_state(
    helpers.mlp(), optax.sgd(0.0), seed=0, mesh=mesh)[1].params)  # fmt: skip
  assert moved > 1e-3
  assert helpers.max_abs_diff(results[0], results[1]) < 1e-6
