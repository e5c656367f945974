"""A sweep's Optuna study: its storage, sampler and pruner, and which process runs which trial.

Trials record their host and process id (`user_attrs`) and, through the
storage's heartbeat, that they are alive. A trial whose process is gone runs
again with the same values (`RETRY`, Optuna's retry of stale trials, which
copies the values and `user_attrs`, the workdir among them): at once when it
ran on this machine (`take_over`), and from any machine once its heartbeat is
`GRACE` seconds old. `counts` says which trials count toward a sweep's total.
"""

import ast
import logging
import os
import socket
import threading
import time
import warnings
from typing import Any

import optuna
import sqlalchemy

from jaxtrain import logs, space
from jaxtrain.config import ConfigError

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
TrialState = optuna.trial.TrialState
# The heartbeat and its retry are marked experimental; they are what resumes killed trials.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()


def make(table: dict[str, type], text: str, what: str, **defaults: Any) -> Any:
  """An Optuna sampler or pruner from `NAME` or `NAME:KEY=VALUE,...` (values as Python literals)."""
  name, _, args = text.partition(":")
  if name not in table:
    raise ConfigError(f"--{what}={text!r}: unknown {what} (known: {', '.join(table)})")
  kwargs = dict(defaults)
  for item in space.split(args):
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"--{what}={text!r}: {item!r} must be KEY=VALUE")
    kwargs[key.strip()] = _literal(value.strip())
  try:
    return table[name](**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--{what}={text!r}: {e}") from e


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def sampler(text: str, dims: list[space.Dimension]) -> optuna.samplers.BaseSampler:
  """The `--sampler`; `grid` takes every combination of choice and int keys."""
  if text.partition(":")[0] != "grid":
    return make(SAMPLERS, text, "sampler")
  if any(d.kind in space.FLOATS for d in dims):
    raise ConfigError("--sampler=grid needs choice(...) or int(...) keys only")
  grid = {d.key: list(d.choices or range(d.low, d.high + 1)) for d in dims}
  return make(SAMPLERS, text, "sampler", search_space=grid)


def shown_url(url: str) -> str:
  """The storage URL with its password hidden; a `ConfigError` for one that is not a URL."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except sqlalchemy.exc.ArgumentError as e:
    raise ConfigError(f"--storage={url!r} is not a database URL, such as "
                      "sqlite:///runs/study.db or postgresql://user@host/db") from e  # fmt: skip


def open_study(url: str, name: str, direction: str, signature: dict[str, Any], **samplers: Any):
  """Opens or creates the study; refuses one that was created for another sweep."""
  shown = shown_url(url)
  kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
  for attempt in range(OPEN_TRIES):
    try:
      storage = optuna.storages.RDBStorage(
        url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
        heartbeat_stale_trial_callback=RETRY,
      )  # fmt: skip
      study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                  load_if_exists=True, **samplers)  # fmt: skip
      break
    except sqlalchemy.exc.IntegrityError as e:  # another process created the tables first
      if attempt + 1 == OPEN_TRIES:
        raise ConfigError(f"--storage={shown}: cannot open the study: {logs.brief(e)}") from e
      time.sleep(0.2 * (attempt + 1))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
      raise ConfigError(f"--storage={shown}: cannot open the study: {logs.brief(e)}") from e
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
