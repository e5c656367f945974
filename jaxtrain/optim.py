"""Optax optimizers from the `optim` settings: one table of bare ones, one wrapper for the rest.

`BASES` maps each `optim.name` to a small function that builds the bare Optax
optimizer from a learning rate and the typed `Settings`, as Optax's own aliases
do. `optimizer` wraps any bare optimizer in what jaxtrain adds around it:
clipping, learning-rate groups, layer decay, freezing, unfreezing, accumulation
and the plateau multiplier. `from_settings` does both for a run. Every piece
returns an ordinary `optax.GradientTransformation` or schedule, so a notebook
can compose its own chain and pass it to `jaxtrain.train(..., tx=...)`.

Parameter paths are the `/`-joined keys of the params pytree, such as
`hidden/0/kernel` or `head/bias`; the regular expressions below are matched
against them with `re.search`.

Example:
  >>> s = settings({"name": "adamw", "weight_decay": 1e-4, "clip_norm": 1.0}, total_steps=1000)
  >>> tx, sched = from_settings(s, multiplier=False)
  >>> tx = optimizer(optax.adam, 1e-3, clip_norm=1.0, frozen=("^embed/",))  # any Optax alias
"""

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtrain import config as config_lib
from jaxtrain import finetune, sharding
from jaxtrain.config import LAYER_PATTERN, MUON_ADAM, NO_DECAY, SCHEDULES

__all__ = [
  "BASES",
  "NO_DECAY",
  "SCHEDULES",
  "TUNABLE",
  "Base",
  "LrMultiplierState",
  "Settings",
  "base",
  "decay_mask",
  "freeze",
  "from_settings",
  "lr_multiplier",
  "muon_dimensions",
  "optimizer",
  "path_labels",
  "scale_by_path",
  "schedule",
  "settings",
  "tunable",
]

# The `optim` keys of `config.DEFAULTS`, without the prefix: the fields of `Settings`.
_KEYS = tuple(k.removeprefix("optim.") for k in config_lib.DEFAULTS if k.startswith("optim."))
TUNABLE = ("learning_rate", "weight_decay")  # what `tunable` may hold in the optimizer state


def _default(key: str) -> Any:
  """The default of `optim.<key>`, written once in `config.DEFAULTS`."""
  return config_lib.DEFAULTS[f"optim.{key}"][0]


