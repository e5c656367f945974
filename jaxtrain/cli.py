"""The command-line entry shared by experiments: absl flags, help, exit statuses.

`define_flags` declares `--config` (its overrides checked against the config's
keys), `--workdir`, `--resume`, and the flags that join a multi-process job
(`--coordinator_address`, `--num_processes`, `--process_id`, `--init_timeout`,
`--peer_timeout`: `jaxtrain.distributed`); `run(main)` runs `main` under
`absl.app.run`. A bad flag, config value, model, loss or dataset ends the
process with one line on stderr and exit status 2, before anything is compiled
or written. A run stopped by SIGTERM after its checkpoint exits with status 3,
one stopped by Ctrl-C with 130; a checkpoint that cannot be written, or
`train.max_skipped` non-finite updates in a row, end it with one line and
status 1. A run the early-stopping monitor stopped exits with status 0, like a
completed one. `--help` prints the experiment's docstring, its flags and every
config key with its default and meaning.

Example (an experiment module):
  >>> FLAGS = cli.define_flags(get_config(), model_help={"hidden": "hidden widths"})
  >>> def main(argv):
  ...   return jaxtrain.train(FLAGS.config.value, ..., workdir=FLAGS.workdir.value,
  ...                         resume=FLAGS.resume.value)
  >>> if __name__ == "__main__":
  ...   cli.run(main)
"""

import importlib
import keyword
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxtrain import config as config_lib
from jaxtrain import distributed, logs, parts, workdir
from jaxtrain.checkpoint import CheckpointError
from jaxtrain.data.sources import DataError
from jaxtrain.distributed import PeerError
from jaxtrain.loop import NonFiniteError

USAGE_ERRORS = (config_lib.ConfigError, DataError)
EXIT_FAILED = 1  # training failed, e.g. a checkpoint could not be written
EXIT_USAGE = 2  # bad config, flag or data: nothing was compiled or written
EXIT_PREEMPTED = 3  # SIGTERM: a checkpoint was saved; rerun the command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")
_OVERRIDE = re.compile(r"^--config\.([^=]+)(=(.*))?$", re.DOTALL)
_keyword_overrides: list[tuple[str, str]] = []
_help: dict[str, Any] = {}


class RunFlags(NamedTuple):
  """The flags `define_flags` declares; each `.value` is set once flags are parsed."""

  config: flags.FlagHolder
  workdir: flags.FlagHolder
  resume: flags.FlagHolder


def define_flags(
  config: ml_collections.ConfigDict | Callable[[str], ml_collections.ConfigDict],
  model_help: Mapping[str, str] | None = None,
  workdir_help: str = "Folder for the run's files; relative, . and ~ paths work.",
  presets: Sequence[str] = (),
) -> RunFlags:
  """Defines `--config` with default `config`, `--workdir` and `--resume` (and `--preset`).

  Args:
    config: the experiment's config, with every default; with `presets`, its
      `get_config(preset)`, called with the `--preset` of the command line.
    model_help: a one-line meaning for each `model.*` key (and top-level
      experiment key), for `--help`.
    workdir_help: the help of `--workdir`.
    presets: the preset names `--preset` takes, the default first.

  Returns:
    The flag holders.
  """
  if presets:
    chosen = chosen_preset(presets)
    flags.DEFINE_enum("preset", presets[0], presets, "The config the overrides start from.")
    config = config(chosen)
  holder = define_config(config, model_help)
  defined = RunFlags(
    holder,
    flags.DEFINE_string("workdir", None, workdir_help, required=True),
    flags.DEFINE_enum(
      "resume",
      "auto",
      workdir.RESUME_MODES,
      "With checkpoints in the workdir: auto resumes unless the config changed a key a "
      "resume may not change; never refuses; force resumes and records the changes.",
    ),
  )
  define_distributed_flags()
  return defined


def define_distributed_flags() -> None:
  """Defines the flags that `run` passes to `distributed.initialize`."""
  flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, where the processes of a multi-host job meet; with "
    "--num_processes and --process_id. Unset: JAX_COORDINATOR_ADDRESS, or the cluster JAX "
    "detects (Cloud TPU VM, SLURM), else one process.",
  )  # fmt: skip
  flags.DEFINE_integer("num_processes", None, "The processes of the job.", lower_bound=1)
  flags.DEFINE_integer("process_id", None, "This process's index, from 0.", lower_bound=0)
  flags.DEFINE_integer(
    "init_timeout", distributed.INIT_TIMEOUT,
    "Seconds to wait for every process to join; then exit with status 1.", lower_bound=1,
  )  # fmt: skip
  flags.DEFINE_integer(
    "peer_timeout", distributed.PEER_TIMEOUT,
    "Seconds a dead peer (no heartbeat) or a barrier may keep the others waiting.",
    lower_bound=1,
  )  # fmt: skip


