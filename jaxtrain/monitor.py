"""Early stopping and reduce-on-plateau: a small pure state machine over eval metrics.

`update(config, state, value, step)` takes one evaluation of the monitored
metric and returns the new `MonitorState`, a pytree of scalars that lives in the
`TrainState`, so it is sharded, checkpointed and restored with everything else.
The functions are written with `jax.numpy` and run inside `jax.jit`.

When a run stops (mode `min`; `max` mirrors it):
- An evaluation *improves* when `value < best - delta`, with `delta = min_delta`,
  or `min_delta * |best|` when `relative`. A tie is not an improvement. `best`
  starts at `baseline` when one is given, else at +inf, so the first finite
  value improves.
- `wait` counts the evaluations since the last improvement. The run stops at
  the evaluation where `wait` reaches `patience`, as Keras' `EarlyStopping` and
  Lightning's count: `patience=5` stops at the fifth evaluation in a row without
  improvement, and `patience` 0 and 1 both stop at the first one.
- Evaluations before `warmup_steps` change neither `best` nor `wait`.
- At any evaluation, warm-up included, a non-finite value stops the run, and so
  does a value worse than `divergence` (above it in `min` mode) when set.

Example (mode `min`, patience 2, min_delta 0.1):

| eval | value | improves         | best | wait | stops |
| ---- | ----- | ---------------- | ---- | ---- | ----- |
| 1    | 1.00  | yes (first)      | 1.00 | 0    | no    |
| 2    | 0.95  | no (< 0.1 better)| 1.00 | 1    | no    |
| 3    | 0.85  | yes              | 0.85 | 0    | no    |
| 4    | 0.85  | no (tie)         | 0.85 | 1    | no    |
| 5    | 0.90  | no               | 0.85 | 2    | yes   |

Reduce-on-plateau uses the same improvement test with its own counter: when it
reaches `plateau_patience` (as in Keras' `ReduceLROnPlateau`; 0 and 1 both
reduce at the first evaluation without improvement), `lr_scale` is multiplied by
`plateau_factor` (not below `plateau_min_scale`), the counter restarts, and the
next `plateau_cooldown` evaluations count as no worse than neutral. The loop copies
`lr_scale` into the optimizer state (`optim.lr_multiplier`), so the step that
uses it never recompiles.

Example:
  >>> config = MonitorConfig(mode="max", patience=3)
  >>> state = init(config)
  >>> state = update(config, state, 0.91, step=100)
  >>> int(state.stop)    # 0: keep going
  0
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtrain import config as config_lib

RUNNING, NO_IMPROVEMENT, NON_FINITE, DIVERGED = 0, 1, 2, 3
REASONS = {
  NO_IMPROVEMENT: "early_stop.patience evaluations in a row without improvement",
  NON_FINITE: "the monitored metric is not finite",
  DIVERGED: "the monitored metric crossed early_stop.divergence",
}


def _default(key: str) -> Any:
  return dataclasses.field(default=config_lib.default(key))


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  """The monitor's settings (the `early_stop` and `plateau` keys; defaults in `jaxtrain.config`).

  Also what a run does with the monitor's verdicts: `metric` is the monitored
  eval metric ("" for none), `restore_best` ends on its best checkpoint, and
  `best_metric`/`best_mode` rank the checkpoints that are kept as best.
  """

  mode: str = _default("early_stop.mode")
  patience: int = _default("early_stop.patience")
  min_delta: float = _default("early_stop.min_delta")
  relative: bool = _default("early_stop.relative")
  baseline: float | None = _default("early_stop.baseline")
  warmup_steps: int = _default("early_stop.warmup_steps")
  divergence: float | None = _default("early_stop.divergence")
  plateau_factor: float = _default("plateau.factor")
  plateau_patience: int = _default("plateau.patience")
  plateau_cooldown: int = _default("plateau.cooldown")
  plateau_min_scale: float = _default("plateau.min_scale")
  metric: str = _default("early_stop.metric")
  restore_best: bool = _default("early_stop.restore_best")
  best_metric: str = _default("ckpt.best_metric")
  best_mode: str = _default("ckpt.best_mode")

  @property
  def best(self) -> tuple[str, str]:
    """The metric and mode that pick the best checkpoint: the monitor's with restore_best."""
    if self.restore_best:
      return self.metric, self.mode
    return self.best_metric, self.best_mode

  @property
  def key(self) -> list[Any]:
    """The settings that give the monitor's state its meaning (a checkpoint records them)."""
    return [self.metric, self.mode, self.baseline]


class MonitorState(NamedTuple):
  """The monitor's state; `best` is in the metric's own units."""

  best: jax.Array  # f32
  best_step: jax.Array  # i32, -1 before the first improvement
  wait: jax.Array  # i32, evaluations since the last improvement
  plateau_wait: jax.Array  # i32
  cooldown: jax.Array  # i32, evaluations left in the plateau cooldown
  lr_scale: jax.Array  # f32, the plateau's learning-rate multiplier
  stop: jax.Array  # i32, RUNNING or the reason to stop