def schedule(
  name: str,
  *,
  lr: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay_fraction: float = _default("decay_fraction"),
  decay_rate: float = _default("decay_rate"),
  boundaries: Sequence[int] = (),
  scales: Sequence[float] = (),
) -> optax.Schedule:
  """Returns a learning-rate schedule that warms up linearly from 0 to `lr`.

  Args:
    name: after the warm-up,
      `constant`: `lr`;
      `cosine`: a cosine decay to 0 at `total_steps`;
      `linear`: a linear decay to 0 at `total_steps`;
      `rsqrt`: `lr * sqrt(w / (t + w))`, `t` steps after the warm-up, `w = max(warmup, 1)`;
      `exponential`: `lr * decay_rate ** (t / (total_steps - warmup_steps))`;
      `piecewise`: `lr * scales[i]` from step `boundaries[i]` on (absolute steps);
      `wsd` (warm-up, stable, decay): constant, then linear to 0 over the last
      `decay_fraction` of the steps.
    lr: the peak learning rate.
    total_steps: the optimizer steps of the run.
    warmup_steps: steps of linear warm-up.
    decay_fraction: for `wsd`, the share of steps spent decaying.
    decay_rate: for `exponential`, the factor reached at `total_steps`.
    boundaries: for `piecewise`, increasing steps.
    scales: for `piecewise`, the multiple of `lr` from each boundary on.

  Returns:
    The schedule, a function of the update count.

  Example:
    >>> sched = schedule("piecewise", lr=0.1, total_steps=300, boundaries=(100, 200),
    ...                  scales=(0.1, 0.01))
    >>> round(float(sched(150)), 6)
    0.01
  """
  after = max(total_steps - warmup_steps, 1)
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, after)
  elif name == "linear":
    main = optax.linear_schedule(lr, 0.0, after)
  elif name == "rsqrt":
    w = max(warmup_steps, 1)
    main = lambda count: lr * jnp.sqrt(w / (jnp.maximum(count, 0) + w))  # noqa: E731
  elif name == "exponential":
    main = optax.exponential_decay(lr, transition_steps=after, decay_rate=decay_rate)
  elif name == "piecewise":
    return _piecewise(lr, warmup_steps, boundaries, scales)
  elif name == "wsd":
    decay = max(round(total_steps * decay_fraction), 1)
    main = optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [max(after - decay, 0)]
    )
  else:
    raise ValueError(f"unknown schedule {name!r}")
  if not warmup_steps:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _piecewise(
  lr: float, warmup_steps: int, boundaries: Sequence[int], scales: Sequence[float]
) -> optax.Schedule:
  """Warm-up, then `lr * scales[i]` from step `boundaries[i]` on."""
  bounds = jnp.asarray(boundaries, jnp.int32)
  values = jnp.asarray([1.0, *scales], jnp.float32) * lr

  def sched(count: jax.Array) -> jax.Array:
    value = values[jnp.sum(count >= bounds)] if len(boundaries) else values[0]
    if warmup_steps:
      value = jnp.where(count < warmup_steps, lr * count / warmup_steps, value)
    return value

  return sched


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """The `optim` section as typed values; `settings` builds one from a plain mapping.

  Each field is the `optim` key of its name, whose default and meaning
  `config.DEFAULTS` gives, plus the run's length. Two keys are read into
  mappings, and `tunable` swaps an array of its state in for `weight_decay`.

  Attributes:
    lr_groups: `{path regex: learning-rate multiplier}`, from `optim.lr_groups`.
    unfreeze: `{path regex: first train step}`, from `optim.unfreeze`.
    total_steps: the run's train steps (`train.steps`); the schedule spans
      `total_steps // accum_steps` updates.
  """

  name: str
  lr: float
  schedule: str
  warmup_steps: int
  decay_fraction: float
  decay_rate: float
  boundaries: tuple[int, ...]
  scales: tuple[float, ...]
  momentum: float
  nesterov: bool
  centered: bool
  weight_decay: float
  no_decay: tuple[str, ...]
  muon_adam: tuple[str, ...]
  muon_adam_scale: float
  clip_norm: float
  accum_steps: int
  freeze: tuple[str, ...]
  lr_groups: Mapping[str, float]
  trainable: tuple[str, ...]
  layer_decay: float
  layer_pattern: str
  unfreeze: Mapping[str, int]
  total_steps: int


def settings(values: Mapping[str, Any], *, total_steps: int) -> Settings:
  """The `Settings` of a plain `optim` mapping; the keys it lacks take their defaults.

  It checks what only this module knows: that `name` is a key of `BASES`, and
  that an option only some optimizers read (`Base.options`) keeps its default
  under the others. `config.validate` checks everything else.

  Args:
    values: `{key: value}` of the `optim` section, such as `config.optim.to_dict()`.
    total_steps: the run's train steps (`train.steps`).

  Returns:
    The settings.

  Raises:
    ConfigError: an unknown key, an unknown optimizer, or an option it does not read.

  Example:
    >>> s = settings({"name": "sgd", "momentum": 0.9}, total_steps=500)
    >>> s.lr, s.momentum
    (0.001, 0.9)
  """
  for key in values:
    if key not in _KEYS:
      known = [f"optim.{k}" for k in _KEYS]
      raise config_lib.ConfigError(config_lib.unknown_key_message(f"optim.{key}", known))
  typed = {k: _typed(_default(k), values.get(k, _default(k))) for k in _KEYS}
  typed["lr_groups"] = config_lib.parse_lr_groups(typed["lr_groups"])
  typed["unfreeze"] = config_lib.parse_unfreeze(typed["unfreeze"])
  s = Settings(**typed, total_steps=total_steps)
  _check(s)
  return s


