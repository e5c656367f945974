"""From the `optim` config section to a plain Optax transform and schedule.

Every piece returns an ordinary `optax.GradientTransformation` or schedule, so
a notebook can use them directly or compose its own chain and pass that to
`jaxtrain.train` instead.

Example:
  >>> sched = schedule("cosine", lr=1e-3, total_steps=1000, warmup_steps=100)
  >>> tx = optimizer("adamw", sched, weight_decay=1e-4, clip_norm=1.0)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = {
  "adam": optax.adam,
  "adamw": optax.adamw,
  "rmsprop": optax.rmsprop,
  "adagrad": optax.adagrad,
  "sgd": optax.sgd,
  "lion": optax.lion,
  "adafactor": optax.adafactor,
}

WEIGHT_DECAY_ARGS = {
  "adamw": "weight_decay",
  "lion": "weight_decay",
  "adafactor": "weight_decay_rate",
}


def schedule(
  name: str, *, lr: float, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2
) -> optax.Schedule:
  """Returns a learning-rate schedule that warms up linearly from 0 to `lr`.

  Args:
    name: `constant`, `cosine` (decays to 0 at `total_steps`), `linear` (to 0 at
      `total_steps`), `rsqrt` (`lr * sqrt(max(warmup, 1) / step)` after the warm-up) or
      `wsd` (warm-up, stable, then a linear decay to 0 over the last
      `decay_fraction` of the steps).
    lr: the peak learning rate.
    total_steps: the optimizer steps of the run.
    warmup_steps: steps of linear warm-up.
    decay_fraction: for `wsd`, the share of steps spent decaying.

  Returns:
    The schedule, a function of the step count.
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


def optimizer(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: float = 0.0,
  clip_norm: float = 0.0,
  accum_steps: int = 1,
  multiplier: bool = False,
) -> optax.GradientTransformation:
  """Returns the named Optax optimizer with optional clipping and accumulation.

  Args:
    name: a key of `OPTIMIZERS`.
    learning_rate: a number or a schedule of the update count.
    weight_decay: decoupled weight decay, for adamw, lion and adafactor.
    clip_norm: clip gradients to this global norm first; 0 turns it off.
    accum_steps: average the gradients of this many calls into one update.
    multiplier: chain `lr_multiplier()` after the optimizer, for reduce-on-plateau.

  Returns:
    The transform.
  """
  # Always passed where accepted: adamw and lion decay by default (1e-4, 1e-3).
  decay_arg = WEIGHT_DECAY_ARGS.get(name)
  kwargs = {decay_arg: weight_decay} if decay_arg else {}
  tx = OPTIMIZERS[name](learning_rate, **kwargs)
  if multiplier:
    tx = optax.chain(tx, lr_multiplier())
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
  return tx


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
