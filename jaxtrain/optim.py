"""From the `optim` config section to a plain Optax transform and schedule.

Every piece is a public function that returns an ordinary
`optax.GradientTransformation` or schedule, so a notebook can use them one by
one, compose its own chain, and pass it to `jaxtrain.train(..., tx=...)`.
`from_config` assembles the chain that a config describes.

Parameter paths are the `/`-joined keys of the params pytree, such as
`hidden/0/kernel` or `head/bias`; the regular expressions below are matched
against them with `re.search`.

Example:
  >>> sched = schedule("cosine", lr=1e-3, total_steps=1000, warmup_steps=100)
  >>> tx = optimizer("adamw", sched, weight_decay=1e-4, clip_norm=1.0,
  ...                freeze=("^embed/",), lr_groups={"^head/": 10.0})
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxtrain import config as config_lib
from jaxtrain import finetune, sharding
from jaxtrain.config import DECAY_OPTIMIZERS, MUON_ADAM, NO_DECAY, OPTIMIZERS, SCHEDULES

__all__ = [
  "DECAY_OPTIMIZERS",
  "NO_DECAY",
  "OPTIMIZERS",
  "SCHEDULES",
  "base",
  "decay_mask",
  "freeze",
  "from_config",
  "lr_multiplier",
  "muon_dimensions",
  "optimizer",
  "path_labels",
  "scale_by_path",
  "schedule",
]


def schedule(
  name: str,
  *,
  lr: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay_fraction: float = 0.2,
  decay_rate: float = 0.01,
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


def base(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: float = 0.0,
  no_decay: Sequence[str] = NO_DECAY,
  momentum: float = 0.0,
  nesterov: bool = False,
  centered: bool = False,
  muon_adam: Sequence[str] = MUON_ADAM,
  muon_adam_scale: float = 1.0,
) -> optax.GradientTransformation:
  """The named Optax optimizer, with its own options and decoupled weight decay.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: a number or a schedule of the update count.
    weight_decay: decoupled weight decay (`DECAY_OPTIMIZERS` only), on the
      parameters whose paths match none of `no_decay`. As in Optax, adamw and
      lion scale it by the learning rate; adafactor's `weight_decay_rate` is
      added after the learning rate, unscaled.
    no_decay: regular expressions of the paths weight decay leaves alone.
    momentum: for sgd and rmsprop; 0 turns it off.
    nesterov: Nesterov momentum, for sgd and rmsprop.
    centered: centered RMSprop.
    muon_adam: muon: path patterns of the parameters its Adam branch trains,
      besides every parameter of fewer than 2 dimensions (`muon_dimensions`).
    muon_adam_scale: muon: the Adam branch's learning rate as a multiple of
      `learning_rate`.

  Returns:
    Exactly the Optax optimizer of that name with these arguments.
  """
  if _nonzero(weight_decay) and name not in DECAY_OPTIMIZERS:
    raise ValueError(f"weight decay needs one of {DECAY_OPTIMIZERS}, not {name!r}")
  mask, mom = decay_mask(no_decay), momentum or None
  builders = {
    "adam": lambda: optax.adam(learning_rate),
    # Decay always passed: Optax's defaults would decay by 1e-4 (adamw) and 1e-3 (lion).
    "adamw": lambda: optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask),
    "lion": lambda: optax.lion(learning_rate, weight_decay=weight_decay, mask=mask),
    "adafactor": lambda: optax.adafactor(
      learning_rate, weight_decay_rate=weight_decay or None, weight_decay_mask=mask
    ),
    "rmsprop": lambda: optax.rmsprop(
      learning_rate, momentum=mom, nesterov=nesterov, centered=centered
    ),
    "adagrad": lambda: optax.adagrad(learning_rate),
    "sgd": lambda: optax.sgd(learning_rate, momentum=mom, nesterov=nesterov),
    "muon": lambda: optax.contrib.muon(
      learning_rate,
      weight_decay=weight_decay,
      weight_decay_mask=mask,
      adam_learning_rate=_scaled(learning_rate, muon_adam_scale),
      muon_weight_dimension_numbers=muon_dimensions(muon_adam),
    ),
  }
  if name not in builders:
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
  return builders[name]()


def _nonzero(value: Any) -> bool:
  """A number other than 0, or an array (a value held in the optimizer state)."""
  return not isinstance(value, int | float) or value != 0


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
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: float = 0.0,
  no_decay: Sequence[str] = NO_DECAY,
  momentum: float = 0.0,
  nesterov: bool = False,
  centered: bool = False,
  muon_adam: Sequence[str] = MUON_ADAM,
  muon_adam_scale: float = 1.0,
  clip_norm: float = 0.0,
  lr_groups: Mapping[str, float] | None = None,
  frozen: Sequence[str] = (),
  accum_steps: int = 1,
  multiplier: bool = False,
  trainable: Sequence[str] = (),
  layer_decay: float = 1.0,
  layer_pattern: str = finetune.LAYER_PATTERN,
  unfreeze: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
  """The full chain: clipping, the optimizer, per-group rates, freezing, accumulation.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: a number or a schedule of the update count.
    weight_decay: decoupled weight decay (see `base`).
    no_decay: path patterns that weight decay skips.
    momentum: for sgd and rmsprop.
    nesterov: Nesterov momentum, for sgd and rmsprop.
    centered: centered RMSprop.
    muon_adam: muon: path patterns its Adam branch trains (see `base`).
    muon_adam_scale: muon: the Adam branch's learning-rate multiple.
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
  """

  def make(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    tx = base(
      name,
      lr,
      weight_decay=weight_decay,
      no_decay=no_decay,
      momentum=momentum,
      nesterov=nesterov,
      centered=centered,
      muon_adam=muon_adam,
      muon_adam_scale=muon_adam_scale,
    )
    if lr_groups:
      tx = optax.chain(tx, scale_by_path(lr_groups))
    if layer_decay < 1:
      tx = optax.chain(tx, finetune.layerwise_decay(layer_decay, layer_pattern))
    return tx

  tx = make(learning_rate)
  if unfreeze:
    tx = finetune.unfreeze_schedule(make, learning_rate, unfreeze)
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


def from_config(
  config: ml_collections.ConfigDict, *, multiplier: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The transform and schedule of a run's `optim` section (`train.steps` sets the length).

  With `optim.accum_steps = k` the schedule counts updates, `train.steps // k` of them.
  """
  sched = _schedule(config, config.optim.lr)
  return _chain(config, sched, config.optim.weight_decay, multiplier), sched


