"""Metric lines (`metrics.jsonl`), throughput meters and the progress bar.

Only process 0 writes; the other processes get writers that do nothing, so the
loop never branches on the process index.

Example:
  >>> writer = JsonlWriter(workdir / "metrics.jsonl")
  >>> writer.write(100, "train", {"loss": 0.31, "lr": 1e-3})
"""

import json
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np
import tqdm

from jaxtrain import logs


class JsonlWriter:
  """Appends one JSON object a line: `{"step": N, "split": ..., **values}`."""

  def __init__(self, path: pathlib.Path | None):
    self._path = path
    with logs.naming(path):
      self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (held open)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    """Writes one line; non-finite numbers become null."""
    if self._file:
      clean = {k: _jsonable(v) for k, v in values.items()}
      with logs.naming(self._path):
        self._file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")

  def close(self) -> None:
    """Closes the file."""
    if self._file:
      self._file.close()


def _jsonable(value: Any) -> Any:
  value = value.item() if isinstance(value, np.generic | np.ndarray) else value
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
  """Keeps the complete lines of `path` up to `last_step`, for a resumed run.

  Lines a killed run wrote after its last checkpoint, and a torn last line,
  go; the resumed run writes those steps again.
  """
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line + "\n")
    except (json.JSONDecodeError, KeyError, TypeError):
      continue
  tmp = path.with_name(path.name + ".tmp")
  with logs.naming(path):
    tmp.write_text("".join(kept))
    tmp.replace(path)


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
  """A tqdm bar over the run's steps with steps/s, loss and the ETA."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = tqdm.tqdm(
      total=total,
      initial=initial,
      unit="step",
      dynamic_ncols=True,
      disable=not enabled or initial >= total,  # a finished run has nothing to show
      file=sys.stderr,
      mininterval=0.5,
    )
    self._postfix: dict[str, str] = {}

  def update(self, steps: int, **postfix: float) -> None:
    """Advances by `steps`; `postfix` values are shown until replaced."""
    self._postfix.update({k: f"{v:.4g}" for k, v in postfix.items()})
    self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(steps)

  def close(self) -> None:
    """Closes the bar."""
    self._bar.close()
