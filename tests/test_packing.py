"""Packed language-model windows from token shards: packing, splits, mixtures, resume and loss."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import losses, models
from jaxtrain.data import bpe, checks, packing, pipeline, sources
from jaxtrain.data.packing import Mixture, Packed
from jaxtrain.data.shards import Shards
from jaxtrain.data.sources import DataError
from jaxtrain.data.tokenize import tokenize
from tests import helpers

# Some documents shorter than a window of 9 tokens, some as long, some longer; one empty.
LENGTHS = [5, 0, 30, 1, 9, 12, 2, 40, 3, 17, 8, 9, 26]
SHARD_MB = 0.00005  # 50 bytes of text a shard: windows cross shards


def write_shards(folder, texts, tokenizer="bytes"):
  """`texts` as one JSON line each, tokenized into `folder/shards` in this process."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"text": t}) for t in texts]
  (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
  tokenize([str(folder / "docs.jsonl")], tokenizer, folder / "shards", workers=0,
           shard_mb=SHARD_MB)  # fmt: skip
  return folder / "shards"


def letters(rng, alphabet, n):
  return "".join(rng.choice(list(alphabet), n))


def ids(text):
  return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Byte shards of documents of random lowercase letters (`LENGTHS`), and their ids."""
  rng = np.random.default_rng(0)
  texts = [letters(rng, string.ascii_lowercase, n) for n in LENGTHS]
  folder = write_shards(tmp_path_factory.mktemp("corpus"), texts)
  shards = Shards(folder)
  assert len(shards.manifest["shards"]) == 3
  np.testing.assert_array_equal(shards.lengths, LENGTHS)
  return shards, [ids(t) for t in texts]


@pytest.fixture(scope="module")
def letter_folders(tmp_path_factory):
  """Byte shards whose document `i` is letter `i` repeated, and an eval folder of 'z's."""
  root = tmp_path_factory.mktemp("letters")
  texts = [chr(ord("a") + i) * (10 + i) for i in range(8)]  # 'a' * 10, 'b' * 11, ...
  return write_shards(root / "train", texts), write_shards(root / "held", ["z" * 30, "z" * 7])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  """Byte shards of lowercase documents (81 tokens) and of uppercase ones (321 tokens)."""
  root, rng = tmp_path_factory.mktemp("mix"), np.random.default_rng(1)
  lower = [letters(rng, string.ascii_lowercase, n) for n in (20, 30, 31)]
  upper = [letters(rng, string.ascii_uppercase, n) for n in (100, 100, 121)]
  return Shards(write_shards(root / "lower", lower)), Shards(write_shards(root / "upper", upper))


def starts_and_positions(docs):
  """For each token of the documents concatenated: whether it starts one, its position in it."""
  starts = np.concatenate([np.arange(len(d)) == 0 for d in docs])
  positions = np.concatenate([np.arange(len(d)) for d in docs])
  return starts, positions


# --- concat packing ---------------------------------------------------------------------------


def test_concat_windows_are_the_documents_back_to_back(corpus):
  shards, docs = corpus
  t = 8
  source = Packed(shards, t)
  stream = np.concatenate(docs)
  assert stream.size == 162 and len(source) == 20 == (162 - 1) // t
  assert stream.size - (len(source) * t + 1) < t  # only a tail shorter than a window is left
  assert source.checked_spec() == {
    "tokens": ((9,), np.dtype(np.int32)),
    "segment_ids": ((9,), np.dtype(np.int32)),
    "positions": ((9,), np.dtype(np.int32)),
    "bytes": ((), np.dtype(np.int32)),
  }
  # window 0: 'aaaaa' (5 tokens), the empty document, then the 30-token one, cut by the window
  first = source[0]
  np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3])
  assert first["bytes"] == 7

  starts, _ = starts_and_positions(docs)
  batch = source.read(np.arange(len(source)))
  covered = np.zeros(stream.size, bool)
  for i in range(len(source)):
    window = source[i]
    for k in window:
      np.testing.assert_array_equal(batch[k][i], window[k])
    lo = i * t
    np.testing.assert_array_equal(window["tokens"], stream[lo : lo + t + 1])
    covered[lo : lo + t + 1] = True
    begins = starts[lo : lo + t + 1].copy()
    begins[0] = False  # the window's first token is segment 1, whether or not it starts one
    np.testing.assert_array_equal(window["segment_ids"], 1 + np.cumsum(begins))
    last_start = np.maximum.accumulate(np.where(begins, np.arange(t + 1), 0))
    np.testing.assert_array_equal(window["positions"], np.arange(t + 1) - last_start)
    counted = packing.target_mask(window["segment_ids"])
    assert window["bytes"] == counted.sum() == t - begins[1:].sum()
    assert {k: v.dtype for k, v in window.items()} == {k: np.int32 for k in packing.FIELDS}
  assert covered[: len(source) * t + 1].all() and not covered[len(source) * t + 1 :].any()
  with pytest.raises(IndexError, match=r"window index out of range \[0, 20\)"):
    source.read(np.array([3, 20]))


def test_concat_windows_of_a_document_range_stay_inside_it(corpus):
  shards, docs = corpus
  source = Packed(shards, 8, documents=(2, 9))
  stream = np.concatenate(docs[2:9])
  assert source.documents == (2, 9) and len(source) == (stream.size - 1) // 8 == 12
  for i in range(len(source)):
    np.testing.assert_array_equal(source[i]["tokens"], stream[i * 8 : i * 8 + 9])
  assert source.name == f"{shards.folder}[2:9]"
  assert source.fingerprint() != Packed(shards, 8).fingerprint()
  assert source.fingerprint() == Packed(shards, 8, documents=(2, 9), name="x").fingerprint()


def test_packed_refuses_what_it_cannot_serve(corpus):
  shards, _ = corpus
  with pytest.raises(DataError, match=r"data.packing='greedy' must be one of concat, pad"):
    Packed(shards, 8, "greedy")
  with pytest.raises(DataError, match="window length 0 must be positive"):
    Packed(shards, 0)
  with pytest.raises(DataError, match=r"source s: its 5 tokens fill no window of 9"):
    Packed(shards, 8, documents=(0, 2), name="s")
  with pytest.raises(DataError, match=r"its 0 tokens fill no window of 9"):
    Packed(shards, 8, "pad", documents=(1, 1))


# --- pad packing ------------------------------------------------------------------------------


def pad_pieces(source):
  """Every window's documents (or document pieces) in order, checking each window's layout."""
  w = source.length + 1
  pieces, fills = [], []
  for i in range(len(source)):
    window = source[i]
    segments, tokens, positions = window["segment_ids"], window["tokens"], window["positions"]
    used = int((segments > 0).sum())
    assert used > 0 and (segments[:used] > 0).all()  # the documents first, padding after
    assert (segments[used:] == 0).all() and (tokens[used:] == 0).all()
    assert (positions[used:] == 0).all()
    count = int(segments.max())
    assert np.array_equal(np.unique(segments[:used]), np.arange(1, count + 1))
    for k in range(1, count + 1):
      where = np.flatnonzero(segments == k)
      assert np.array_equal(where, np.arange(where[0], where[0] + where.size))  # contiguous
      np.testing.assert_array_equal(positions[where], np.arange(where.size))
      pieces.append(tokens[where])
    assert window["bytes"] == packing.target_mask(segments).sum() == used - count
    fills.append(used)
  assert all(f <= w for f in fills)
  return pieces, fills


@pytest.mark.parametrize("documents", [(0, None), (3, 10)])
def test_pad_windows_hold_every_document_once_whole_or_in_window_pieces(corpus, documents):
  shards, docs = corpus
  source = Packed(shards, 8, "pad", documents=documents)
  w = 9
  pieces, fills = pad_pieces(source)
  first, last = source.documents
  expected = []
  for doc in docs[first:last]:
    pieces_of = (doc[at : at + w] for at in range(0, len(doc), w))  # T + 1 pieces, a remainder
    expected += [piece for piece in pieces_of if len(piece) > 1]  # one token holds no target
  assert len(pieces) == len(expected)
  for got, want in zip(pieces, expected, strict=True):
    np.testing.assert_array_equal(got, want)
  starts = np.cumsum([0, *(int(source[i]["segment_ids"].max()) for i in range(len(source)))])
  for i in range(len(source) - 1):  # next fit: a window is closed only by a piece it cannot hold
    assert fills[i] + len(pieces[starts[i + 1]]) > w
  if documents == (0, None):
    assert fills == [5, 9, 9, 9, 3, 9, 9, 5, 9, 9, 9, 9, 7, 9, 8, 8, 9, 9, 9, 8]
    assert len(source) == 20


def test_pad_plan_is_next_fit_on_a_hand_made_example():
  bounds, doc, begin, size = packing.pad_plan(np.array([2, 0, 2, 1, 7, 3, 3]), 5, first_document=4)
  np.testing.assert_array_equal(bounds, [0, 2, 3, 5, 6])  # document 7's one token is left out
  np.testing.assert_array_equal(doc, [4, 6, 8, 8, 9, 10])
  np.testing.assert_array_equal(begin, [0, 0, 0, 5, 0, 0])
  np.testing.assert_array_equal(size, [2, 2, 5, 2, 3, 3])
  bounds, doc, begin, size = packing.pad_plan(np.array([5, 10, 4, 1]), 5)
  np.testing.assert_array_equal(bounds, [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(doc, [0, 1, 1, 2])
  np.testing.assert_array_equal(begin, [0, 0, 5, 0])
  np.testing.assert_array_equal(size, [5, 5, 5, 4])
  bounds, doc, _, _ = packing.pad_plan(np.zeros(3, np.int64), 5)
  assert bounds.tolist() == [0] and doc.size == 0


# --- the tokens dataset: eval split, eval folder, mixtures -------------------------------------


def letters_of(source):
  """The set of letters in all windows' counted tokens (segment > 0) of `source`."""
  batch = source.read(np.arange(len(source)))
  return set(bytes(batch["tokens"][batch["segment_ids"] > 0].astype(np.uint8)).decode())


@pytest.mark.parametrize("kind", packing.PACKINGS)
def test_eval_fraction_holds_out_the_last_documents(letter_folders, kind):
  train_dir, held_dir = letter_folders
  ds = packing.tokens(str(train_dir), 8, packing=kind, eval_fraction=0.25)
  assert isinstance(ds, sources.Dataset) and ds.name == "tokens" and ds.files is None
  assert ds.train.documents == (0, 6) and ds.eval.documents == (6, 8)
  assert letters_of(ds.train) == set("abcdef") and letters_of(ds.eval) == set("gh")
  assert ds.info == {
    "tokenizer_sha256": None,
    "vocab_size": 256,
    "shards": [{"folder": str(train_dir), "fingerprint": Shards(train_dir).fingerprint()}],
    "packing": kind,
  }
  ds = packing.tokens(str(train_dir), 8, packing=kind, eval_dir=str(held_dir))
  assert ds.train.documents == (0, 8) and letters_of(ds.train) == set("abcdefgh")
  assert ds.eval.shards.folder == held_dir and letters_of(ds.eval) == {"z"}


def test_tokens_refuses_bad_splits_in_one_line(letter_folders, tmp_path):
  train_dir, _ = letter_folders
  with pytest.raises(DataError, match=r"data.eval_fraction=0 must be in \(0, 1\)"):
    packing.tokens(str(train_dir), 8, eval_fraction=0)
  with pytest.raises(DataError, match=r"data\.dir is empty"):
    packing.tokens("", 8)
  with pytest.raises(DataError, match=r"give data\.dir or data\.mixture, not both"):
    packing.tokens(str(train_dir), 8, mixture=f"{train_dir}=1")
  one = write_shards(tmp_path / "one", ["a" * 40])
  with pytest.raises(DataError, match=r"holds 1 document\(s\): too few to hold some out"):
    packing.tokens(str(one), 8)


def test_parse_mixture_round_trip_and_one_line_errors():
  assert packing.parse_mixture("a=0.7, b/c=0.3,") == [("a", 0.7), ("b/c", 0.3)]
  assert packing.parse_mixture("x=y=2") == [("x=y", 2.0)]  # the weight follows the last '='
  text = "a=0.7,b=0.3"
  assert packing.parse_mixture(",".join(f"{d}={w}" for d, w in packing.parse_mixture(text))) == [
    ("a", 0.7),
    ("b", 0.3),
  ]
  for bad, item in [("a=0.7,b=0", "b=0"), ("a=-1", "a=-1"), ("a=x", "a=x"), ("a=nan", "a=nan"),
                    ("a=inf", "a=inf"), ("a=0.5,b", "b"), ("=0.5", "=0.5")]:  # fmt: skip
    with pytest.raises(DataError) as e:
      packing.parse_mixture(bad)
    assert str(e.value) == (
      f"data.mixture={bad!r}: {item!r} must be DIR=WEIGHT with a positive weight"
    )
  for empty in ("", " , ,"):
    with pytest.raises(DataError) as e:
      packing.parse_mixture(empty)
    assert str(e.value) == (
      f"data.mixture={empty!r} names no shard folder; write DIR_A=0.7,DIR_B=0.3"
    )
    assert "\n" not in str(e.value)


def test_a_mixture_of_folders_splits_each_and_weighs_them(letter_folders, two_sources):
  train_dir, _ = letter_folders
  _, upper = two_sources
  ds = packing.tokens(mixture=f"{train_dir}=3,{upper.folder}=1", seq_len=8, eval_fraction=0.25)
  assert isinstance(ds.train, Mixture) and isinstance(ds.eval, Mixture)
  np.testing.assert_allclose(ds.train.weights, [0.75, 0.25])
  assert [s.documents for s in ds.train.sources] == [(0, 6), (0, 2)]
  assert [s.documents for s in ds.eval.sources] == [(6, 8), (2, 3)]
  # the eval mixture reads each held-out window exactly once
  assert ds.eval.counts.tolist() == [len(s) for s in ds.eval.sources] == [4, 15]
  assert len(ds.eval) == 19
  assert letters_of(ds.eval.sources[0]) == set("gh")
  assert [s["folder"] for s in ds.info["shards"]] == [str(train_dir), str(upper.folder)]


def test_a_mixture_of_two_tokenizers_is_refused(letter_folders, tmp_path):
  train_dir, held_dir = letter_folders
  tokenizer = bpe.train("abcdefgh " * 30, 260)
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  other = write_shards(tmp_path / "bpe", ["abc" * 20, "def" * 20], str(tmp_path / "tokenizer.json"))
  with pytest.raises(DataError) as e:
    packing.tokens(mixture=f"{train_dir}=1,{other}=1", seq_len=8)
  assert str(e.value) == (
    f"data.mixture: {other} was tokenized with another tokenizer than {train_dir}; "
    "mix shards of one tokenizer"
  )
  with pytest.raises(DataError, match=f"data.eval_dir={other} was tokenized with another"):
    packing.tokens(str(train_dir), 8, eval_dir=str(other))
  # a mixture built by hand checks that its sources' windows agree
  with pytest.raises(DataError, match="hold different fields, shapes or dtypes"):
    Mixture([Packed(Shards(train_dir), 8), Packed(Shards(held_dir), 4)], [1, 1])


# --- mixture proportions, epochs and resume -----------------------------------------------------


def test_mixture_draws_each_source_at_its_weight(two_sources):
  lower, upper = two_sources
  a, b = Packed(lower, 8), Packed(upper, 8)
  assert (len(a), len(b)) == (10, 40)
  mix = Mixture([a, b], [0.7, 0.3])
  assert len(mix) == 134 and mix.counts.tolist() == [94, 40]  # ceil(40 / 0.3) windows an epoch
  batches = helpers.global_batches(mix, 16, 200, seed=3)
  assert batches["tokens"].shape == (200, 16, 9)
  lowercase = batches["tokens"] >= ord("a")
  assert (lowercase.all(axis=-1) | ~lowercase.any(axis=-1)).all()  # each window from one source
  share = lowercase.all(axis=-1).mean()
  assert abs(share - 0.7) < 0.02 and abs((1 - share) - 0.3) < 0.02, share

  # one epoch (len(mix) indices) reads every window of each source, each in its share
  epoch = mix.read(np.arange(len(mix)))
  for c, source in enumerate((a, b)):
    own = {tuple(source[i]["tokens"]) for i in range(len(source))}
    assert len(own) == len(source)
    read = [tuple(row) for row in epoch["tokens"][mix.component(np.arange(len(mix))) == c]]
    assert len(read) == mix.counts[c] and set(read) == own
  flat = {k: v.reshape(-1, *v.shape[2:])[: len(mix)] for k, v in batches.items()}
  in_stream = {tuple(row) for row in flat["tokens"]}  # the stream's first epoch
  assert in_stream == {tuple(row) for row in epoch["tokens"]}
  assert mix.value_range("tokens") == (0, 256) and mix.checked_spec() == a.checked_spec()


def test_resume_is_exact_across_process_counts_and_start_batches(two_sources):
  lower, upper = two_sources
  mix = Mixture([Packed(lower, 8), Packed(upper, 8, "pad")], [0.5, 0.5])
  b, k = 8, 3

  def chunks(rows, start_batch=0, count=4):
    stream = iter(pipeline.train_chunks(mix, batch_size=b, seed=7, steps_per_loop=k, rows=rows,
                                        start_batch=start_batch))  # fmt: skip
    got = [next(stream) for _ in range(count)]
    return {key: np.concatenate([c[key] for c in got]) for key in got[0]}

  whole = chunks((0, b))
  halves = [chunks((0, b // 2)), chunks((b // 2, b))]
  assert whole["tokens"].shape == (12, 8, 9)
  for key in whole:
    np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves], axis=1))
  resumed = chunks((0, b), start_batch=5, count=2)  # batches 5..10
  for key in whole:
    np.testing.assert_array_equal(resumed[key], whole[key][5:11])
  resumed_half = chunks((b // 2, b), start_batch=5, count=2)
  np.testing.assert_array_equal(resumed_half["tokens"], whole["tokens"][5:11, b // 2 :])
  assert len(np.unique(whole["tokens"].reshape(-1, 9), axis=0)) > 40  # not one window repeated


# --- the chunked loss and the loss of packed windows --------------------------------------------


def tiny_transformer(seed=0):
  return models.Transformer(vocab=256, seq_len=16, d_model=16, layers=1, heads=2, mlp=32,
                            rngs=nnx.Rngs(seed))  # fmt: skip


@pytest.fixture(scope="module")
def packed_batch(corpus):
  """Four pad-packed windows of 13 tokens (T = 12): several documents, pieces and padding."""
  shards, _ = corpus
  source = Packed(shards, 12, "pad")
  batch = source.read(np.array([0, 1, 3, 5]))
  segments = batch["segment_ids"]
  assert (segments == 0).any() and (segments.max(axis=1) > 1).any()
  return {k: jnp.asarray(v) for k, v in batch.items()}


def loss_and_grads(model, batch, chunk):
  def loss(m):
    return losses.next_token(m, batch, None, chunk=chunk)["loss"].mean()

  return nnx.value_and_grad(loss)(model)


def assert_same(a, b):
  (loss_a, grads_a), (loss_b, grads_b) = a, b
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5)
  leaves_a, leaves_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for ga, gb in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(ga, gb, atol=1e-5, rtol=1e-5)


CHUNKS = (0, 4, 5)  # none, then for 12 positions a divisor and not


@nnx.jit
def every_chunk(model, batches):
  """`loss_and_grads` for each batch and each of `CHUNKS`, compiled as one program."""
  return [[loss_and_grads(model, batch, chunk) for chunk in CHUNKS] for batch in batches]


def test_the_chunked_loss_equals_the_plain_loss(packed_batch):
  model = tiny_transformer()
  batches = [packed_batch, {"tokens": packed_batch["tokens"]}]  # with segments, and without
  for plain, *chunked in every_chunk(model, batches):  # under jit
    assert float(plain[0]) > 1.0
    for other in chunked:
      assert_same(other, plain)
  # eagerly, the loss alone (eager gradients cost seconds of op-by-op compiles on CPU)
  plain = every_chunk(model, batches)[0][0][0]
  for chunk in CHUNKS[1:]:
    loss = losses.next_token(model, packed_batch, None, chunk=chunk)["loss"].mean()
    np.testing.assert_allclose(loss, plain, rtol=1e-5, atol=1e-5)


class FixedLogits(nnx.Module):
  """Logits that ignore the tokens: a target's loss depends on the target alone."""

  def __init__(self, t, vocab):
    self.table = nnx.Param(jax.random.normal(jax.random.key(0), (1, t, vocab)))

  def __call__(self, tokens, *, segment_ids=None, positions=None, rngs=None):
    del segment_ids, positions, rngs
    return jnp.broadcast_to(self.table[...], (*tokens.shape, self.table[...].shape[-1]))


@nnx.jit
def next_token(model, batch):
  return losses.next_token(model, batch, None)


def test_targets_that_start_a_document_or_pad_do_not_count(packed_batch):
  model = FixedLogits(12, 256)
  segments = np.asarray(packed_batch["segment_ids"])
  counted = packing.target_mask(segments)
  assert (~counted).sum() > 8 and counted.sum() > 8
  base = next_token(model, packed_batch)
  assert set(base) == {"loss", "bits_per_byte"} and base["loss"].shape == (4,)
  tokens = np.asarray(packed_batch["tokens"])
  for row, t in zip(*np.nonzero(~counted), strict=True):  # each uncounted target, changed
    changed = tokens.copy()
    changed[row, t + 1] = (changed[row, t + 1] + 1) % 256
    out = next_token(model, {**packed_batch, "tokens": jnp.asarray(changed)})
    np.testing.assert_array_equal(out["loss"], base["loss"])
    np.testing.assert_array_equal(out["bits_per_byte"], base["bits_per_byte"])
  row, t = (int(x[0]) for x in np.nonzero(counted))
  changed = tokens.copy()
  changed[row, t + 1] = (changed[row, t + 1] + 1) % 256
  out = next_token(model, {**packed_batch, "tokens": jnp.asarray(changed)})
  assert float(out["loss"][row]) != float(base["loss"][row])
  # the loss is the mean over counted targets; bits per byte their total over the window's bytes
  nll = -jax.nn.log_softmax(model.table[...][0], -1)[np.arange(12), tokens[:, 1:]]
  total = np.asarray((nll * counted).sum(-1))
  np.testing.assert_allclose(base["loss"], total / counted.sum(-1), rtol=1e-6)
  bytes_B = np.asarray(packed_batch["bytes"])
  np.testing.assert_array_equal(bytes_B, counted.sum(-1))
  np.testing.assert_allclose(base["bits_per_byte"], total / (np.log(2) * bytes_B), rtol=1e-6)


@nnx.jit
def packed_and_alone(model, batch, alone_PxT):
  """The packed batch's loss, and the logits of documents alone (one a row, padded after)."""
  return losses.next_token(model, batch, None)["loss"], model(alone_PxT)


def test_the_loss_of_a_packed_window_is_that_of_its_documents_alone(packed_batch):
  model = tiny_transformer(1)
  segments = np.asarray(packed_batch["segment_ids"])
  tokens = np.asarray(packed_batch["tokens"])
  pieces = [(row, tokens[row][segments[row] == k])
            for row in range(len(tokens)) for k in range(1, segments[row].max() + 1)]  # fmt: skip
  alone = np.zeros((len(pieces), 12), np.int32)  # causal: padding after a document is unseen
  for p, (_, piece) in enumerate(pieces):
    alone[p, : piece.size - 1] = piece[:-1]
  loss, logits = packed_and_alone(model, packed_batch, jnp.asarray(alone))
  totals = np.zeros(len(tokens))
  for p, (row, piece) in enumerate(pieces):
    n = piece.size - 1
    log_probs = jax.nn.log_softmax(logits[p, :n], -1)
    totals[row] -= float(log_probs[np.arange(n), piece[1:]].sum())
  counted = packing.target_mask(segments).sum(-1)
  np.testing.assert_allclose(np.asarray(loss) * counted, totals, rtol=1e-5)
  padded = tokens.copy()
  padded[segments == 0] = 7  # other padding tokens: no counted target sees them
  again, _ = packed_and_alone(model, {**packed_batch, "tokens": jnp.asarray(padded)}, alone)
  np.testing.assert_allclose(again, loss, rtol=1e-6)


# --- checks that read no record -----------------------------------------------------------------


def test_checks_take_packed_sources_at_their_word(letter_folders, monkeypatch):
  train_dir, _ = letter_folders
  ds = packing.tokens(str(train_dir), 8, eval_fraction=0.25)
  mix = Mixture([ds.train, ds.eval], [1, 1], name="both")

  def no_reading(*args, **kwargs):
    raise AssertionError("a check read a record")

  monkeypatch.setattr(Shards, "span", no_reading)
  monkeypatch.setattr(Shards, "documents", no_reading)
  monkeypatch.setattr(Packed, "read", no_reading)
  spec = checks.check_dataset(ds, num_classes={"tokens": 256})
  assert spec == ds.train.checked_spec() and spec["tokens"] == ((9,), np.dtype(np.int32))
  checks.check_dataset(sources.Dataset("tokens", mix, ds.eval), num_classes={"tokens": 300})
  sources.check_labels(ds.train, 256, "tokens")
  sources.check_labels(mix, 256, "tokens")
  assert ds.train.value_range("segment_ids") is None
  with pytest.raises(DataError) as e:
    sources.check_labels(ds.train, 100, "tokens", why="the model's 100 logits")
  assert str(e.value) == (
    f"source {train_dir}/train: field tokens holds values in [0, 256), not all inside "
    "[0, 100) (the model's 100 logits)"
  )
  with pytest.raises(DataError, match=r"source both: field tokens holds values in \[0, 256\)"):
    checks.check_dataset(sources.Dataset("tokens", mix, ds.eval), num_classes={"tokens": 100})


def test_a_mixture_weighted_by_size_is_their_concatenation():
  """Held-out windows of several folders: each read once, whatever the float rounding."""
  rng = np.random.default_rng(0)
  for sizes in ([511, 270], *rng.integers(1, 2000, (200, 3)).tolist()):
    parts = [sources.ArraySource(f"s{i}", x=np.arange(n)) for i, n in enumerate(sizes)]
    mixed = packing.Mixture(parts, sizes)
    assert len(mixed) == sum(sizes), sizes
