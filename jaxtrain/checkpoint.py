"""Checkpoints: one Orbax step per resume bundle, with corrupt-step fallback.

A bundle holds the `TrainState`, the data stream's state after the last
trained chunk (the loop saves `{"next_batch": step}`), and a JSON record: config hash, mesh, package
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

import itertools
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
from jax.sharding import Mesh
from orbax.checkpoint import checkpoint_managers

from jaxtrain import config as config_lib
from jaxtrain import record, sharding
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
  """A data stream's state (any JSON value), in the form Grain's Orbax handler saves.

  The training stream runs ahead of the loop, so its live state is not the one
  to save; this holds the state after the last trained chunk. Grain's handler
  writes one JSON file per process.
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

  Raises:
    CheckpointError: when `directory` cannot be written.
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
    try:  # fail now, not at the first save: training must not run without checkpoints
      record.check_writable(self.directory)
      if jax.process_index() == 0:
        for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
          logging.warning(
            "checkpoint step %s was never finished; removing %s", tmp.name.split(".")[0], tmp.name
          )
      self._manager = ocp.CheckpointManager(
        self.directory, options=_options(keep, async_save, best_metric, best_mode)
      )
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
    meta = {
      **b.meta,
      "step": step,
      "checksums": [int(x) for x in jax.device_get(b.checksums)],
      "structure": structure(b.state),
    }
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(b.state),
      data=grain.checkpoint.CheckpointSave(IteratorState(b.data_state)),
      meta=ocp.args.JsonSave(meta),
    )
    try:
      self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # this save, or an earlier asynchronous one, failed
      raise CheckpointError(f"checkpoint save failed (reported at step {step}): {e}") from e

  def check(self) -> None:
    """Raises `CheckpointError` if a background save has failed; never blocks."""
    try:
      self._manager.check_for_errors()
    except Exception as e:
      raise CheckpointError(f"checkpoint save failed: {e}") from e

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises `CheckpointError` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"checkpoint save failed: {e}") from e

  def restore(self, abstract: TrainState) -> Restored | None:
    """Restores the newest readable step into the layout of `abstract`.

    A step is unreadable when its record, this process's iterator state or its
    arrays cannot be read, or its checksums disagree: it is reported, renamed
    `<step>.corrupt`, and the next older step is tried. A readable step saved for
    another state structure or process count is not corrupt; it raises.

    Args:
      abstract: the state's `jax.ShapeDtypeStruct`s, each with the sharding to
        restore onto (which may differ from the one saved).

    Returns:
      The bundle, or None when the folder holds no step.

    Raises:
      ConfigError: the newest readable step does not fit `abstract` or the
        process count.
      CheckpointError: every step was unreadable.
    """
    set_aside = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      meta, problem = self._read_meta(step)
      if _everywhere(problem is None):
        _check_fits(meta, abstract, step)
        restored, problem = self._read_all(step, abstract, meta)
        if _everywhere(problem is None):
          return restored
      problem = problem or "unreadable in another process"
      logging.warning(
        "checkpoint step %d is unreadable, using an older one: %s",
        step,
        " ".join(problem.split())[:300],
      )
      self._set_aside(step)
      set_aside.append(step)
    if set_aside:
      raise CheckpointError(
        f"no readable checkpoint in {self.directory} (set aside: {set_aside}); move the "
        "folder away to start afresh"
      )
    return None

  def restore_step(self, step: int, abstract: TrainState) -> Restored:
    """Restores one given step, such as the best, into the layout of `abstract`.

    Raises:
      CheckpointError: the step is missing or unreadable; nothing is renamed.
    """
    meta, problem = self._read_meta(step)
    restored = None
    if _everywhere(problem is None):
      _check_fits(meta, abstract, step)
      restored, problem = self._read_all(step, abstract, meta)
    if not _everywhere(problem is None):
      problem = problem or "unreadable in another process"
      raise CheckpointError(f"checkpoint step {step} is unreadable: {' '.join(problem.split())}")
    return restored

  def _read_meta(self, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """Reads a step's record and checks this process's iterator state, with no collective."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      name = f"process_{jax.process_index()}-of-{meta['structure']['process_count']}.json"
      if meta["structure"]["process_count"] == jax.process_count():
        json.loads((self.directory / str(step) / "data" / name).read_text())
    except Exception as e:  # an unreadable record or iterator state: a damaged step
      return None, f"{type(e).__name__}: {e}"
    return meta, None

  def _read_all(
    self, step: int, abstract: TrainState, meta: dict[str, Any]
  ) -> tuple[Restored | None, str | None]:
    data = IteratorState()
    try:
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(data),
        ),
      )
      if checksums(out.state) != meta["checksums"]:
        return None, "state checksums do not match the saved ones"
    except Exception as e:  # arrays that cannot be read: a damaged step
      return None, f"{type(e).__name__}: {e}"
    return Restored(step, out.state, data.state, meta), None

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


def _options(
  keep: int, async_save: bool, best_metric: str, best_mode: str
) -> ocp.CheckpointManagerOptions:
  """Keeps the newest `keep` steps, and the best one by `best_metric` if set."""
  policies = [checkpoint_managers.LatestN(n=keep)]
  best = {}
  if best_metric:
    get = lambda metrics: metrics[best_metric]  # noqa: E731
    policies.append(
      checkpoint_managers.BestN(
        get_metric_fn=get, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False
      )
    )
    best = {"best_fn": get, "best_mode": best_mode}  # Orbax stores the metrics only then
  return ocp.CheckpointManagerOptions(
    enable_async_checkpointing=async_save,
    preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
    cleanup_tmp_directories=True,  # unfinished saves of a killed run; reported below
    # Folders made in the foreground: a failure (full or read-only disk) raises in
    # save() at once, where asynchronous creation left it waiting for minutes.
    async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
    **best,
  )


def structure(state: TrainState) -> dict[str, Any]:
  """What a checkpoint must match to be restored: leaf paths, shapes, dtypes, processes."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    "leaves": [[sharding.path_str(p), list(x.shape), str(x.dtype)] for p, x in leaves],
    "process_count": jax.process_count(),
  }


