"""Data checks that run before anything is compiled: one line naming source, record, field.

Every record of a source must have the fields, shapes and dtypes of its first
record (of the train source's, for an eval source), and integer labels must lie
in `[0, num_classes)`. A source with `checked_spec()` (its records all alike by
construction, as packed token windows are) is taken at its word. Array-backed
sources are checked with whole-array operations, sources with a batch `read` a
batch at a time (a batch that does not fit is then searched record by record),
others record by record; once, at start.
A batch `read` must keep each record's dtype (`RecordSource.read` checks them);
`np.stack` alone would promote a narrower one unseen.

Example:
  >>> check_dataset(ds, num_classes={"label": 10})   # raises DataError on bad data
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtrain.data.sources import DataError, Dataset, Source, check_labels, index_batches

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def spec_of(record: Mapping[str, Any]) -> Spec:
  """The field names, shapes and dtypes of one record."""
  return {k: (np.shape(v), np.asarray(v).dtype) for k, v in record.items()}


def check_source(
  source: Source, *, like: Spec | None = None, num_classes: Mapping[str, int] | None = None
) -> Spec:
  """Raises `DataError` at the first bad record of `source`; returns its spec.

  Args:
    source: the source to check.
    like: the spec every record must have; the first record's by default.
    num_classes: integer fields whose values must lie in `[0, n)`.

  Returns:
    The spec the records have.
  """
  name = getattr(source, "name", type(source).__name__)
  try:
    return _check(name, source, like, num_classes)
  except DataError:
    raise
  except Exception as e:  # the user's own source failed to read: one line, not a traceback
    raise DataError(f"source {name}: reading it failed: {type(e).__name__}: {e}") from e


def _check(
  name: str, source: Source, like: Spec | None, num_classes: Mapping[str, int] | None
) -> Spec:
  if len(source) == 0:
    raise DataError(f"source {name}: is empty")
  if hasattr(source, "checked_spec"):  # every record alike by construction: token shards
    return _checked(name, source.checked_spec(), like, num_classes, source)
  spec = like or spec_of(source[0])
  for field, (_, dtype) in spec.items():
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
      raise DataError(
        f"source {name}: field {field} has dtype {dtype}; batches hold numeric or bool arrays "
        "(encode text as token ids first)"
      )
  arrays = getattr(source, "arrays", None)
  if arrays is not None:
    _check_arrays(name, arrays, spec)
  elif hasattr(source, "read"):
    for indices in index_batches(len(source)):
      if not _batch_fits(source, indices, spec):
        for i in indices:
          _check_record(name, int(i), source[int(i)], spec)
  else:
    for i in range(len(source)):
      _check_record(name, i, source[i], spec)
  for field, n in (num_classes or {}).items():
    check_labels(source, n, field)
  return spec


def _checked(name, spec: Spec, like: Spec | None, num_classes, source: Source) -> Spec:
  if like is not None and spec != like:
    raise DataError(f"source {name}: records have fields {spec}, expected {like}")
  for field, n in (num_classes or {}).items():
    check_labels(source, n, field)
  return spec


def check_dataset(data: Dataset, num_classes: Mapping[str, int] | None = None) -> Spec:
  """Checks the train source, then the eval source against the train records' spec."""
  if not isinstance(data, Dataset):
    raise DataError(
      f"data is a {type(data).__name__}; pass a jaxtrain.data.Dataset(name, train, eval) "
      "of two sources"
    )
  spec = check_source(data.train, num_classes=num_classes)
  check_source(data.eval, like=spec, num_classes=num_classes)
  return spec


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
  return f"shape {tuple(shape)} dtype {np.dtype(dtype).name}"


def _check_record(name: str, index: int, record: Mapping[str, Any], spec: Spec) -> None:
  if set(record) != set(spec):
    raise DataError(
      f"source {name}: record {index} has fields {sorted(record)}, expected {sorted(spec)}"
    )
  for field, (shape, dtype) in spec.items():
    value = np.asarray(record[field])
    if value.shape != shape or value.dtype != dtype:
      raise DataError(
        f"source {name}: record {index} field {field} has {_describe(value.shape, value.dtype)}, "
        f"expected {_describe(shape, dtype)}"
      )


def _batch_fits(source: Source, indices: np.ndarray, spec: Spec) -> bool:
  """Whether one `read` of `indices` stacks to the spec's fields, shapes and dtypes."""
  try:
    batch = source.read(indices)
  except (ValueError, KeyError):  # records that do not stack, or one that does not decode
    return False
  return {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == spec


def _check_arrays(name: str, arrays: Mapping[str, np.ndarray], spec: Spec) -> None:
  _check_record(name, 0, {k: v[0] for k, v in arrays.items()}, spec)