def _typed(default: Any, value: Any) -> Any:
  """`value` with its default's type: JSON's lists and integer floats come back."""
  if isinstance(default, tuple):
    return tuple(value)
  return float(value) if isinstance(default, float) else value


def _check(s: Settings) -> None:
  """The optimizer is in `BASES`; the options only others read keep their defaults."""
  if s.name not in BASES:
    raise config_lib.ConfigError(f"optim.name={s.name!r} must be one of {', '.join(BASES)}")
  for key in _KEYS:
    readers = [name for name, b in BASES.items() if key in b.options]
    value = getattr(s, key)
    if readers and s.name not in readers and value != _default(key):
      need = f"={readers[0]!r}" if len(readers) == 1 else f" in ({', '.join(readers)})"
      raise config_lib.ConfigError(f"optim.{key}={value!r} needs optim.name{need}")


def path_labels(params: Any, patterns: Sequence[str], hit: Any, miss: Any) -> Any:
  """A pytree like `params`: `hit` where a leaf's path matches a pattern, else `miss`."""
  compiled = [re.compile(p) for p in patterns]

  def label(path: tuple[Any, ...], _: Any) -> Any:
    name = sharding.path_str(path)
    return hit if any(c.search(name) for c in compiled) else miss

  return jax.tree.map_with_path(label, params)


def decay_mask(no_decay: Sequence[str] = NO_DECAY) -> Callable[[Any], Any]:
  """The weight-decay mask: True for every parameter whose path matches no pattern.

  Example:
    >>> optax.adamw(1e-3, weight_decay=0.1, mask=decay_mask())  # not biases, scales
  """
  return lambda params: path_labels(params, no_decay, False, True)


def muon_dimensions(adam: Sequence[str] = MUON_ADAM) -> Callable[[Any], Any]:
  """Muon's split of the parameters: Newton-Schulz over the last two axes, or Adam (None).

  A parameter of at least 2 dimensions whose path matches none of `adam` is a
  matrix to Muon, its leading axes (the stacked layers, say) a batch of
  matrices; the rest (embeddings, the head, norms, biases) go to the Adam branch.
  """

  def dims(path: tuple[Any, ...], leaf: Any) -> Any:
    if leaf.ndim < 2 or any(re.search(p, sharding.path_str(path)) for p in adam):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=leaf.ndim - 2,
                                              output_axis=leaf.ndim - 1)  # fmt: skip

  return lambda params: jax.tree.map_with_path(dims, params)


def _scaled(learning_rate: optax.ScalarOrSchedule, scale: float) -> optax.ScalarOrSchedule:
  if callable(learning_rate):
    return lambda count: learning_rate(count) * scale
  return learning_rate * scale


def _muon(learning_rate: optax.ScalarOrSchedule, s: Settings) -> optax.GradientTransformation:
  """Muon on the matrices of `muon_dimensions`, its Adam branch on the rest."""
  return optax.contrib.muon(
    learning_rate,
    weight_decay=s.weight_decay,
    weight_decay_mask=decay_mask(s.no_decay),
    adam_learning_rate=_scaled(learning_rate, s.muon_adam_scale),
    muon_weight_dimension_numbers=muon_dimensions(s.muon_adam),
  )


class Base(NamedTuple):
  """An optimizer of `BASES`.

  Attributes:
    build: `(learning_rate, settings) -> transform`, exactly the Optax alias
      called with the settings' options.
    options: the `Settings` fields that only some optimizers read, this one
      among them; `settings` refuses a non-default value of one elsewhere.
    tunable: the options besides the learning rate that `tunable` can hold in
      the optimizer state, since `build` takes them as traced arrays.
  """

  build: Callable[[optax.ScalarOrSchedule, Settings], optax.GradientTransformation]
  options: tuple[str, ...] = ()
  tunable: tuple[str, ...] = ()


