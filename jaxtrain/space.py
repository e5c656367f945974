"""A sweep's search space: `KEY=DIST` texts, checked against a config, and the values they draw.

    optim.lr=loguniform(1e-4,1e-2)       a float, uniform in log space
    optim.weight_decay=uniform(0,0.1)    a float, uniform
    train.batch_size=int(32,256)         an integer, both ends included
    optim.name=choice(adam,rmsprop)      one of the values, read with the key's type

Each key must be one of the config's keys; a bad distribution, a bound of the
wrong type, or a value the config refuses (checked at each bound and choice,
with the run's own checks too when `parse` is given them) is a `ConfigError`
naming it, before any trial runs.

Example:
  >>> dims = space.parse(["optim.lr=loguniform(1e-4,1e-2)"], config)
  >>> space.apply(config, {"optim.lr": 3e-3}).optim.lr
  0.003
"""

import ast
import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import flags

from jaxtrain import cli, parts
from jaxtrain import config as config_lib
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError

try:
  import optuna
except ImportError as e:  # the sweep extra
  raise cli.missing("sweep", "optuna") from e

KINDS = ("uniform", "loguniform", "int", "choice")
FLOATS = ("uniform", "loguniform")
_DIST = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([a-z]+)\((.*)\)\s*$", re.DOTALL)


class Dimension(NamedTuple):
  """One key of the space: `kind` with bounds `low`, `high`, or `choices` (as typed)."""

  key: str
  kind: str
  low: float | int | None = None
  high: float | int | None = None
  choices: tuple[str, ...] = ()

  def distribution(self) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution it draws from (choices as their texts)."""
    if self.kind == "choice":
      return optuna.distributions.CategoricalDistribution(self.choices)
    if self.kind == "int":
      return optuna.distributions.IntDistribution(self.low, self.high)
    return optuna.distributions.FloatDistribution(self.low, self.high,
                                                  log=self.kind == "loguniform")  # fmt: skip

  def suggest(self, trial: optuna.Trial) -> Any:
    """Draws this key's value for `trial`."""
    if self.kind == "choice":
      return trial.suggest_categorical(self.key, self.choices)
    if self.kind == "int":
      return trial.suggest_int(self.key, self.low, self.high)
    return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

  def corners(self) -> tuple[Any, ...]:
    """The values the config is checked at: both bounds, or every choice."""
    return self.choices if self.kind == "choice" else (self.low, self.high)

  def text(self) -> str:
    """The `KEY=DIST` it was read from, normalised."""
    inside = ",".join(self.choices) if self.kind == "choice" else f"{self.low!r},{self.high!r}"
    return f"{self.key}={self.kind}({inside})"


def parse(
  texts: Sequence[str],
  config: ml_collections.ConfigDict,
  check_run: Callable[[ml_collections.ConfigDict], Any] | None = None,
) -> list[Dimension]:
  """Reads `KEY=DIST` texts and checks each key and value against `config`.

  Args:
    texts: the `KEY=DIST` texts.
    config: the base config.
    check_run: checks a whole run's config beyond the framework's keys (the
      experiment's model, data and loss, with abstract shapes), called at each
      bound and choice of a key other than one of the framework's floats
      (`optim.lr`, say, which the config check covers); raises `ConfigError`
      or `DataError`.

  Raises:
    ConfigError: naming the first bad text and its problem.
  """
  if not texts:
    raise ConfigError("--space is required: give one KEY=DIST per key, such as "
                      "--space 'optim.lr=loguniform(1e-4,1e-2)'")  # fmt: skip
  known = [key for key, _ in config_lib.flatten(config)]
  dims = []
  for text in texts:
    dim = _dimension(text, known, config)
    if any(d.key == dim.key for d in dims):
      raise ConfigError(f"--space {text!r}: {dim.key} is given twice")
    # A framework's float key is fully checked by `parts.validate`; others may change what
    # the experiment builds (a model's width, a batch larger than the data, a regex).
    deep = check_run if not (dim.kind in FLOATS and dim.key in config_lib.DEFAULTS) else None
    for value in dim.corners():
      check(config, {dim.key: value}, f"--space {text!r}", deep)
    dims.append(dim)
  return dims


