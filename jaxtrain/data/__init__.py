"""Data sources and Grain pipelines."""

from jaxtrain.data.checks import check_dataset, check_source
from jaxtrain.data.labelled import fortunes
from jaxtrain.data.pipeline import Prefetcher, eval_batches, train_chunks
from jaxtrain.data.records import RecordSource, write_records
from jaxtrain.data.sources import (
  ArraySource,
  DataError,
  Dataset,
  Source,
  check_labels,
  digits,
  fashion_mnist,
  read_idx,
)
from jaxtrain.data.text import ByteTextSource, byte_text, python_stdlib

__all__ = [
  "ArraySource",
  "ByteTextSource",
  "DataError",
  "Dataset",
  "Prefetcher",
  "RecordSource",
  "Source",
  "byte_text",
  "check_dataset",
  "check_labels",
  "check_source",
  "digits",
  "eval_batches",
  "fashion_mnist",
  "fortunes",
  "python_stdlib",
  "read_idx",
  "train_chunks",
  "write_records",
]
