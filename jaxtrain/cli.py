"""The command-line entry shared by experiments: absl flags, help, exit statuses.

`define_flags` declares `--config` (ml_collections' `DEFINE_config_file`: the
experiment's file by default, `--config=FILE.py:PRESET` for a preset, its
`--config.KEY=VALUE` overrides checked against the config's keys),
`--workdir`, `--resume`, and the flags that join a multi-process job
(`--coordinator_address`, `--num_processes`, `--process_id`, `--init_timeout`,
`--peer_timeout`: `jaxtrain.distributed`); `run(main)` runs `main` under
`absl.app.run`. A bad flag, config file, preset, config value, model, loss or
dataset ends the process with one line on stderr and exit status 2, before
anything is compiled or written. A run stopped by SIGTERM after its checkpoint
exits with status 3, one stopped by Ctrl-C with 130; a checkpoint that cannot
be written, or `train.max_skipped` non-finite updates in a row, end it with one
line and status 1. A run the early-stopping monitor stopped exits with status
0, like a completed one. `--help` prints the experiment's docstring, its flags
and every config key with its default and meaning.

Example (an experiment module, run as `python -m experiments.NAME --workdir DIR`
or `python -m experiments.NAME --config=experiments/NAME.py:PRESET --workdir DIR`):
  >>> def get_config(preset="small"): ...
  >>> def main(argv):
  ...   config = flags.FLAGS.config
  ...   return jaxtrain.train(config, ..., workdir=flags.FLAGS.workdir,
  ...                         resume=flags.FLAGS.resume)
  >>> if __name__ == "__main__":  # not when ml_collections loads the file for its config
  ...   cli.define_flags(__file__, MODEL_HELP, presets=("small", "large"))
  ...   cli.run(main)
"""

