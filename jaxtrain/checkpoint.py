"""Checkpoints: one Orbax step per resume bundle, with corrupt-step fallback.

A bundle holds the `TrainState`, the data iterator's state as it was when the
last trained chunk was drawn, and a JSON record: config hash, mesh, package
versions, the loop's partial metric sums, and a checksum of every state leaf.
Saves are asynchronous by default. Restoring walks from the newest step down:
a step that fails to read, or whose checksums disagree, is reported in one
line, moved aside as `<step>.corrupt`, and the previous step is tried. No
readable step is ever deleted because of a failed save or restore.

Example:
  >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3, async_save=True)
  >>> restored = ckpt.restore(abstract_state)        # None on a fresh workdir
  >>> ckpt.save(bundle(100, state, data_state, {"config_hash": "..."}))
  >>> ckpt.close()
"""

import json
import logging
import pathlib
import signal
import threading
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxtrain.state import TrainState


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; training must not go on without it."""


class Restored(NamedTuple):
  """A restored bundle."""

  step: int
  state: TrainState
  data_state: Any
  meta: dict[str, Any]


class IteratorState:
  """A data iterator's recorded state, in the form Grain's Orbax handler saves.

  The training iterator runs ahead of the loop, so its live state is not the
  one to save; this holds the state recorded when the last trained chunk was
  drawn. Grain's handler writes one JSON file per process.
  """

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    """Returns the state as JSON bytes."""
    return json.dumps(self.state).encode()

  def set_state(self, raw: bytes) -> None:
    """Sets the state from JSON bytes."""
    self.state = json.loads(raw)

  def start_prefetch(self) -> None:
    """Nothing to start: Grain's handler calls this after a restore."""


def checksums(state: TrainState) -> list[int]:
  """Returns one uint32 checksum per state leaf, the same for any sharding.

  Each leaf's bits are summed as unsigned integers modulo 2**32, an order-free
  sum, so a layout change keeps it and a flipped bit changes it.
  """
  return [int(x) for x in jax.device_get(_checksums(state))]


