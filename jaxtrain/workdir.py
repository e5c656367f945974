"""The workdir: one absolute path, and one live run at a time.

`resolve` turns a relative, `.` or `~` workdir into an absolute path once, at
the entry (Orbax needs absolute paths); `fresh` makes a new temporary one.
`Lock` (`hold`) lets a single run hold a workdir: a second process started on
it stops with one line naming the first. What a rerun on a workdir resumes is
`jaxtrain.resume`'s.

Example:
  >>> path = resolve("runs/digits")            # /home/me/project/runs/digits
  >>> lock = Lock(path)                         # raises ConfigError if it is held
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

import jax

from jaxtrain import distributed
from jaxtrain.config import ConfigError

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
