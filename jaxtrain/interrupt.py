"""SIGTERM and Ctrl-C as votes to stop, counted inside the compiled chunk.

Each process installs handlers that set its vote: `PREEMPTED` for SIGTERM,
`INTERRUPTED` for the first Ctrl-C (SIGINT). `votes()` is passed to every
chunk, which returns the maximum over all processes as `metrics["stop"]`.
Every process reads that value from the same chunk, so all stop at the same
step, even when the notice reaches only one of them, and no process ever waits
for another outside the compiled computation. The loop then saves a checkpoint
and stops. A second Ctrl-C raises `KeyboardInterrupt` at once.

Example:
  >>> signals = StopSignals(mesh)
  >>> state, metrics = chunk(state, batch, signals.votes())
  >>> int(metrics["stop"])   # 0, PREEMPTED or INTERRUPTED
  >>> signals.close()
"""

import logging
import signal
import threading
from typing import Any

import jax
from jax.sharding import Mesh

from jaxtrain import sharding

RUNNING, PREEMPTED, INTERRUPTED = 0, 1, 2
STATUS = {PREEMPTED: "preempted", INTERRUPTED: "interrupted"}


class StopSignals:
  """Turns SIGTERM and the first Ctrl-C into this process's vote to save and stop.

  `saves=False` (a loop that keeps no checkpoints) only changes what the
  notice says. Handlers are installed only from the main thread (where
  Python runs them); `close` puts back the ones that were there before.
  """

  def __init__(self, mesh: Mesh, saves: bool = True):
    self._saves = saves  # False: nothing is saved (a population), only stopped
    self._vote = RUNNING
    self._votes = {v: sharding.votes(mesh, v) for v in STATUS | {RUNNING: ""}}  # made once
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
      for signum, handler in ((signal.SIGTERM, self._on_sigterm), (signal.SIGINT, self._on_sigint)):
        self._previous[signum] = signal.signal(signum, handler)

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning("SIGTERM: %s", "saving a checkpoint within two chunks, then stopping"
                    if self._saves else "stopping at the next chunk")  # fmt: skip
    self._vote = max(self._vote, PREEMPTED)

  def _on_sigint(self, signum: int, frame: Any) -> None:
    del signum, frame
    if self._vote == INTERRUPTED:  # the second Ctrl-C: stop now
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    logging.warning("Ctrl-C: %s (again: at once)", "saving a checkpoint at the next chunk, then "
                    "stopping" if self._saves else "stopping at the next chunk")  # fmt: skip
    self._vote = INTERRUPTED

  @property
  def vote(self) -> int:
    """This process's vote on the host: `RUNNING`, `PREEMPTED` or `INTERRUPTED`."""
    return self._vote

  def votes(self) -> jax.Array:
    """This process's vote, as the chunk's `votes` input."""
    return self._votes[self._vote]

  def close(self) -> None:
    """Puts back the handlers that were there before."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
