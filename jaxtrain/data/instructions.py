"""Instruction tuning data: conversations under a chat template, the loss on the answers only.

`encode` renders one exchange (a user's prompt, the assistant's answer) with
the model's own chat template, tokenizes it, and marks the tokens the loss
counts: the answer and what the template closes its turn with (such as
`<|im_end|>` and a newline), not the template's framing or the prompt. `pack`
puts encoded exchanges several to a window (`loss_mask` beside `tokens`,
`segment_ids` and `positions`, as `jaxtrain.data.packing` windows have), so
attention stays within each exchange. `wordnet` reads the task the
SFT experiment trains on: WordNet's definitions, one per word and part of
speech (Debian's `wordnet-base`).

Example:
  >>> ids, mask = encode(tokenizer, render, "Define cat (noun).", "feline mammal")
  >>> windows = pack([(ids, mask)], length=128)
"""

import hashlib
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from jaxtrain.data.packing import pad_plan
from jaxtrain.data.sources import ArraySource, DataError

WORDNET = pathlib.Path("/usr/share/wordnet")
PARTS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
INSTALL = "install Debian's wordnet-base package (apt-get install wordnet-base)"


def wordnet(folder: str | pathlib.Path = WORDNET) -> list[tuple[str, str, str]]:
  """`(word, part of speech, definition)` for each word with one sense in its part of speech.

  A word with several senses has no one right answer, so only single-sense
  words are kept; the definition is the gloss without its examples.

  Raises:
    DataError: the folder or one of its `data.*` files is missing.
  """
  root = pathlib.Path(folder)
  entries: dict[tuple[str, str], list[str]] = {}
  for part, name in PARTS.items():
    path = root / f"data.{part}"
    if not path.is_file():
      raise DataError(f"wordnet: no {path}; {INSTALL}")
    for line in path.read_text(encoding="latin-1").splitlines():
      if line.startswith("  ") or " | " not in line:  # the licence's header lines
        continue
      head, gloss = line.split(" | ", 1)
      fields = head.split()
      words = int(fields[3], 16)
      definition = gloss.split(";")[0].strip()
      for word in fields[4 : 4 + 2 * words : 2]:
        word = word.split("(")[0].replace("_", " ")  # noqa: PLW2901 (adjectives' markers)
        entries.setdefault((word, name), []).append(definition)
  return [(w, p, d[0]) for (w, p), d in entries.items() if len(d) == 1 and d[0]]


def held_out(word: str, fraction: float) -> bool:
  """Whether `word` is in the held-out share: a hash of the word, the same on every run."""
  digest = hashlib.sha256(word.lower().encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def encode(
  tokenizer, render: Callable[..., str], prompt: str, answer: str
) -> tuple[list[int], list[int]]:
  """The token ids of one exchange under the chat template, and which the loss counts.

  Args:
    tokenizer: a `tokenizers.Tokenizer` that keeps the template's special tokens whole.
    render: `render(messages, add_generation_prompt)` renders the chat template.
    prompt: the user's turn.
    answer: the assistant's turn.

  Returns:
    `(ids, mask)`: `mask[i]` is 1 for the tokens of the answer and all that the
    template writes after it (the end of its turn).

  Raises:
    DataError: the template renders the exchange without the prompt's rendering
      as its start, so the answer's tokens cannot be told apart.
  """
  user = [{"role": "user", "content": prompt}]
  head = render(user, add_generation_prompt=True)
  whole = render([*user, {"role": "assistant", "content": answer}], add_generation_prompt=False)
  if not whole.startswith(head) or answer not in whole[len(head) :]:
    raise DataError("the chat template does not render a conversation as its prompt's "
                    "rendering followed by the answer")  # fmt: skip
  encoding = tokenizer.encode(whole, add_special_tokens=False)
  mask = [int(start >= len(head)) for start, _ in encoding.offsets]
  return list(encoding.ids), mask


def pack(examples: Sequence[tuple[list[int], list[int]]], length: int, name: str = "sft"):
  """Encoded exchanges into windows of `length + 1` tokens, several to a window, in order.

  An exchange longer than a window is left out (cutting it would cut its
  answer). Returns the `ArraySource` of `tokens`, `segment_ids` (1, 2, ... a
  window's exchanges; 0 padding), `positions` (from 0 in each exchange) and
  `loss_mask`, and the number of exchanges left out.
  """
  fits = [e for e in examples if len(e[0]) <= length + 1]
  if not fits:
    raise DataError(f"{name}: no exchange fits a window of {length + 1} tokens")
  lengths = np.array([len(ids) for ids, _ in fits])
  bounds, doc, _, _ = pad_plan(lengths, length + 1)
  shape = (len(bounds) - 1, length + 1)
  tokens, segments, positions, mask = (np.zeros(shape, np.int32) for _ in range(4))
  for w in range(shape[0]):
    at = 0
    for segment, d in enumerate(doc[bounds[w] : bounds[w + 1]], start=1):
      ids, weights = fits[d]
      span = slice(at, at + len(ids))
      tokens[w, span], mask[w, span] = ids, weights
      segments[w, span], positions[w, span] = segment, np.arange(len(ids))
      at += len(ids)
  source = ArraySource(name, tokens=tokens, segment_ids=segments, positions=positions,
                       loss_mask=mask)  # fmt: skip
  return source, len(examples) - len(fits)