_DECAY = ("weight_decay", "no_decay")  # decoupled weight decay, masked by path
_MOMENTUM = ("momentum", "nesterov")

# The optimizers of `optim.name`: adding one is an entry here (and a line in
# `config.DEFAULTS` for each new option). As in Optax, adamw, lion and muon scale
# their decay by the learning rate; adafactor adds its `weight_decay_rate` after
# it, unscaled. Decay is always passed, since Optax's defaults would decay by
# 1e-4 (adamw) and 1e-3 (lion); `or None` keeps off what 0 turns off.
BASES: dict[str, Base] = {
  "adam": Base(lambda lr, s: optax.adam(lr)),
  "adamw": Base(
    lambda lr, s: optax.adamw(lr, weight_decay=s.weight_decay, mask=decay_mask(s.no_decay)),
    options=_DECAY,
    tunable=("weight_decay",),
  ),
  "rmsprop": Base(
    lambda lr, s: optax.rmsprop(
      lr, momentum=s.momentum or None, nesterov=s.nesterov, centered=s.centered
    ),
    options=(*_MOMENTUM, "centered"),
  ),
  "adagrad": Base(lambda lr, s: optax.adagrad(lr)),
  "sgd": Base(
    lambda lr, s: optax.sgd(lr, momentum=s.momentum or None, nesterov=s.nesterov),
    options=_MOMENTUM,
  ),
  "lion": Base(
    lambda lr, s: optax.lion(lr, weight_decay=s.weight_decay, mask=decay_mask(s.no_decay)),
    options=_DECAY,
    tunable=("weight_decay",),
  ),
  "adafactor": Base(
    lambda lr, s: optax.adafactor(
      lr, weight_decay_rate=s.weight_decay or None, weight_decay_mask=decay_mask(s.no_decay)
    ),
    options=_DECAY,
  ),
  "muon": Base(_muon, options=(*_DECAY, "muon_adam", "muon_adam_scale"), tunable=("weight_decay",)),
}


