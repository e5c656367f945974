"""The command-line entry shared by experiments: absl flags, exit statuses.

`define_config` declares `--config` with its overrides checked, and `run(main)`
runs `main` under `absl.app.run`. A bad flag, config value or dataset ends the
process with one line on stderr and exit status 2, before anything is compiled
or written.

Example (an experiment module):
  >>> _CONFIG = cli.define_config(get_config())
  >>> if __name__ == "__main__":
  ...   cli.run(main)
"""

import keyword
import re
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxtrain import config as config_lib
from jaxtrain import sharding
from jaxtrain.data.sources import DataError

USAGE_ERRORS = (config_lib.ConfigError, DataError)
_OVERRIDE = re.compile(r"^--config\.([^=]+)=(.*)$", re.DOTALL)
_keyword_overrides: list[tuple[str, str]] = []


def define_config(config: ml_collections.ConfigDict) -> flags.FlagHolder:
  """Defines the locked `--config` flag with default `config`.

  `config_flags` reads the `--config.KEY=VALUE` overrides as the flag is
  defined, so they are checked here first: an unknown key exits with status 2.
  Keys whose last part is a Python keyword (`ckpt.async`) cannot go through
  `config_flags`; they are set after parsing, with the key's type.

  Args:
    config: the experiment's config, with every default.

  Returns:
    The flag holder; `.value` is the resolved config once flags are parsed.
  """
  known = [key for key, _ in config_lib.flatten(config)]
  kept = []
  for arg in sys.argv:
    match = _OVERRIDE.match(arg)
    if match and match.group(1) not in known:
      fail(config_lib.unknown_key_message(match.group(1), known))
    if match and any(keyword.iskeyword(part) for part in match.group(1).split(".")):
      _keyword_overrides.append((match.group(1), match.group(2)))
    else:
      kept.append(arg)
  sys.argv[:] = kept
  return config_flags.DEFINE_config_dict("config", config, lock_config=True)


def run(main: Callable[[list[str]], None]) -> None:
  """Runs `main` under absl with jaxtrain's flag parsing and exit statuses."""

  def guarded(argv: list[str]) -> None:
    try:
      sharding.initialize_distributed()
      if "config" in flags.FLAGS:  # fail before the experiment loads any data
        config_lib.validate(flags.FLAGS.config, jax.device_count())
      main(argv)
    except USAGE_ERRORS as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse_flags)


def fail(message: str) -> None:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses absl flags; a bad flag or override value exits with status 2."""
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    fail(f"bad flag: {e}")
  for key, text in _keyword_overrides:
    _apply_override(flags.FLAGS.config, key, text)
  return rest


def _apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  current = node[leaf]
  try:
    value = flags.BooleanParser().parse(text) if isinstance(current, bool) else type(current)(text)
  except (TypeError, ValueError) as e:
    fail(f"bad flag: --config.{key}={text}: {e}")
  node[leaf] = value
