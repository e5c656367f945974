"""The workdir: one absolute path, one live run at a time, and what a rerun may change.

`resolve` turns a relative, `.` or `~` workdir into an absolute path once, at
the entry (Orbax needs absolute paths); `fresh` makes a new temporary one.
`Lock` (`hold`) lets a single run hold a workdir: a second process started on
it stops with one line naming the first. `open_checkpoints` restores the newest
readable step; `check_resume` decides whether a rerun whose config differs
from its checkpoint's may resume: the keys in `RESUMABLE` may change, any other
change is refused unless `resume="force"`, and `resume="never"` refuses a
workdir that holds checkpoints at all.

Example:
  >>> path = resolve("runs/digits")            # /home/me/project/runs/digits
  >>> lock = Lock(path)                         # raises ConfigError if it is held
  >>> check_resume("auto", saved_config, config, step=600)
  >>> lock.release()
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from jaxtrain import checkpoint, distributed, logs, record
from jaxtrain import config as config_lib
from jaxtrain import parts as parts_lib
from jaxtrain.config import ConfigError

RESUME_MODES = ("auto", "never", "force")
# Keys a resumed run may change: none changes which batch a step sees or what a step computes.
RESUMABLE = (
  "train.steps",  # continue a finished run, or end sooner
  "train.steps_per_loop",  # when it divides the checkpoint's step
  "train.log_every",
  "train.log_norms",
  "train.unroll",
  "train.compile_cache",
  "eval.every_steps",
  "ckpt.every_steps",
  "ckpt.keep",
  "ckpt.async",
  "data.workers",
  "data.max_workers",
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "mesh.rules",
  "profile.start_step",
  "profile.steps",
)
LOCK_NAME = ".lock"


def resolve(workdir: str | os.PathLike | None) -> pathlib.Path | None:
  """The absolute path of `workdir`, `~` expanded; None stays None (see `fresh`).

  Raises:
    ConfigError: for an empty workdir.
  """
  if workdir is None:
    return None
  if not isinstance(workdir, str | os.PathLike) or not isinstance(os.fspath(workdir), str):
    raise ConfigError(f"workdir={workdir!r} must be a path (a str or a pathlib.Path)")
  text = os.fspath(workdir)
  if not text.strip():
    raise ConfigError("workdir is empty; give a folder for the run's files, such as runs/NAME")
  if "\0" in text:
    raise ConfigError(f"workdir {text!r} holds a NUL character")
  return pathlib.Path(text).expanduser().absolute()


def fresh() -> pathlib.Path:
  """A new, empty temporary workdir (one process only: others could not share it).

  Raises:
    ConfigError: with several processes.
  """
  if jax.process_count() > 1:
    raise ConfigError("workdir=None needs one process; give every process the same workdir")
  return pathlib.Path(tempfile.mkdtemp(prefix="jaxtrain-"))


def hold(path: pathlib.Path) -> "Lock":
  """Process 0 locks the workdir; every process stops if it could not.

  Raises:
    ConfigError: the workdir is held by another run, or cannot be written.
  """
  lock, error = None, None
  try:
    lock = Lock(path, enabled=jax.process_index() == 0)
  except ConfigError as e:
    error = e
  if not distributed.everywhere(error is None):
    if lock:
      lock.release()
    raise error or ConfigError(f"workdir {path}: process 0 could not lock it")
  return lock


class Lock:
  """Holds `workdir/.lock` with `flock` while a run uses the workdir.

  The lock file names the holder (process id, host, command, start time), so a
  second run can say who holds it. The operating system drops the lock when
  the holder dies, however it dies, so a killed run never leaves it held. The
  workdir is created if needed; `release` removes the folders it created if
  nothing was written into them.

  Args:
    workdir: the absolute workdir.
    enabled: False in processes other than process 0, which hold nothing.

  Raises:
    ConfigError: the workdir cannot be written, or another process holds it.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.workdir, self._fd = workdir, None
    self._created = []  # the folders this lock made, deepest first
    if not enabled:
      return
    if workdir.exists() and not workdir.is_dir():
      raise ConfigError(f"workdir {workdir} is a file, not a folder")
    try:
      self._created = [p for p in (workdir, *workdir.parents) if not p.exists()]
      workdir.mkdir(parents=True, exist_ok=True)
      self._fd = self._acquire(workdir / LOCK_NAME)
    except OSError as e:
      self.release()
      raise ConfigError(f"workdir {workdir} is not writable ({e.strerror or e})") from e

  def _acquire(self, path: pathlib.Path) -> int:
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a filesystem without locks
          logging.warning("workdir %s: no lock taken (%s)", self.workdir, e.strerror)
          return fd
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise ConfigError(
          f"workdir {self.workdir} is in use by {_holder(path)}; wait for that run to end, "
          "or use another workdir"
        ) from None
      try:  # the holder may have removed the file between our open and our lock
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": " ".join(sys.argv),
      "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd

  def release(self) -> None:
    """Removes the lock file and lets go; removes the folders it made if they stayed empty."""
    if self._fd is not None:
      (self.workdir / LOCK_NAME).unlink(missing_ok=True)
      os.close(self._fd)
      self._fd = None
    for folder in self._created:
      try:
        folder.rmdir()  # only an empty one: a run that wrote anything keeps its workdir
      except OSError:
        break
    self._created = []


