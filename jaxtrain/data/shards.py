"""Reads the token shards that `python -m jaxtrain.data.tokenize` writes.

A shard folder holds `manifest.json` (the tokenizer, the dtype, every shard's
documents, tokens and SHA-256), the shards `tokens-00000.array_record`, ...
(one record `{"tokens": ids}` per document) and, next to each, its documents'
token counts `tokens-00000.lengths.npy`, so the reader knows where every
document starts in the concatenated token stream without opening a shard.
`span(start, stop)` reads a window of that stream from the few documents it
overlaps: the access pattern of language-model pretraining.

Example:
  >>> shards = Shards("tokens")
  >>> shards.span(1000, 2025).shape, shards.vocab_size
  ((1025,), 256)
"""

import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tokenizers

from jaxtrain.data import bpe, records
from jaxtrain.data.sources import DataError

if TYPE_CHECKING:  # Grain is imported when a shard is first read
  import grain

FORMAT = 1  # the manifest's "format"; a reader refuses others
MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: Grain reads records by index
SHARD_NAME = re.compile(r"tokens-(\d{5,})\.(array_record|lengths\.npy)")


def shard_file(index: int) -> str:
  """The file name of shard `index`."""
  return f"tokens-{index:05d}.array_record"


def lengths_file(index: int) -> str:
  """The file name of shard `index`'s token counts."""
  return f"tokens-{index:05d}.lengths.npy"


