"""A sweep's Optuna study: its storage, sampler and pruner, and which process runs which trial.

Trials record their host and process id (`user_attrs`) and, through the
storage's heartbeat, that they are alive. A trial whose process is gone runs
again with the same values (`RETRY`, Optuna's retry of stale trials, which
copies the values and `user_attrs`, the workdir among them): at once when it
ran on this machine (`take_over`), and from any machine once its heartbeat is
`GRACE` seconds old. `counts` says which trials count toward a sweep's total.
`open_sweep` checks the sweep's folder, study name and storage before the
study is opened: nothing is written for a folder that is (or lies inside) a
run, a name that would put trial folders elsewhere, a database in memory, or a
folder whose trials belong to a study the storage does not hold.
"""

import ast
import logging
import os
import pathlib
import re
import socket
import threading
import time
import warnings
from typing import Any

import sqlalchemy

from jaxtrain import cli, logs, record, space
from jaxtrain.config import ConfigError

try:
  import optuna
except ImportError as e:  # the sweep extra
  raise cli.missing("sweep", "optuna") from e

HEARTBEAT = 10  # seconds between a running trial's heartbeats in the study
OPEN_TRIES = 5  # a storage two processes create at once: the second retries
GRACE = 60  # seconds without a heartbeat after which another machine runs the trial again
SAMPLERS = {
  "tpe": optuna.samplers.TPESampler,
  "random": optuna.samplers.RandomSampler,
  "qmc": optuna.samplers.QMCSampler,
  "grid": optuna.samplers.GridSampler,
}
PRUNERS = {
  "median": optuna.pruners.MedianPruner,
  "percentile": optuna.pruners.PercentilePruner,
  "halving": optuna.pruners.SuccessiveHalvingPruner,
  "hyperband": optuna.pruners.HyperbandPruner,
  "none": optuna.pruners.NopPruner,
}
RESEEDED = ("random", "tpe")  # seeded samplers made anew for each trial (`seeded`)
TrialState = optuna.trial.TrialState
# The heartbeat and its retry are marked experimental; they are what resumes killed trials.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()


def make(table: dict[str, type], text: str, what: str, *, defaults: dict[str, Any] | None = None,
         fixed: dict[str, Any] | None = None) -> Any:  # fmt: skip
  """An Optuna sampler or pruner from `NAME` or `NAME:KEY=VALUE,...` (values as Python literals).

  `defaults` apply where the text gives no value; `fixed` replace the text's.
  """
  name = text.partition(":")[0]
  if name not in table:
    raise ConfigError(f"--{what}={text!r}: unknown {what} (known: {', '.join(table)})")
  kwargs = {**(defaults or {}), **_arguments(text, what), **(fixed or {})}
  try:
    return table[name](**kwargs)
  except (TypeError, ValueError, OverflowError) as e:
    raise ConfigError(f"--{what}={text!r}: {e}") from e


def seeded(text: str) -> bool:
  """Whether `sampler` is made anew for each trial: a seeded `random` or `tpe` sampler.

  Their seed only drives draws that nothing stores. QMC's seed names its
  sequence (a new seed per trial would restart it), and a grid never repeats
  a point, so those keep one sampler.
  """
  return text.partition(":")[0] in RESEEDED and "seed" in _arguments(text, "sampler")


def _arguments(text: str, what: str) -> dict[str, Any]:
  """The `KEY=VALUE` arguments after `NAME:`."""
  kwargs = {}
  for item in space.split(text.partition(":")[2]):
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"--{what}={text!r}: {item!r} must be KEY=VALUE")
    kwargs[key.strip()] = _literal(value.strip())
  return kwargs


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def sampler(text: str, dims: list[space.Dimension], trials: int,
            number: int = 0) -> optuna.samplers.BaseSampler:  # fmt: skip
  """The `--sampler`; `grid` takes every combination of choice and int keys.

  A seeded `random` or `tpe` sampler (`random:seed=0`) is made for the trial
  it draws next: its seed is the given one plus that trial's `number`, so a
  resumed sweep draws what an uninterrupted one would, never the first
  trials' values again.

  Raises:
    ConfigError: an unknown sampler or argument, a grid with a float key, or
      one of more points than `trials` (checked without listing them).
  """
  name = text.partition(":")[0]
  fixed = {}
  seed = _arguments(text, "sampler").get("seed") if name in SAMPLERS else None
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
    raise ConfigError(f"--sampler={text!r}: seed={seed!r} must be a whole number, 0 or more")
  if seeded(text):
    fixed["seed"] = (seed + number) % 2**32
  if name != "grid":
    return make(SAMPLERS, text, "sampler", fixed=fixed)
  if any(d.kind in space.FLOATS for d in dims):
    raise ConfigError("--sampler=grid needs choice(...) or int(...) keys only")
  points = space.size(dims)
  if points > trials:
    raise ConfigError(f"--sampler=grid: the space holds {points:,} points, more than the "
                      f"--trials={trials} the sweep runs; narrow it, raise --trials, or draw "
                      "from it with --sampler=random")  # fmt: skip
  grid = {d.key: list(d.choices or range(d.low, d.high + 1)) for d in dims}
  return make(SAMPLERS, text, "sampler", defaults={"search_space": grid}, fixed=fixed)


