"""Batch transforms for training images, random per record yet deterministic.

Each record's randomness comes from a hash of the run's seed and the record's
position in the endless training stream (`TrainChunks` knows it), never from a
generator's running state. So the same step sees the same augmented images
whatever the number of processes or Grain workers, and after a resume.

Example:
  >>> augment = Augment(padding=4, flip=True, mean=0.286, std=0.353)
  >>> batch = augment({"image": images_NxHxW, "label": labels_N}, seed=0, positions=pos_N)
"""

import dataclasses
from typing import Any

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def record_hash(seed: int, positions: np.ndarray) -> np.ndarray:
  """64 well-mixed bits per stream position (splitmix64 of seed and position)."""
  with np.errstate(over="ignore"):
    z = np.asarray(positions, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def crop_flip(images: np.ndarray, hashes: np.ndarray, padding: int, flip: bool) -> np.ndarray:
  """Pads `[N, H, W, ...]` images by `padding` zeros, crops back at per-record offsets, flips.

  The crop offsets take the low bits of each record's hash, the flip bit the
  high ones, so each record's transform depends on its hash alone.
  """
  n, h, w = images.shape[:3]
  out = images
  if padding:
    pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad)
    span = 2 * padding + 1
    dy = (hashes % np.uint64(span)).astype(np.int64)
    dx = ((hashes >> np.uint64(16)) % np.uint64(span)).astype(np.int64)
    rows = dy[:, None] + np.arange(h)  # [N, H]
    cols = dx[:, None] + np.arange(w)  # [N, W]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    flips = ((hashes >> np.uint64(63)) & np.uint64(1)).astype(bool)
    out = np.where(flips.reshape(n, *[1] * (images.ndim - 1)), out[:, :, ::-1], out)
  return out


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random crop with zero padding, horizontal flip, then `(x - mean) / std`, on `image`.

  Picklable, so Grain worker processes can run it.
  """

  padding: int = 0
  flip: bool = False
  mean: float = 0.0
  std: float = 1.0
  field: str = "image"

  def __call__(
    self, batch: dict[str, np.ndarray], *, seed: int, positions: np.ndarray
  ) -> dict[str, np.ndarray]:
    """Transforms the `[N, H, W, ...]` images of one batch drawn at stream `positions`."""
    images = batch[self.field]
    if self.padding or self.flip:
      images = crop_flip(images, record_hash(seed, positions), self.padding, self.flip)
    if self.mean or self.std != 1.0:
      images = (images - np.float32(self.mean)) / np.float32(self.std)
    return {**batch, self.field: images.astype(batch[self.field].dtype, copy=False)}

  @property
  def active(self) -> bool:
    """Whether the transform changes anything."""
    return bool(self.padding or self.flip or self.mean or self.std != 1.0)


def image_stats(source: Any, field: str = "image", limit: int = 10_000) -> tuple[float, float]:
  """The mean and standard deviation of `field` over the first `limit` records of `source`."""
  n = min(len(source), limit)
  if hasattr(source, "read"):
    values = source.read(np.arange(n))[field]
  else:
    values = np.stack([source[i][field] for i in range(n)])
  values = values.astype(np.float64)
  return float(values.mean()), float(values.std() or 1.0)
