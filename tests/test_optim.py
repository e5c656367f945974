"""Schedules, the named optimizers against Optax, decay masks, freezing, groups, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import config as config_lib
from jaxtrain import optim, sharding


@pytest.mark.parametrize(
  "name,expected",
  [
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
    ("cosine", {0: 0.0, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("linear", {0: 0.0, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("rsqrt", {0: 0.0, 10: 1.0, 40: 0.5, 1000: 0.1}),
    ("wsd", {0: 0.0, 10: 1.0, 88: 1.0, 99: 0.5, 110: 0.0}),
    ("exponential", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.25}),
    ("piecewise", {0: 0.0, 5: 0.5, 10: 1.0, 49: 1.0, 50: 0.3, 79: 0.3, 80: 0.1, 110: 0.1}),
  ],
)
def test_schedule_values_at_boundaries(name, expected):
  sched = optim.schedule(
    name,
    lr=1.0,
    total_steps=110,
    warmup_steps=10,
    decay_fraction=0.2,
    decay_rate=0.25,
    boundaries=(50, 80),
    scales=(0.3, 0.1),
  )
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


PARAMS = {
  "dense": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.full((3,), 0.5)},
  "norm": {"scale": jnp.ones((3,)), "bias": jnp.full((3,), 0.2)},
  "embed": {"embedding": jnp.full((5, 3), 0.3)},
}
# Each named optimizer, with options, against the Optax call it must equal.
REFERENCES = {
  "adam": ({}, optax.adam),
  "adamw": (
    {"weight_decay": 0.1},
    lambda lr: optax.adamw(lr, weight_decay=0.1, mask=_decayed_kernels_only),
  ),
  "rmsprop": (
    {"momentum": 0.9, "centered": True, "nesterov": True},
    lambda lr: optax.rmsprop(lr, momentum=0.9, centered=True, nesterov=True),
  ),
  "adagrad": ({}, optax.adagrad),
  "sgd": (
    {"momentum": 0.9, "nesterov": True},
    lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
  ),
  "lion": (
    {"weight_decay": 0.1},
    lambda lr: optax.lion(lr, weight_decay=0.1, mask=_decayed_kernels_only),
  ),
  "adafactor": (
    {"weight_decay": 0.1},
    lambda lr: optax.adafactor(lr, weight_decay_rate=0.1, weight_decay_mask=_decayed_kernels_only),
  ),
  "muon": (
    {"weight_decay": 0.1},
    lambda lr: optax.contrib.muon(
      lr,
      weight_decay=0.1,
      weight_decay_mask=_decayed_kernels_only,
      muon_weight_dimension_numbers=_kernels_only_to_muon,
    ),
  ),
}


def _kernels_only_to_muon(params):
  dims = jax.tree.map(lambda _: None, params)
  dims["dense"]["kernel"] = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  return dims


def _decayed_kernels_only(params):
  mask = jax.tree.map(lambda _: False, params)
  mask["dense"]["kernel"] = True
  return mask


def _grads(seed):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
  return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), PARAMS)


def test_every_optimizer_has_a_reference():
  assert set(REFERENCES) == set(optim.OPTIMIZERS) == set(config_lib.OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_optimizer_equals_its_optax_reference(name):
  """Five steps with a schedule: the same updates, and so the same params, as Optax's call."""
  options, reference = REFERENCES[name]
  sched = optim.schedule("cosine", lr=0.05, total_steps=10, warmup_steps=2)
  ours, theirs = optim.optimizer(name, sched, **options), reference(sched)
  p_ours, p_theirs = PARAMS, PARAMS
  s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
  for seed in range(5):
    u_ours, s_ours = ours.update(_grads(seed), s_ours, p_ours)
    u_theirs, s_theirs = theirs.update(_grads(seed), s_theirs, p_theirs)
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p_ours, PARAMS)
  assert min(jax.tree.leaves(changed)) > 0  # the steps really moved every parameter
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# Rosenbrock from (-1.5, 2): lr and schedule per optimizer, 5000 steps each.
ROSENBROCK = {
  "adam": ({}, 3e-2, "cosine"),
  "adamw": ({}, 3e-2, "cosine"),
  "rmsprop": ({"momentum": 0.9}, 1e-3, "cosine"),
  "adagrad": ({}, 0.5, "constant"),
  "sgd": ({"momentum": 0.9}, 1e-3, "cosine"),
  "lion": ({}, 3e-3, "cosine"),
  "adafactor": ({}, 5e-2, "cosine"),
  "muon": ({}, 3e-2, "cosine"),  # a vector: its Adam branch
}


