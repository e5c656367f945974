"""Schedules, the table of optimizers against Optax, its settings, and the wrapper around it."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import config as config_lib
from jaxtrain import finetune, optim, sharding


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


def _bare(name, **options):
  """The table's optimizer `name` with `options`, a function of the learning rate."""
  return functools.partial(optim.base, name, **options)


@pytest.mark.parametrize("name", sorted(optim.BASES))
def test_each_optimizer_minimises_a_quadratic(name):
  target = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  tx = optim.optimizer(_bare(name), 0.1 if name != "adagrad" else 0.5, clip_norm=10.0)
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
  tx = optim.optimizer(optax.sgd, 1.0, accum_steps=3)
  params = jnp.ones(2)
  state = tx.init(params)
  changes = []
  for g in [1.0, 2.0, 3.0]:
    updates, state = tx.update(jnp.full(2, g), state, params)
    changes.append(np.asarray(updates))
  np.testing.assert_allclose(changes[0], 0.0)
  np.testing.assert_allclose(changes[1], 0.0)
  np.testing.assert_allclose(changes[2], -2.0)  # the mean of the three gradients


@pytest.mark.parametrize("name", sorted(optim.BASES))
def test_no_weight_decay_unless_asked(name):
  """Zero gradients and the default weight_decay=0 leave parameters where they are."""
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  tx = _bare(name)(0.1)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0.0


def test_weight_decay_is_applied_when_asked():
  params = {"w": jnp.ones((4, 4))}
  tx = _bare("adamw", weight_decay=0.5)(0.1)
  updates, _ = tx.update({"w": jnp.zeros((4, 4))}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5, rtol=1e-6)


def test_lr_multiplier_scales_the_updates_exactly():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, -0.1, 0.2])}
  plain = optim.optimizer(optax.adam, 1e-2)
  scaled = optim.optimizer(optax.adam, 1e-2, multiplier=True)
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
# Each table entry, with `settings` keys, against the Optax alias (of the schedule) it must equal.
REFERENCES = {
  "adam": ("adam", {}, optax.adam),
  "adamw": (
    "adamw",
    {"weight_decay": 0.1},
    lambda lr: optax.adamw(lr, weight_decay=0.1, mask=_decayed_kernels_only),
  ),
  "rmsprop": (
    "rmsprop",
    {"momentum": 0.9, "centered": True, "nesterov": True},
    lambda lr: optax.rmsprop(lr, momentum=0.9, centered=True, nesterov=True),
  ),
  "adagrad": ("adagrad", {}, optax.adagrad),
  "sgd": (
    "sgd",
    {"momentum": 0.9, "nesterov": True},
    lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
  ),
  "lion": (
    "lion",
    {"weight_decay": 0.1},
    lambda lr: optax.lion(lr, weight_decay=0.1, mask=_decayed_kernels_only),
  ),
  "adafactor": (
    "adafactor",
    {"weight_decay": 0.1},
    lambda lr: optax.adafactor(lr, weight_decay_rate=0.1, weight_decay_mask=_decayed_kernels_only),
  ),
  "muon": (
    "muon",
    {"weight_decay": 0.1},
    lambda lr: optax.contrib.muon(
      lr,
      weight_decay=0.1,
      weight_decay_mask=_decayed_kernels_only,
      muon_weight_dimension_numbers=_kernels_only_to_muon,
    ),
  ),
  "muon_adam_scale": (
    "muon",
    {"muon_adam_scale": 0.5, "muon_adam": (r"(^|/)(scale|bias)$",)},
    lambda lr: optax.contrib.muon(
      lr,
      adam_learning_rate=lambda count: lr(count) * 0.5,
      muon_weight_dimension_numbers=_matrices_to_muon,
    ),
  ),
}


