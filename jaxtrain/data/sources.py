"""Random-access data sources and the datasets that need no download at run time.

A source is anything Grain can read by index: `len(source)` and
`source[i] -> dict of numpy arrays`. `ArraySource` adds a vectorised
`read(indices)` that the pipelines use to read a whole batch at once.

Example:
  >>> ds = digits()
  >>> len(ds.train), ds.train[0]["image"].shape
  (1437, (8, 8))
"""

import gzip
import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

READ_BATCH = 4096  # records per `read` when a whole source is checked


def index_batches(length: int, size: int = READ_BATCH) -> Iterator[np.ndarray]:
  """The indices `0 ... length-1` in consecutive arrays of at most `size`."""
  for first in range(0, length, size):
    yield np.arange(first, min(first + size, length))


class DataError(ValueError):
  """The data is missing or malformed; the message names the source and field."""


class Source(Protocol):
  """A Grain random-access source of dict records."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
  """A random-access source over equal-length in-memory arrays.

  Example:
    >>> src = ArraySource("toy", image=np.zeros((10, 4)), label=np.arange(10))
    >>> src.read(np.array([3, 1]))["label"]
    array([3, 1])
  """

  def __init__(self, name: str, **arrays: np.ndarray):
    if not arrays:
      raise DataError(f"source {name}: no arrays")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise DataError(f"source {name}: fields have different lengths {lengths}")
    if not next(iter(lengths.values())):
      raise DataError(f"source {name}: is empty")
    self.name = name
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._fingerprint = None

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the records at `indices`, stacked."""
    return {k: v[indices] for k, v in self.arrays.items()}

  def fingerprint(self) -> str:
    """Returns a sha256 of the arrays' names, dtypes, shapes and bytes."""
    if self._fingerprint is None:
      h = hashlib.sha256()
      for k in sorted(self.arrays):
        v = np.ascontiguousarray(self.arrays[k])
        h.update(f"{k}:{v.dtype}:{v.shape}".encode())
        h.update(memoryview(v).cast("B"))
      self._fingerprint = h.hexdigest()
    return self._fingerprint


class Dataset(NamedTuple):
  """A train and an eval source of one dataset, and the folder it was read from, if any.

  `files` (name to text) are written into the workdir when a run starts, such
  as a trained tokenizer; `info` is recorded in `run.json`'s `data` section.
  """

  name: str
  train: Source
  eval: Source
  folder: str = ""
  files: dict[str, str] | None = None
  info: dict[str, Any] | None = None


def check_labels(
  source: Source, num_classes: int, field: str = "label", *, low: int = 0, why: str = ""
) -> None:
  """Raises `DataError` naming the first record with a `field` value outside `[low, num_classes)`.

  Labels may be scalars or arrays (one per position); array-backed sources are
  checked with whole-array operations, sources with a batch `read` a batch at
  a time, others record by record. A source with `value_range(field)` (a range
  its writer guaranteed, or None) is checked by that range, reading nothing.

  Args:
    source: the source to check.
    num_classes: the end of the range, exclusive.
    field: the integer field.
    low: the start of the range.
    why: what the range is, for the message (such as "the model's 10 logits").
  """
  name = getattr(source, "name", type(source).__name__)
  known = source.value_range(field) if hasattr(source, "value_range") else None
  if known is not None:  # a source whose writer checked every value (token shards)
    if known[0] < low or known[1] > num_classes:
      because = f" ({why})" if why else ""
      raise DataError(f"source {name}: field {field} holds values in [{known[0]}, {known[1]}), "
                      f"not all inside [{low}, {num_classes}){because}")  # fmt: skip
    return
  arrays = getattr(source, "arrays", None)
  if arrays is not None:
    values = arrays[field]
  elif hasattr(source, "read"):
    values = np.concatenate([source.read(i)[field] for i in index_batches(len(source))])
  else:
    values = np.array([np.asarray(source[i][field]) for i in range(len(source))])
  outside = ((values < low) | (values >= num_classes)).reshape(len(values), -1).any(axis=1)
  bad = np.flatnonzero(outside)
  if bad.size:
    i = int(bad[0])
    shown = values[i] if values.ndim == 1 else f"{values[i].min()}..{values[i].max()}"
    because = f" ({why})" if why else ""
    raise DataError(
      f"source {name}: record {i} field {field}={shown} is outside [{low}, {num_classes}){because}"
    )


