"""Labelled text: Debian's fortunes as a topic classification task, tokenised for BERT.

The `fortunes` package installs one `%`-separated file per topic under
`/usr/share/games/fortunes/`. `fortunes` reads the chosen topics, drops texts
that occur more than once (so that no text is both trained on and evaluated),
splits each topic at random (`eval_fraction`, stratified, by `seed`), and
tokenises with a Hugging Face `tokenizers.Tokenizer`: records are `ids` and
`attention_mask` (`[max_len]` int32, padded with 0 and truncated) and `label`.

Example:
  >>> tok = tokenizers.Tokenizer.from_file(".../tokenizer.json")
  >>> ds = fortunes(tok, max_len=64)
  >>> ds.train[0]["ids"].shape, ds.info["classes"]
  ((64,), ['computers', 'politics', 'science', 'songs-poems', 'food', 'sports'])
"""

import collections
import hashlib
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtrain.data.sources import ArraySource, DataError, Dataset

FORTUNES = "/usr/share/games/fortunes"
# Six topics of distinct subject matter and 147 to 1,051 texts each (3,444 in all).
TOPICS = ("computers", "politics", "science", "songs-poems", "food", "sports")
INSTALL = "install Debian's fortunes package (apt-get install fortunes)"


def read_fortunes(
  topics: Sequence[str] = TOPICS, folder: str | pathlib.Path = FORTUNES
) -> dict[str, list[str]]:
  """The texts of each topic file, stripped, in file order.

  Raises:
    DataError: the folder or a topic file is missing, or a topic holds no text.
  """
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise DataError(f"fortunes: no folder {root}; {INSTALL}")
  texts = {}
  for topic in topics:
    path = root / topic
    if not path.is_file():
      known = sorted(p.name for p in root.iterdir() if p.is_file() and "." not in p.name)
      raise DataError(f"fortunes: no topic {topic!r} in {root} (topics: {', '.join(known)})")
    raw = path.read_text(encoding="utf-8", errors="replace")
    texts[topic] = [t.strip() for t in raw.split("\n%\n") if t.strip().strip("%").strip()]
    if not texts[topic]:
      raise DataError(f"fortunes: topic {topic!r} ({path}) holds no text")
  return texts


def fortunes(
  tokenizer: Any,
  *,
  topics: Sequence[str] = TOPICS,
  max_len: int = 64,
  eval_fraction: float = 0.2,
  seed: int = 0,
  folder: str | pathlib.Path = FORTUNES,
) -> Dataset:
  """The topic classification set: tokenised train and eval sources and their description.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (its padding and truncation are set here).
    topics: the topic files, in label order.
    max_len: tokens per record, `[CLS]` and `[SEP]` included.
    eval_fraction: the share of each topic held out for evaluation.
    seed: the split's seed.
    folder: where the topic files are.

  Returns:
    The `Dataset`; `info` names the classes, counts and the truncated share.
  """
  if len(set(topics)) != len(topics) or len(topics) < 2:
    raise DataError(f"fortunes: topics={tuple(topics)!r} must be at least 2 distinct topics")
  if not 0 < eval_fraction < 1:
    raise DataError(f"fortunes: eval_fraction={eval_fraction!r} must be in (0, 1)")
  by_topic = read_fortunes(topics, folder)
  counts = collections.Counter(t for texts in by_topic.values() for t in texts)
  rng = np.random.default_rng(seed)
  splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "eval": ([], [])}
  for label, topic in enumerate(topics):
    unique = [t for t in by_topic[topic] if counts[t] == 1]
    order = rng.permutation(len(unique))
    held = max(1, round(len(unique) * eval_fraction))
    for split, part in (("eval", order[:held]), ("train", order[held:])):
      splits[split][0].extend(unique[i] for i in part)
      splits[split][1].extend([label] * len(part))
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(length=max_len, pad_id=0)
  sources, truncated = {}, 0
  for split, (texts, labels) in splits.items():
    encoded = tokenizer.encode_batch(texts)
    truncated += sum(bool(e.overflowing) for e in encoded)
    sources[split] = ArraySource(
      f"fortunes/{split}",
      ids=np.array([e.ids for e in encoded], np.int32),
      attention_mask=np.array([e.attention_mask for e in encoded], np.int32),
      label=np.array(labels, np.int32),
    )
  total = sum(len(s) for s in sources.values())
  info = {
    "classes": list(topics),
    "max_len": max_len,
    "truncated_fraction": round(truncated / total, 4),
    "duplicates_dropped": sum(c for c in counts.values() if c > 1),
    "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16],
    "eval_fraction": eval_fraction,
    "split_seed": seed,
  }
  return Dataset("fortunes", sources["train"], sources["eval"], folder=str(folder), info=info)