def _matrices_to_muon(params):
  dims = _kernels_only_to_muon(params)
  dims["embed"]["embedding"] = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  return dims


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
  assert {name for name, _, _ in REFERENCES.values()} == set(optim.BASES)


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_from_settings_equals_the_optax_alias(case):
  """Five updates on a schedule: exactly the params of the plain Optax alias's updates."""
  name, options, reference = REFERENCES[case]
  values = {"name": name, "lr": 0.05, "schedule": "cosine", "warmup_steps": 2, **options}
  ours, ours_sched = optim.from_settings(optim.settings(values, total_steps=10), multiplier=False)
  sched = optim.schedule("cosine", lr=0.05, total_steps=10, warmup_steps=2)
  theirs = reference(sched)
  assert [float(ours_sched(n)) for n in range(11)] == [float(sched(n)) for n in range(11)]
  p_ours, p_theirs = PARAMS, PARAMS
  s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
  for seed in range(5):
    u_ours, s_ours = ours.update(_grads(seed), s_ours, p_ours)
    u_theirs, s_theirs = theirs.update(_grads(seed), s_theirs, p_theirs)
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p_ours, PARAMS)
  assert min(jax.tree.leaves(changed)) > 0  # the steps really moved every parameter
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
    np.testing.assert_array_equal(a, b)


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
  tx = _bare(name, **options)(optim.schedule(schedule_name, lr=lr, total_steps=steps))
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


