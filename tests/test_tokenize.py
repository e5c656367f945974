"""`python -m jaxtrain.data.tokenize` run as a user runs it, and the shards it writes read back."""

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from jaxtrain.data import bpe
from jaxtrain.data import tokenize as tokenize_lib
from jaxtrain.data.shards import Shards
from jaxtrain.data.sources import DataError
from tests import commands, helpers

WORDS = ["the", "model", "token", "shards", "écrit", "naïve", "数据", "😀", "loss", "grain"]
SHARD_MB = "0.001"  # 1,000 bytes of text a shard: several shards from a small corpus


def tokenize(*args, cwd, timeout=120):
  return commands.run(["jaxtrain.data.tokenize", *map(str, args)], cwd=cwd, timeout=timeout,
                      env=helpers.subprocess_env())  # fmt: skip


def tokenize_all(runs):
  """The results of `tokenize(*args, cwd=cwd)` for each `(args, cwd)`, run 4 at a time."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return list(pool.map(lambda run: tokenize(*run[0], cwd=run[1]), runs))


def words(rng, count):
  return " ".join(rng.choice(WORDS, count)) + "\n"


def contents(folder):
  """Every file under `folder` and its bytes."""
  return {name: data for name, (data, _) in helpers.snapshot(folder).items()}


def shard_count(sizes, target):
  """Shards cut after the document that brings a shard's text to `target` bytes."""
  count, size, open_shard = 0, 0, False
  for s in sizes:
    count, size = (count, size) if open_shard else (count + 1, 0)
    size += s
    open_shard = size < target
  return count


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Text files in nested folders (one empty), a JSON Lines file, and a BPE run's workdir."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  (root / "docs" / "sub").mkdir(parents=True)
  files = {"docs/a.txt": words(rng, 300), "docs/c.txt": "", "docs/sub/b.md": words(rng, 500)}
  for name, text in files.items():
    (root / name).write_text(text)
  lines = [{"id": i, "body": words(rng, 40)} for i in range(12)]
  lines[3]["body"] += "a NUL \x00 char"  # json escapes it, so the file holds no NUL byte
  jsonl = [json.dumps(line) for line in lines]
  (root / "lines.jsonl").write_text("\n".join([*jsonl[:5], "  ", *jsonl[5:]]) + "\n")
  texts = [*files.values(), *(line["body"] for line in lines)]  # folders sort by path
  (root / "run").mkdir()
  bpe.train("".join(texts), 300).save(str(root / "run" / "tokenizer.json"))
  return root, texts


@pytest.fixture(scope="module")
def outputs(corpus):
  """The corpus tokenized with bytes and with the BPE run's tokenizer, one worker each."""
  root, _ = corpus
  args = ["--workers=1", f"--shard_mb={SHARD_MB}", "--field=body", "docs", "lines.jsonl"]
  runs = [([f"--tokenizer={tokenizer}", f"--out=out_{name}", *args], root)
          for name, tokenizer in (("bytes", "bytes"), ("bpe", "run"))]  # fmt: skip
  for done in tokenize_all(runs):
    assert done.returncode == 0, done.stderr[-3000:]
  return root


