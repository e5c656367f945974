"""A profiler window: a `jax.profiler` trace of chosen training steps, for TensorBoard or Perfetto.

`profile.start_step` and `profile.steps` choose the steps. The trace starts at
the first chunk boundary at or after `start_step` (pick one past the first
chunk, whose time is mostly compiling) and stops once `steps` steps have run,
so it covers whole chunks. Each chunk is annotated (`StepTraceAnnotation`
`train_chunk`, numbered by its first step), and
the trace lands in `workdir/tb/plugins/profile/<time>/`, where TensorBoard's
profile plugin finds it; the `.trace.json.gz` beside it opens in Perfetto.

Example:
  >>> window = Window(start_step=20, steps=10, folder=workdir / "tb")
  >>> window.before(step)          # before dispatching the chunk that starts at `step`
  >>> window.after(step, state)    # after it; returns what run.json records, once
"""

import pathlib
from typing import Any

import jax


class Window:
  """Starts and stops one trace around the chunks it covers; inactive with `steps=0`."""

  def __init__(self, start_step: int, steps: int, folder: pathlib.Path | None):
    self.start_step, self.steps, self.folder = start_step, steps, folder
    self._started_at: int | None = None
    self._done = steps == 0 or folder is None

  def before(self, step: int) -> None:
    """Starts the trace if the chunk starting at `step` is the first in the window."""
    if self._done or self._started_at is not None or step < self.start_step:
      return
    jax.profiler.start_trace(str(self.folder))
    self._started_at = step

  def annotate(self, step: int) -> Any:
    """A context that names the chunk starting at `step` in the trace."""
    return jax.profiler.StepTraceAnnotation("train_chunk", step_num=step)

  def after(self, step: int, state: Any) -> dict[str, Any] | None:
    """Stops the trace once `steps` steps ran (at `step`); returns its record, or None."""
    if self._started_at is None or self._done or step - self._started_at < self.steps:
      return None
    jax.block_until_ready(state)  # the traced chunks' device work belongs in the trace
    jax.profiler.stop_trace()
    self._done = True
    runs = sorted((self.folder / "plugins" / "profile").iterdir())
    return {"start_step": self._started_at, "end_step": step, "folder": str(runs[-1])}

  def close(self) -> None:
    """Stops a trace the run ended inside of."""
    if self._started_at is not None and not self._done:
      jax.profiler.stop_trace()
      self._done = True