@pytest.mark.parametrize("name", [n for n, b in optim.BASES.items() if "weight_decay" in b.options])
def test_decay_mask_leaves_biases_norm_scales_and_embeddings_alone(name):
  """Zero gradients: only the decayed parameters move, by the decay alone."""
  tx = _bare(name, weight_decay=0.5)(0.1)
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
  tx = _bare("adamw", weight_decay=0.5, no_decay=("kernel$",))(0.1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
  flat = _flat(updates)
  assert float(jnp.max(jnp.abs(flat["dense/kernel"]))) == 0
  np.testing.assert_allclose(flat["norm/scale"], -0.1 * 0.5 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(flat["dense/bias"], -0.1 * 0.5 * 0.5, rtol=1e-6)


def _flat(tree):
  return {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state():
  tx = optim.optimizer(optax.adam, 0.1, frozen=("^dense/", "^embed/"), clip_norm=1.0)
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
  plain = optim.optimizer(optax.sgd, 0.1)
  grouped = optim.optimizer(optax.sgd, 0.1, lr_groups={"^dense/": 10.0, "bias$": 0.5})
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
  tx = _bare("muon")(1.0)
  stacked = tx.update(grads, tx.init(params), params)[0]["blocks"]["mlp"]["up"]["kernel"]
  for i in range(3):
    alone = {"w": params["blocks"]["mlp"]["up"]["kernel"][i]}
    g = {"w": grads["blocks"]["mlp"]["up"]["kernel"][i]}
    np.testing.assert_allclose(stacked[i], tx.update(g, tx.init(alone), alone)[0]["w"], atol=1e-6)
  assert float(jnp.abs(stacked[0] - stacked[1]).max()) > 1e-3


def test_settings_fields_are_the_optim_keys_with_their_config_defaults():
  """One field per `optim` key of `config.DEFAULTS`, whose defaults `settings` takes."""
  keys = [k.removeprefix("optim.") for k in config_lib.DEFAULTS if k.startswith("optim.")]
  assert [f.name for f in dataclasses.fields(optim.Settings)] == [*keys, "total_steps"]
  s = optim.settings({}, total_steps=100)
  parsed = {"lr_groups": {}, "unfreeze": {}}
  for key in keys:
    assert getattr(s, key) == parsed.get(key, config_lib.DEFAULTS[f"optim.{key}"][0]), key
  assert s.total_steps == 100


def test_settings_of_a_config_and_of_its_json_are_equal():
  config = config_lib.get_config()
  config.optim.name, config.optim.lr = "adamw", 1  # an int where a float is meant
  config.optim.lr_groups, config.optim.unfreeze = ("^head/=10",), ("^embed/=20",)
  config.optim.freeze, config.optim.accum_steps = ("^norm/",), 2
  ours = optim.settings(config.optim.to_dict(), total_steps=config.train.steps)
  assert ours == optim.settings(json.loads(config_lib.to_json(config))["optim"], total_steps=1000)
  assert (ours.lr, ours.freeze) == (1.0, ("^norm/",)) and isinstance(ours.lr, float)
  assert (ours.lr_groups, ours.unfreeze) == ({"^head/": 10.0}, {"^embed/": 20})
  with pytest.raises(dataclasses.FrozenInstanceError):
    ours.lr = 2.0


@pytest.mark.parametrize(
  "values,message",
  [
    ({"nmae": "adam"}, "unknown config key optim.nmae (did you mean optim.name?)"),
    ({"name": "adamx"}, "optim.name='adamx' must be one of " + ", ".join(optim.BASES)),
    ({"name": "adam", "weight_decay": 0.1}, "optim.weight_decay=0.1 needs optim.name in (adamw, "),
    ({"name": "adam", "momentum": 0.9}, "optim.momentum=0.9 needs optim.name in (rmsprop, sgd)"),
    ({"name": "sgd", "centered": True}, "optim.centered=True needs optim.name='rmsprop'"),
    ({"name": "adamw", "muon_adam_scale": 2}, "optim.muon_adam_scale=2.0 needs optim.name='muon'"),
  ],
)
def test_settings_refuses_what_the_table_does_not_hold(values, message):
  with pytest.raises(config_lib.ConfigError) as e:
    optim.settings(values, total_steps=100)
  assert message in str(e.value)


def test_base_takes_only_the_optimizers_own_options():
  with pytest.raises(TypeError, match="not accum_steps, clip_norm"):
    optim.base("adam", 0.1, clip_norm=1.0, accum_steps=2)  # the wrapper's: see optimizer


# For each option only some optimizers read: (a non-default value, the values it is compared to).
OPTION_VALUES = {
  "weight_decay": ({"weight_decay": 0.1}, {}),
  "no_decay": ({"weight_decay": 0.1, "no_decay": ("kernel$",)}, {"weight_decay": 0.1}),
  "momentum": ({"momentum": 0.9}, {}),
  "nesterov": ({"momentum": 0.9, "nesterov": True}, {"momentum": 0.9}),
  "centered": ({"centered": True}, {}),
  "muon_adam": ({"muon_adam": ("^dense/",)}, {}),
  "muon_adam_scale": ({"muon_adam_scale": 0.5}, {}),
}


def _params_after(name, options, steps=3):
  tx = _bare(name, **options)(0.05)
  params, state = PARAMS, tx.init(PARAMS)
  for seed in range(steps):
    updates, state = tx.update(_grads(seed), state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("name", sorted(optim.BASES))
def test_each_optimizer_reads_exactly_the_options_its_entry_names(name):
  """A named option changes the updates; any other is refused rather than ignored."""
  assert set(OPTION_VALUES) == {k for b in optim.BASES.values() for k in b.options}
  for key, (changed, compared) in OPTION_VALUES.items():
    if key in optim.BASES[name].options:
      diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                          _params_after(name, changed), _params_after(name, compared))  # fmt: skip
      assert max(jax.tree.leaves(diff)) > 1e-6, key
    else:
      with pytest.raises(config_lib.ConfigError, match=r"needs optim\.name"):
        optim.base(name, 0.05, **changed)


def test_a_table_entry_is_all_a_new_optimizer_needs(monkeypatch):
  """The config takes the new name, `settings` lists it, `from_settings` builds it."""
  monkeypatch.setitem(optim.BASES, "nadam", optim.Base(lambda lr, s: optax.nadam(lr)))
  config = config_lib.get_config()
  config.optim.name = "nadam"
  config_lib.validate(config)
  s = optim.settings(config.optim.to_dict(), total_steps=config.train.steps)
  ours, _ = optim.from_settings(s, multiplier=False)
  theirs = optax.nadam(config.optim.lr)
  got, _ = ours.update(_grads(0), ours.init(PARAMS), PARAMS)
  want, _ = theirs.update(_grads(0), theirs.init(PARAMS), PARAMS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(config_lib.ConfigError, match=r"must be one of adam, .*, muon, nadam$"):
    optim.settings({"name": "nadamw"}, total_steps=10)


def _assert_same_run(ours, theirs, grads_of, calls=6):
  """Same state layout, then exactly the same updates call by call; returns the last one."""
  s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  for seed in range(calls):
    u_ours, s_ours = ours.update(grads_of(seed), s_ours, PARAMS)
    u_theirs, s_theirs = theirs.update(grads_of(seed), s_theirs, PARAMS)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True):
      np.testing.assert_array_equal(a, b)
  return u_ours


def test_wrapper_is_the_hand_built_chain_of_clipping_and_accumulation():
  ours = optim.optimizer(optax.adam, 0.1, clip_norm=1.0, accum_steps=2)
  theirs = optax.MultiSteps(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)), every_k_schedule=2
  )
  big = lambda seed: jax.tree.map(lambda g: 3.0 * g, _grads(seed))  # noqa: E731  (norm > 1)
  last = _assert_same_run(ours, theirs, big)
  assert float(optax.tree.norm(last)) > 0  # the sixth call applied an update
  unclipped = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
  with pytest.raises(AssertionError):  # clipping changes the numbers
    _assert_same_run(ours, unclipped, big)


def test_from_settings_is_the_wrapper_around_the_base_in_this_order():
  """The full chain, layout included, as checkpoints written before the table hold it."""
  values = {
    "name": "adamw", "lr": 0.01, "weight_decay": 0.1, "clip_norm": 1.0, "accum_steps": 2,
    "lr_groups": ("^dense/=10",), "freeze": ("^norm/",), "layer_decay": 0.5,
  }  # fmt: skip
  ours, sched = optim.from_settings(optim.settings(values, total_steps=100), multiplier=True)
  assert float(sched(0)) == 0.01
  adamw = optax.adamw(optax.constant_schedule(0.01), weight_decay=0.1, mask=optim.decay_mask())
  inner = optax.chain(optax.chain(adamw, optim.scale_by_path({"^dense/": 10.0})),
                      finetune.layerwise_decay(0.5))  # fmt: skip
  chain = optax.chain(optax.clip_by_global_norm(1.0), optax.chain(inner, optim.lr_multiplier()))
  theirs = optax.MultiSteps(optim.freeze(chain, ("^norm/",)), every_k_schedule=2)
  _assert_same_run(ours, theirs, _grads)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_tunable_state_values_train_as_settings_with_those_values(name):
  values = {"name": name, "lr": 0.01, "weight_decay": 0.1, "schedule": "cosine", "clip_norm": 1.0}
  tx, unit = optim.tunable(optim.settings(values, total_steps=20), multiplier=False)
  assert float(unit(0)) == 1.0
  held = "weight_decay" in optim.BASES[name].tunable
  state = tx.init(PARAMS)
  assert bool(optax.tree_utils.tree_get_all_with_path(state, "weight_decay")) == held
  new = {"learning_rate": 0.03, **({"weight_decay": 0.3} if held else {})}
  state = optax.tree_utils.tree_set(state, **{k: jnp.float32(v) for k, v in new.items()})
  changed = {**values, "lr": 0.03, "weight_decay": new.get("weight_decay", 0.1)}
  want, _ = optim.from_settings(optim.settings(changed, total_steps=20), multiplier=False)
  p_ours, p_want, s_want = PARAMS, PARAMS, want.init(PARAMS)
  for seed in range(3):
    u, state = tx.update(_grads(seed), state, p_ours)
    w, s_want = want.update(_grads(seed), s_want, p_want)
    p_ours, p_want = optax.apply_updates(p_ours, u), optax.apply_updates(p_want, w)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert _moved(p_ours) > 1e-3


def _moved(params):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS), strict=True))  # fmt: skip
