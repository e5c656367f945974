"""Grain pipelines: seeded training chunks, exact eval batches, device prefetch.

Both pipelines are defined over *global* batches, so a run sees the same
batches whatever the number of processes: global batch `g` of the training
stream holds positions `[g*B, (g+1)*B)` of an endless sequence of epochs, each
epoch a permutation of the source seeded by `(seed, epoch)`. Every process
reads only its rows `[lo, hi)` of each global batch, the rows its devices hold.
Reading works on whole batches of indices, so the per-record cost of Python is
paid once per batch.

A batch is a pure function of its number, so the stream's whole state is the
next batch number: a run resumes, or changes its number of Grain workers, by
starting a new stream there (`start_batch`). `AutoWorkers` picks that number
from the measured rates of reading and of training.

Example:
  >>> it = iter(train_chunks(source, batch_size=128, seed=0, steps_per_loop=10,
  ...                        rows=(0, 128)))
  >>> next(it)["image"].shape   # [K, B, ...]
  (10, 128, 28, 28)
"""

import collections
import logging
import math
import os
import pickle
import queue
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

from jaxtrain.data.sources import DataError, Source

if TYPE_CHECKING:  # Grain is imported where a stream is made: a refused command never needs it
  import grain


def read(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Reads the records at `indices` as one stacked batch."""
  if hasattr(source, "read"):
    return source.read(indices)
  records = [source[int(i)] for i in indices]
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


class TrainChunks:
  """Maps a chunk number to this process's rows of `K` consecutive global batches.

  Chunk `c` holds global batches `start + c*K ... start + c*K + K-1`, read with
  one vectorised `read` and shaped `[K, rows, ...]`, so the host copies each
  example once. Picklable, so Grain worker processes can run it.
  """

  def __init__(
    self,
    source: Source,
    *,
    batch_size: int,
    seed: int,
    rows: tuple[int, int],
    steps_per_loop: int,
    transform: Callable[..., dict[str, np.ndarray]] | None = None,
    start: int = 0,
  ):
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.rows, self.steps_per_loop, self.transform = rows, steps_per_loop, transform
    self.start = start
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """Returns the permutation of the source for `epoch`."""
    order = self._orders.get(epoch)
    if order is None:  # keep only the current epoch's order
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._orders = {epoch: order}
    return order

  def indices(self, first: int, count: int) -> np.ndarray:
    """Returns `[count, rows]` source indices of global batches `first, ..., first+count-1`."""
    epoch, offset = np.divmod(self.positions(first, count), len(self.source))
    out = np.empty(epoch.shape, np.int64)
    for e in np.unique(epoch):
      where = epoch == e
      out[where] = self.order(int(e))[offset[where]]
    return out

  def positions(self, first: int, count: int) -> np.ndarray:
    """The `[count, rows]` positions in the endless stream of those batches' records."""
    lo, hi = self.rows
    return (first + np.arange(count))[:, None] * self.batch_size + np.arange(lo, hi)

  def __call__(self, c: int) -> dict[str, np.ndarray]:
    """Returns chunk `c` as `[K, rows, ...]` arrays, transformed if a transform is set."""
    first = self.start + c * self.steps_per_loop
    idx = self.indices(first, self.steps_per_loop)
    batch = read(self.source, idx.ravel())
    if self.transform is not None:  # seeded by stream position: any worker, same result
      positions = self.positions(first, self.steps_per_loop).ravel()
      batch = self.transform(batch, seed=self.seed, positions=positions)
    return {k: v.reshape(*idx.shape, *v.shape[1:]) for k, v in batch.items()}


class EvalBatch:
  """Maps an eval batch number to this process's rows, padded and masked."""

  def __init__(
    self,
    source: Source,
    batch_size: int,
    rows: tuple[int, int],
    transform: Callable[..., dict[str, np.ndarray]] | None = None,
  ):
    self.source, self.batch_size, self.rows, self.transform = source, batch_size, rows, transform

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    """Returns this process's rows of eval batch `j`, with `mask`."""
    lo, hi = self.rows
    positions = np.arange(j * self.batch_size + lo, j * self.batch_size + hi)
    mask = positions < len(self.source)
    batch = read(self.source, np.where(mask, positions, 0))
    if self.transform is not None:
      batch = self.transform(batch, seed=0, positions=positions)
    batch["mask"] = mask.astype(np.int32)
    return batch


def train_chunks(
  source: Source,
  *,
  batch_size: int,
  seed: int,
  steps_per_loop: int,
  rows: tuple[int, int],
  workers: int = 0,
  transform: Callable[..., dict[str, np.ndarray]] | None = None,
  start_batch: int = 0,
) -> "grain.IterDataset":
  """The endless training stream from global batch `start_batch`, as `[K, rows, ...]` chunks.

  Args:
    source: the training source.
    batch_size: the global batch size `B`.
    seed: the data order's seed.
    steps_per_loop: `K`, the batches stacked into one chunk.
    rows: this process's rows `[lo, hi)` of each global batch.
    workers: Grain worker processes; 0 reads in this process.
    transform: `transform(batch, seed=, positions=) -> batch`, such as
      `transforms.Augment`, applied to each read batch; picklable with workers.
    start_batch: the first global batch; a resumed run passes its step.

  Returns:
    A Grain dataset; `iter()` it.
  """
  import grain  # noqa: PLC0415

  chunks = TrainChunks(
    source,
    batch_size=batch_size,
    seed=seed,
    rows=rows,
    steps_per_loop=steps_per_loop,
    transform=transform,
    start=start_batch,
  )
  ds = grain.MapDataset.range(2**62).map(chunks)
  # Read in the caller's thread (the Prefetcher's): one data thread competes less with XLA.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if workers:
    try:  # Grain would fail later, in its own thread, with a long traceback
      pickle.dumps(chunks)
    except Exception as e:
      raise DataError(
        f"data.workers={workers}: the source or transform cannot be sent to worker "
        f"processes ({type(e).__name__}: {e}); use data.workers=0"
      ) from e
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    # Blocks that Grain's workers had in flight when the stream stopped are freed by
    # multiprocessing's resource tracker at exit, which warns about each; it starts
    # with this interpreter's -W options.
    if _QUIET_TRACKER not in sys.warnoptions:
      sys.warnoptions.append(_QUIET_TRACKER)
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), _worker_init)
  return it


