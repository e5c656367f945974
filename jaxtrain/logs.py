"""What a run prints: its own lines, once each, and none of the libraries' noise.

A normal run shows the progress bar and a few notes (`note`: resuming, stopping)
that leave the bar intact. Informational log lines (the backends JAX probes,
the devices, the compiled chunk) go to the log at INFO, which the command line
hides unless `--verbosity=0` asks for it. What the libraries underneath log
(Orbax's informational lines, about thirty per checkpoint, and the tracebacks
of its background threads when a disk fills), what a failed library thread
raises, and the traceback of an error the run stops on go to the workdir's
`log.txt` (`to_file`), not the terminal: there the run says what happened in
one line. What Orbax and asyncio print about the reads of a damaged checkpoint
is dropped; the loop reports the step in one line.

Example:
  >>> note("resuming from the checkpoint at step 300")
  >>> with to_file(workdir):
  ...   train(...)
"""

import contextlib
import functools
import gc
import logging
import os
import pathlib
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import tqdm
from absl import logging as absl_logging

_LIBRARY_NOISE = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", "tensorstore")
FILE = "log.txt"  # in the workdir: the full detail of what a run and its libraries logged
DETAIL = {"detail": True}  # `extra=` of a record for the log file only, not the terminal


def note(message: str) -> None:
  """Prints one line for the user on stderr (process 0 only), above any progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


def brief(problem: str | BaseException, limit: int = 300) -> str:
  """An error in one short line: `Type: message` for an exception, whitespace folded.

  TensorStore appends its whole spec to each read error; that part is dropped.
  """
  if isinstance(problem, BaseException):
    lines = str(problem).strip().splitlines()
    problem = f"{type(problem).__name__}: {lines[0] if lines else ''}"
  text = " ".join(problem.split()).split(" See full TensorStore details")[0]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def quiet_orbax_logs() -> None:
  """Keeps the libraries' records and tracebacks off the terminal (the log file has them).

  Orbax's, TensorStore's and asyncio's records of every level below critical
  (Orbax's informational lines, and the tracebacks its threads and tasks log
  when a save fails: the run names the failure in one line), records meant for
  the log file only (`DETAIL`), and the traceback any library logs for a
  Ctrl-C that stopped it (the run reports the stop itself). A library thread
  that dies is one warning line here and its traceback in the log file
  (`threading.excepthook`). What the libraries' own threads raise where no
  one can catch it (TensorStore's callbacks into an event loop Orbax closed
  after a failed save: "Event loop is closed") goes to the log file only
  (`sys.unraisablehook`).
  """
  absl_logging.get_absl_handler().addFilter(_not_orbax_noise)
  threading.excepthook = _thread_failed
  sys.unraisablehook = functools.partial(_unraisable, sys.unraisablehook)


def _unraisable(previous: Any, unraisable: Any) -> None:
  if not _from_libraries(unraisable):
    previous(unraisable)
    return
  info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
  logging.error("a library raised where nothing could catch it", extra=DETAIL, exc_info=info)


def _not_orbax_noise(record: logging.LogRecord) -> bool:
  if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
    return False
  if getattr(record, "detail", False):
    return False
  library = any(m in record.pathname for m in _LIBRARY_NOISE)
  return not library or record.levelno >= logging.CRITICAL


def _thread_failed(args: threading.ExceptHookArgs) -> None:
  """A thread's uncaught error: its traceback in the log file, and one line on the terminal.

  No line for Orbax's, TensorStore's and asyncio's own threads: they fail with
  the save the run already reports.
  """
  if issubclass(args.exc_type, SystemExit):
    return
  name = args.thread.name if args.thread else "a thread"
  error = args.exc_value if args.exc_value is not None else args.exc_type()
  logging.error("background thread %s failed", name, extra=DETAIL,
                exc_info=(args.exc_type, error, args.exc_traceback))  # fmt: skip
  if not _in_libraries(args.exc_traceback):
    print(f"warning: background thread {name} failed: {brief(error)}", file=sys.stderr,
          flush=True)  # fmt: skip


class _FileHandler(logging.FileHandler):
  """A log file that never complains: a full disk must not print logging's own tracebacks."""

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
    del record

  def close(self) -> None:
    """Closes the file; a write that fails now (a full disk) is dropped."""
    try:
      super().close()
    except OSError:
      self.stream = None


