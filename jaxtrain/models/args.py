"""Argument checks for the reference models: a bad size is one line naming it.

A model is built inside `jax.eval_shape` before training, so these run before
anything is compiled; `train` reports the `ConfigError` as it is.
"""

from collections.abc import Sequence

from jaxtrain.config import ConfigError


def positive(model: str, **sizes: int | Sequence[int]) -> None:
  """Raises `ConfigError` unless every size (or every entry of a sequence) is a positive int."""
  for name, value in sizes.items():
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok or not values:
      kind = "positive widths" if isinstance(value, Sequence) else "a positive integer"
      raise ConfigError(f"{model}: {name}={value!r} must be {kind}")


def dropout_rate(model: str, rate: float) -> None:
  """Raises `ConfigError` unless `0 <= rate < 1`."""
  if not 0 <= rate < 1:
    raise ConfigError(f"{model}: dropout={rate!r} must be in [0, 1)")