def digits(eval_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split once.

  Args:
    eval_fraction: the share of images held out for evaluation.
    seed: the seed of the fixed split.

  Returns:
    Images as float32 `[8, 8]` in [0, 1] and int32 labels.
  """
  folder = _digits_folder()
  # The file `sklearn.datasets.load_digits` reads, read here without importing scikit-learn,
  # which takes over a second: every quick run and test would pay it.
  raw = np.loadtxt(folder / "digits.csv.gz", delimiter=",")
  images = (raw[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)
  labels = raw[:, -1].astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  cut = len(labels) - round(len(labels) * eval_fraction)
  train = ArraySource("digits/train", image=images[order[:cut]], label=labels[order[:cut]])
  test = ArraySource("digits/test", image=images[order[cut:]], label=labels[order[cut:]])
  return Dataset("digits", train, test, str(folder))


def _digits_folder() -> pathlib.Path:
  """scikit-learn's bundled data folder, found without importing the package."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("the digits come with scikit-learn, which is not installed: "
                    "pip install scikit-learn")  # fmt: skip
  return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data"


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# sha256 of the decompressed IDX bytes: the same for the upstream files and for
# Debian's, which are compressed again and so differ as .gz files.
FASHION_MNIST_SHA256 = {
  "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
  "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
  "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
  "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST family's format), gzipped or not.

  Args:
    path: the file.

  Returns:
    The array, with the dtype and shape its header declares.

  Raises:
    DataError: when the header or the size is wrong.
  """
  return _parse_idx(_read_bytes(path), path)


def _parse_idx(raw: bytes, path: str | os.PathLike) -> np.ndarray:
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in dtypes:
    raise DataError(f"{path}: not an IDX file (bad magic number)")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(dtypes[raw[2]])
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise DataError(f"{path}: holds {len(raw) - offset} data bytes, header says shape {shape}")
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(
  data_dir: str = "", cache_dir: str | None = None, url: str = FASHION_MNIST_URL
) -> Dataset:
  """Fashion-MNIST (60,000 train and 10,000 test 28x28 images, 10 classes).

  The four IDX files are looked up in `data_dir`, then in the Debian package's
  folder (`apt-get install dataset-fashion-mnist`), then in `cache_dir`, and
  are otherwise downloaded from `url` into `cache_dir`. Every file's content is
  checked against its sha256.

  Args:
    data_dir: a folder to read them from (`data.dir`); when given, it must
      hold them. Empty to look in the other places.
    cache_dir: the download cache; `$JAXTRAIN_CACHE/fashion-mnist` or
      `~/.cache/jaxtrain/fashion-mnist` by default.
    url: the base address of the files.

  Returns:
    Images as float32 `[28, 28]` in [0, 1] and int32 labels.
  """
  cache = pathlib.Path(cache_dir or _default_cache() / "fashion-mnist")
  if data_dir:
    folder = pathlib.Path(data_dir).expanduser()
    if not folder.is_dir():
      raise DataError(f"data.dir={data_dir!r} is not a folder")
    if not _find_fashion_mnist([folder]):
      raise DataError(
        f"data.dir={data_dir!r} holds no Fashion-MNIST: it needs the four IDX files "
        f"{', '.join(FASHION_MNIST_SHA256)} (each may end in .gz)"
      )
  else:
    folder = _find_fashion_mnist([DEBIAN_DIR, cache]) or _download(url, cache)
  arrays = {name: _checked_idx(folder, name) for name in FASHION_MNIST_SHA256}

  def split(prefix: str, name: str) -> ArraySource:
    images = arrays[f"{prefix}-images-idx3-ubyte"].astype(np.float32) / 255.0
    labels = arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int32)
    source = ArraySource(f"fashion_mnist/{name}", image=images, label=labels)
    check_labels(source, 10)
    return source

  return Dataset(
    "fashion_mnist", split("train", "train"), split("t10k", "test"), str(folder.resolve())
  )


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = pathlib.Path(path)
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (OSError, EOFError) as e:
    raise DataError(f"{path}: cannot read ({e})") from e


def _default_cache() -> pathlib.Path:
  root = os.environ.get("JAXTRAIN_CACHE")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "jaxtrain"


def _idx_path(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  for candidate in (folder / f"{name}.gz", folder / name):
    if candidate.is_file():
      return candidate
  return None


def _find_fashion_mnist(folders: Sequence[str | os.PathLike]) -> pathlib.Path | None:
  for folder in folders:
    if folder and all(_idx_path(pathlib.Path(folder), n) for n in FASHION_MNIST_SHA256):
      return pathlib.Path(folder)
  return None


def _checked_idx(folder: pathlib.Path, name: str) -> np.ndarray:
  path = _idx_path(folder, name)
  raw = _read_bytes(path)
  if hashlib.sha256(raw).hexdigest() != FASHION_MNIST_SHA256[name]:
    raise DataError(f"{path}: content does not match the Fashion-MNIST sha256 checksum")
  return _parse_idx(raw, path)


def _download(url: str, cache: pathlib.Path) -> pathlib.Path:
  """Downloads the four files into `cache`, each checked before it is kept."""
  try:
    cache.mkdir(parents=True, exist_ok=True)
    for name, sha256 in FASHION_MNIST_SHA256.items():
      if not _idx_path(cache, name):
        _fetch(f"{url.rstrip('/')}/{name}.gz", cache / f"{name}.gz", sha256)
  except OSError as e:
    raise DataError(
      f"Fashion-MNIST not found (looked in {DEBIAN_DIR} and {cache}) and the download "
      f"from {url} failed ({e}); run `apt-get install dataset-fashion-mnist` or put the four "
      "IDX files in a folder and pass --config.data.dir=FOLDER"
    ) from e
  return cache


def _fetch(address: str, dest: pathlib.Path, sha256: str) -> None:
  """Downloads `address` to `dest` through a private temporary file.

  Processes sharing the cache each write their own file; the checked file is
  renamed into place atomically, so a reader never sees a partial `dest`.
  """
  fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part.gz")
  part = pathlib.Path(name)
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(address, timeout=30) as response:
      shutil.copyfileobj(response, f)
    if hashlib.sha256(_read_bytes(part)).hexdigest() != sha256:
      raise DataError(f"download {address}: content does not match its sha256 checksum")
    os.replace(part, dest)
  finally:
    part.unlink(missing_ok=True)
