"""The monitor's state machine: when it stops, what it counts best, how it lowers the lr."""

import jax
import numpy as np
import pytest

from jaxtrain import monitor
from jaxtrain.monitor import DIVERGED, NO_IMPROVEMENT, NON_FINITE, RUNNING, MonitorConfig

INF = float("inf")


def _run(config, values, steps=None):
  """Feeds `values` (evaluations at `steps`) through a jitted update; returns the states."""
  update = jax.jit(lambda s, v, n: monitor.update(config, s, v, n))
  state, states = monitor.init(config), []
  for value, step in zip(values, steps or range(100, 100 * len(values) + 1, 100), strict=True):
    state = update(state, value, step)
    states.append(jax.device_get(state))
  return states


# Each row: settings, the values of successive evaluations, then per evaluation
# the expected best, wait, and stop reason.
TABLE = {
  "docstring example": (
    dict(mode="min", patience=2, min_delta=0.1),
    [1.00, 0.95, 0.85, 0.85, 0.90, 0.80],
    [1.00, 1.00, 0.85, 0.85, 0.85, 0.85],
    [0, 1, 0, 1, 2, 3],
    [0, 0, 0, 0, NO_IMPROVEMENT, NO_IMPROVEMENT],
  ),
  "the same in max mode": (
    dict(mode="max", patience=2, min_delta=0.1),
    [-1.00, -0.95, -0.85, -0.85, -0.90, -0.80],
    [-1.00, -1.00, -0.85, -0.85, -0.85, -0.85],
    [0, 1, 0, 1, 2, 3],
    [0, 0, 0, 0, NO_IMPROVEMENT, NO_IMPROVEMENT],
  ),
  "patience 0 stops at the first tie": (
    dict(mode="max", patience=0),
    [0.5, 0.6, 0.6],
    [0.5, 0.6, 0.6],
    [0, 0, 1],
    [0, 0, NO_IMPROVEMENT],
  ),
  "patience 1 stops there too": (
    dict(mode="max", patience=1),
    [0.5, 0.6, 0.6],
    [0.5, 0.6, 0.6],
    [0, 0, 1],
    [0, 0, NO_IMPROVEMENT],
  ),
  "patience 0, min mode, a worse value": (
    dict(mode="min", patience=0),
    [0.5, 0.4, 0.41],
    [0.5, 0.4, 0.4],
    [0, 0, 1],
    [0, 0, NO_IMPROVEMENT],
  ),
  "ties never improve": (
    dict(mode="min", patience=3),
    [0.3, 0.3, 0.3, 0.3],
    [0.3, 0.3, 0.3, 0.3],
    [0, 1, 2, 3],
    [0, 0, 0, NO_IMPROVEMENT],
  ),
  "min_delta is absolute": (
    dict(mode="max", patience=2, min_delta=0.05),
    [0.80, 0.84, 0.86, 0.90],
    [0.80, 0.80, 0.86, 0.86],
    [0, 1, 0, 1],
    [0, 0, 0, 0],
  ),
  "relative min_delta scales with the best": (
    dict(mode="min", patience=2, min_delta=0.1, relative=True),
    [2.0, 1.85, 1.79, 1.65, 1.62],
    [2.0, 2.0, 1.79, 1.79, 1.79],
    [0, 1, 0, 1, 2],
    [0, 0, 0, 0, NO_IMPROVEMENT],
  ),
  "a baseline must be beaten first": (
    dict(mode="max", patience=3, baseline=0.9),
    [0.85, 0.88, 0.91, 0.90],
    [0.9, 0.9, 0.91, 0.91],
    [1, 2, 0, 1],
    [0, 0, 0, 0],
  ),
  "a baseline never beaten stops": (
    dict(mode="min", patience=2, baseline=0.2),
    [0.5, 0.4],
    [0.2, 0.2],
    [1, 2],
    [0, NO_IMPROVEMENT],
  ),
  "divergence threshold": (
    dict(mode="min", patience=5, divergence=3.0),
    [2.0, 2.5, 3.5],
    [2.0, 2.0, 2.0],
    [0, 1, 2],
    [0, 0, DIVERGED],
  ),
  "a non-finite value stops at once": (
    dict(mode="max", patience=5),
    [0.5, float("nan"), 0.9],
    [0.5, 0.5, 0.9],
    [0, 1, 0],
    [0, NON_FINITE, NON_FINITE],  # the reason stays once set
  ),
}


def _keras_early_stopping(values, patience, min_delta, mode):
  """The evaluation (0-based) where Keras' `EarlyStopping` stops, or None (its rule, written out).

  `wait` grows by one each epoch and restarts at an improvement; training stops
  once `wait >= patience` (Lightning's `EarlyStopping` counts the same way).
  """
  sign = 1.0 if mode == "min" else -1.0
  best, wait = float("inf"), 0
  for epoch, value in enumerate(values):
    wait += 1
    if sign * value < best - min_delta:
      best, wait = sign * value, 0
      continue
    if wait >= patience and epoch > 0:
      return epoch
  return None