@contextlib.contextmanager
def to_file(
  workdir: pathlib.Path, *, enabled: bool = True, expected: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
  """Sends every log record, with tracebacks, to `workdir/log.txt` while the block runs.

  The file is opened at the first record and appended to, so a resumed run
  adds to it. An error that leaves the block is written there with its
  traceback, unless it is one of `expected` (a mistake of the user's, which
  is one line and nothing written). Records keep their loggers' levels: INFO
  lines appear with `--verbosity=0`.

  Args:
    workdir: the run's (or the sweep's) folder.
    enabled: False in processes other than 0, which write nothing.
    expected: the errors that are the user's to mend, left out of the file.
  """
  if not enabled:
    yield
    return
  handler = _FileHandler(workdir / FILE, delay=True, encoding="utf-8")
  handler.setFormatter(logging.Formatter(
    "%(asctime)s %(levelname)s %(threadName)s %(pathname)s:%(lineno)d] %(message)s"))  # fmt: skip
  # Orbax warns at each save without metrics while a best metric is kept: periodic saves
  # between evaluations have none, by design.
  handler.addFilter(lambda record: "did not provide metrics" not in str(record.msg))
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  except Exception as e:
    log_failure(e, expected)
    raise
  finally:
    root.removeHandler(handler)
    handler.close()


def log_failure(error: BaseException, expected: tuple[type[Exception], ...] = ()) -> None:
  """Writes the error a run stopped on, with its traceback, to the log (`log.txt`).

  Not a user's mistake (`expected`, one line on the terminal), nor Ctrl-C.
  """
  if isinstance(error, Exception) and not isinstance(error, expected):
    logging.error("stopped by %s", brief(error), exc_info=error, extra=DETAIL)


@contextlib.contextmanager
def quiet_failed_reads() -> Iterator[None]:
  """Drops what Orbax and asyncio print about the reads of a damaged step.

  An unreadable array leaves Orbax's read coroutines failed or never awaited;
  Python reports each as an unraisable exception with its traceback (hundreds
  of lines for one step), and Orbax logs errors too. The step is reported in
  one line instead.
  """
  previous = sys.unraisablehook
  noise = _ReadNoise()
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]

  def hook(unraisable: Any) -> None:
    if not _from_libraries(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  for logger in loggers:
    logger.addFilter(noise)
  try:
    yield
  finally:
    gc.collect()  # abandoned read coroutines are reported now, while the hook drops them
    sys.unraisablehook = previous
    for logger in loggers:
      logger.removeFilter(noise)


def _from_libraries(unraisable: Any) -> bool:
  code = getattr(unraisable.object, "cr_code", None)
  return bool(code and _in_libraries(None, code.co_filename)) or _in_libraries(
    unraisable.exc_traceback
  )


def _in_libraries(tb: Any, *names: str) -> bool:
  """Whether a traceback (or one of `names`) passes through Orbax, TensorStore or asyncio."""
  names = (*names, *(f.filename for f in traceback.extract_tb(tb)))
  return any(m in name for name in names for m in _LIBRARY_NOISE)


class _ReadNoise(logging.Filter):
  """Keeps only critical records of Orbax and asyncio while a damaged step is read."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.CRITICAL:
      return True
    return not any(m in record.pathname for m in _LIBRARY_NOISE)


@contextlib.contextmanager
def naming(path: os.PathLike | str) -> Iterator[None]:
  """Re-raises an `OSError` inside as one that names `path` ("could not write ...")."""
  try:
    yield
  except OSError as e:
    if str(e).startswith("could not write"):
      raise
    named = OSError(f"could not write {path}: {e.strerror or e}")
    named.errno = e.errno
    raise named from e