@pytest.mark.parametrize("name", sorted(ROSENBROCK))
def test_each_optimizer_solves_rosenbrock(name):
  options, lr, schedule_name = ROSENBROCK[name]
  steps = 5000
  tx = optim.optimizer(name, optim.schedule(schedule_name, lr=lr, total_steps=steps), **options)
  rosenbrock = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2  # noqa: E731

  def body(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
    return params + updates, state

  start = jnp.array([-1.5, 2.0])
  params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p))))(start)
  assert float(rosenbrock(start)) == pytest.approx(12.5)
  assert float(rosenbrock(params)) < 3e-3
  assert float(jnp.max(jnp.abs(params - 1.0))) < 0.15


@pytest.mark.parametrize("name", optim.DECAY_OPTIMIZERS)
def test_decay_mask_leaves_biases_norm_scales_and_embeddings_alone(name):
  """Zero gradients: only the decayed parameters move, by the decay alone."""
  tx = optim.optimizer(name, 0.1, weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
  moved = {path: float(jnp.max(jnp.abs(u))) > 0 for path, u in _flat(updates).items()}
  assert moved == {
    "dense/kernel": True,
    "dense/bias": False,
    "norm/scale": False,
    "norm/bias": False,
    "embed/embedding": False,
  }


def test_no_decay_patterns_override_the_default():
  tx = optim.optimizer("adamw", 0.1, weight_decay=0.5, no_decay=("kernel$",))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
  flat = _flat(updates)
  assert float(jnp.max(jnp.abs(flat["dense/kernel"]))) == 0
  np.testing.assert_allclose(flat["norm/scale"], -0.1 * 0.5 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(flat["dense/bias"], -0.1 * 0.5 * 0.5, rtol=1e-6)


def _flat(tree):
  return {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state():
  tx = optim.optimizer("adam", 0.1, frozen=("^dense/", "^embed/"), clip_norm=1.0)
  state = tx.init(PARAMS)
  params = PARAMS
  for seed in range(3):
    updates, state = tx.update(_grads(seed), state, params)
    params = optax.apply_updates(params, updates)
  flat, start = _flat(params), _flat(PARAMS)
  for path in ("dense/kernel", "dense/bias", "embed/embedding"):
    np.testing.assert_array_equal(flat[path], start[path])
  for path in ("norm/scale", "norm/bias"):
    assert float(jnp.max(jnp.abs(flat[path] - start[path]))) > 0
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moments == 2 * (3 + 3)  # Adam's mu and nu for the norm's two vectors only


def test_lr_groups_scale_their_updates():
  plain = optim.optimizer("sgd", 0.1)
  grouped = optim.optimizer("sgd", 0.1, lr_groups={"^dense/": 10.0, "bias$": 0.5})
  grads = _grads(0)
  want, _ = plain.update(grads, plain.init(PARAMS), PARAMS)
  got, _ = grouped.update(grads, grouped.init(PARAMS), PARAMS)
  want, got = _flat(want), _flat(got)
  factors = {"dense/kernel": 10, "dense/bias": 10, "norm/scale": 1, "norm/bias": 0.5}
  for path, factor in {**factors, "embed/embedding": 1}.items():
    np.testing.assert_allclose(got[path], factor * want[path], rtol=1e-6)


def test_muon_orthogonalises_stacked_matrices_and_leaves_the_rest_to_adam():
  params = {
    "embed": {"embedding": jnp.ones((7, 4))},
    "blocks": {"mlp": {"up": {"kernel": jnp.ones((3, 4, 6))}}, "norm": {"scale": jnp.ones((3, 4))}},
    "head": {"kernel": jnp.ones((4, 7))},
    "hidden": {"0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
  }
  dims = _flat(optim.muon_dimensions()(params))  # MuonDimensionNumbers are pytrees
  assert dims == {
    "blocks/mlp/up/kernel/reduction_axis": 1,
    "blocks/mlp/up/kernel/output_axis": 2,
    "hidden/0/kernel/reduction_axis": 0,
    "hidden/0/kernel/output_axis": 1,
  }
  # One step: each of the 3 stacked [4, 6] updates is Muon's update of that matrix alone.
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  tx = optim.optimizer("muon", 1.0)
  stacked = tx.update(grads, tx.init(params), params)[0]["blocks"]["mlp"]["up"]["kernel"]
  for i in range(3):
    alone = {"w": params["blocks"]["mlp"]["up"]["kernel"][i]}
    g = {"w": grads["blocks"]["mlp"]["up"]["kernel"][i]}
    np.testing.assert_allclose(stacked[i], tx.update(g, tx.init(alone), alone)[0]["w"], atol=1e-6)
  assert float(jnp.abs(stacked[0] - stacked[1]).max()) > 1e-3
