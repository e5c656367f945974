"""Grain pipelines: seeded training chunks, exact eval batches, device prefetch.

Both pipelines are defined over *global* batches, so a run sees the same
batches whatever the number of processes: global batch `g` of the training
stream holds positions `[g*B, (g+1)*B)` of an endless sequence of epochs, each
epoch a permutation of the source seeded by `(seed, epoch)`. Every process
reads only its rows `[lo, hi)` of each global batch, the rows its devices hold.
Reading works on whole batches of indices, so the per-record cost of Python is
paid once per batch.

Example:
  >>> it = iter(train_chunks(source, batch_size=128, seed=0, steps_per_loop=10,
  ...                        rows=(0, 128)))
  >>> next(it)["image"].shape   # [K, B, ...]
  (10, 128, 28, 28)
"""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxtrain.data.sources import Source


def read(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Reads the records at `indices` as one stacked batch."""
  if hasattr(source, "read"):
    return source.read(indices)
  records = [source[int(i)] for i in indices]
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


class TrainChunks:
  """Maps a chunk number to this process's rows of `K` consecutive global batches.

  Chunk `c` holds global batches `c*K ... c*K + K-1`, read with one vectorised
  `read` and shaped `[K, rows, ...]`, so the host copies each example once.
  Picklable, so Grain worker processes can run it.
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
  ):
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.rows, self.steps_per_loop, self.transform = rows, steps_per_loop, transform
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
    first = c * self.steps_per_loop
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
) -> grain.IterDataset:
  """The endless training stream, as `[K, rows, ...]` chunks.

  Args:
    source: the training source.
    batch_size: the global batch size `B`.
    seed: the data order's seed.
    steps_per_loop: `K`, the batches stacked into one chunk.
    rows: this process's rows `[lo, hi)` of each global batch.
    workers: Grain worker processes; 0 reads in this process.
    transform: `transform(batch, seed=, positions=) -> batch`, such as
      `transforms.Augment`, applied to each read batch; picklable with workers.

  Returns:
    A checkpointable Grain dataset; `iter()` it.
  """
  chunks = TrainChunks(
    source,
    batch_size=batch_size,
    seed=seed,
    rows=rows,
    steps_per_loop=steps_per_loop,
    transform=transform,
  )
  ds = grain.MapDataset.range(2**62).map(chunks)
  # Read in the caller's thread (the Prefetcher's): one data thread competes less with XLA.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if workers:
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def eval_batches(
  source: Source,
  *,
  batch_size: int,
  rows: tuple[int, int],
  transform: Callable[..., dict[str, np.ndarray]] | None = None,
) -> grain.MapDataset:
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
  num_batches = -(-len(source) // batch_size)
  return grain.MapDataset.range(num_batches).map(EvalBatch(source, batch_size, rows, transform))


class Prefetcher:
  """Puts chunks on the devices from a background thread, ahead of the loop.

  `next()` returns the next device chunk, the seconds the caller waited for it
  (the loop reports them as `data_wait_frac`), and the iterator's state right
  after that chunk was drawn: the state to checkpoint once the chunk is
  trained, since the iterator itself runs ahead.
  """

  def __init__(self, chunks: Iterator[Any], put: Callable[[Any], Any], size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(chunks, put), daemon=True)
    self._thread.start()

  def _fill(self, chunks: Iterator[Any], put: Callable[[Any], Any]) -> None:
    try:
      for chunk in chunks:
        state = chunks.get_state() if hasattr(chunks, "get_state") else None
        if not self._offer((put(chunk), state, None)):
          return
      self._offer((None, None, StopIteration()))
    except Exception as e:  # re-raised in the loop's thread by next()
      self._offer((None, None, e))
    finally:
      if hasattr(chunks, "close"):  # Grain iterators with workers stop them here
        chunks.close()

  def _offer(self, item: tuple[Any, Any, BaseException | None]) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def next(self) -> tuple[Any, float, Any]:
    """Returns the next device chunk, the seconds waited, and the data state after it."""
    start = time.perf_counter()
    chunk, state, error = self._queue.get()
    if error is not None:
      raise error
    return chunk, time.perf_counter() - start, state

  def close(self) -> None:
    """Stops the background thread."""
    self._stop.set()
    self._thread.join(timeout=5)