def base(
  name: str, learning_rate: optax.ScalarOrSchedule, **options: Any
) -> optax.GradientTransformation:
  """The bare optimizer `name` of `BASES`: exactly its Optax alias, with `options`.

  Args:
    name: a key of `BASES`.
    learning_rate: a number or a schedule of the update count.
    **options: its own `optim` keys (those of `Base.options`, such as
      `weight_decay` or `momentum`); the rest keep their `config.DEFAULTS`.

  Returns:
    The transform.

  Raises:
    TypeError: a key that no optimizer reads (`clip_norm`, say: see `optimizer`).
    ConfigError: an unknown optimizer, or an option of another one.

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), base("adamw", sched, weight_decay=1e-4))
    >>> tx = optimizer(functools.partial(base, "sgd", momentum=0.9), sched, accum_steps=4)
  """
  others = sorted(set(options) - {k for b in BASES.values() for k in b.options})
  if others:
    raise TypeError(f"base() takes an optimizer's own options, not {', '.join(others)}")
  s = settings({"name": name, **options}, total_steps=1)  # the length only sets schedules
  return BASES[s.name].build(learning_rate, s)


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies each update by the value of the first pattern its path matches (else 1).

  Chained after an optimizer, this gives parameter groups their own learning
  rates; it keeps no state.

  Example:
    >>> tx = optax.chain(optax.adam(1e-4), scale_by_path({"^head/": 10.0}))
  """
  patterns = list(multipliers.items())

  def factors(updates: Any) -> Any:
    def factor(path: tuple[Any, ...], _: Any) -> float:
      name = sharding.path_str(path)
      return next((m for p, m in patterns if re.search(p, name)), 1.0)

    return jax.tree.map_with_path(factor, updates)

  def update(
    updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del params
    scaled = jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors(updates))
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def freeze(
  tx: optax.GradientTransformation, patterns: Sequence[str]
) -> optax.GradientTransformation:
  """Applies `tx` only to the parameters whose paths match none of `patterns`.

  The others get zero updates and no optimizer state (`optax.multi_transform`),
  so a frozen backbone costs no Adam moments.

  Example:
    >>> tx = freeze(optax.adam(1e-3), ["^backbone/"])
  """
  labels = lambda params: path_labels(params, patterns, "frozen", "trained")  # noqa: E731
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def optimizer(
  base: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
  learning_rate: optax.ScalarOrSchedule,
  *,
  clip_norm: float = 0.0,
  lr_groups: Mapping[str, float] | None = None,
  frozen: Sequence[str] = (),
  accum_steps: int = 1,
  multiplier: bool = False,
  trainable: Sequence[str] = (),
  layer_decay: float = 1.0,
  layer_pattern: str = LAYER_PATTERN,
  unfreeze: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
  """Wraps a bare optimizer: clipping, group rates, freezing, unfreezing, accumulation.

  Each option's default leaves its piece out: `optimizer(optax.adam, lr)` is
  `optax.adam(lr)`. From the outside in: accumulation, `trainable`, `frozen`,
  `unfreeze`'s hold, clipping, then the optimizer followed by the group rates,
  the layer decay and the plateau multiplier.

  Args:
    base: the bare optimizer as a function of the learning rate: an Optax alias
      (`optax.adam`) or `functools.partial(base, name, **options)`. A function,
      not a transform, since gradual unfreezing builds one per group, each on
      its own shifted schedule.
    learning_rate: a number or a schedule of the update count.
    clip_norm: clip gradients to this global norm first; 0 turns it off.
    lr_groups: learning-rate multipliers by path pattern (`scale_by_path`).
    frozen: path patterns of parameters that are not trained (`freeze`).
    accum_steps: average the gradients of this many calls into one update
      (`optax.MultiSteps`), equal to one update on a batch that many times larger.
    multiplier: chain `lr_multiplier()` after the optimizer, for reduce-on-plateau.
    trainable: if given, only parameters whose paths match one are trained
      (`finetune.train_only`), as if every other one were in `frozen`.
    layer_decay: below 1, layer-wise learning-rate decay (`finetune.layerwise_decay`).
    layer_pattern: the regex whose last group is a parameter's layer index.
    unfreeze: `{path pattern: first update}`, gradual unfreezing
      (`finetune.unfreeze_schedule`); the groups' gradients are held at zero
      before their start, ahead of clipping.

  Returns:
    The transform.

  Example:
    >>> tx = optimizer(optax.adam, 1e-3, clip_norm=1.0, accum_steps=4, lr_groups={"^head/": 10.0})
  """

  def make(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    tx = base(lr)
    if lr_groups:
      tx = optax.chain(tx, scale_by_path(lr_groups))
    if layer_decay < 1:
      tx = optax.chain(tx, finetune.layerwise_decay(layer_decay, layer_pattern))
    return tx

  if unfreeze:
    tx = finetune.unfreeze_schedule(make, learning_rate, unfreeze)
  else:
    tx = make(learning_rate)
  if multiplier:
    tx = optax.chain(tx, lr_multiplier())
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  if unfreeze:
    tx = optax.chain(finetune.hold_until(unfreeze), tx)
  if frozen:
    tx = freeze(tx, frozen)
  if trainable:
    tx = finetune.train_only(tx, trainable)
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
  return tx


def from_settings(
  s: Settings, *, multiplier: bool
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's transform and schedule: `optimizer` around `s.name`, on the schedule of `s`.

  Args:
    s: the `optim` settings (`settings`).
    multiplier: chain `lr_multiplier()` after the optimizer, for reduce-on-plateau.

  Returns:
    The transform, and the schedule of the update count: with `accum_steps = k`
    it spans `total_steps // k` updates.

  Example:
    >>> s = settings({"name": "adamw", "lr": 3e-4, "weight_decay": 0.1}, total_steps=10_000)
    >>> tx, sched = from_settings(s, multiplier=False)
  """
  sched = _schedule(s, s.lr)
  return _wrap(s, sched, multiplier), sched


