"""ArrayRecord files of dict records, and a command that writes them.

Each record is one dict of numpy arrays: a small JSON header (each field's
name, dtype and shape) then the fields' raw bytes, so any field names, shapes
and numeric, bool, bytes or str dtypes round-trip exactly, and decoding costs microseconds. Records
stored as `np.savez` bytes, the earlier format, are still read. `RecordSource`
reads them by index, or a batch at once, through Grain's `ArrayRecordDataSource`.

`python -m jaxtrain.data.convert` writes them from arrays or text.

Example:
  >>> write_records("toy.array_record", [{"x": np.zeros(3), "y": np.int32(1)}])
  >>> RecordSource("toy.array_record")[0]["y"]
  array(1, dtype=int32)
"""

import functools
import io
import json
import pathlib
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
from array_record.python import array_record_module

from jaxtrain.data.sources import DataError

MAGIC = b"JTR1"
_NPZ_MAGIC = b"PK\x03\x04"  # np.savez bytes, the earlier record format


@functools.lru_cache(maxsize=64)
def _layout(header: bytes) -> tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]:
  """Each field's name, dtype, shape and element count; records of a file share a header."""
  fields = []
  for name, dtype, shape in json.loads(header):
    fields.append((name, np.dtype(dtype), tuple(shape), int(np.prod(shape, dtype=np.int64))))
  return tuple(fields)


def encode(record: dict[str, Any]) -> bytes:
  """One record's bytes: `MAGIC`, the header's length and JSON header, then each field's bytes."""
  arrays = {k: np.asarray(v) for k, v in record.items()}  # tobytes() writes C order
  for name, array in arrays.items():
    if array.dtype.hasobject or array.dtype.names:
      raise DataError(
        f"record field {name}: dtype {array.dtype} cannot be stored; use one array per field "
        "of a numeric, bool, bytes or str dtype"
      )
  header = json.dumps([[k, a.dtype.str, a.shape] for k, a in arrays.items()]).encode()
  return b"".join(
    [MAGIC, struct.pack("<I", len(header)), header, *(a.tobytes() for a in arrays.values())]
  )


def decode(raw: bytes, copy: bool = True) -> dict[str, np.ndarray]:
  """The record that `encode` wrote; with `copy=False`, read-only views of `raw`."""
  if raw[:4] == _NPZ_MAGIC:
    with np.load(io.BytesIO(raw), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if raw[:4] != MAGIC:
    raise ValueError(f"not a record: starts with {raw[:4]!r}")
  size = struct.unpack_from("<I", raw, 4)[0] if len(raw) >= 8 else len(raw)
  offset, out = 8 + size, {}
  if offset > len(raw):
    raise ValueError(f"a torn header: {len(raw)} bytes in all")
  for name, dtype, shape, count in _layout(bytes(raw[8:offset])):
    array = np.frombuffer(raw, dtype, count, offset).reshape(shape)
    out[name] = array.copy() if copy else array
    offset += count * dtype.itemsize
  if offset != len(raw):
    raise ValueError(f"{len(raw) - offset} bytes past the fields the header names")
  return out


def write_records(path: str | pathlib.Path, records: Iterable[dict[str, Any]]) -> int:
  """Writes `records` to an ArrayRecord file; returns the count.

  The file is written under a temporary name and renamed into place only when
  every record is written, so a failure (or no record at all) leaves `path` as
  it was and no temporary file behind.

  Raises:
    DataError: a record cannot be stored, or there is none.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    try:
      for record in records:
        writer.write(encode(record))
        count += 1
    finally:
      writer.close()
    if not count:
      raise DataError(f"{path}: no records to write")
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
  return count


def _layout_of(record: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
  return [(k, v.dtype.str, v.shape) for k, v in record.items()]


class RecordSource:
  """A random-access source over ArrayRecord files written by `write_records`."""

  def __init__(self, *paths: str | pathlib.Path, name: str = ""):
    self.name = name or ",".join(pathlib.Path(p).name for p in paths)
    missing = [str(p) for p in paths if not pathlib.Path(p).is_file()]
    if not paths or missing:
      raise DataError(
        f"source {self.name}: missing ArrayRecord file(s) {missing or '(none given)'}"
      )
    import grain  # noqa: PLC0415 (a command that reads no records starts without it)

    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if not len(self._source):
      raise DataError(f"source {self.name}: is empty")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._decode(self._source[index], index)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the records at `indices`, read in one call and stacked.

    Raises:
      DataError: a record cannot be decoded, or its fields, shapes or dtypes
        differ from the first one's.
    """
    raws = self._source.__getitems__([int(i) for i in indices])
    records = [self._decode(raw, int(i), copy=False) for raw, i in zip(raws, indices, strict=True)]
    layout = _layout_of(records[0])
    for i, record in zip(indices, records, strict=True):
      if _layout_of(record) != layout:
        raise DataError(
          f"source {self.name}: record {i} has fields {_layout_of(record)}, record "
          f"{indices[0]} {layout}"
        )
    return {k: np.stack([r[k] for r in records]) for k in records[0]}

  def _decode(self, raw: bytes, index: int, copy: bool = True) -> dict[str, np.ndarray]:
    try:
      return decode(raw, copy)
    except (ValueError, OSError, KeyError, TypeError, struct.error) as e:
      raise DataError(f"source {self.name}: record {index} cannot be decoded ({e})") from e
