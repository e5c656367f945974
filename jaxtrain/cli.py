"""The command-line entry shared by experiments: absl flags, exit statuses.

`define_config` declares `--config` with its overrides checked, and `run(main)`
runs `main` under `absl.app.run`. A bad flag, config value or dataset ends the
process with one line on stderr and exit status 2, before anything is compiled
or written. A run stopped by SIGTERM after its checkpoint exits with status 3;
a checkpoint that cannot be written, or `train.max_skipped` non-finite updates
in a row, end it with one line and status 1. A run the early-stopping monitor
stopped exits with status 0, like a completed one.

Example (an experiment module):
  >>> _CONFIG = cli.define_config(get_config())
  >>> if __name__ == "__main__":
  ...   cli.run(main)
"""

import keyword
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxtrain import config as config_lib
from jaxtrain import sharding
from jaxtrain.checkpoint import CheckpointError
from jaxtrain.data.sources import DataError
from jaxtrain.loop import NonFiniteError

USAGE_ERRORS = (config_lib.ConfigError, DataError)
EXIT_FAILED = 1  # training failed, e.g. a checkpoint could not be written
EXIT_USAGE = 2  # bad config, flag or data: nothing was compiled or written
EXIT_PREEMPTED = 3  # SIGTERM: a checkpoint was saved; rerun the command to resume
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
    quiet_orbax_logs()
    try:
      sharding.initialize_distributed()
      if "config" in flags.FLAGS:  # fail before the experiment loads any data
        config_lib.validate(flags.FLAGS.config, jax.device_count())
      result = main(argv)
    except USAGE_ERRORS as e:
      fail(str(e))
    except (CheckpointError, NonFiniteError, OSError) as e:  # saved steps are intact
      fail(str(e), EXIT_FAILED)
    if getattr(result, "status", None) == "preempted":
      sys.exit(EXIT_PREEMPTED)

  app.run(guarded, flags_parser=parse_flags)


def quiet_orbax_logs() -> None:
  """Drops Orbax's informational log lines (about thirty for every checkpoint).

  Also its warning on each save without metrics when a best metric is tracked:
  periodic saves between evaluations have none, by design.
  """
  absl_logging.get_absl_handler().addFilter(_not_orbax_noise)


def _not_orbax_noise(record: logging.LogRecord) -> bool:
  if f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  return record.levelno >= logging.WARNING and "did not provide metrics" not in str(record.msg)


def fail(message: str, status: int = EXIT_USAGE) -> None:
  """Prints `error: message` as one line on stderr and exits with `status`."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(status)


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