def _check_fits(meta: dict[str, Any], abstract: TrainState, step: int) -> None:
  """Raises `ConfigError` when the saved state is not the one this run builds."""
  saved, here = meta["structure"], structure(abstract)
  if saved["process_count"] != here["process_count"]:
    raise config_lib.ConfigError(
      f"the checkpoint at step {step} was saved by {saved['process_count']} processes and this "
      f"run has {here['process_count']}; resume with as many, or use another workdir"
    )
  if saved["leaves"] != here["leaves"]:
    pairs = itertools.zip_longest(saved["leaves"], here["leaves"])
    old, new = next((s, h) for s, h in pairs if s != h)
    raise config_lib.ConfigError(
      f"the checkpoint at step {step} holds another model or optimizer state (saved {old}, "
      f"this run {new}); keep the model and optimizer to resume, or use another workdir"
    )


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds in every process (each reads its own shards)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class PreemptionWatch:
  """Turns SIGTERM into a vote to save and stop, counted in the compiled chunk.

  Each process installs a SIGTERM handler that sets its vote; `votes()` is
  passed to every chunk, which returns the maximum over all processes as
  `metrics["stop"]`. Every process reads that value from the same chunk, so all
  stop at the same step, even when the notice reaches only one of them, and no
  process ever waits for another outside the compiled computation.
  """

  def __init__(self, mesh: Mesh):
    self._flag = threading.Event()
    self._votes = {v: sharding.votes(mesh, v) for v in (0, 1)}  # made once, no per-chunk copy
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint within two chunks, then stopping")
    self._flag.set()

  def votes(self) -> jax.Array:
    """This process's vote, as the chunk's `votes` input."""
    return self._votes[int(self._flag.is_set())]

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