def shown_url(url: str) -> str:
  """The storage URL with its password hidden; a `ConfigError` for one that is not a URL.

  An SQLite database in memory is refused: the study would end with the
  process, and the heartbeat threads that resume killed trials cannot reach it.
  """
  try:
    parsed = sqlalchemy.engine.make_url(url)
  except sqlalchemy.exc.ArgumentError as e:
    raise ConfigError(f"--storage={url!r} is not a database URL, such as "
                      "sqlite:///runs/study.db or postgresql://user@host/db") from e  # fmt: skip
  memory = parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
  if parsed.drivername.startswith("sqlite") and memory:
    raise ConfigError(f"--storage={url!r} keeps the study in memory, where it ends with the "
                      "sweep; give a file, such as sqlite:///runs/sweep/study.db")  # fmt: skip
  return parsed.render_as_string(hide_password=True)


def sqlite_file(url: str) -> str | None:
  """The file of an SQLite URL, None for other databases."""
  parsed = sqlalchemy.engine.make_url(url)
  return parsed.database if parsed.drivername.startswith("sqlite") else None


def check_name(name: str) -> None:
  """Refuses a study name that cannot name trial folders (`trials/NAME-0001`)."""
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
    raise ConfigError(f"--study={name!r} must be a name of letters, digits, '.', '_' and '-' "
                      "(it names the trials' folders)")  # fmt: skip


def open_sweep(root: pathlib.Path, shown: str, name: str | None, url: str | None,
               signature: dict[str, Any], **kwargs: Any):  # fmt: skip
  """Checks a sweep's folder, study name and storage, then opens its study (`open_study`).

  Args:
    root: the sweep's folder, absolute.
    shown: `--workdir` as given.
    name: `--study`; None names the study after the folder.
    url: `--storage`; None keeps the study in `root/study.db`.
    signature: what the study must have been created with (`open_study`).
    **kwargs: `direction`, `sampler` and `pruner`.

  A folder holding trial folders of the study is resumed only from a storage
  that holds the study: a missing `study.db` is not made anew over them.

  Returns:
    The study and its storage.
  """
  check_root(root, shown)
  if name is not None:
    check_name(name)
  name = name or root.name
  if url:
    shown_url(url)  # a bad URL is refused before anything is written
  held = trial_folders(root, name)
  must_exist = f"{shown} holds trials of study {name!r} ({held[0]})" if held else ""
  if not url:
    root.mkdir(parents=True, exist_ok=True)  # for study.db
  opened = open_study(url or f"sqlite:///{root / 'study.db'}", name, signature=signature,
                      must_exist=must_exist, **kwargs)  # fmt: skip
  root.mkdir(parents=True, exist_ok=True)
  return opened


def prefix(root: pathlib.Path, name: str) -> str:
  """What a trial folder's name starts with: nothing, or `NAME-` for a study not named as root."""
  return "" if name == root.name else f"{name}-"


def trial_folders(root: pathlib.Path, name: str) -> list[str]:
  """The trial folders of study `name` under the sweep's folder (`sweep.trial_folder`'s)."""
  pattern = re.compile(re.escape(prefix(root, name)) + r"[0-9]{4,}")
  return sorted(f"{kind}/{p.name}" for kind in ("trials", "populations")
                for p in (root / kind).glob("*") if pattern.fullmatch(p.name))  # fmt: skip


def check_root(root: pathlib.Path, shown: str) -> None:
  """Refuses a `--workdir` that is a file, or the folder of an ordinary run or one inside it."""
  if root.exists() and not root.is_dir():
    raise ConfigError(f"--workdir={shown} is a file, not a folder")
  if run := record.enclosing_run(root):
    where = "holds a run (run.json)" if run == root.resolve() else f"lies inside the run {run}"
    raise ConfigError(f"--workdir={shown} {where}, not a sweep; give a new one")