import importlib
import importlib.util
import inspect
import keyword
import os
import pathlib
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
from jaxtrain import distributed, logs, parts, resume
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
  config_file: str,
  model_help: Mapping[str, str] | None = None,
  workdir_help: str = "Folder for the run's files; relative, . and ~ paths work.",
  presets: Sequence[str] = (),
) -> RunFlags:
  """Defines `--config` (default `config_file`), `--workdir`, `--resume` and the job's flags.

  Args:
    config_file: the experiment's own file (`__file__`), whose `get_config()`
      is the default config and whose `get_config(PRESET)` each preset's.
    model_help: a one-line meaning for each `model.*` key (and top-level
      experiment key), for `--help`.
    workdir_help: the help of `--workdir`.
    presets: the presets its `get_config` takes, for `--help`.

  Returns:
    The flag holders.
  """
  defined = RunFlags(
    define_config(config_file, model_help, presets),
    flags.DEFINE_string("workdir", None, workdir_help, required=True),
    flags.DEFINE_enum(
      "resume",
      "auto",
      resume.RESUME_MODES,
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
  """Defines `--config` for a tool from an experiment module: its file, `MODEL_HELP`, `PRESETS`."""
  define_config(module.__file__, getattr(module, "MODEL_HELP", None),
                getattr(module, "PRESETS", ()))  # fmt: skip


def define_config(
  experiment_file: str,
  model_help: Mapping[str, str] | None = None,
  presets: Sequence[str] = (),
) -> flags.FlagHolder:
  """Defines the locked `--config=FILE.py[:PRESET]` flag, by default `experiment_file`.

  ml_collections' `DEFINE_config_file` loads FILE, a path from the current
  folder, and calls its `get_config(PRESET)` (`get_config()` without a
  preset), then applies the `--config.KEY=VALUE` (or `--config.KEY VALUE`)
  overrides that follow. The config is loaded here first, so that a missing
  file, a bad preset, a config whose keys are not the experiment's, or an
  override of an unknown key exits with one line and status 2 before any flag
  is parsed. Keys whose last part is a Python keyword (`ckpt.async`) cannot go
  through `config_flags`; they are set after parsing, with the key's type.

  Args:
    experiment_file: the experiment's own file; its `get_config()` is the default.
    model_help: a one-line meaning for each `model.*` key (and top-level
      experiment key), for `--help`.
    presets: the presets its `get_config` takes, for `--help` and hints.

  Returns:
    The flag holder; `.value` is the resolved config once flags are parsed.
  """
  default = _relative(experiment_file)
  spec = config_argument(sys.argv[1:])
  _refuse_preset_flag(default, presets)
  base = check(lambda: load_config(default))
  config = base
  if spec is not None and spec != default:
    config = check(lambda: load_config(spec, experiment_file))
    check(lambda: _check_keys(spec, config, default, base))
  _help.update(config=config, model=dict(model_help or {}), spec=spec)
  _take_overrides(config, default, presets, spec)
  source = "FILE.py: the config is FILE's get_config()"
  if presets:
    named = ", ".join(presets)
    source = f"FILE.py[:PRESET]: the config is FILE's get_config(PRESET) (presets: {named})"
  return config_flags.DEFINE_config_file(
    "config", default,
    f"{source}, then the --config.KEY=VALUE overrides that follow; FILE is a path from the "
    "current folder.",
    lock_config=True,
  )  # fmt: skip


def config_argument(argv: Sequence[str]) -> str | None:
  """The `FILE[:PRESET]` of the last `--config=...` (or `--config ...`) in `argv`; None if none."""
  found = None
  for i, arg in enumerate(argv):
    if re.fullmatch(r"--?config", arg):
      found = argv[i + 1] if i + 1 < len(argv) else ""
    elif re.match(r"--?config=", arg):
      found = arg.partition("=")[2]
  return found


def load_config(spec: str, experiment_file: str | None = None) -> ml_collections.ConfigDict:
  """The config `--config=spec` names: FILE's `get_config(PRESET)`, or `get_config()`.

  FILE is read as ml_collections reads it, a path from the current folder.

  Args:
    spec: `FILE.py` or `FILE.py:PRESET`.
    experiment_file: the experiment's own file: the hint when FILE is missing here.

  Returns:
    The config.

  Raises:
    ConfigError: one line: not a .py file, no such file here, a file that does not
      load or defines no `get_config`, or a preset it refuses.
  """
  path, colon, preset = spec.partition(":")
  shown = f"--config={spec}"
  module = _config_module(shown, path, colon + preset, experiment_file)
  get = getattr(module, "get_config", None)
  if not callable(get):
    raise config_lib.ConfigError(f"{shown}: {path} defines no get_config()")
  if colon and not inspect.signature(get).parameters:
    raise config_lib.ConfigError(f"{shown}: {path} has no presets (its get_config() takes "
                                 "no argument)")  # fmt: skip
  try:
    config = get(preset) if colon else get()
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{shown}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise config_lib.ConfigError(f"{shown}: get_config() returned a {type(config).__name__}, "
                                 "not a ConfigDict")  # fmt: skip
  return config


def _config_module(shown: str, path: str, preset: str, experiment_file: str | None) -> Any:
  """Loads the config file `path` as a module (a fresh one, as ml_collections does)."""
  if not path.endswith(".py"):
    example = _relative(experiment_file) if experiment_file else "experiments/NAME.py"
    raise config_lib.ConfigError(f"{shown}: --config takes a file, FILE.py or FILE.py:PRESET, "
                                 f"such as {example}{preset}")  # fmt: skip
  if not os.path.isfile(path):
    full = "the file's full path"
    if experiment_file and pathlib.Path(path).name == pathlib.Path(experiment_file).name:
      full = f"the full path, --config={experiment_file}{preset}"
    hint = f"run from the repository root or give {full}"
    raise config_lib.ConfigError(f"{shown}: no file {path} in {os.getcwd()} (the path is read "
                                 f"from the current folder); {hint}")  # fmt: skip
  name = f"jaxtrain_config_{pathlib.Path(path).stem}"
  loader = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(loader)
  sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
  try:
    loader.loader.exec_module(module)
  except Exception as e:  # the user's file: its error is one line, like any bad flag
    raise config_lib.ConfigError(f"{shown}: {path} does not load: {type(e).__name__}: {e}") from e
  return module


def _check_keys(spec: str, config: ml_collections.ConfigDict, default: str,
                base: ml_collections.ConfigDict) -> None:  # fmt: skip
  """Refuses a config whose keys are not the default config's: the experiment reads those."""
  have, want = {k for k, _ in config_lib.flatten(config)}, {k for k, _ in config_lib.flatten(base)}
  if have == want:
    return
  differences = [f"{what} {', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}"
                 for what, keys in (("lacks", want - have), ("adds", have - want))
                 if keys]  # fmt: skip
  raise config_lib.ConfigError(f"--config={spec}: its keys are not those of {default}'s "
                               f"get_config(): it {' and '.join(differences)}")  # fmt: skip


def _relative(path: str) -> str:
  """`path` from the current folder, as a user types it, when it lies below it; else absolute."""
  full = os.path.abspath(path)
  relative = os.path.relpath(full)
  return full if relative.startswith("..") else relative


def _refuse_preset_flag(default: str, presets: Sequence[str]) -> None:
  """`--preset=NAME`, gone: one line saying where a preset goes now."""
  for i, arg in enumerate(sys.argv[1:], 1):
    if arg == "--preset" or arg.startswith("--preset="):
      name = arg.partition("=")[2] or (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
      name = name or (presets[0] if presets else "PRESET")
      fail(f"--preset is gone: a preset follows the config file, --config={default}:{name}")


def _take_overrides(config: ml_collections.ConfigDict, default: str, presets: Sequence[str],
                    spec: str | None) -> None:  # fmt: skip
  """Checks each `--config.KEY` against `config`; takes out those of keyword keys (set later)."""
  known = [key for key, _ in config_lib.flatten(config)]
  kept, args = [], list(sys.argv)
  while args:
    arg = args.pop(0)
    match = _OVERRIDE.match(arg)
    if match and spec is not None and config_argument(kept) is None:  # config_flags refuses it
      fail(f"{arg} comes before --config={spec}: give the file first, then its overrides")
    if arg.startswith("--config.") and (not match or match.group(1) not in known):
      if not match:
        fail(f"no key in {arg}")
      hint = ""
      if match.group(3) in presets:  # such as the old --config.finetune=lora
        hint = f"; a preset follows the config file, --config={default}:{match.group(3)}"
      fail(config_lib.unknown_key_message(match.group(1), known) + hint)
    if match and any(keyword.iskeyword(part) for part in match.group(1).split(".")):
      _keyword_overrides.append((match.group(1), _value(match, args, config)))
    else:
      kept.append(arg)
  sys.argv[:] = kept


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


def missing(extra: str, package: str) -> ImportError:
  """A tool's `extra` is not installed: one line and exit 2 when a tool runs, else the error.

  Tools import their extras' packages (matplotlib, Optuna) as
  `try: import optuna` / `except ImportError as e: raise cli.missing("sweep", "optuna") from e`.
  """
  message = (f"{package} is not installed, and this tool needs it: pip install -e '.[{extra}]' "
             f"(or pip install 'jaxtrain[{extra}]')")  # fmt: skip
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec and spec.name.startswith("jaxtrain."):
    fail(message)
  return ImportError(message)


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
  found = flags.FLAGS.find_module_defining_flag
  shown = {}  # --config, jaxtrain's flags, then the experiment's (or the tool's) own
  for module in (found("config"), found("workdir"), sys.argv[0]):
    shown.update({f.name: f for f in flags.FLAGS.get_flags_for_module(module or sys.argv[0])})
  for flag in shown.values():
    # --config's default is its file, not the config loaded from it; ml_collections keeps
    # only the file, as the default, when --config is given
    value = getattr(flag, "default_unparsed", flag.default)
    default = f" (default: {value!r})" if value is not None else ""
    lines.append(f"  --{flag.name}: {' '.join(flag.help.split())}{default}")
  lines.append("  --verbosity: 0 also prints the log's INFO lines (--helpfull: absl's other flags)")
  config = _help.get("config")
  if config is None:
    return "\n".join(lines)
  spec = _help.get("spec")
  source = f"the defaults of --config={spec}" if spec else "this experiment's defaults"
  lines += ["", f"config keys: --config.KEY=VALUE ({source}):"]
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
