"""Language-model windows packed from token shards: documents with segment ids and positions.

A `Packed` source serves window `i` of a set of shards (`jaxtrain.data.tokenize`
writes them) as `T + 1` tokens with, for each token, its `segment_ids` (1 for
the window's first document, 2 for the next, ...; 0 for padding) and its
`positions` (counted from 0 where its document starts in the window), so
attention stays within a document and positions restart at each one. Two ways
to fill a window (`packing`):

- `concat`: the documents back to back, cut into windows of `T` tokens that
  overlap in one; every token trains (but a last stretch shorter than a window),
  and no padding is read;
- `pad`: whole documents, in order, into windows they fit in whole (a document
  longer than a window is cut into window-sized pieces), the rest padding.

Each window weighs the same in the loss's mean, however many of its targets count.

`bytes` is the UTF-8 length of the tokens a window's loss counts (a token that
starts a document is not predicted from the one before it), for bits per byte.
`Mixture` draws windows from several sources by weight, and `tokens` builds the
dataset that `data.name=tokens` trains on. Every window is a pure function of
its index, so the pipeline's seeded order makes each batch a pure function of
the seed and its number: resume stays exact on any process count.

Example:
  >>> ds = tokens("shards/", seq_len=1024)
  >>> sorted(ds.train[0])
  ['bytes', 'positions', 'segment_ids', 'tokens']
"""

import hashlib
from collections.abc import Sequence

import numpy as np

from jaxtrain.data.shards import Shards
from jaxtrain.data.sources import DataError, Dataset

PACKINGS = ("concat", "pad")
FIELDS = ("tokens", "segment_ids", "positions", "bytes")