def _dimension(text: str, known: list[str], config: ml_collections.ConfigDict) -> Dimension:
  match = _DIST.match(text)
  if not match:
    raise ConfigError(
      f"--space {text!r} must be KEY=DIST with DIST one of uniform(LOW,HIGH), "
      "loguniform(LOW,HIGH), int(LOW,HIGH), choice(A,B,...)"
    )
  key, kind, inside = match.groups()
  if key not in known:
    raise ConfigError(f"--space {text!r}: {config_lib.unknown_key_message(key, known)}")
  if kind not in KINDS:
    raise ConfigError(f"--space {text!r}: unknown distribution {kind!r} "
                      f"(known: {', '.join(KINDS)})")  # fmt: skip
  default = config_lib.get(config, key)
  if kind == "choice":
    choices = tuple(split(inside))
    if len(choices) < 2 or len(set(choices)) < len(choices):
      raise ConfigError(f"--space {text!r}: choice needs two or more different values")
    for choice in choices:
      convert(default, choice, f"--space {text!r}")
    return Dimension(key, kind, choices=choices)
  bounds = split(inside)
  number = int if kind == "int" else float
  try:
    low, high = (number(b) for b in bounds) if len(bounds) == 2 else (None, None)
  except ValueError:
    low = high = None
  if low is None or not low < high:
    raise ConfigError(f"--space {text!r}: {kind} needs two {number.__name__} bounds, LOW < HIGH")
  if kind == "loguniform" and low <= 0:
    raise ConfigError(f"--space {text!r}: loguniform needs LOW > 0")
  if isinstance(default, bool) or not isinstance(default, int | float):
    raise ConfigError(f"--space {text!r}: {key} is a {type(default).__name__}, not a number; "
                      "use choice(...)")  # fmt: skip
  if isinstance(default, int) and kind in FLOATS:
    raise ConfigError(f"--space {text!r}: {key} is an integer; use int(LOW,HIGH) or choice(...)")
  return Dimension(key, kind, low, high)


def split(inside: str) -> list[str]:
  """Splits on the commas outside brackets and quotes; strips each part."""
  parts, depth, quote, current = [], 0, None, ""
  for ch in inside:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(current.strip())
      current = ""
      continue
    current += ch
  parts.append(current.strip())
  return [p for p in parts if p]


def convert(default: Any, value: Any, where: str) -> Any:
  """`value` (a number or a choice's text) as the type of the key's `default`."""
  if not isinstance(value, str):
    return float(value) if isinstance(default, float) else value
  try:
    if isinstance(default, bool):
      return flags.BooleanParser().parse(value)
    if isinstance(default, int | float):
      return type(default)(ast.literal_eval(value) if isinstance(default, int) else value)
    if isinstance(default, tuple | list):
      parsed = ast.literal_eval(value)
      return tuple(parsed) if isinstance(parsed, tuple | list) else (parsed,)
  except (ValueError, SyntaxError, TypeError) as e:
    raise ConfigError(f"{where}: {value!r} is not a {type(default).__name__}: {e}") from e
  return value


def apply(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with each `key: value` set (converted to the key's type)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in values.items():
      *parents, leaf = key.split(".")
      node = out
      for part in parents:
        node = node[part]
      node[leaf] = convert(node[leaf], value, key)
  return out


def check(
  config: ml_collections.ConfigDict,
  values: Mapping[str, Any],
  where: str,
  check_run: Callable[[ml_collections.ConfigDict], Any] | None = None,
) -> None:
  """Validates `config` with `values` set (`parts.validate`, then `check_run`); names `where`."""
  try:
    changed = apply(config, values)
    parts.validate(changed, jax.device_count())
    if check_run:
      check_run(changed)
  except (ConfigError, DataError) as e:
    raise ConfigError(f"{where}: {e}") from e


def size(dims: Sequence[Dimension]) -> int:
  """How many points a grid over `dims` (choice and int keys) holds, without listing them."""
  return math.prod(len(d.choices) if d.kind == "choice" else d.high - d.low + 1 for d in dims)