def init(config: MonitorConfig = MonitorConfig()) -> MonitorState:
  """The state before any evaluation."""
  worst = jnp.inf if config.mode == "min" else -jnp.inf
  best = worst if config.baseline is None else config.baseline
  count = lambda value=0: jnp.full((), value, jnp.int32)  # noqa: E731 (a distinct array each)
  return MonitorState(
    best=jnp.asarray(best, jnp.float32),
    best_step=count(-1),
    wait=count(),
    plateau_wait=count(),
    cooldown=count(),
    lr_scale=jnp.ones((), jnp.float32),
    stop=count(),
  )


def update(config: MonitorConfig, state: MonitorState, value: Any, step: Any) -> MonitorState:
  """Takes one evaluation of the monitored metric at `step`.

  Args:
    config: the settings.
    state: the state so far.
    value: the metric's value, a scalar.
    step: the step the evaluation belongs to.

  Returns:
    The new state; `stop` is nonzero once the run should stop, and stays so.
  """
  value = jnp.asarray(value, jnp.float32)
  sign = 1.0 if config.mode == "min" else -1.0  # compare as if minimising
  delta = config.min_delta
  if config.relative:  # against an infinite best (no value yet), any finite value improves
    delta = jnp.where(jnp.isfinite(state.best), delta * jnp.abs(state.best), 0.0)
  diverged = ~jnp.isfinite(value)
  if config.divergence is not None:
    diverged |= sign * value > sign * config.divergence
  warm = jnp.asarray(step) >= config.warmup_steps
  improved = warm & ~diverged & (sign * value < sign * state.best - delta)
  wait = jnp.where(improved, 0, state.wait + warm.astype(jnp.int32))
  reason = jnp.where(warm & (wait >= max(config.patience, 1)), NO_IMPROVEMENT, RUNNING)
  if config.divergence is not None:
    reason = jnp.where(sign * value > sign * config.divergence, DIVERGED, reason)
  reason = jnp.where(jnp.isfinite(value), reason, NON_FINITE)
  plateau_wait, cooldown, lr_scale = _plateau(config, state, improved, warm)
  return MonitorState(
    best=jnp.where(improved, value, state.best),
    best_step=jnp.where(improved, jnp.asarray(step, jnp.int32), state.best_step),
    wait=wait,
    plateau_wait=plateau_wait,
    cooldown=cooldown,
    lr_scale=lr_scale,
    stop=jnp.where(state.stop != RUNNING, state.stop, reason),
  )


def _plateau(
  config: MonitorConfig, state: MonitorState, improved: jax.Array, warm: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The plateau counter, cooldown and learning-rate scale after one evaluation."""
  if config.plateau_factor >= 1.0:
    return state.plateau_wait, state.cooldown, state.lr_scale
  in_cooldown = state.cooldown > 0
  bad = warm & ~improved & ~in_cooldown
  plateau_wait = jnp.where(improved | in_cooldown, 0, state.plateau_wait + bad.astype(jnp.int32))
  reduce = plateau_wait >= max(config.plateau_patience, 1)
  scale = jnp.maximum(state.lr_scale * config.plateau_factor, config.plateau_min_scale)
  return (
    jnp.where(reduce, 0, plateau_wait),
    jnp.where(reduce, config.plateau_cooldown, jnp.maximum(state.cooldown - 1, 0)),
    jnp.where(reduce, scale, state.lr_scale),
  )


def summary(state: MonitorState, config: MonitorConfig) -> dict[str, Any]:
  """The host-side view for logs and `run.json` (one small device-to-host copy).

  Returns:
    `best_value` and `best_step` (None before any improvement),
    `patience_left` (evaluations without improvement that would stop the
    run now), `lr_scale`,
    and `reason`: why the monitor stopped the run, or None.
  """
  host = jax.device_get(state)
  improved = int(host.best_step) >= 0
  return {
    "best_value": float(host.best) if improved else None,
    "best_step": int(host.best_step) if improved else None,
    "patience_left": max(max(config.patience, 1) - int(host.wait), 0),
    "lr_scale": float(host.lr_scale),
    "reason": REASONS.get(int(host.stop)),
  }


def stop_reason(metric: str, verdict: dict[str, Any]) -> str:
  """Why the monitor stopped the run, with the best value, for `run.json` and the log."""
  best = "no improvement at all"
  if verdict["best_step"] is not None:
    best = f"best {verdict['best_value']:.6g} at step {verdict['best_step']}"
  return f"{metric}: {verdict['reason']} ({best})"


def progress_fields(verdict: dict[str, Any]) -> dict[str, float]:
  """What the progress bar shows of the monitor: the best value and the patience left."""
  fields = {"patience_left": verdict["patience_left"]}
  if verdict["best_value"] is not None:
    fields["best"] = verdict["best_value"]
  return fields


def line_fields(verdict: dict[str, Any]) -> dict[str, float]:
  """What an eval line of `metrics.jsonl` and TensorBoard carry of the monitor."""
  return {f"monitor_{k}": v for k, v in progress_fields(verdict).items()}


def record_fields(verdict: dict[str, Any], status: str) -> dict[str, Any]:
  """What `run.json` records of the monitor."""
  return {
    "stopped_early": status == "stopped_early",
    "best_step": verdict["best_step"],
    "best_value": verdict["best_value"],
    "lr_scale": verdict["lr_scale"],
  }
