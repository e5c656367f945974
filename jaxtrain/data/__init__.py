"""Data sources and Grain pipelines."""

from jaxtrain.data.pipeline import Prefetcher, eval_batches, train_chunks
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

__all__ = [
  "ArraySource",
  "DataError",
  "Dataset",
  "Prefetcher",
  "Source",
  "check_labels",
  "digits",
  "eval_batches",
  "fashion_mnist",
  "read_idx",
  "train_chunks",
]
