"""Metric lines (`metrics.jsonl`), TensorBoard scalars (`tb/`), throughput meters, progress.

Only process 0 writes; the other processes get writers that do nothing, so the
loop never branches on the process index. `Writers` sends every line to the
JSONL file, as `split/name` scalars to TensorBoard event files written by
`tensorboardX`, and to any `extra` writer (see `Writer`; `jaxtrain.sinks` has
Weights & Biases and MLflow ones).

Example:
  >>> writer = Writers(workdir, enabled=True)
  >>> writer.write(100, "train", {"loss": 0.31, "lr": 1e-3})
"""

import json
import logging
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import tqdm

from jaxtrain import logs
from jaxtrain.config import ConfigError


class Writer(Protocol):
  """Receives the run's metric lines: what `Writers` needs of a writer.

  Example, a writer that prints each line:
    >>> class Printer:
    ...   def write(self, step, split, values):
    ...     print(step, split, dict(values))
    ...   def close(self):
    ...     pass
    >>> writers = Writers(workdir, enabled=True, extra=[Printer()])
  """

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Takes one line: the metric values of `split` (`train`, `eval`) at `step`."""

  def close(self) -> None:
    """Flushes and releases what the writer holds; no line comes after it."""


class JsonlWriter:
  """Appends one JSON object a line: `{"step": N, "split": ..., **values, "time": T}`.

  `latest` holds the lines of the newest step written, which a checkpoint of
  that step records (a crash may cut them from the file).
  """

  def __init__(self, path: pathlib.Path | None):
    self._path = path
    self.latest: list[dict[str, Any]] = []
    with logs.naming(path):
      self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (held open)

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Writes one line, with `time` (Unix seconds); non-finite numbers become null."""
    if self._file:
      clean = {k: _jsonable(v) for k, v in values.items()}
      line = {"step": step, "split": split, **clean, "time": round(time.time(), 3)}
      if self.latest and self.latest[0]["step"] != step:
        self.latest = []
      self.latest.append(line)
      with logs.naming(self._path):
        self._file.write(json.dumps(line) + "\n")

  def close(self) -> None:
    """Closes the file."""
    if self._file:
      self._file.close()


class TensorBoardWriter:
  """Writes each numeric value as the scalar `split/name` at `step` into `folder`.

  Events are written and flushed in the calling thread (tensorboardX's record
  writer, without its background thread), so a failed write is an `OSError`
  naming the folder, raised where the line was written. The loop passes
  `purge_step`, the step after a resumed run's restored one (0 for a fresh
  start): TensorBoard hides what an earlier attempt wrote from that step on, as
  `truncate_jsonl` drops it from the JSONL. Each writer's file has its own
  suffix (the attempt), so no attempt's file replaces another's.
  """

  def __init__(self, folder: pathlib.Path | None, purge_step: int | None = None, suffix: str = ""):
    self._folder, self._writer = folder, None
    if folder is None:
      return
    from tensorboardX import event_file_writer  # noqa: PLC0415 (process 0 only: protobuf)
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    self._event = event_pb2.Event
    with logs.naming(folder):
      folder.mkdir(parents=True, exist_ok=True)
      self._writer = event_file_writer.EventsWriter(str(folder / "events"), suffix)
      if purge_step is not None:
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.write_event(self._event(step=purge_step, session_log=start))
      self._writer.flush()

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Adds one scalar a finite number; others are left out."""
    if self._writer is None:
      return
    from tensorboardX import summary  # noqa: PLC0415

    with logs.naming(self._folder):
      for name, raw in values.items():
        value = _jsonable(raw)
        if isinstance(value, int | float) and not isinstance(value, bool):
          scalar = summary.scalar(f"{split}/{name}", float(value))
          self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=scalar))
      self._writer.flush()

  def close(self) -> None:
    """Closes the event file."""
    if self._writer is not None:
      with logs.naming(self._folder):
        self._writer.close()
      self._writer = None


class Writers:
  """The run's metric writers: `metrics.jsonl` and TensorBoard's `tb/`, in `workdir`, and `extra`.

  Args:
    workdir: the run's folder.
    enabled: False in every process but 0: nothing is written.
    purge_step: the step after a resumed run's restored one, 0 for a fresh start
      (see `TensorBoardWriter`); None hides nothing.
    attempt: the run's attempt number, which names its event file.
    extra: more writers (`jaxtrain.sinks`), which get every line after the
      JSONL file and TensorBoard, in process 0 only. `close` closes them too,
      in every process.
  """

  def __init__(self, workdir: pathlib.Path, *, enabled: bool, purge_step: int | None = None,
               attempt: int = 1, extra: Sequence[Writer] = ()):  # fmt: skip
    self._jsonl = JsonlWriter(workdir / "metrics.jsonl" if enabled else None)
    tb = TensorBoardWriter(workdir / "tb" if enabled else None, purge_step, f".attempt{attempt}")
    self._writers: tuple[Writer, ...] = (self._jsonl, tb, *extra)
    # Another process's copy of a sink would log every line a second time.
    self._writing = self._writers if enabled else ()

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Writes one line to each writer."""
    for writer in self._writing:
      writer.write(step, split, values)

  def lines_at(self, step: int) -> list[dict[str, Any]]:
    """The JSONL lines written at `step`, if it is the newest step written."""
    return [dict(line) for line in self._jsonl.latest if line["step"] == step]

  def close(self) -> None:
    """Closes every writer."""
    for writer in self._writers:
      writer.close()


