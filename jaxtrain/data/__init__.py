"""Data sources and Grain pipelines; token shards packed into language-model windows."""

from jaxtrain.data.checks import check_dataset, check_source
from jaxtrain.data.labelled import fortunes
from jaxtrain.data.packing import Mixture, Packed, tokens
from jaxtrain.data.pipeline import Prefetcher, eval_batches, train_chunks
from jaxtrain.data.records import RecordSource, write_records
from jaxtrain.data.shards import Shards
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
  "Mixture",
  "Packed",
  "Prefetcher",
  "RecordSource",
  "Shards",
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
  "tokens",
  "train_chunks",
  "write_records",
]