def expected_ids(corpus, name):
  root, texts = corpus
  if name == "bytes":
    return [np.frombuffer(t.encode(), np.uint8) for t in texts]
  tokenizer = tokenizers.Tokenizer.from_file(str(root / "run" / "tokenizer.json"))
  return [np.array(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_documents_and_spans_read_back_as_the_tokenizer_encodes(corpus, outputs, name):
  root, texts = corpus
  expected = expected_ids(corpus, name)
  shards = Shards(root / f"out_{name}")
  assert len(shards) == 15 and shards.dtype == np.uint16
  np.testing.assert_array_equal(shards.lengths, [ids.size for ids in expected])
  for i, ids in enumerate(expected):
    np.testing.assert_array_equal(shards.document(i), ids)
  for got, ids in zip(shards.documents([14, 0, 1, 3]), [expected[i] for i in (14, 0, 1, 3)],
                      strict=True):  # fmt: skip
    np.testing.assert_array_equal(got, ids)
  stream = np.concatenate(expected)
  np.testing.assert_array_equal(shards.offsets, np.concatenate([[0], np.cumsum(shards.lengths)]))
  rng = np.random.default_rng(1)
  starts = rng.integers(0, stream.size, 40)
  spans = [(0, stream.size), (0, 0), (stream.size, stream.size), (5, 6)]
  spans += [(int(shards.offsets[i]), int(shards.offsets[j])) for i, j in ((1, 3), (2, 4), (0, 15))]
  spans += [(int(s), int(min(s + rng.integers(1, 900), stream.size))) for s in starts]
  for start, stop in spans:
    span = shards.span(start, stop)
    assert span.dtype == np.int32
    np.testing.assert_array_equal(span, stream[start:stop])
  with pytest.raises(IndexError):
    shards.span(0, stream.size + 1)

  manifest = json.loads((root / f"out_{name}" / "manifest.json").read_text())
  sizes = [len(t.encode()) for t in texts]
  assert manifest["documents"] == 15 and manifest["tokens"] == stream.size
  assert len(manifest["shards"]) == shard_count(sizes, 1000)
  assert sum(s["documents"] for s in manifest["shards"]) == 15
  assert sum(s["tokens"] for s in manifest["shards"]) == stream.size
  for entry in manifest["shards"]:
    data = (root / f"out_{name}" / entry["file"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
  sources = ["docs/a.txt", "docs/c.txt", "docs/sub/b.md", "lines.jsonl"]
  assert [s["path"] for s in manifest["sources"]] == [str(root / s) for s in sources]
  assert [s["size"] for s in manifest["sources"]] == [(root / s).stat().st_size for s in sources]
  assert manifest["field"] == "body" and manifest["dtype"] == "uint16"

  if name == "bytes":
    assert shards.vocab_size == 256 and shards.tokenizer_json is None
    assert manifest["tokenizer"] == {"kind": "bytes", "path": None, "sha256": None,
                                     "vocab_size": 256}  # fmt: skip
    np.testing.assert_array_equal(shards.token_bytes(), np.ones(256))
    assert not (root / "out_bytes" / "tokenizer.json").exists()
  else:
    raw = (root / "run" / "tokenizer.json").read_bytes()
    assert (root / "out_bpe" / "tokenizer.json").read_bytes() == raw
    assert shards.vocab_size == 300 and shards.tokenizer_json == raw.decode()
    path, sha = str(root / "run" / "tokenizer.json"), hashlib.sha256(raw).hexdigest()
    assert manifest["tokenizer"] == {"kind": "json", "path": path, "sha256": sha,
                                     "vocab_size": 300}  # fmt: skip
    tokenizer = tokenizers.Tokenizer.from_str(raw.decode())
    np.testing.assert_array_equal(shards.token_bytes(), bpe.token_bytes(tokenizer))
  assert Shards(root / "out_bytes").fingerprint() != Shards(root / "out_bpe").fingerprint()


def test_two_workers_write_the_same_bytes_as_one(outputs):
  done = tokenize("--tokenizer=run", "--out=out_two", "--workers=2", f"--shard_mb={SHARD_MB}",
                  "--field=body", "docs", "lines.jsonl", cwd=outputs)  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  assert "(2 workers)" in done.stdout
  assert contents(outputs / "out_two") == contents(outputs / "out_bpe")
  assert Shards(outputs / "out_two").fingerprint() == Shards(outputs / "out_bpe").fingerprint()


def test_a_rerun_on_finished_output_changes_nothing(corpus, outputs):
  count = shard_count([len(t.encode()) for t in corpus[1]], 1000)
  before = helpers.snapshot(outputs / "out_bpe")
  done = tokenize("--tokenizer=run/tokenizer.json", "--out=out_bpe", "--workers=1",
                  f"--shard_mb={SHARD_MB}", "--field=body", "docs", "lines.jsonl",
                  cwd=outputs)  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == (
    "out_bpe already holds these tokens (15 documents, "
    f"{Shards(outputs / 'out_bpe').tokens:,} tokens, {count} shards); nothing to do"
  )
  assert helpers.snapshot(outputs / "out_bpe") == before


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
  rng = np.random.default_rng(2)
  lines = [json.dumps({"text": words(rng, 120)}) for _ in range(300)]
  (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
  args = ["--tokenizer=bytes", "--workers=1", "--shard_mb=0.0005", "big.jsonl"]  # one doc a shard
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the reference, meanwhile
    reference = pool.submit(tokenize, "--out=reference", *args, cwd=tmp_path)
    finished = kill_when_a_shard_is_written(tmp_path, args)
    assert reference.result().returncode == 0, reference.result().stderr[-3000:]
  assert "300 documents" in reference.result().stdout
  assert "300 shards" in reference.result().stdout
  killed = tmp_path / "killed"
  (killed / f"tokens-{finished:05d}.array_record.tmp.999999").write_bytes(b"torn")

  resumed = tokenize("--out=killed", *args, cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"kept {finished:,} finished shard" in resumed.stdout
  assert contents(killed) == contents(tmp_path / "reference")
  assert not [p for p in killed.iterdir() if ".tmp" in p.name]


def kill_when_a_shard_is_written(tmp_path, args):
  """Starts the command into `killed`, SIGKILLs it once a shard exists; the shards it finished."""
  command = [sys.executable, "-m", "jaxtrain.data.tokenize", "--out=killed", *args]
  proc = subprocess.Popen(command, cwd=tmp_path, env=helpers.subprocess_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)  # fmt: skip
  try:
    helpers.wait_for((tmp_path / "killed" / "tokens-00000.array_record").exists, proc)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
  killed = tmp_path / "killed"
  assert not (killed / "manifest.json").exists(), "the run finished before it was killed"
  finished = len(list(killed.glob("tokens-*.array_record")))
  assert 0 < finished < 300
  return finished


BAD = {  # name: (arguments after --tokenizer=bytes --out=out --workers=1, expected)
  "an input matches no file": (["a.txt", "missing/*.txt"], "INPUT 'missing/*.txt' matches no"),
  "a NUL byte": (["a.txt", "nul.bin"], "nul.bin: a binary file (a NUL byte at offset 3)"),
  "not UTF-8": (["latin.txt"], "latin.txt: not UTF-8 text (a bad byte at offset 3)"),
  "a missing tokenizer": (["--tokenizer=absent.json", "a.txt"], "--tokenizer absent.json: no such"),
  "a damaged tokenizer": (["--tokenizer=damaged.json", "a.txt"], "damaged.json is not a readable"),
  "a folder without a tokenizer": (["--tokenizer=empty", "a.txt"], "holds no tokenizer.json"),
  "an output folder with other files": (["a.txt"], "--out out holds other data (notes.txt)"),
  "an output folder of other inputs": (["a.txt"], "holds the tokens of another run"),
  "a line that is not JSON": (["bad.jsonl"], "bad.jsonl:3: not a JSON line"),
  "a line without the field": (["bad.jsonl", "--field=title"], "bad.jsonl:2: the JSON line has"),
  "negative workers": (["--workers=-1", "a.txt"], "--workers=-1 must be 0 or more"),
  "zero shard size": (["--shard_mb=0", "a.txt"], "--shard_mb=0.0 must be a positive number"),
}


def bad_inputs(folder, name, outputs):
  """The files of every case, and the case's own output folder."""
  (folder / "a.txt").write_text("some text\n")
  (folder / "nul.bin").write_bytes(b"abc\x00def")
  (folder / "latin.txt").write_bytes("ok ça".encode("latin-1"))
  (folder / "damaged.json").write_text('{"model": {"type": "BPE", ')
  (folder / "empty").mkdir()
  (folder / "bad.jsonl").write_text('{"text": "a", "title": "t"}\n{"text": "b"}\n{"text": \n')
  if "other files" in name:
    (folder / "out").mkdir()
    (folder / "out" / "notes.txt").write_text("mine")
  if "other inputs" in name:
    (folder / "out").mkdir()
    shutil.copy(outputs / "out_bytes" / "plan.json", folder / "out" / "plan.json")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, outputs):
  """Each bad case's result, and its folder's files before and after, all cases run at once."""
  folders = {name: tmp_path_factory.mktemp("bad") for name in BAD}
  for name, folder in folders.items():
    bad_inputs(folder, name, outputs)
  before = {name: helpers.snapshot(folder) for name, folder in folders.items()}
  flags = ["--tokenizer=bytes", "--out=out", "--workers=1"]
  results = tokenize_all([([*flags, *args], folders[name]) for name, (args, _) in BAD.items()])
  return {name: (result, before[name], helpers.snapshot(folders[name]))
          for name, result in zip(BAD, results, strict=True)}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(refusals, name):
  result, before, after = refusals[name]
  helpers.refused(result, BAD[name][1])
  assert after == before


def test_the_reader_names_the_folder_when_shards_are_missing(outputs, tmp_path):
  with pytest.raises(DataError, match=f"token shards {tmp_path}: no manifest.json"):
    Shards(tmp_path)
  shutil.copytree(outputs / "out_bytes", tmp_path / "copy")
  (tmp_path / "copy" / "tokens-00002.array_record").unlink()
  with pytest.raises(DataError, match=r"copy: tokens-00002\.array_record or its lengths file is"):
    Shards(tmp_path / "copy")
  (tmp_path / "copy" / "manifest.json").write_text("{")
  with pytest.raises(DataError, match=r"copy: manifest\.json is damaged"):
    Shards(tmp_path / "copy")


def test_bpe_n_trains_on_the_inputs_and_a_rerun_reads_it_back(corpus, tmp_path):
  """`bpe:N` trains a tokenizer on the inputs, keeps it in the folder, and encodes with it."""
  root, texts = corpus
  (tmp_path / "latin.txt").write_bytes("ok ça".encode("latin-1"))  # left out by skip_binary
  inputs = [str(root / "docs"), str(tmp_path / "latin.txt")]
  out = tmp_path / "out"
  summary = tokenize_lib.tokenize(inputs, "bpe:300", out, workers=0, skip_binary=True)
  shards = Shards(out)
  assert shards.vocab_size == 300 and summary.documents == 3 == len(shards.lengths)
  tokenizer = tokenizers.Tokenizer.from_str(shards.tokenizer_json)
  for i, text in enumerate(texts[:3]):
    assert tokenizer.decode(shards.document(i).tolist()) == text
  before = helpers.snapshot(out)
  again = tokenize_lib.tokenize(inputs, "bpe:300", out, workers=0, skip_binary=True)
  assert again.done_before and helpers.snapshot(out) == before
  with pytest.raises(DataError, match=r"^--tokenizer=bpe:100000 must be from 257"):
    tokenize_lib.tokenize(inputs, "bpe:100000", tmp_path / "big", workers=0, skip_binary=True)
  assert not (tmp_path / "big").exists()
