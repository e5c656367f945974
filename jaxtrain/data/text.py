"""Text as tokens, cut into fixed-length windows for language models.

A `ByteTextSource` holds a corpus as one token array (its bytes, `uint8`, by
default; the ids of a tokenizer otherwise) and serves window `i` as
`{"tokens": ids[i*T : i*T + T + 1]}` (int32): `T + 1` tokens, so a model sees
`T` of them and predicts the next at each position. Windows do not overlap
except in that one token. Byte-level text has the 256 byte values as its
vocabulary; tokenized text (`jaxtrain.data.bpe`) also serves each window's
`bytes`, the length in bytes of the tokens it predicts, from which the loss
reports `bits_per_byte` comparably across tokenizers.

Example:
  >>> ds = python_stdlib(length=256)          # CPython's own sources, offline
  >>> ds.train[0]["tokens"].shape
  (257,)
"""

import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

from jaxtrain.data.sources import DataError, Dataset

VOCAB = 256


class ByteTextSource:
  """Fixed-length windows over a token array; vectorised `read` for whole batches.

  Args:
    name: the source's name, for messages.
    data: the tokens, an unsigned integer array (bytes by default).
    length: the window length `T`; a record holds `T + 1` tokens.
    token_bytes: for tokenized text, each token id's length in bytes; each
      record then also holds `bytes`, the bytes its last `T` tokens stand for.
  """

  def __init__(self, name: str, data: np.ndarray, length: int, token_bytes=None):
    if length < 1:
      raise DataError(f"source {name}: window length {length} must be positive")
    self.name, self.length = name, length
    data = np.asarray(data)
    self.data = data if data.dtype.kind == "u" else np.asarray(data, np.uint8)
    self.token_bytes = None if token_bytes is None else np.asarray(token_bytes, np.int32)
    if len(self) == 0:
      raise DataError(f"source {name}: {self.data.size} tokens hold no window of {length + 1}")

  def __len__(self) -> int:
    return max((self.data.size - 1) // self.length, 0)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read(np.array([index])).items()}

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The windows at `indices`, as int32 `[len(indices), length + 1]`."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"source {self.name}: window index out of range [0, {len(self)})")
    starts = indices[:, None] * self.length + np.arange(self.length + 1)
    tokens = self.data[starts].astype(np.int32)
    if self.token_bytes is None:
      return {"tokens": tokens}
    return {"tokens": tokens, "bytes": self.token_bytes[tokens[:, 1:]].sum(axis=1, dtype=np.int32)}

  def fingerprint(self) -> str:
    """The SHA-256 of the tokens and the window length: the corpus changes with Python's version."""
    digest = hashlib.sha256(self.data.tobytes())
    digest.update(f"{self.data.dtype}/{self.length}".encode())
    return digest.hexdigest()[:16]


def read_files(paths: Iterable[str | pathlib.Path]) -> np.ndarray:
  """The bytes of `paths`, in the order given, each followed by a newline."""
  chunks = []
  for path in paths:
    try:
      chunks.append(pathlib.Path(path).read_bytes())
    except OSError as e:
      raise DataError(f"text file {path}: {e.strerror or e}") from e
    chunks.append(b"\n")
  return np.frombuffer(b"".join(chunks), np.uint8)


def byte_text(
  name: str, paths: Sequence[str | pathlib.Path], length: int, eval_fraction: float = 0.05
) -> Dataset:
  """A language-modelling dataset over the bytes of `paths`.

  The last `eval_fraction` of the bytes is held out for evaluation.

  Args:
    name: the dataset's name.
    paths: the files, read in this order.
    length: the window length `T` (each record holds `T + 1` bytes).
    eval_fraction: the share of bytes held out.

  Returns:
    Train and eval `ByteTextSource`s.
  """
  if not paths:
    raise DataError(f"dataset {name}: no text files")
  data = read_files(paths)
  cut = int(data.size * (1 - eval_fraction))
  return Dataset(
    name,
    ByteTextSource(f"{name}/train", data[:cut], length),
    ByteTextSource(f"{name}/eval", data[cut:], length),
    os.path.commonpath([os.path.abspath(p) for p in paths]),
  )


def python_stdlib(length: int, eval_fraction: float = 0.05, limit_bytes: int = 0) -> Dataset:
  """The `.py` files of this Python's standard library (sorted by path), as byte text.

  Args:
    length: the window length.
    eval_fraction: the share of bytes held out for evaluation.
    limit_bytes: use only the first this many bytes; 0 for all.

  Returns:
    The dataset `python_stdlib`.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
  if limit_bytes:
    kept, total = [], 0
    for p in paths:
      kept.append(p)
      total += p.stat().st_size
      if total >= limit_bytes:
        break
    paths = kept
  return byte_text("python_stdlib", paths, length, eval_fraction)