def _initialize() -> None:
  """Joins the job that the distributed flags (or the environment) describe."""
  f = flags.FLAGS
  if "init_timeout" not in f:  # a module without define_flags
    distributed.initialize()
    return
  distributed.initialize(
    f.coordinator_address,
    f.num_processes,
    f.process_id,
    init_timeout=f.init_timeout,
    peer_timeout=f.peer_timeout,
  )


def chosen_preset(presets: Sequence[str], flag: str = "--preset") -> str:
  """The `--preset=NAME` (or `--preset NAME`, or another `flag`), read before flags parse.

  An experiment whose defaults depend on one key reads it this way, such as
  `chosen_preset(("full", "lora"), "--config.finetune")`.
  """
  args = sys.argv[1:]
  for i, arg in enumerate(args):
    if arg == flag or arg.startswith(flag + "="):
      name = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
      if name not in presets:
        fail(f"{flag}={name!r} must be one of {', '.join(presets)}")
      return name
  return presets[0]


def import_experiment(name: str) -> Any:
  """Imports an experiment module that defines `get_config()` and `task(config, workdir)`.

  An experiment that needs something installed (pretrained weights, say)
  defines `requirements()`, which raises `ConfigError` with the line that
  installs it; it is called here.

  Raises:
    ConfigError: when it cannot be imported, lacks either, or misses a requirement.
  """
  try:
    module = importlib.import_module(name)
  except ImportError as e:
    raise config_lib.ConfigError(f"cannot import experiment {name!r}: {e}") from e
  if not hasattr(module, "task") or not hasattr(module, "get_config"):
    raise config_lib.ConfigError(f"{name} defines no task(config, workdir) and get_config()")
  if hasattr(module, "requirements"):
    module.requirements()
  return module


def define_experiment_config(module: Any) -> None:
  """Defines `--config` (and `--preset`) from an experiment module's config, for a tool.

  The config is `get_config(preset)` with the command line's `--preset` when the
  module lists `PRESETS`, else `get_config()`; `MODEL_HELP` describes its keys.
  """
  presets = getattr(module, "PRESETS", ())
  get = module.get_config
  define_config(get(chosen_preset(presets)) if presets else get(),
                getattr(module, "MODEL_HELP", None))  # fmt: skip
  if presets:
    flags.DEFINE_enum("preset", presets[0], presets, "The config the overrides start from.")


def define_config(
  config: ml_collections.ConfigDict, model_help: Mapping[str, str] | None = None
) -> flags.FlagHolder:
  """Defines the locked `--config` flag with default `config`.

  `config_flags` reads the `--config.KEY=VALUE` (or `--config.KEY VALUE`)
  overrides as the flag is defined, so they are checked here first: an unknown
  key exits with status 2. Keys whose last part is a Python keyword
  (`ckpt.async`) cannot go through `config_flags`; they are set after
  parsing, with the key's type.

  Args:
    config: the experiment's config, with every default.
    model_help: a one-line meaning for each `model.*` key (and top-level
      experiment key), for `--help`.

  Returns:
    The flag holder; `.value` is the resolved config once flags are parsed.
  """
  _help.update(config=config, model=dict(model_help or {}))
  known = [key for key, _ in config_lib.flatten(config)]
  kept, args = [], list(sys.argv)
  while args:
    arg = args.pop(0)
    match = _OVERRIDE.match(arg)
    if arg.startswith("--config.") and (not match or match.group(1) not in known):
      fail(config_lib.unknown_key_message(match.group(1), known) if match else f"no key in {arg}")
    if match and any(keyword.iskeyword(part) for part in match.group(1).split(".")):
      _keyword_overrides.append((match.group(1), _value(match, args, config)))
    else:
      kept.append(arg)
  sys.argv[:] = kept
  return config_flags.DEFINE_config_dict("config", config, lock_config=True)


def _value(match: re.Match, rest: list[str], config: ml_collections.ConfigDict) -> str:
  """The text of an override: after `=`, else the next argument; a bare boolean means true."""
  if match.group(2):
    return match.group(3)
  if isinstance(config_lib.get(config, match.group(1)), bool) and (
    not rest or rest[0].startswith("-")
  ):
    return "true"
  return rest.pop(0) if rest else ""


