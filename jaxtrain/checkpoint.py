"""Checkpoints: one Orbax step per resume bundle, with corrupt-step fallback.

A bundle holds the `TrainState`, the data stream's state after the last
trained chunk (the loop saves `{"next_batch": step}`), and a JSON record: the
config, mesh, package versions, the loop's partial metric sums, and a checksum
of every state leaf. Nothing in it belongs to one process or device: the data
position is global, the arrays are restored onto whatever mesh the resuming run
has, and the checksums do not depend on the layout, so a run saved by N
processes (or devices) resumes on M.
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

import contextlib
import itertools
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtrain import config as config_lib
from jaxtrain import distributed, logs, record, sharding
from jaxtrain.state import TrainState

if TYPE_CHECKING:  # Orbax is imported where a manager is made: a refused command never needs it
  import orbax.checkpoint as ocp

# Where steps saved by earlier versions keep the data position (Grain's handler, process 0).
OLD_DATA = "process_0-of-*.json"
ABANDON_LOOKS = 5  # 0.5 s of looks for the folders of saves cut short


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; training must not go on without it."""


class Restored(NamedTuple):
  """A restored bundle."""

  step: int
  state: TrainState
  data_state: Any
  meta: dict[str, Any]


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
  state, sums = _copy_and_checksums(state) if copy else (state, _checksums(state))
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
    try:  # fail now, not at the first save: training must not run without checkpoints
      record.check_writable(self.directory)
      if jax.process_index() == 0:
        for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
          logging.warning(
            "checkpoint step %s was never finished; removing %s", tmp.name.split(".")[0], tmp.name
          )
        for odd in sorted(p for p in self.directory.iterdir() if p.name.isdigit()):
          if not odd.is_dir():  # Orbax would not list it, then save over it
            target = _aside(self.directory, odd.name)
            odd.rename(target)
            logging.warning("checkpoint step %s is a file, not a folder; set aside as %s",
                            odd.name, target.name)  # fmt: skip
      import orbax.checkpoint as ocp  # noqa: PLC0415 (refused commands start without Orbax)

      _register_array_handler()
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
    meta = {
      **b.meta,
      "step": step,
      "checksums": [int(x) for x in jax.device_get(b.checksums)],
      "structure": structure(b.state),
      "data": b.data_state,
    }
    import orbax.checkpoint as ocp  # noqa: PLC0415

    args = ocp.args.Composite(state=ocp.args.StandardSave(b.state), meta=ocp.args.JsonSave(meta))
    try:
      self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # this save, or an earlier asynchronous one, failed
      raise CheckpointError(f"checkpoint save failed (reported at step {step}): {e}") from e

  def check(self) -> None:
    """Raises `CheckpointError` if a background save has failed; never blocks."""
    _as_checkpoint_error(self._manager.check_for_errors)

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises `CheckpointError` if it failed."""
    _as_checkpoint_error(self._manager.wait_until_finished)

  def drop_unfinished(self) -> None:
    """Removes the folders of saves that failed part-way, to free a full disk.

    Only after a failure: the next start would remove them anyway. Process 0's
    task, like the rest of the folder's upkeep.
    """
    with contextlib.suppress(CheckpointError):  # a save still writing ends first
      self.wait()
    if jax.process_index() == 0:
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)

  def restore(
    self, abstract: TrainState, accept: Callable[[dict[str, Any], int], None] | None = None
  ) -> Restored | None:
    """Restores the newest readable step into the layout of `abstract`.

    A step whose record, iterator state or arrays cannot be read, or whose
    checksums disagree, is reported in one line, renamed `<step>.corrupt`, and
    the next older step is tried. A readable step of another state structure
    is not corrupt; it raises. The arrays are resharded onto `abstract`'s
    layout, whatever the mesh or process count that saved them.

    Args:
      abstract: the state's `jax.ShapeDtypeStruct`s, each with the sharding to
        restore onto (which may differ from the one saved).
      accept: called as `accept(record, step)` with the newest readable step's
        record before its arrays are read; it raises to refuse resuming.

    Returns:
      The bundle, or None when the folder holds no step, readable or set aside.

    Raises:
      ConfigError: the newest readable step does not fit `abstract`, or
        `accept` refused it.
      CheckpointError: no step is readable, now or at an earlier restore.
    """
    with logs.quiet_failed_reads():
      for step in sorted(self._manager.all_steps(), reverse=True):
        restored, problem = self._read(step, abstract, accept)
        if restored:
          return restored
        name = self._set_aside(step)
        logging.warning(
          "checkpoint step %d is unreadable (%s); set aside as %s, trying an older step",
          step,
          logs.brief(problem, 160),
          name,
        )
    if self.corrupt_folders():
      raise CheckpointError(
        f"no readable checkpoint in {self.directory}: every step is set aside as unreadable "
        f"({', '.join(self.corrupt_folders())}); starting afresh would replace this run's "
        "records, so move those folders out of checkpoints/ first"
      )
    return None

  def steps(self) -> list[int]:
    """The steps on disk, oldest first (their folders may still prove unreadable)."""
    return sorted(self._manager.all_steps())

  def corrupt_folders(self) -> list[str]:
    """The folders of steps set aside as unreadable, by name."""
    return sorted(p.name for p in self.directory.glob("*.corrupt*") if p.name[0].isdigit())

  def restore_step(self, step: int, abstract: TrainState) -> Restored:
    """Restores one given step, such as the best, into the layout of `abstract`.

    Raises:
      CheckpointError: the step is missing or unreadable; nothing is renamed.
    """
    with logs.quiet_failed_reads():
      restored, problem = self._read(step, abstract)
    if not restored:
      raise CheckpointError(f"checkpoint step {step} is unreadable: {logs.brief(problem, 160)}")
    return restored

  def _read(
    self,
    step: int,
    abstract: TrainState,
    accept: Callable[[dict[str, Any], int], None] | None = None,
  ) -> tuple[Restored | None, str | None]:
    """Reads one step in every process: the bundle, or why it is unreadable."""
    meta, problem = self._read_meta(step)
    if distributed.everywhere(problem is None):
      refusal = None
      try:  # each process checks its own data: all refuse if one does, or the others would wait
        if accept:
          accept(meta, step)
      except config_lib.ConfigError as e:
        refusal = e
      if not distributed.everywhere(refusal is None):
        raise refusal or config_lib.ConfigError(
          f"another process may not resume the checkpoint at step {step}; its error says why"
        )
      _check_fits(meta, abstract, step)
      restored, problem = self._read_all(step, abstract, meta)
      if distributed.everywhere(problem is None):
        return restored, None
    return None, problem or "unreadable in another process"

  def _read_meta(self, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """Reads a step's record, with no collective."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      if "data" not in meta:  # saved before the data position moved into the record
        old = next((self.directory / str(step) / "data").glob(OLD_DATA))
        meta["data"] = json.loads(old.read_text())
    except Exception as e:  # an unreadable record: a damaged step
      return None, f"{type(e).__name__}: {e}"
    return meta, None

  def _read_all(
    self, step: int, abstract: TrainState, meta: dict[str, Any]
  ) -> tuple[Restored | None, str | None]:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      out = self._manager.restore(step, args=args)
      if checksums(out.state) != meta["checksums"]:
        return None, "state checksums do not match the saved ones"
    except Exception as e:  # arrays that cannot be read: a damaged step
      return None, f"{type(e).__name__}: {e}"
    return Restored(step, out.state, meta["data"], meta), None

  def _set_aside(self, step: int) -> str:
    """Renames a bad step folder out of Orbax's sight; returns its new name. Nothing is deleted."""
    source = self.directory / str(step)
    target = _aside(self.directory, str(step))
    if jax.process_index() == 0 and source.exists():
      source.rename(target)
    distributed.barrier(f"set_aside_{step}")
    self._manager.reload()
    return target.name

  def close(self, abandon: bool = False) -> None:
    """Waits for pending saves and releases the manager; reports, never raises.

    Call `wait` first where a failed save must stop the run. With `abandon`
    (a run stopped at once), the folders of saves that never finished are
    removed too.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # already failing, and reported: the detail goes to the log file
      logging.error("checkpoint save failed: %s", e, extra=logs.DETAIL)
    finally:
      self._manager.close()
    if abandon and jax.process_index() == 0:
      # A save that Ctrl-C cut short may still make its folder from Orbax's own thread:
      # look again for a moment.
      for _ in range(ABANDON_LOOKS):
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
          shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.1)


def _aside(directory: pathlib.Path, name: str) -> pathlib.Path:
  """The first free `<name>.corrupt`, `<name>.corrupt2`, ... in `directory`."""
  target, n = directory / f"{name}.corrupt", 1
  while target.exists():
    n += 1
    target = directory / f"{name}.corrupt{n}"
  return target


def _as_checkpoint_error(fn: Callable[[], Any]) -> None:
  try:
    fn()
  except Exception as e:
    raise CheckpointError(f"checkpoint save failed: {e}") from e


# Below this many bytes a replica's share, a replicated array is written by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  """Orbax's `jax.Array` handler, splitting a replicated array's writes only in large pieces.

  By default Orbax (off GPU) has each replica write a slice of a replicated
  array, and slicing compiles one program per shape and replica before the
  first save: 54 s for 150 small arrays on 8 CPU devices, against 0.2 s when
  one replica writes them whole (the same files). Slices of 1 MiB and more are
  still shared out.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415
  from orbax.checkpoint._src.serialization import type_handler_registry  # noqa: PLC0415

  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
    return
  # The registry itself, to replace the handler without Orbax's warning in the run's log.
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(),  # as Orbax's own default handler has
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True,
    ignore_warnings=True)  # fmt: skip


def _options(
  keep: int, async_save: bool, best_metric: str, best_mode: str
) -> "ocp.CheckpointManagerOptions":
  """Keeps the newest `keep` steps, and the best one by `best_metric` if set."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from orbax.checkpoint import checkpoint_managers  # noqa: PLC0415

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
  """What a checkpoint must match to be restored: leaf paths, shapes, dtypes.

  The process count is kept for the record only: any count may resume.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    "leaves": [[sharding.path_str(p), list(x.shape), str(x.dtype)] for p, x in leaves],
    "process_count": jax.process_count(),
  }


def _check_fits(meta: dict[str, Any], abstract: TrainState, step: int) -> None:
  """Raises `ConfigError` when the saved state is not the one this run builds."""
  saved, here = meta["structure"], structure(abstract)
  if saved["leaves"] != here["leaves"]:
    pairs = itertools.zip_longest(saved["leaves"], here["leaves"])
    old, new = next((s, h) for s, h in pairs if s != h)
    raise config_lib.ConfigError(
      f"the checkpoint at step {step} holds another model or optimizer state (saved {old}, "
      f"this run {new}); keep the model and optimizer to resume, or use another workdir"
    )