class Shards:
  """Random access to token shards: documents by index, and spans of the token stream.

  Args:
    folder: the `--out` folder of `python -m jaxtrain.data.tokenize`.

  Attributes:
    folder: the folder.
    manifest: the parsed `manifest.json`.
    vocab_size: the tokenizer's vocabulary size.
    dtype: the stored ids' dtype (`uint16`, or `uint32` for larger vocabularies).
    lengths: every document's token count, int64, in order.
    offsets: where each document starts in the concatenated stream, int64;
      `offsets[-1]` is the total token count.

  Raises:
    DataError: the manifest is missing or damaged, or a shard or its lengths
      file is missing or disagrees with it; one line naming the folder.
  """

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    self.manifest = _read_manifest(self.folder)
    self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
    self.dtype = np.dtype(self.manifest["dtype"])
    shards = self.manifest["shards"]
    self.lengths = np.concatenate([self._lengths(s) for s in shards] or [np.zeros(0, np.int64)])
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
    # `path[0:n]` tells Grain each shard's record count, so it opens no file until a read
    self._paths = [f"{self.folder / s['file']}[0:{s['documents']}]" for s in shards]
    self._source = None
    self._tokenizer_json = None

  def __len__(self) -> int:
    return self.lengths.size

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_source": None}  # open readers stay with their process

  @property
  def tokens(self) -> int:
    """The total token count."""
    return int(self.offsets[-1])

  @property
  def source(self) -> "grain.sources.ArrayRecordDataSource":
    """The Grain source over all shards (one record per document); it caches open readers."""
    if self._source is None:
      import grain  # noqa: PLC0415

      self._source = grain.sources.ArrayRecordDataSource(self._paths)
    return self._source

  @property
  def tokenizer_json(self) -> str | None:
    """The tokenizer's JSON, checked against the manifest's SHA-256; None for bytes."""
    if self.manifest["tokenizer"]["kind"] == "bytes":
      return None
    if self._tokenizer_json is None:
      self._tokenizer_json = self._read_tokenizer()
    return self._tokenizer_json

  def fingerprint(self) -> str:
    """A short hash of the tokenizer and every shard's bytes, as the manifest records them."""
    digest = hashlib.sha256(str(self.manifest["tokenizer"]["sha256"]).encode())  # None: bytes
    for shard in self.manifest["shards"]:
      digest.update(shard["sha256"].encode())
    return digest.hexdigest()[:16]

  @property
  def tokenizer_sha256(self) -> str | None:
    """The tokenizer's SHA-256 as the manifest records it; None for bytes."""
    return self.manifest["tokenizer"]["sha256"]

  def token_bytes(self) -> np.ndarray:
    """Each token id's length in bytes, int32: for bits per byte.

    Raises:
      DataError: the tokenizer is not byte-level, so its tokens have no fixed byte length.
    """
    text = self.tokenizer_json
    if text is None:
      return np.ones(bpe.BYTES, np.int32)
    if '"ByteLevel"' not in json.dumps(json.loads(text).get("pre_tokenizer")):
      raise DataError(f"token shards {self.folder}: the tokenizer is not byte-level, so its "
                      "tokens have no fixed length in bytes")  # fmt: skip
    return bpe.token_bytes(tokenizers.Tokenizer.from_str(text))

  def document(self, index: int) -> np.ndarray:
    """Document `index`'s token ids, in the stored dtype."""
    return self._decode(self.source[self._check(index)], index).copy()

  def documents(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """The documents at `indices`, read in one batch (Grain reads the shards in parallel)."""
    keys = [self._check(i) for i in np.asarray(indices, np.int64).ravel()]
    raws = self.source.__getitems__(keys) if keys else []
    return [self._decode(raw, i).copy() for raw, i in zip(raws, keys, strict=True)]

  def span(self, start: int, stop: int) -> np.ndarray:
    """Tokens `[start, stop)` of all documents concatenated, as int32.

    Only the documents the span overlaps are read, each with a single-record
    read: a batch read starts a thread pool per call, a millisecond that
    dwarfs reading the one or two documents a window usually touches.

    Raises:
      IndexError: the span is not within `[0, tokens]`.
    """
    if not 0 <= start <= stop <= self.tokens:
      raise IndexError(f"token shards {self.folder}: span [{start}, {stop}) is outside "
                       f"[0, {self.tokens}]")  # fmt: skip
    if start == stop:
      return np.zeros(0, np.int32)
    first = int(np.searchsorted(self.offsets, start, "right")) - 1
    last = int(np.searchsorted(self.offsets, stop, "left"))
    pieces = [self._decode(self.source[i], i) for i in range(first, last) if self.lengths[i]]
    joined = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    base = int(self.offsets[first])
    return joined[start - base : stop - base].astype(np.int32)

  def _check(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"token shards {self.folder}: document {index} of {len(self)}")
    return index

  def _decode(self, raw: bytes, index: int) -> np.ndarray:
    try:
      tokens = records.decode(raw, copy=False)["tokens"]
    except (ValueError, KeyError) as e:
      raise DataError(f"token shards {self.folder}: document {index} cannot be read ({e})") from e
    if tokens.size != self.lengths[index]:
      raise DataError(f"token shards {self.folder}: document {index} holds {tokens.size} "
                      f"tokens, its lengths file {self.lengths[index]}")  # fmt: skip
    return tokens

  def _lengths(self, shard: dict) -> np.ndarray:
    """A shard's token counts, checked with the shard's presence against the manifest."""
    name = shard["file"]
    lengths_path = self.folder / name.replace(".array_record", ".lengths.npy")
    if not (self.folder / name).is_file() or not lengths_path.is_file():
      raise DataError(f"token shards {self.folder}: {name} or its lengths file is missing; "
                      "rerun python -m jaxtrain.data.tokenize to write it")  # fmt: skip
    try:
      lengths = np.load(lengths_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f"token shards {self.folder}: {lengths_path.name} is damaged ({e})") from e
    if lengths.shape != (shard["documents"],) or int(lengths.sum()) != shard["tokens"]:
      raise DataError(f"token shards {self.folder}: {lengths_path.name} holds {lengths.size} "
                      f"documents of {int(lengths.sum())} tokens, the manifest "
                      f"{shard['documents']} of {shard['tokens']}")  # fmt: skip
    return lengths.astype(np.int64)

  def _read_tokenizer(self) -> str:
    path = self.folder / TOKENIZER
    try:
      raw = path.read_bytes()
    except OSError as e:
      raise DataError(f"token shards {self.folder}: {TOKENIZER} cannot be read "
                      f"({e.strerror or e})") from e  # fmt: skip
    if hashlib.sha256(raw).hexdigest() != self.manifest["tokenizer"]["sha256"]:
      raise DataError(f"token shards {self.folder}: {TOKENIZER} is not the tokenizer the "
                      "manifest names (its SHA-256 differs)")  # fmt: skip
    return raw.decode()


def _read_manifest(folder: pathlib.Path) -> dict:
  """The folder's manifest, checked for the keys and format the reader needs."""
  path = folder / MANIFEST
  if not path.is_file():
    raise DataError(f"token shards {folder}: no {MANIFEST} (python -m jaxtrain.data.tokenize "
                    "writes it last; rerun it to finish the folder)")  # fmt: skip
  try:
    manifest = json.loads(path.read_text())
    _ = manifest["tokenizer"]["vocab_size"], manifest["dtype"], manifest["shards"]
    np.dtype(manifest["dtype"])
    for shard in manifest["shards"]:  # each entry as the reader uses it
      _ = str(shard["file"]), int(shard["documents"]), int(shard["tokens"]), shard["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"token shards {folder}: {MANIFEST} is damaged ({type(e).__name__}: "
                    f"{e})") from e  # fmt: skip
  if manifest.get("format") != FORMAT:
    raise DataError(f"token shards {folder}: {MANIFEST} has format {manifest.get('format')!r}; "
                    f"this reader reads format {FORMAT}")  # fmt: skip
  return manifest