def _jsonable(value: Any) -> Any:
  value = value.item() if isinstance(value, np.generic | np.ndarray) else value
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The lines of a `metrics.jsonl` as a crash leaves it: a cut-off last line is left out.

  That line is reported in one warning; the run that resumes writes it again.

  Raises:
    ConfigError: a line before the last is not a metric line (the file is
      damaged, not cut short), naming the file and the line.
  """
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from e
  rows = text.splitlines()
  out = []
  for number, row in enumerate(rows, 1):
    if not row.strip():
      continue
    line = _parse(row)
    if line is not None:
      out.append(line)
    elif number == len(rows) and not text.endswith("\n"):
      logging.warning("%s: its last line is cut short (a crash while writing it); left out", path)
    else:
      raise ConfigError(f"{path}: line {number} is not a metric line "
                        f"({logs.brief(row, 60)}); the file is damaged")  # fmt: skip
  return out


def _parse(row: str) -> dict[str, Any] | None:
  try:
    line = json.loads(row)
  except json.JSONDecodeError:
    return None
  ok = isinstance(line, dict) and isinstance(line.get("step"), int) and "split" in line
  return line if ok else None


def truncate_jsonl(
  path: pathlib.Path, last_step: int, lines: list[dict[str, Any]] | None = None
) -> None:
  """Keeps the complete lines of `path` up to `last_step`, for a resumed run.

  Lines a killed run wrote after its last checkpoint go: the resumed run
  writes those steps again. A torn line is dropped with a warning, and any of
  `lines` (the resumed step's own lines, as its checkpoint recorded them) that
  a crash cut from the file are written back.
  """
  if not path.exists():
    return
  kept, have, torn = [], set(), 0
  for row in path.read_bytes().decode(errors="replace").splitlines():
    line = _parse(row) if row.strip() else {}
    if line is None:
      torn += 1
    elif line and line["step"] <= last_step:
      kept.append(row + "\n")
      have.add(_key(line))
  if torn:
    logging.warning("%s: %d cut-off line(s) left out; the resumed run writes them again",
                    path, torn)  # fmt: skip
  lost = [x for x in lines or [] if x["step"] == last_step and _key(x) not in have]
  kept += [json.dumps(x) + "\n" for x in lost]
  tmp = path.with_name(path.name + ".tmp")
  with logs.naming(path):
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _key(line: dict[str, Any]) -> tuple[Any, ...]:
  return line["step"], line["split"], line.get("member")


class Meter:
  """Averages per-step train metrics and times the steps between two log lines."""

  def __init__(self, batch_size: int, throughput: dict[str, Any] | None = None):
    self.batch_size = batch_size
    known = throughput or {}  # `throughput.describe`: tokens, model FLOPs and peak of a step
    self.tokens_per_step = known.get("tokens_per_step", 0)
    self.flops_per_step, self.peak_flops = (
      known.get("flops_per_step", 0),
      known.get("peak_flops", 0),
    )
    self._sums: dict[str, float] = {}
    self._steps = 0
    self.start_clock(time.perf_counter())

  def start_clock(self, now: float) -> None:
    """Times the interval from `now` on; the sums are kept."""
    self._start, self._timed, self._wait = now, 0, 0.0

  def add(self, metrics: dict[str, np.ndarray], data_wait: float) -> None:
    """Adds a chunk's `[K]` metric arrays and the time spent waiting for its data."""
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(np.sum(v))
    steps = len(next(iter(metrics.values())))
    self._steps += steps
    self._timed += steps
    self._wait += data_wait

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation, say) out of the interval's time."""
    self._start += seconds

  def state_dict(self) -> dict[str, Any]:
    """The interval's partial sums, for a checkpoint: a resumed run logs the same means."""
    return {"sums": dict(self._sums), "steps": self._steps}

  def load(self, state: dict[str, Any]) -> None:
    """Continues an interval from `state_dict()`; its timing restarts now."""
    self._sums, self._steps = dict(state["sums"]), state["steps"]

  def summary(self, now: float, last: dict[str, np.ndarray]) -> dict[str, float]:
    """Returns the interval's means, throughput and `data_wait_frac`, then resets.

    Args:
      now: the time the interval ends.
      last: the last chunk's metrics; `lr` is reported at the interval's end.
    """
    elapsed = max(now - self._start, 1e-9)
    out = {k: v / self._steps for k, v in self._sums.items()}
    if "lr" in last:
      out["lr"] = float(last["lr"][-1])
    out["steps_per_sec"] = self._timed / elapsed
    out["samples_per_sec"] = out["steps_per_sec"] * self.batch_size
    if self.tokens_per_step:
      out["tokens_per_sec"] = out["steps_per_sec"] * self.tokens_per_step
    if self.flops_per_step and self.peak_flops:
      out["mfu"] = out["steps_per_sec"] * self.flops_per_step / self.peak_flops
    out["data_wait_frac"] = self._wait / elapsed
    self._sums, self._steps = {}, 0
    self.start_clock(now)
    return out