def asks_help() -> bool:
  """Whether the command line asks for `--help` (or `-h`, `-?`, `--helpshort`)."""
  return any(arg in HELP_FLAGS for arg in sys.argv[1:])


def run(main: Callable[[list[str]], Any]) -> None:
  """Runs `main` under absl with jaxtrain's help, flag parsing, logging and exit statuses."""
  if asks_help():
    print(usage())
    sys.exit(0)

  def guarded(argv: list[str]) -> None:
    _quiet()
    if len(argv) > 1:
      fail(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
    try:
      _initialize()
      if "config" in flags.FLAGS:  # fail before the experiment loads any data
        parts.validate(flags.FLAGS.config, jax.device_count())
      result = main(argv)
    except USAGE_ERRORS as e:
      fail(str(e))
    except (CheckpointError, NonFiniteError, PeerError, OSError) as e:  # saved steps are intact
      fail(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
      fail("stopped at once by Ctrl-C; rerun the same command to resume", EXIT_INTERRUPTED)
    _exit_for(result)

  try:
    app.run(guarded, flags_parser=parse_flags)
  except KeyboardInterrupt:  # before main started: while importing or parsing
    fail("stopped by Ctrl-C before training started", EXIT_INTERRUPTED)


def _quiet() -> None:
  if not flags.FLAGS["verbosity"].present:  # INFO lines only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  logs.quiet_orbax_logs()


def run_tool(main: Callable[[list[str]], Any]) -> None:
  """Runs a tool's `main(argv)` (report, replay): positional arguments, run's logging and errors.

  `--help` prints the tool's docstring and flags, exit status 0. A
  `ConfigError` or `DataError` is one line and exit status 2; a failed
  checkpoint, write or peer one line and 1; Ctrl-C 130.
  """
  if asks_help():
    print(usage())
    sys.exit(0)

  def guarded(argv: list[str]) -> Any:
    _quiet()
    try:
      return main(argv)
    except USAGE_ERRORS as e:
      fail(str(e))
    except (CheckpointError, NonFiniteError, PeerError, OSError) as e:
      fail(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
      fail("stopped at once by Ctrl-C", EXIT_INTERRUPTED)

  app.run(guarded, flags_parser=parse_flags)


def _exit_for(result: Any) -> None:
  status = getattr(result, "status", None)
  codes = {"preempted": EXIT_PREEMPTED, "interrupted": EXIT_INTERRUPTED}
  if status in codes:
    print(f"{status}: {result.reason}", file=sys.stderr, flush=True)
    sys.exit(codes[status])


def check(fn: Callable[[], Any]) -> Any:
  """`fn()`, or one line and exit status 2 when it raises a `ConfigError` or `DataError`.

  For what an entry point checks before its flags are defined, such as that
  an experiment's pretrained weights are installed.
  """
  try:
    return fn()
  except USAGE_ERRORS as e:
    fail(str(e))


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


def usage() -> str:
  """The experiment's docstring, its flags, and every config key with default and meaning."""
  main = sys.modules["__main__"]
  lines = [(main.__doc__ or "").strip(), "", "flags:"]
  ours = flags.FLAGS.find_module_defining_flag("workdir") or sys.argv[0]
  shown = {}  # jaxtrain's flags, then the experiment's own
  for module in (ours, sys.argv[0]):
    shown.update({f.name: f for f in flags.FLAGS.get_flags_for_module(module)})
  for flag in shown.values():
    if flag.name == "config":  # its keys follow
      continue
    default = f" (default: {flag.default!r})" if flag.default is not None else ""
    lines.append(f"  --{flag.name}: {' '.join(flag.help.split())}{default}")
  lines.append("  --verbosity: 0 also prints the log's INFO lines (--helpfull: absl's other flags)")
  config = _help.get("config")
  if config is None:
    return "\n".join(lines)
  lines += ["", "config keys: --config.KEY=VALUE (this experiment's defaults):"]
  for key, value in config_lib.flatten(config):
    setting = f"  {key}={value!r}"
    meaning = _meaning(key)
    if len(setting) < 44:
      lines.append(f"{setting:<44}{meaning}".rstrip())
    else:
      lines += [setting, f"{'':<44}{meaning}"] if meaning else [setting]
  return "\n".join(lines)


def _meaning(key: str) -> str:
  if key in config_lib.DEFAULTS:
    return config_lib.DEFAULTS[key][1]
  return _help.get("model", {}).get(key.removeprefix("model."), "")