TUNABLE = ("learning_rate", "weight_decay")  # what `tunable` holds in the optimizer state


def tunable(
  config: ml_collections.ConfigDict, *, multiplier: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`from_config`'s transform with `learning_rate` and `weight_decay` in its state.

  `optax.inject_hyperparams` holds the schedule's peak `learning_rate` (the
  schedule is `unit(count) * learning_rate`) and, for the optimizers with
  decoupled decay but adafactor, `weight_decay` as arrays of the optimizer
  state, so a vmapped stack of states trains each with its own values in one
  program (`jaxtrain.population`). Set them with
  `optax.tree_utils.tree_set(opt_state, learning_rate=..., weight_decay=...)`.

  Returns:
    The transform, and the unit schedule (peak 1) of the update count.
  """
  o = config.optim
  unit = _schedule(config, 1.0)
  decays = o.name in DECAY_OPTIMIZERS and o.name != "adafactor"

  def make(learning_rate: jax.Array, weight_decay: Any) -> optax.GradientTransformation:
    lr = lambda count: unit(count) * learning_rate  # noqa: E731
    return _chain(config, lr, weight_decay, multiplier)

  if decays:
    return optax.inject_hyperparams(make)(learning_rate=o.lr, weight_decay=o.weight_decay), unit
  fixed = lambda learning_rate: make(learning_rate, o.weight_decay)  # noqa: E731
  return optax.inject_hyperparams(fixed)(learning_rate=o.lr), unit


def _schedule(config: ml_collections.ConfigDict, lr: float) -> optax.Schedule:
  o = config.optim
  return schedule(
    o.schedule,
    lr=lr,
    total_steps=config.train.steps // o.accum_steps,
    warmup_steps=o.warmup_steps,
    decay_fraction=o.decay_fraction,
    decay_rate=o.decay_rate,
    boundaries=tuple(o.boundaries),
    scales=tuple(o.scales),
  )


def _chain(
  config: ml_collections.ConfigDict, sched: optax.Schedule, weight_decay: Any, multiplier: bool
) -> optax.GradientTransformation:
  o = config.optim
  return optimizer(
    o.name,
    sched,
    weight_decay=weight_decay,
    no_decay=tuple(o.no_decay),
    momentum=o.momentum,
    nesterov=o.nesterov,
    centered=o.centered,
    muon_adam=tuple(o.muon_adam),
    muon_adam_scale=o.muon_adam_scale,
    clip_norm=o.clip_norm,
    lr_groups=config_lib.parse_lr_groups(o.lr_groups),
    frozen=tuple(o.freeze),
    accum_steps=o.accum_steps,
    multiplier=multiplier,
    trainable=tuple(o.trainable),
    layer_decay=o.layer_decay,
    layer_pattern=o.layer_pattern,
    unfreeze={p: s // o.accum_steps for p, s in config_lib.parse_unfreeze(o.unfreeze).items()},
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