class Packed:
  """The windows of `T + 1` tokens packed from documents `[first, last)` of `shards`.

  Args:
    shards: the token shards.
    length: `T`, the tokens a model sees per window (a window holds `T + 1`).
    packing: `concat` or `pad`.
    documents: the documents `(first, last)` to read; `last=None` for all.
    name: the source's name, for messages.
  """

  def __init__(
    self,
    shards: Shards,
    length: int,
    packing: str = "concat",
    documents: tuple[int, int | None] = (0, None),
    name: str = "",
  ):
    if packing not in PACKINGS:
      raise DataError(f"data.packing={packing!r} must be one of {', '.join(PACKINGS)}")
    if length < 1:
      raise DataError(f"window length {length} must be positive")
    self.shards, self.length, self.packing = shards, length, packing
    first, last = documents
    last = len(shards.lengths) if last is None else last
    self.documents = (first, last)
    self.name = name or f"{shards.folder}[{first}:{last}]"
    try:
      self._bytes = shards.token_bytes()
    except DataError:  # not a byte-level tokenizer: windows carry no `bytes`
      self._bytes = None
    if packing == "concat":
      start, stop = int(shards.offsets[first]), int(shards.offsets[last])
      self._start, self._count = start, max((stop - start - 1) // length, 0)
    else:
      self._pieces = pad_plan(shards.lengths[first:last], length + 1, first)
      self._count = len(self._pieces[0]) - 1
    if not self._count:
      raise DataError(
        f"source {self.name}: its {int(shards.lengths[first:last].sum()):,} tokens fill no "
        f"window of {length + 1}"
      )

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read(np.array([index])).items()}

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The windows at `indices`: int32 `tokens`, `segment_ids`, `positions` `[n, T+1]`, `bytes`."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self._count):
      raise IndexError(f"source {self.name}: window index out of range [0, {self._count})")
    out = self._read_concat(indices) if self.packing == "concat" else self._read_pad(indices)
    if self._bytes is not None:
      out["bytes"] = self._counted_bytes(out["tokens"], out["segment_ids"])
    return out

  def _read_concat(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    n, w = len(indices), self.length + 1
    starts = self._start + indices * self.length
    where = starts[:, None] + np.arange(w)
    offsets = self.shards.offsets
    doc = np.searchsorted(offsets, where, side="right") - 1
    first_token = np.maximum(offsets[doc], starts[:, None])  # a document cut by the window
    tokens = np.empty((n, w), np.int32)
    for row, start in enumerate(starts):
      tokens[row] = self.shards.span(int(start), int(start) + w)
    # 1 + the documents started so far: an empty document between two others starts none
    begun = np.concatenate([np.zeros((n, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    return {
      "tokens": tokens,
      "segment_ids": (1 + np.cumsum(begun, axis=1)).astype(np.int32),
      "positions": (where - first_token).astype(np.int32),
    }

  def _read_pad(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    bounds, doc, begin, size = self._pieces
    w = self.length + 1
    out = {k: np.zeros((len(indices), w), np.int32) for k in FIELDS[:3]}
    offsets = self.shards.offsets
    for row, i in enumerate(indices):
      at = 0
      for segment, p in enumerate(range(bounds[i], bounds[i + 1]), start=1):
        start = int(offsets[doc[p]] + begin[p])
        out["tokens"][row, at : at + size[p]] = self.shards.span(start, start + int(size[p]))
        out["segment_ids"][row, at : at + size[p]] = segment
        out["positions"][row, at : at + size[p]] = np.arange(size[p])
        at += int(size[p])
    return out

  def _counted_bytes(self, tokens: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """The bytes of each window's predicted tokens: those that follow one of their document."""
    counted = target_mask(segments)
    return (self._bytes[tokens[:, 1:]] * counted).sum(axis=1, dtype=np.int64).astype(np.int32)

  def value_range(self, field: str) -> tuple[int, int] | None:
    """The values `field` is known to hold, `[low, high)`, from the manifest; else None."""
    return (0, self.shards.vocab_size) if field == "tokens" else None

  def checked_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every window's fields, shapes and dtypes: the same by construction, so no pass reads them."""
    spec = {k: ((self.length + 1,), np.dtype(np.int32)) for k in FIELDS[:3]}
    return spec if self._bytes is None else {**spec, "bytes": ((), np.dtype(np.int32))}

  def fingerprint(self) -> str:
    """The shards', the documents', the window length's and the packing's hash."""
    key = f"{self.shards.fingerprint()}/{self.documents}/{self.length}/{self.packing}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def target_mask(segments: np.ndarray) -> np.ndarray:
  """Which next-token targets train: in the same document as the token before, not padding.

  Args:
    segments: `[..., T + 1]` segment ids of a window.

  Returns:
    `[..., T]` booleans: target `t + 1` counts when its segment is token `t`'s and not 0.
  """
  return (segments[..., 1:] == segments[..., :-1]) & (segments[..., 1:] != 0)


def pad_plan(
  lengths: np.ndarray, capacity: int, first_document: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Whole documents into windows of `capacity` tokens, in order (next fit).

  A document longer than a window is cut into pieces of `capacity` and a
  remainder; each piece is placed like a document of its own, except a piece of
  one token, which holds no target and is left out.

  Args:
    lengths: the documents' token counts.
    capacity: the tokens a window holds.
    first_document: the index of `lengths[0]` among the shards' documents.

  Returns:
    `(bounds, doc, begin, size)`: window `i` holds pieces
    `bounds[i]:bounds[i+1]`, piece `p` being tokens `[begin, begin + size)`
    of document `doc[p]`.
  """
  lengths = np.asarray(lengths, np.int64)
  pieces = np.maximum(-(-lengths // capacity), 0)
  doc = np.repeat(np.arange(len(lengths)), pieces)
  within = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
  begin = within * capacity
  size = np.minimum(lengths[doc] - begin, capacity)
  trains = size > 1  # a one-token piece holds no target: it would only pad a window
  doc, begin, size = doc[trains], begin[trains], size[trains]
  starts, fill = [], capacity
  for p, s in enumerate(size.tolist()):  # next fit: one pass, in document order
    if fill + s > capacity:
      starts.append(p)
      fill = 0
    fill += s
  bounds = np.array([*starts, len(size)], np.int64)
  return bounds, doc + first_document, begin, size


class Mixture:
  """Windows of several sources drawn by weight: an epoch holds each in its share.

  The epoch is as long as it takes for every source to be read whole at its
  weight (a source with more weight than windows repeats its windows), and
  index `j` of it maps to one source's window by a fixed table, so a window
  stays a pure function of its index.

  Args:
    sources: sources with the same fields (from the same tokenizer).
    weights: their shares, positive (normalised here).
    name: the source's name.
  """

  def __init__(self, sources: Sequence, weights: Sequence[float], name: str = "mixture"):
    if len(sources) != len(weights) or not sources:
      raise DataError(f"source {name}: {len(sources)} sources for {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
      raise DataError(f"source {name}: weights {list(weights)} must be positive numbers")
    w = w / w.sum()
    specs = [s.checked_spec() for s in sources if hasattr(s, "checked_spec")]
    if any(spec != specs[0] for spec in specs):
      names = ", ".join(getattr(s, "name", type(s).__name__) for s in sources)
      raise DataError(f"source {name}: its sources ({names}) hold different fields, shapes or "
                      "dtypes; mix windows of one length from one tokenizer")  # fmt: skip
    sizes = np.array([len(s) for s in sources], np.int64)
    epoch = int(np.ceil((sizes / w).max() * (1 - 1e-12)))  # shares of the sizes: their sum
    self.counts = np.maximum(np.round(w * epoch).astype(np.int64), sizes)
    self.bounds = np.concatenate([[0], np.cumsum(self.counts)])
    self.sources, self.weights, self.name, self._sizes = list(sources), w, name, sizes

  def __len__(self) -> int:
    return int(self.bounds[-1])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read(np.array([index])).items()}

  def component(self, indices: np.ndarray) -> np.ndarray:
    """Which source each index reads."""
    return np.searchsorted(self.bounds, np.asarray(indices, np.int64), side="right") - 1

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The windows at `indices`, each from its source."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    which = self.component(indices)
    local = (indices - self.bounds[which]) % self._sizes[which]
    parts = {}
    for c in np.unique(which):
      parts[int(c)] = self.sources[c].read(local[which == c])
    first = next(iter(parts.values()))
    out = {k: np.empty((len(indices), *v.shape[1:]), v.dtype) for k, v in first.items()}
    for c, batch in parts.items():
      for k, v in batch.items():
        out[k][which == c] = v
    return out

  def value_range(self, field: str) -> tuple[int, int] | None:
    """The widest range the sources declare for `field`, if all do."""
    ranges = [getattr(s, "value_range", lambda f: None)(field) for s in self.sources]
    if any(r is None for r in ranges):
      return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)

  def checked_spec(self):
    """The sources' common spec (they are checked to agree when the mixture is built)."""
    return self.sources[0].checked_spec()

  def fingerprint(self) -> str:
    """The sources' fingerprints and the weights."""
    key = "/".join(f"{s.fingerprint()}={c}" for s, c in zip(self.sources, self.counts, strict=True))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """`"DIR_A=0.7,DIR_B=0.3"` as `[(DIR_A, 0.7), (DIR_B, 0.3)]`; a malformed one is a DataError."""
  out = []
  for item in filter(None, (p.strip() for p in text.split(","))):
    folder, sep, weight = item.rpartition("=")
    try:
      value = float(weight)
    except ValueError:
      value = float("nan")
    if not sep or not folder or not np.isfinite(value) or value <= 0:
      raise DataError(f"data.mixture={text!r}: {item!r} must be DIR=WEIGHT with a positive weight")
    out.append((folder, value))
  if not out:
    raise DataError(f"data.mixture={text!r} names no shard folder; write DIR_A=0.7,DIR_B=0.3")
  return out


def tokens(
  folder: str = "",
  seq_len: int = 1024,
  *,
  packing: str = "concat",
  mixture: str = "",
  eval_dir: str = "",
  eval_fraction: float = 0.01,
) -> Dataset:
  """The language-model dataset over token shards: packed train and eval windows.

  Args:
    folder: a folder of shards (`jaxtrain.data.tokenize`'s output); or '' with `mixture`.
    seq_len: `T`, the tokens a model sees per window.
    packing: `concat` or `pad`.
    mixture: `"DIR_A=0.7,DIR_B=0.3"`: train on several shard sets by weight.
    eval_dir: a shard folder to evaluate on; '' holds out the last
      `eval_fraction` of the documents of each train folder instead.
    eval_fraction: the share of documents held out when `eval_dir` is ''.

  Returns:
    A `Dataset` whose `files` hold the tokenizer's JSON (for the workdir) and
    whose `info` records the shards.
  """
  named = parse_mixture(mixture) if mixture else [(folder, 1.0)]
  if mixture and folder:
    raise DataError("give data.dir or data.mixture, not both")
  if not named[0][0]:
    raise DataError("data.dir is empty: name a folder of token shards (python -m "
                    "jaxtrain.data.tokenize --tokenizer TOKENIZER --out DIR INPUT...)")  # fmt: skip
  sets = [Shards(f) for f, _ in named]
  for other in sets[1:]:
    if other.tokenizer_sha256 != sets[0].tokenizer_sha256:
      raise DataError(
        f"data.mixture: {other.folder} was tokenized with another tokenizer than "
        f"{sets[0].folder}; mix shards of one tokenizer"
      )
  if not 0 <= eval_fraction < 1 or (not eval_dir and not eval_fraction):
    raise DataError(
      f"data.eval_fraction={eval_fraction} must be in (0, 1) when data.eval_dir is empty"
    )
  trains, evals = [], []
  for s in sets:
    n = len(s.lengths)
    cut = n if eval_dir else n - max(round(n * eval_fraction), 1)
    if cut < 1:
      raise DataError(f"{s.folder} holds {n} document(s): too few to hold some out for eval")
    trains.append(Packed(s, seq_len, packing, (0, cut), f"{s.folder}/train"))
    if not eval_dir:
      evals.append(Packed(s, seq_len, packing, (cut, n), f"{s.folder}/eval"))
  if eval_dir:
    held = Shards(eval_dir)
    if held.tokenizer_sha256 != sets[0].tokenizer_sha256:
      raise DataError(f"data.eval_dir={eval_dir} was tokenized with another tokenizer")
    evals = [Packed(held, seq_len, packing, name=f"{held.folder}/eval")]
  train = trains[0] if len(trains) == 1 else Mixture(trains, [w for _, w in named])
  held_out = evals[0] if len(evals) == 1 else Mixture(evals, [len(e) for e in evals])
  info = {
    "tokenizer_sha256": sets[0].tokenizer_sha256,
    "vocab_size": sets[0].vocab_size,
    "shards": [{"folder": str(s.folder), "fingerprint": s.fingerprint()} for s in sets],
    "packing": packing,
  }
  files = {"tokenizer.json": sets[0].tokenizer_json} if sets[0].tokenizer_json else None
  return Dataset("tokens", train, held_out, str(sets[0].folder), files=files, info=info)