def _raced(error: Exception) -> bool:
  """Whether another process created the study's tables or rows at the same moment."""
  return isinstance(error, sqlalchemy.exc.IntegrityError) or (
    isinstance(error, sqlalchemy.exc.OperationalError) and "already exists" in str(error)
  )


def open_study(url: str, name: str, *, direction: str, signature: dict[str, Any],
               must_exist: str = "", **samplers: Any):  # fmt: skip
  """Opens or creates the study; refuses one that was created for another sweep.

  With `must_exist` (why it must: trial folders of it are on disk), a study
  the storage does not hold is refused, and a missing SQLite file is not created.
  """
  shown = shown_url(url)
  file = sqlite_file(url)
  if must_exist and file and not pathlib.Path(file).is_file():
    raise ConfigError(f"{must_exist}, but {file} is missing: put it back to resume, or give "
                      "a new --workdir")  # fmt: skip
  kwargs = {"connect_args": {"timeout": 60}} if file else {}
  for attempt in range(OPEN_TRIES):
    try:
      storage = optuna.storages.RDBStorage(
        url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
        heartbeat_stale_trial_callback=RETRY,
      )  # fmt: skip
      if must_exist and name not in optuna.study.get_all_study_names(storage):
        raise ConfigError(f"{must_exist}, but {shown} holds no study {name!r}: give its "
                          "storage and --study to resume, or a new --workdir")  # fmt: skip
      study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                  load_if_exists=True, **samplers)  # fmt: skip
      break
    except ConfigError:
      raise
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
      if not _raced(e) or attempt + 1 == OPEN_TRIES:
        raise ConfigError(f"--storage={shown}: cannot open the study: {logs.brief(e)}") from e
      time.sleep(0.2 * (attempt + 1))
  saved = study.user_attrs.get("sweep")
  if saved is None:
    study.set_user_attr("sweep", signature)
  elif saved != signature:
    changed = [k for k in signature if saved.get(k) != signature[k]]
    raise ConfigError(
      f"study {name!r} in {shown} belongs to another sweep ({', '.join(changed)} differ: "
      f"it has {', '.join(f'{k}={saved.get(k)}' for k in changed)}); give the same flags, "
      "or a new --study or --workdir"
    )
  return study, storage


def counts(frozen: optuna.trial.FrozenTrial) -> bool:
  """Whether a trial counts toward `--trials`: not one killed (run again) or left over."""
  if frozen.state != TrialState.FAIL:
    return True
  return "error" in frozen.user_attrs


def take_over(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
  """Runs again the trials whose process is gone.

  At once for those of this machine (kill -9, crash); for those elsewhere, once
  their heartbeat is `GRACE` seconds old.
  """
  optuna.storages.fail_stale_trials(study)
  for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    attrs = frozen.user_attrs
    if attrs.get("host") != socket.gethostname() or _alive(attrs.get("pid")):
      continue
    try:
      storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
    except RuntimeError:  # another process on this machine took it first
      continue
    RETRY(study, storage.get_trial(frozen._trial_id))


def _alive(pid: int | None) -> bool:
  if pid is None or pid == os.getpid():
    return pid is not None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remaining(study: optuna.Study, total: int) -> int:
  """Trials still to start: those waiting to run again, and those `total` lacks."""
  trials = study.get_trials(deepcopy=False)
  waiting = sum(t.state == TrialState.WAITING for t in trials)
  return max(total - sum(map(counts, trials)), 0) + waiting


def claim(trial: optuna.Trial) -> None:
  """Records that this process, on this machine, runs `trial`."""
  trial.set_user_attr("host", socket.gethostname())
  trial.set_user_attr("pid", os.getpid())


class Heartbeats:
  """Records the heartbeats of trials that `Study.optimize` does not run: a population's."""

  def __init__(self, storage: optuna.storages.RDBStorage, trial_ids: list[int]):
    self._storage, self._ids, self._stop = storage, trial_ids, threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self) -> None:
    while True:
      for trial_id in self._ids:
        try:
          self._storage.record_heartbeat(trial_id)
        except sqlalchemy.exc.SQLAlchemyError as e:  # the next beat tries again
          logging.warning("heartbeat of trial %d not recorded: %s", trial_id, logs.brief(e))
      if self._stop.wait(HEARTBEAT):
        return

  def __enter__(self) -> "Heartbeats":
    self._thread.start()
    return self

  def __exit__(self, *exc: object) -> None:
    self._stop.set()
    self._thread.join()