def _holder(path: pathlib.Path) -> str:
  try:
    info = json.loads(path.read_text())
    return f"process {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


def changed_keys(
  saved: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
  """The keys whose values differ between a checkpoint's config and `config`.

  Args:
    saved: the checkpoint's config, as a nested dict (from JSON).
    config: this run's config.

  Returns:
    `{key: (old, new)}`, sorted by key; keys only one of them has are left out
    (a newer jaxtrain may add keys with defaults).
  """
  old = dict(_flat_dict(saved))
  new = dict(_flat_dict(json.loads(config_lib.to_json(config))))
  return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def _flat_dict(tree: Mapping[str, Any], prefix: str = "") -> Any:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat_dict(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_resume(
  mode: str, saved: Mapping[str, Any], config: ml_collections.ConfigDict, step: int
) -> dict[str, tuple[Any, Any]]:
  """Refuses a resume that changes keys outside `RESUMABLE`, unless `mode` is force.

  Args:
    mode: one of `RESUME_MODES` (never is handled before any checkpoint is read).
    saved: the checkpoint's config.
    config: this run's config.
    step: the checkpoint's step, for the message.

  Returns:
    The changed keys outside `RESUMABLE` that `force` lets through, `{key: (old, new)}`.

  Raises:
    ConfigError: naming every such key with its old and new value.
  """
  changes = changed_keys(saved, config)
  refused = {k: v for k, v in changes.items() if k not in RESUMABLE}
  if refused and mode != "force":
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
    raise ConfigError(
      f"the config differs from the checkpoint at step {step}: {listed}; to resume, keep the "
      "checkpoint's values (or change only what a resume allows), use another workdir to "
      "start afresh, or pass --resume=force"
    )
  return refused


def _show(value: Any) -> str:
  return json.dumps(value)


def check_mode(mode: str) -> None:
  """Raises `ConfigError` for an unknown resume mode."""
  if mode not in RESUME_MODES:
    raise ConfigError(f"resume={mode!r} must be one of {', '.join(RESUME_MODES)}")


def open_checkpoints(
  config: ml_collections.ConfigDict,
  abstract: Any,
  path: pathlib.Path,
  resume: str,
  *,
  best: tuple[str, str] = ("", "min"),
  initial: Any = None,
  prints: Mapping[str, Any] | None = None,
) -> tuple[checkpoint.Checkpointer, checkpoint.Restored | None]:
  """Opens `path/checkpoints` and restores the newest readable step, if `resume` allows.

  Args:
    config: this run's config, compared with the checkpoint's.
    abstract: the abstract `TrainState` to restore into.
    path: the workdir.
    resume: one of `RESUME_MODES`.
    best: the metric and mode of the best step to keep (`ckpt.best_metric`).
    initial: the run's `weights.Initial`, if any: a checkpoint of a run that
      loaded initial weights resumes only from the same source (by sha256).
    prints: the data's `record.fingerprints`: a checkpoint trained on other
      data, or with another tokenizer, is not resumed.

  Returns:
    The checkpointer, and the restored bundle or None for a fresh start.

  Raises:
    ConfigError: `never` and checkpoints exist, or the config may not resume
      the newest readable step; nothing is written.
    CheckpointError: no step is readable; `run.json` records the failure.
  """
  ckpt = checkpoint.Checkpointer(
    path / "checkpoints",
    keep=config.ckpt.keep,
    async_save=config.ckpt["async"],
    best_metric=best[0],
    best_mode=best[1],
  )
  try:
    held = ckpt.steps() or ckpt.corrupt_folders()
    if resume == "never" and held:
      raise ConfigError(
        f"workdir {path} holds checkpoints ({', '.join(map(str, held))}) and resume is never: "
        "use another workdir, or --resume=auto to resume"
      )
    restored = ckpt.restore(abstract, accept=lambda meta, step: _check_resumable(
      config, resume, meta, step, initial=initial, prints=prints))  # fmt: skip
  except checkpoint.CheckpointError as e:
    if jax.process_index() == 0:
      record.mark_failed(path, f"CheckpointError: {e}")
    ckpt.close()
    raise
  except BaseException:
    ckpt.close()
    raise
  if restored:
    logs.note(f"resuming from the checkpoint at step {restored.step} in {path}")
  return ckpt, restored


def _check_resumable(
  config: ml_collections.ConfigDict,
  resume: str,
  meta: Mapping[str, Any],
  step: int,
  *,
  initial: Any = None,
  prints: Mapping[str, Any] | None = None,
) -> None:
  """Raises `ConfigError` when `config` may not resume the checkpoint at `step`."""
  saved_sha = meta.get("initial_sha256")
  if saved_sha and (initial is None or initial.sha256 != saved_sha):
    now = f"{initial.source} holds {initial.sha256[:12]}..." if initial else "is empty"
    raise ConfigError(
      f"the checkpoint at step {step} was trained from the initial weights {saved_sha[:12]}..., "
      f"and init.source {now}; give the same source to resume, or use another workdir"
    )
  changed = data_change(meta.get("fingerprints"), prints, step)
  if changed and resume != "force":
    raise ConfigError(f"{changed}; put the old one back to resume, use another workdir, or "
                      "pass --resume=force")  # fmt: skip
  if changed:
    logging.warning("resuming anyway (--resume=force): %s", changed)
  if "config" in meta:
    check_resume(resume, meta["config"], config, step)
  else:  # saved before checkpoints held their config: only the data order is known
    for key, saved in meta["data_order"].items():
      if config_lib.get(config, key) != saved and resume != "force":
        raise ConfigError(
          f"{key}={config_lib.get(config, key)!r} differs from {saved!r} in the checkpoint at "
          f"step {step}; keep it to resume, or use another workdir"
        )
  k = config.train.steps_per_loop
  if step % k:
    raise ConfigError(
      f"train.steps_per_loop={k} does not divide the checkpoint's step {step}; "
      "pick one that does to resume"
    )


def data_change(
  saved: Mapping[str, Any] | None, prints: Mapping[str, Any] | None, step: int
) -> str | None:
  """How the data or its files differ from the checkpoint's record (`record.fingerprints`)."""
  if not saved or not prints:  # a checkpoint from before data was recorded
    return None
  for name, sha in saved.get("files", {}).items():
    now = prints["files"].get(name)
    if now != sha:
      state = f"now {now[:12]}..." if now else "now absent"
      return (f"{name} in the workdir differs from the one the checkpoint at step {step} "
              f"trained with (sha256 {sha[:12]}..., {state})")  # fmt: skip
  for split in ("train", "eval"):
    if saved.get(split) != prints.get(split):
      return (f"the {split} data differs from the data the checkpoint at step {step} trained "
              f"on (fingerprint {saved.get(split)}, now {prints.get(split)})")  # fmt: skip
  return None


def forced_changes(
  config: ml_collections.ConfigDict, restored: checkpoint.Restored | None
) -> dict[str, tuple[Any, Any]] | None:
  """The changed keys that `resume="force"` let through, if any."""
  if not restored or "config" not in restored.meta:
    return None
  return check_resume("force", restored.meta["config"], config, restored.step)


def best_rule(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The metric and mode that pick the best checkpoint: the monitor's with restore_best."""
  e = config.early_stop
  if e.restore_best:
    return e.metric, e.mode
  return config.ckpt.best_metric, config.ckpt.best_mode


def monitor_key(config: ml_collections.ConfigDict) -> list[Any]:
  """The settings that give the monitor's state its meaning (a checkpoint records them)."""
  e = config.early_stop
  return [e.metric, e.mode, e.baseline]


def resumed_state(
  config: ml_collections.ConfigDict, spec: parts_lib.Spec, restored: checkpoint.Restored | None
) -> Any:
  """The restored state, with a fresh monitor if what it watches changed; None to start afresh."""
  if not restored:
    return None
  state = restored.state
  if spec.omit:
    state = parts_lib.completed(spec, state)  # the frozen parameters it left out
  if restored.meta.get("monitor") == monitor_key(config):
    return state
  if config.early_stop.metric:
    logging.warning("early_stop.metric, mode or baseline changed: the monitor starts afresh")
  scale = state.monitor.lr_scale  # the learning rate carries on
  return state.replace(monitor=parts_lib.fresh_monitor(spec, scale))


def start_batch(restored: checkpoint.Restored | None) -> int:
  """The first global batch to read: the restored step's, as its data state records."""
  if not restored:
    return 0
  if isinstance(restored.data_state, dict) and "next_batch" in restored.data_state:
    return int(restored.data_state["next_batch"])
  return restored.step  # a state saved by Grain itself: batch g is trained at step g


def restore_best(
  ckpt: checkpoint.Checkpointer,
  spec: parts_lib.Spec,
  best_step: int | None,
  state: Any,
  eval_metrics: dict[str, float],
) -> tuple[Any, dict[str, float]]:
  """The best step's state and eval metrics (`early_stop.restore_best`); else the given ones."""
  if best_step is None:
    logging.warning("early_stop.restore_best: no evaluation improved; keeping the final state")
    return state, eval_metrics
  if best_step == int(jax.device_get(state.step)):
    return state, eval_metrics
  try:
    best = ckpt.restore_step(best_step, parts_lib.checkpointed(spec, spec.abstract))
  except checkpoint.CheckpointError as error:  # not saved, say restore_best was off until now
    logging.warning("early_stop.restore_best: keeping the final state: %s", error)
    return state, eval_metrics
  logs.note(f"early_stop.restore_best: the best state, step {best_step}, restored")
  return parts_lib.completed(spec, best.state), best.meta["eval"]
