"""What a run prints: its own lines, once each, and none of the libraries' noise.

A normal run shows the progress bar and a few notes (`note`: resuming, stopping)
that leave the bar intact. Informational log lines (the backends JAX probes,
the devices, the compiled chunk) go to the log at INFO, which the command line
hides unless `--verbosity=0` asks for it. Orbax's own informational lines
(about thirty per checkpoint) are dropped, and so is what Orbax and asyncio
print about the reads of a damaged checkpoint, which the loop reports in one
line.

Example:
  >>> note("resuming from the checkpoint at step 300")
"""

import contextlib
import gc
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import tqdm
from absl import logging as absl_logging

_LIBRARY_NOISE = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", "tensorstore")


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
  """Drops Orbax's informational log lines from the absl handler.

  Also its warning on each save without metrics when a best metric is tracked
  (periodic saves between evaluations have none, by design), and the traceback
  any library logs for a Ctrl-C that stopped it: the run reports the stop itself.
  """
  absl_logging.get_absl_handler().addFilter(_not_orbax_noise)


def _not_orbax_noise(record: logging.LogRecord) -> bool:
  if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
    return False
  if f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  return record.levelno >= logging.WARNING and "did not provide metrics" not in str(record.msg)


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
    if not _from_reads(unraisable):
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


def _from_reads(unraisable: Any) -> bool:
  code = getattr(unraisable.object, "cr_code", None)
  names = [code.co_filename] if code else []
  names += [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
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
