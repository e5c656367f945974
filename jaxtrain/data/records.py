"""ArrayRecord files of dict records, and a command that writes them.

Each record is one dict of numpy arrays, stored as the bytes of `np.savez`
(so any field names, dtypes and shapes round-trip exactly). `RecordSource`
reads them by index through Grain's `ArrayRecordDataSource`.

`python -m jaxtrain.data.convert` writes them from arrays or text.

Example:
  >>> write_records("toy.array_record", [{"x": np.zeros(3), "y": np.int32(1)}])
  >>> RecordSource("toy.array_record")[0]["y"]
  array(1, dtype=int32)
"""

import io
import pathlib
from collections.abc import Iterable
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module

from jaxtrain.data.sources import DataError


def encode(record: dict[str, Any]) -> bytes:
  """One record's bytes: `np.savez` of its fields."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in record.items()})
  return buffer.getvalue()


def decode(raw: bytes) -> dict[str, np.ndarray]:
  """The record that `encode` wrote."""
  with np.load(io.BytesIO(raw), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def write_records(path: str | pathlib.Path, records: Iterable[dict[str, Any]]) -> int:
  """Writes `records` to an ArrayRecord file (through a temporary name); returns the count."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(encode(record))
      count += 1
  finally:
    writer.close()
  tmp.replace(path)
  return count


class RecordSource:
  """A random-access source over ArrayRecord files written by `write_records`."""

  def __init__(self, *paths: str | pathlib.Path, name: str = ""):
    self.name = name or ",".join(pathlib.Path(p).name for p in paths)
    missing = [str(p) for p in paths if not pathlib.Path(p).is_file()]
    if not paths or missing:
      raise DataError(
        f"source {self.name}: missing ArrayRecord file(s) {missing or '(none given)'}"
      )
    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if not len(self._source):
      raise DataError(f"source {self.name}: is empty")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    try:
      return decode(self._source[index])
    except (ValueError, OSError, KeyError) as e:
      raise DataError(f"source {self.name}: record {index} cannot be decoded ({e})") from e