def _leaf_checksum(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


@jax.jit
def _checksums(state: TrainState) -> jax.Array:
  leaves = [_leaf_checksum(jnp.asarray(x)) for x in jax.tree.leaves(state)]
  return jnp.stack(leaves) if leaves else jnp.zeros((0,), jnp.uint32)


@jax.jit
def _copy_and_checksums(state: TrainState) -> tuple[TrainState, jax.Array]:
  return jax.tree.map(jnp.copy, state), _checksums(state)


class Bundle(NamedTuple):
  """What one checkpoint saves, taken at a step boundary by `bundle`."""

  step: int
  state: TrainState
  checksums: jax.Array
  data_state: Any
  meta: dict[str, Any]
  metrics: dict[str, float] | None


def bundle(
  step: int,
  state: TrainState,
  data_state: Any,
  meta: dict[str, Any],
  metrics: dict[str, float] | None = None,
  *,
  copy: bool = False,
) -> Bundle:
  """Takes a bundle; with `copy`, of a device copy of the state.

  The copy lets the loop donate `state` to the next chunk and save while that
  chunk runs (one extra copy of the state lives on the devices meanwhile).
  Both the copy and the checksums are dispatched now, ahead of the next chunk.
  """
  if copy:
    state, sums = _copy_and_checksums(state)
  else:
    sums = _checksums(state)
  return Bundle(step, state, sums, data_state, meta, metrics)


class Checkpointer:
  """Saves and restores resume bundles in `directory` through Orbax.

  Args:
    directory: the folder of step subfolders.
    keep: how many of the newest steps to keep.
    async_save: write in the background; `save` returns once the arrays are
      copied to host memory.
    best_metric: a metric passed to `save` (for example `eval/accuracy`); the
      best step by it is kept too. Empty to keep only the newest steps.
    best_mode: `min` or `max`, for `best_metric`.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    *,
    keep: int,
    async_save: bool,
    best_metric: str = "",
    best_mode: str = "min",
  ):
    self.directory = pathlib.Path(directory)
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(
        checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric],
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=async_save,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      cleanup_tmp_directories=True,  # unfinished saves of a killed run
      # Folders made in the foreground: a failure (full or read-only disk) raises in
      # save() at once, where asynchronous creation left it waiting for minutes.
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f"checkpoint folder {self.directory} is not usable ({e})") from e

  def save(self, b: Bundle) -> None:
    """Starts saving a bundle; raises `CheckpointError` if it fails.

    An error of an earlier asynchronous save is raised here too.
    """
    step, metrics = b.step, b.metrics
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise CheckpointError(
        f"ckpt.best_metric={self.best_metric!r} is not one of the eval metrics {sorted(metrics)}"
      )
    sums = [int(x) for x in jax.device_get(b.checksums)]
    meta = {**b.meta, "step": step, "checksums": sums}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(b.state),
      data=grain.checkpoint.CheckpointSave(IteratorState(b.data_state)),
      meta=ocp.args.JsonSave(meta),
    )
    try:
      self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # this save, or an earlier asynchronous one, failed
      raise CheckpointError(f"checkpoint save failed (reported at step {step}): {e}") from e

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises `CheckpointError` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"checkpoint save failed: {e}") from e

  def restore(self, abstract: TrainState) -> Restored | None:
    """Restores the newest readable step into the layout of `abstract`.

    Args:
      abstract: the state's `jax.ShapeDtypeStruct`s, each with the sharding to
        restore onto (which may differ from the one saved).

    Returns:
      The bundle, or None when no step is readable.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, problem = self._try_restore(step, abstract)
      if _everywhere(problem is None):
        return restored
      problem = problem or "unreadable in another process"
      logging.warning(
        "checkpoint step %d is unreadable, using an older one: %s",
        step,
        " ".join(problem.split())[:300],
      )
      self._set_aside(step)
    return None

  def _try_restore(self, step: int, abstract: TrainState) -> tuple[Restored | None, str | None]:
    data = IteratorState()
    try:
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(data),
          meta=ocp.args.JsonRestore(),
        ),
      )
      if checksums(out.state) != out.meta["checksums"]:
        return None, "state checksums do not match the saved ones"
    except Exception as e:  # any failure to read means this step is not usable
      return None, f"{type(e).__name__}: {e}"
    return Restored(step, out.state, data.state, out.meta), None

  def _set_aside(self, step: int) -> None:
    """Renames a bad step folder out of Orbax's sight; nothing is deleted."""
    if jax.process_index() == 0:
      source = self.directory / str(step)
      target = self.directory / f"{step}.corrupt"
      n = 1
      while target.exists():
        n += 1
        target = self.directory / f"{step}.corrupt{n}"
      if source.exists():
        source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxtrain_set_aside_{step}")
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; reports, never raises.

    Call `wait` first where a failed save must stop the run.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # already failing: do not hide the first error
      logging.error("checkpoint save failed: %s", e)
    finally:
      self._manager.close()


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds in every process (each reads its own shards)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def abstract_like(state: TrainState) -> TrainState:
  """Returns `ShapeDtypeStruct`s with the shardings of a (possibly abstract) state."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class PreemptionWatch:
  """Tells the loop when to save and stop because the job is being preempted.

  In one process, SIGTERM sets a flag that the loop reads at its next chunk
  boundary. With several processes a notice may reach only some of them, so
  JAX's preemption sync point picks one boundary for all (its own SIGTERM
  handler stays in place). That protocol settles on "the fastest process's
  counter + 1" and expects the counter to rise by one per call; Orbax feeds it
  the step number of each save, so the counter here is the step too, and every
  step of a chunk is reported.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next chunk boundary, then stopping")
    self._flag.set()

  def requested(self, step: int, steps_per_loop: int) -> bool:
    """Whether to save and stop at `step`; called at every chunk boundary.

    Call it after any checkpoint save of the boundary: Orbax reports the saved
    step to the same counter.
    """
    if jax.process_count() == 1:
      return self._flag.is_set()
    reached = [
      multihost_utils.reached_preemption_sync_point(s)
      for s in range(step - steps_per_loop + 1, step + 1)
    ]
    return any(reached)

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