def _keras_reduce_on_plateau(values, patience, factor, min_delta, mode):
  """The learning-rate scale after each evaluation under Keras' `ReduceLROnPlateau` (cooldown 0)."""
  sign = 1.0 if mode == "min" else -1.0
  best, wait, scale, scales = float("inf"), 0, 1.0, []
  for value in values:
    if sign * value < best - min_delta:
      best, wait = sign * value, 0
    else:
      wait += 1
      if wait >= patience:
        scale, wait = scale * factor, 0
    scales.append(scale)
  return scales


@pytest.mark.parametrize("patience", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_patience_counts_as_keras_and_lightning_do(patience, mode):
  """On random walks, the monitor stops and reduces at the evaluations Keras' callbacks do."""
  rng = np.random.default_rng(patience + (mode == "max"))
  for _ in range(5):
    values = np.round(np.cumsum(rng.normal(0, 1, 30)) * 0.1, 2).tolist()  # on a 0.01 grid: ties
    config = MonitorConfig(
      mode=mode, patience=patience, min_delta=0.005, plateau_factor=0.5, plateau_patience=patience
    )
    states = _run(config, values)
    stops = [i for i, s in enumerate(states) if int(s.stop) == NO_IMPROVEMENT]
    assert (stops[0] if stops else None) == _keras_early_stopping(values, patience, 0.005, mode)
    expected = _keras_reduce_on_plateau(values, patience, 0.5, 0.005, mode)
    assert [float(s.lr_scale) for s in states] == pytest.approx(expected)


@pytest.mark.parametrize("name", list(TABLE))
def test_semantics_table(name):
  settings, values, best, wait, stop = TABLE[name]
  states = _run(MonitorConfig(**settings), values)
  np.testing.assert_allclose([s.best for s in states], best, rtol=1e-6)
  assert [int(s.wait) for s in states] == wait
  assert [int(s.stop) for s in states] == stop


def test_best_step_is_the_step_of_the_last_improvement():
  states = _run(MonitorConfig(mode="max", patience=3), [0.7, 0.8, 0.8, 0.75], [10, 20, 30, 40])
  assert [int(s.best_step) for s in states] == [10, 20, 20, 20]
  summary = monitor.summary(states[-1], MonitorConfig(mode="max", patience=3))
  assert summary == {
    "best_value": pytest.approx(0.8),
    "best_step": 20,
    "patience_left": 1,  # wait 2 of 3: the next evaluation without improvement stops
    "lr_scale": 1.0,
    "reason": None,
  }


def test_no_improvement_yet_reports_no_best():
  state = _run(MonitorConfig(mode="max", baseline=0.95), [0.9])[-1]
  summary = monitor.summary(state, MonitorConfig(mode="max", baseline=0.95))
  assert summary["best_value"] is None and summary["best_step"] is None


def test_warmup_counts_nothing_but_divergence():
  config = MonitorConfig(mode="min", patience=0, warmup_steps=300, divergence=10.0)
  states = _run(config, [1.0, 2.0, 3.0, 4.0], [100, 200, 300, 400])
  assert [float(s.best) for s in states] == [INF, INF, 3.0, 3.0]
  assert [int(s.wait) for s in states] == [0, 0, 0, 1]
  assert [int(s.stop) for s in states] == [RUNNING, RUNNING, RUNNING, NO_IMPROVEMENT]
  assert int(_run(config, [11.0], [100])[-1].stop) == DIVERGED  # not exempt
  assert int(_run(config, [float("inf")], [100])[-1].stop) == NON_FINITE


def test_plateau_lowers_the_scale_after_patience_with_cooldown_and_floor():
  config = MonitorConfig(
    mode="min",
    patience=100,
    plateau_factor=0.5,
    plateau_patience=2,
    plateau_cooldown=1,
    plateau_min_scale=0.2,
  )
  states = _run(config, [1.0] * 9)
  # Eval 1 improves; 2 and 3 do not, so 3 lowers the scale; 4 is in cooldown;
  # 5 and 6 do not improve, 6 lowers it; 7 cools down; 9 hits the floor.
  assert [float(s.lr_scale) for s in states] == pytest.approx(
    [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
  )
  assert all(int(s.stop) == RUNNING for s in states)


def test_plateau_counter_restarts_on_improvement():
  config = MonitorConfig(mode="max", patience=100, plateau_factor=0.1, plateau_patience=2)
  states = _run(config, [0.5, 0.5, 0.6, 0.6, 0.6])
  assert [float(s.lr_scale) for s in states] == pytest.approx([1, 1, 1, 1, 0.1])


def test_plateau_off_keeps_the_scale():
  states = _run(MonitorConfig(mode="min", patience=100), [1.0] * 5)
  assert all(float(s.lr_scale) == 1.0 for s in states)


def test_eager_update_with_python_numbers():
  config = MonitorConfig(mode="max", patience=3)
  state = monitor.update(config, monitor.init(config), 0.91, step=100)
  assert int(state.stop) == RUNNING and int(state.best_step) == 100


def test_a_diverged_value_is_never_the_best():
  states = _run(MonitorConfig(mode="min", divergence=5.0), [7.0])
  assert int(states[-1].best_step) == -1 and int(states[-1].stop) == DIVERGED
