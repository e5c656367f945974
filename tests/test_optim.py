"""Schedules and the named optimizers (the basics; the chains have their own tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import config as config_lib
from jaxtrain import optim


@pytest.mark.parametrize(
  "name,expected",
  [
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
    ("cosine", {0: 0.0, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("linear", {0: 0.0, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("rsqrt", {0: 0.0, 10: 1.0, 40: 0.5, 1000: 0.1}),
    ("wsd", {0: 0.0, 10: 1.0, 88: 1.0, 99: 0.5, 110: 0.0}),
  ],
)
def test_schedule_values_at_boundaries(name, expected):
  sched = optim.schedule(name, lr=1.0, total_steps=110, warmup_steps=10, decay_fraction=0.2)
  for step, value in expected.items():
    assert float(sched(step)) == pytest.approx(value, abs=1e-6), step


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_each_optimizer_minimises_a_quadratic(name):
  assert set(optim.OPTIMIZERS) == set(config_lib.OPTIMIZERS)
  target = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  tx = optim.optimizer(name, 0.1 if name != "adagrad" else 0.5, clip_norm=10.0)
  params = jnp.zeros((2, 2))
  state = tx.init(params)
  loss = lambda p: jnp.sum((p - target) ** 2)  # noqa: E731

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return params + updates, state

  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params)) < 0.05 * float(loss(jnp.zeros((2, 2))))


def test_accumulation_updates_every_k_calls():
  tx = optim.optimizer("sgd", 1.0, accum_steps=3)
  params = jnp.ones(2)
  state = tx.init(params)
  changes = []
  for g in [1.0, 2.0, 3.0]:
    updates, state = tx.update(jnp.full(2, g), state, params)
    changes.append(np.asarray(updates))
  np.testing.assert_allclose(changes[0], 0.0)
  np.testing.assert_allclose(changes[1], 0.0)
  np.testing.assert_allclose(changes[2], -2.0)  # the mean of the three gradients


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_no_weight_decay_unless_asked(name):
  """Zero gradients and weight_decay=0 leave parameters where they are."""
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  tx = optim.optimizer(name, 0.1, weight_decay=0.0)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0.0


def test_weight_decay_is_applied_when_asked():
  params = {"w": jnp.ones((4, 4))}
  tx = optim.optimizer("adamw", 0.1, weight_decay=0.5)
  updates, _ = tx.update({"w": jnp.zeros((4, 4))}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5, rtol=1e-6)


def test_lr_multiplier_scales_the_updates_exactly():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, -0.1, 0.2])}
  plain = optim.optimizer("adam", 1e-2)
  scaled = optim.optimizer("adam", 1e-2, multiplier=True)
  state = optax.tree_utils.tree_set(scaled.init(params), lr_multiplier=jnp.float32(0.25))
  want, _ = plain.update(grads, plain.init(params), params)
  got, state = scaled.update(grads, state, params)
  np.testing.assert_allclose(got["w"], 0.25 * want["w"], rtol=1e-6)
  assert float(optax.tree_utils.tree_get(state, "lr_multiplier")) == 0.25