_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Grain workers leave Ctrl-C to the training process, which stops them itself."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_batches(
  source: Source,
  *,
  batch_size: int,
  rows: tuple[int, int],
  transform: Callable[..., dict[str, np.ndarray]] | None = None,
) -> "grain.MapDataset":
  """One pass over `source` in order, every example exactly once.

  The last global batch is padded to `batch_size`; its `mask` is 0 on padding.

  Args:
    source: the eval source.
    batch_size: the global eval batch size.
    rows: this process's rows `[lo, hi)` of each global batch.
    transform: applied to each batch (for example normalisation, never random).

  Returns:
    A Grain dataset of `ceil(len(source) / batch_size)` batches.
  """
  import grain  # noqa: PLC0415

  num_batches = -(-len(source) // batch_size)
  return grain.MapDataset.range(num_batches).map(EvalBatch(source, batch_size, rows, transform))


class Prefetcher:
  """Puts chunks on the devices from a background thread, ahead of the loop.

  An iterator of device chunks; `waited` holds the seconds the caller waited
  for the last one (the loop reports them as `data_wait_frac`). The thread
  times, for each chunk, drawing it from the iterator and putting it on the
  devices (`timings()`), which is what `AutoWorkers` compares with training.
  Close it, or use it in a `with` block, to stop the thread.
  """

  def __init__(self, chunks: Iterator[Any], put: Callable[[Any], Any], size: int = 2):
    self.waited = 0.0
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._timings: collections.deque = collections.deque(maxlen=64)
    self._thread = threading.Thread(target=self._fill, args=(chunks, put), daemon=True)
    self._thread.start()

  def _fill(self, chunks: Iterator[Any], put: Callable[[Any], Any]) -> None:
    try:
      while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        if chunk is None:
          break
        drawn = time.perf_counter()
        on_device = put(chunk)
        self._timings.append((drawn - start, time.perf_counter() - drawn))
        if not self._offer((on_device, None)):
          return
      self._offer((None, StopIteration()))
    except Exception as e:  # re-raised in the loop's thread by next()
      self._offer((None, e))
    finally:
      if hasattr(chunks, "close"):  # Grain iterators with workers stop them here
        chunks.close()

  def _offer(self, item: tuple[Any, BaseException | None]) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Any:
    """Returns the next device chunk; `waited` says how long it took to come."""
    start = time.perf_counter()
    chunk, error = self._queue.get()
    self.waited = time.perf_counter() - start
    if error is not None:
      raise error
    return chunk

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def timings(self) -> list[tuple[float, float]]:
    """The `(read, put)` seconds of the last 64 chunks prepared, in order."""
    return list(self._timings)

  def close(self) -> None:
    """Stops the background thread."""
    self._stop.set()
    self._thread.join(timeout=5)
    if self._thread.is_alive():  # still inside one read; it stops after it
      logging.warning("the prefetch thread is still reading a chunk; it stops once that is done")


# Auto mode wants chunks to arrive this many times faster than they train...
HEADROOM = 1.5
# ... and, when no worker count can do that, starts workers only for this speed-up.
MIN_GAIN = 1.25


def _cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def worker_limit() -> int:
  """The most workers auto mode starts by default: this process's CPUs less one, 1 to 8."""
  return max(1, min(8, _cpus() - 1))


def most_workers() -> int:
  """The most workers a run may ask for: twice this process's CPUs, and at least 8."""
  return max(8, 2 * _cpus())


def choose_workers(read_s: float, put_s: float, train_s: float, limit: int) -> int:
  """The fewest Grain workers with which chunks arrive `HEADROOM` times faster than they train.

  Without workers the prefetch thread reads and puts each chunk, `read_s +
  put_s`; with `n`, the workers read `n` chunks at once and the thread puts
  them, taken as `read_s / n + put_s` (a worker also costs a transfer between
  processes, so one worker is never faster than the thread). When no count up
  to `limit` meets the target, `limit` workers (or as many as keep pace with
  the put) start only if they make chunks arrive `MIN_GAIN` times sooner.

  Args:
    read_s: seconds to read and transform one chunk in one process.
    put_s: seconds to put one chunk on the devices.
    train_s: seconds the devices take to train on one chunk.
    limit: the most workers to choose.

  Returns:
    0 when the thread alone keeps ahead or workers would not help enough;
    else a count in `[2, limit]`.
  """
  budget = train_s / HEADROOM  # seconds each chunk may take to arrive
  if read_s + put_s <= budget:
    return 0
  if put_s < budget:
    n = math.ceil(read_s / (budget - put_s))
    if n <= limit:
      return n
  n = limit if put_s < budget else min(limit, max(1, math.ceil(read_s / put_s)))
  gain = (read_s + put_s) / (read_s / n + put_s)
  return n if gain >= MIN_GAIN else 0


class AutoWorkers:
  """`data.workers=-1`: times a few chunks of training, then picks the worker count once.

  The loop times `probes` chunks after the first compiled one, each from a
  finished state to its finished metrics, so `train_s` is the devices' time.
  The prefetch thread's timings give the rest; `choose_workers` decides.
  """

  def __init__(self, limit: int = 0, probes: int = 3):
    self.limit = limit or worker_limit()
    self.probes, self.train_times = probes, []
    self.measured: dict[str, float | int] | None = None

  @property
  def timing(self) -> bool:
    """Whether the loop should time its next chunk."""
    return self.measured is None

  def add(
    self, train_s: float, compiled: bool, timings: list[tuple[float, float]]
  ) -> dict[str, float | int] | None:
    """Records a timed chunk; returns the decision and its measurements once made."""
    if compiled:  # a compilation is not the training rate
      return None
    self.train_times.append(train_s)
    if len(self.train_times) < self.probes:
      return None
    steady = timings[1:] or timings  # the first read also opens files
    read_s = statistics.median(r for r, _ in steady)
    put_s = statistics.median(p for _, p in steady)
    train_s = statistics.median(self.train_times)
    self.measured = {
      "workers": choose_workers(read_s, put_s, train_s, self.limit),
      "read_s": read_s,
      "put_s": put_s,
      "train_s": train_s,
    }
    return self.measured