class Progress:
  """The run's progress on stderr: step, loss, eval metrics, the monitor's best, rate, ETA.

  On a terminal, a tqdm bar. Otherwise (a log file, a pipe, a batch job) plain
  lines without carriage returns: one every `every` steps and one per
  evaluation, such as `step 200/1000 (20%) loss=0.31 eval_accuracy=0.9
  samples_per_sec=5120 eta 0:01:10`.
  """

  def __init__(self, total: int, initial: int, enabled: bool, every: int = 0,
               terminal: bool | None = None):  # fmt: skip
    self._terminal = sys.stderr.isatty() if terminal is None else terminal
    self._active = enabled and initial < total  # a finished run has nothing to show
    self._total, self._step, self._every = total, initial, every
    self._start, self._start_step = time.perf_counter(), initial
    self._bar = tqdm.tqdm(
      total=total,
      initial=initial,
      unit="step",
      dynamic_ncols=True,
      disable=not (self._active and self._terminal),
      file=sys.stderr,
      mininterval=0.5,
    )
    self._postfix: dict[str, str] = {}

  def update(self, steps: int, **postfix: float) -> None:
    """Advances by `steps`; `postfix` values are shown until replaced."""
    self._postfix.update(
      {k: f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}" for k, v in postfix.items()}
    )
    self._step += steps
    if self._terminal:
      self._bar.set_postfix(self._postfix, refresh=False)
      self._bar.update(steps)
    elif self._active and (
      (steps and self._every and self._step % self._every == 0)
      or (not steps and any(k.startswith("eval_") for k in postfix))
    ):
      print(self.line(), file=sys.stderr, flush=True)

  def line(self) -> str:
    """The plain progress line for the current step."""
    fields = " ".join(f"{k}={v}" for k, v in self._postfix.items())
    done = self._step - self._start_step
    elapsed = time.perf_counter() - self._start
    eta = ""
    if done > 0 and self._step < self._total:
      seconds = int(elapsed / done * (self._total - self._step))
      eta = f" eta {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    share = f"{self._step / self._total:.0%}"
    return f"step {self._step}/{self._total} ({share}) {fields}{eta}".replace("  ", " ")

  def close(self) -> None:
    """Closes the bar."""
    self._bar.close()