def tunable(
  s: Settings, *, multiplier: bool
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`from_settings`'s transform with `learning_rate` and `weight_decay` in its state.

  `optax.inject_hyperparams` holds the schedule's peak `learning_rate` (the
  schedule is `unit(count) * learning_rate`) and, for the optimizers whose
  `Base.tunable` names it, `weight_decay` as arrays of the optimizer state, so
  a vmapped stack of states trains each with its own values in one program
  (`jaxtrain.population`). Set them with
  `optax.tree_utils.tree_set(opt_state, learning_rate=..., weight_decay=...)`.

  Returns:
    The transform, and the unit schedule (peak 1) of the update count.
  """
  unit = _schedule(s, 1.0)

  def make(learning_rate: jax.Array, weight_decay: Any) -> optax.GradientTransformation:
    lr = lambda count: unit(count) * learning_rate  # noqa: E731
    return _wrap(dataclasses.replace(s, weight_decay=weight_decay), lr, multiplier)

  if "weight_decay" in BASES[s.name].tunable:
    return optax.inject_hyperparams(make)(learning_rate=s.lr, weight_decay=s.weight_decay), unit
  fixed = lambda learning_rate: make(learning_rate, s.weight_decay)  # noqa: E731
  return optax.inject_hyperparams(fixed)(learning_rate=s.lr), unit


def _schedule(s: Settings, lr: float) -> optax.Schedule:
  """The schedule of `s` with peak `lr`, over the run's updates."""
  return schedule(
    s.schedule,
    lr=lr,
    total_steps=s.total_steps // s.accum_steps,
    warmup_steps=s.warmup_steps,
    decay_fraction=s.decay_fraction,
    decay_rate=s.decay_rate,
    boundaries=s.boundaries,
    scales=s.scales,
  )


def _wrap(
  s: Settings, learning_rate: optax.ScalarOrSchedule, multiplier: bool
) -> optax.GradientTransformation:
  """`optimizer` around the optimizer `s.name` with the wrapping options of `s`."""
  build = BASES[s.name].build
  return optimizer(
    lambda lr: build(lr, s),
    learning_rate,
    clip_norm=s.clip_norm,
    lr_groups=s.lr_groups,
    frozen=s.freeze,
    accum_steps=s.accum_steps,
    multiplier=multiplier,
    trainable=s.trainable,
    layer_decay=s.layer_decay,
    layer_pattern=s.layer_pattern,
    unfreeze={pattern: step // s.accum_steps for pattern, step in s.unfreeze.items()},
  )


class LrMultiplierState(NamedTuple):
  """The factor that `lr_multiplier` applies; set from outside the step."""

  lr_multiplier: jax.Array


def lr_multiplier() -> optax.GradientTransformation:
  """Scales updates by a factor held in the optimizer state (initially 1).

  Chained after an optimizer, it scales the learning rate without recompiling:
  set the factor with `optax.tree_utils.tree_set(opt_state, lr_multiplier=x)`,
  as reduce-on-plateau does. The train step reports `lr` times the factor.

  Example:
    >>> tx = optax.chain(optax.adam(1e-3), lr_multiplier())
    >>> opt_state = optax.tree_utils.tree_set(tx.init(params), lr_multiplier=0.5)
  """

  def init(params: optax.Params) -> LrMultiplierState:
    del params
    return LrMultiplierState(jnp.ones((), jnp.float32))

  def update(
    updates: optax.Updates, state: LrMultiplierState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, LrMultiplierState]:
    del params
    return jax.tree.map(lambda u: u * state.lr_multiplier.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)
