"""Byte-level BPE tokenizers (the `tokenizers` package) over a text dataset.

`tokenize` trains a tokenizer of `vocab_size` on the train split only, or reads
the one a run saved (`tokenizer.json` in its workdir, so a resumed run encodes
the same way), encodes both splits and returns a dataset of token windows
whose records also carry `bytes`: the loss turns its nats into bits per byte
with it, so runs with other tokenizers, bytes included, compare. The returned
dataset carries the tokenizer's JSON (written into the workdir when the run
starts) and its SHA-256 (recorded in `run.json`).

Example:
  >>> text = python_stdlib(length=256)
  >>> ds, tokenizer = tokenize(text, vocab_size=4096, length=128)
  >>> tokenizer.decode(ds.train[0]["tokens"].tolist())[:20]
"""

import hashlib
import pathlib

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxtrain.data.sources import DataError, Dataset
from jaxtrain.data.text import ByteTextSource

FILE = "tokenizer.json"
BYTES = 256  # a byte-level vocabulary's first tokens
_CHUNK = 1 << 20  # characters per encoded piece, cut at a newline


def train(text: str, vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer of `vocab_size` tokens (the 256 bytes among them) on `text`.

  Raises:
    DataError: `vocab_size` is not between the 256 byte tokens and what the
      text can train (each merge takes at least one pair of its tokens), or
      the text trains fewer tokens than asked.
  """
  most = BYTES + len(text.encode())
  if not BYTES < vocab_size <= most:
    raise DataError(f"data.vocab_size={vocab_size} must be from {BYTES + 1} (the {BYTES} byte "
                    f"tokens and a merge) to {most:,} (what the train text's bytes can "
                    "merge into)")  # fmt: skip
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  try:
    tokenizer.train_from_iterator(_pieces(text), trainer)
  except BaseException as e:  # a Rust panic is a BaseException
    if isinstance(e, KeyboardInterrupt | SystemExit):
      raise
    raise DataError(f"training the BPE tokenizer failed: {e}") from e
  if tokenizer.get_vocab_size() < vocab_size:
    raise DataError(
      f"data.vocab_size={vocab_size}: the train text holds merges for only "
      f"{tokenizer.get_vocab_size()} tokens; ask for at most that many"
    )
  return tokenizer


def load(path: pathlib.Path) -> tokenizers.Tokenizer:
  """A saved `tokenizer.json`; a damaged one is a `DataError` naming it."""
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except BaseException as e:  # tokenizers raises Exception, or a Rust panic (BaseException)
    if isinstance(e, KeyboardInterrupt | SystemExit):
      raise
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    raise DataError(
      f"{path} is not a readable tokenizer ({why}); put the run's own tokenizer.json back, "
      "or use another workdir to train a new one"
    ) from e


def token_bytes(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """Each token id's length in bytes: a byte-level token's characters are one byte each."""
  lengths = np.zeros(tokenizer.get_vocab_size(), np.int32)
  for piece, index in tokenizer.get_vocab().items():
    lengths[index] = len(piece)
  return lengths


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
  """The ids of `text`, as `uint16` (or `uint32` for vocabularies over 65,536)."""
  dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
  pieces = tokenizer.encode_batch_fast(list(_pieces(text)), add_special_tokens=False)
  return np.concatenate([np.asarray(p.ids, dtype) for p in pieces] or [np.zeros(0, dtype)])


def tokenize(
  dataset: Dataset, vocab_size: int, length: int, saved: pathlib.Path | None = None
) -> tuple[Dataset, tokenizers.Tokenizer]:
  """Byte text re-cut as BPE token windows of `length`.

  Args:
    dataset: a dataset of `ByteTextSource`s over bytes (`byte_text`, `python_stdlib`).
    vocab_size: the tokenizer's size, if one is trained.
    length: the window length in tokens.
    saved: a `tokenizer.json` to read instead of training, if it exists.

  Returns:
    The token dataset, with the tokenizer's JSON in `files` and its hash in
    `info`, and the tokenizer.
  """
  train_text, eval_text = (_text(s) for s in (dataset.train, dataset.eval))
  if saved is not None and saved.is_file():
    tokenizer = load(saved)
    if tokenizer.get_vocab_size() != vocab_size:
      raise DataError(
        f"{saved} holds a tokenizer of {tokenizer.get_vocab_size()} tokens, not "
        f"data.vocab_size={vocab_size}; use another workdir to train a new one"
      )
  else:
    tokenizer = train(train_text, vocab_size)
  serial = tokenizer.to_str()
  lengths = token_bytes(tokenizer)
  sources = (
    ByteTextSource(f"{dataset.name}/{split}", encode(tokenizer, text), length, lengths)
    for split, text in (("train", train_text), ("eval", eval_text))
  )
  info = {
    "tokenizer": "bpe",
    "vocab_size": tokenizer.get_vocab_size(),
    "tokenizer_sha256": hashlib.sha256(serial.encode()).hexdigest(),
  }
  tokenized = Dataset(dataset.name, *sources, dataset.folder, files={FILE: serial}, info=info)
  return tokenized, tokenizer


def _text(source: ByteTextSource) -> str:
  if not isinstance(source, ByteTextSource) or source.data.dtype != np.uint8:
    raise DataError(f"source {getattr(source, 'name', source)}: BPE needs byte text")
  return source.data.tobytes().decode("utf-8", errors="replace")


def _pieces(text: str):
  """`text` in pieces of about `_CHUNK` characters, each ending at a newline."""
  start = 0
  while start < len(text):
    end = text.find("\n", start + _CHUNK)
    end = len(text) if end < 0 else end + 1
    yield text[start:end]
    start = end
