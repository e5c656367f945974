"""Tokenizes text into ArrayRecord token shards for language-model pretraining.

    python -m jaxtrain.data.tokenize --tokenizer=bytes --out=tokens 'jaxtrain/data/*.py'
    python -m jaxtrain.data.tokenize --tokenizer=runs/lm_bpe --out=tokens_bpe corpus/ --workers=8

Each INPUT is a file, a folder (all its regular files, recursively) or a glob,
expanded in sorted order, INPUTs in the order given. A `.jsonl` or `.json`
file is JSON Lines: each non-blank line is one document, the string in its
`--field`. Any other file is one document of UTF-8 text. `--tokenizer` is
`bytes` (the ids are the UTF-8 bytes), a `tokenizer.json` of the `tokenizers`
package, a run's workdir holding one (what `experiments.lm
--config.data.tokenizer=bpe` trains), or `bpe:N`: a byte-level BPE tokenizer of
N tokens trained on the inputs' first 100 MB of text and kept in the output
folder (a rerun reads it back). No special tokens are added.

The output folder holds `tokens-00000.array_record`, ... (one record
`{"tokens": ids}` per document, `uint16` ids, or `uint32` for vocabularies over
65,536), each shard's token counts `tokens-00000.lengths.npy`, a copy of
`tokenizer.json`, `plan.json` (what the run was asked to do) and, written last,
`manifest.json`. Shards are cut between documents every `--shard_mb` of input
text, so the output does not depend on `--workers`: each worker tokenizes whole
shards (a small corpus keeps more of them busy with a smaller `--shard_mb`).
`jaxtrain.data.shards.Shards` reads the folder.

A run killed at any point resumes when rerun with the same arguments: it keeps
the finished shards and writes the rest, and the folder ends byte-identical to
an uninterrupted run's. A rerun over finished output rewrites nothing. Bad
input (no file for an INPUT, a binary file unless `--skip_binary` leaves such
files out (not JSON Lines: their lines are checked one by one), a JSON line that is not JSON or
lacks the field, a tokenizer that does not load, an output folder holding
other data, a bad flag) is one line on stderr and exit status 2, before
anything is written.
"""

import codecs
import contextlib
import functools
import glob
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple

import numpy as np
import tokenizers
from absl import flags
from array_record.python import array_record_module

from jaxtrain import cli
from jaxtrain.data import bpe, records, shards
from jaxtrain.data.sources import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
BPE_SPEC = re.compile(r"bpe:(\d+)")  # --tokenizer=bpe:N trains one on the inputs
BPE_TRAIN_BYTES = 100_000_000  # the text `bpe:N` trains on: the first documents' 100 MB
_BATCH_CHARS = 1 << 20  # text per encode call: bounds the memory of the ids lists
_READ_BYTES = 1 << 24  # bytes per read when hashing or checking UTF-8
_TMP = re.compile(r"\.tmp\.\d+$")  # the pid keeps a killed run's orphaned worker off our files
_worker: dict[str, Callable[[list[str]], list[np.ndarray]]] = {}  # this process's encoder


class Tokenizer(NamedTuple):
  """What `--tokenizer` names: its kind, path, JSON (None for bytes), SHA-256 and size."""

  kind: str
  path: str | None
  json: str | None
  sha256: str | None
  vocab_size: int

  @property
  def dtype(self) -> str:
    """The ids' dtype: uint16 while every id fits."""
    return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


class Scan(NamedTuple):
  """One input file: its size and SHA-256, and each document's text size and end byte."""

  size: int
  sha256: str
  sizes: np.ndarray
  ends: np.ndarray


class Task(NamedTuple):
  """One shard to write: its documents, as (path, first byte, stop byte, documents) pieces."""

  index: int
  out: str
  field: str
  pieces: tuple[tuple[str, int, int, int], ...]


class Written(NamedTuple):
  """A finished shard: its documents' token counts, file size and SHA-256."""

  index: int
  lengths: np.ndarray
  size: int
  sha256: str
  kept: bool


class Summary(NamedTuple):
  """What a run did; `str()` is its one-line report."""

  out: str
  documents: int
  tokens: int
  shards: int
  text_bytes: int
  seconds: float
  workers: int
  kept: int = 0
  done_before: bool = False
  tokenizing: float = 0.0  # of `seconds`, those after the scan (and the workers' start-up)

  def __str__(self) -> str:
    counts = ", ".join(_count(n, what) for n, what in ((self.documents, "document"),
                       (self.tokens, "token"), (self.shards, "shard")))  # fmt: skip
    if self.done_before:
      return f"{self.out} already holds these tokens ({counts}); nothing to do"
    kept = f", kept {_count(self.kept, 'finished shard')}" if self.kept else ""
    rate = self.text_bytes / 1e6 / max(self.seconds, 1e-9)
    return (f"wrote {counts} to {self.out}: {self.text_bytes / 1e6:.2f} MB of text at "
            f"{rate:.2f} MB/s ({_count(self.workers, 'worker')}{kept})")  # fmt: skip


def tokenize(
  inputs: Sequence[str],
  tokenizer: str,
  out: str | pathlib.Path,
  *,
  field: str = "text",
  workers: int | None = None,
  shard_mb: float = 64.0,
  skip_binary: bool = False,
) -> Summary:
  """Tokenizes `inputs` into token shards in `out`, or finishes a killed run's.

  Everything is checked before anything is written: the arguments, the
  tokenizer, the inputs (each must match a file; each file must be UTF-8
  text; each JSON line must hold the field) and `out` (new, empty, or this
  command's output for the same inputs and tokenizer).

  Args:
    inputs: files, folders and globs, as on the command line.
    tokenizer: `bytes`, a tokenizer.json, or a folder holding one.
    out: the output folder.
    field: the text's field in JSON Lines.
    workers: tokenizing processes (spawned); 0 or 1 tokenizes in this
      process; None for the CPUs this process may use.
    shard_mb: input text per shard, in MB.
    skip_binary: leave out files that are not UTF-8 text instead of refusing them.

  Returns:
    What was done; `str()` of it is the one-line summary.

  Raises:
    DataError: bad input, in one line.

  Example:
    >>> print(tokenize(["jaxtrain/data/*.py"], "bytes", "tokens", shard_mb=0.1))
  """
  started = time.perf_counter()
  workers = _check_args(inputs, workers, shard_mb)
  trained = BPE_SPEC.fullmatch(tokenizer)
  tok = load_tokenizer("bytes" if trained else tokenizer)
  out = _output(out)
  paths = expand(inputs, out)
  workers = min(workers, _most_workers(paths, round(shard_mb * 1e6)))
  scan_fn = functools.partial(scan, field=field, skip_binary=skip_binary)
  if trained:  # the scan checks the text before the tokenizer trains on it
    _check_out_before_training(out, tokenizer)
    with _mapper(workers, tok) as (mapper, used):
      scans = list(mapper(scan_fn, paths, _chunk(len(paths), used)))
    tok = _trained_bpe(tokenizer, paths, scans, field, out)
  with _mapper(workers, tok) as (mapper, used):
    if not trained:
      scans = list(mapper(scan_fn, paths, _chunk(len(paths), used)))
    plan = _plan(paths, scans, tok, field, round(shard_mb * 1e6))
    tasks = _tasks(paths, scans, plan["shard_bytes"], str(out), field)
    manifest = _existing(out, plan, len(tasks))
    if manifest is not None:
      return _summary(out, manifest, started, used, done_before=True)
    scanned = time.perf_counter()
    _prepare(out, plan, tok)
    written = sorted(mapper(write_shard, tasks, 1))
  manifest = _manifest(plan, written)
  _write_atomic(out / shards.MANIFEST, _json(manifest))
  kept, tokenizing = sum(w.kept for w in written), time.perf_counter() - scanned
  return _summary(out, manifest, started, used, kept=kept, tokenizing=tokenizing)


def _check_args(inputs: Sequence[str], workers: int | None, shard_mb: float) -> int:
  """The worker count to use, after checking the arguments that need no file."""
  if not inputs:
    raise DataError("no INPUT: give the files, folders or globs of text to tokenize")
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if workers < 0:
    raise DataError(f"--workers={workers} must be 0 or more (0 and 1 tokenize in this process)")
  if not (math.isfinite(shard_mb) and round(shard_mb * 1e6) >= 1):
    raise DataError(f"--shard_mb={shard_mb} must be a positive number of MB (10^6 bytes)")
  return max(workers, 1)


def _most_workers(paths: list[str], shard_bytes: int) -> int:
  """The most workers that find work: one a file when scanning, about one a shard after."""
  size = sum(os.path.getsize(p) for p in paths)
  return max(len(paths), math.ceil(size / shard_bytes))


def load_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer `spec` names: `bytes`, a tokenizer.json, or a folder holding one.

  Raises:
    DataError: no such file, a folder without tokenizer.json, or a file that
      does not load as a tokenizer.
  """
  if spec == "bytes":
    return Tokenizer("bytes", None, None, None, 256)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if not (path / shards.TOKENIZER).is_file():
      raise DataError(f"--tokenizer {spec}: the folder holds no {shards.TOKENIZER} (a run of "
                      "experiments.lm with --config.data.tokenizer=bpe writes one)")  # fmt: skip
    path = path / shards.TOKENIZER
  elif not path.is_file():
    raise DataError(f"--tokenizer {spec}: no such file or folder; give bytes, a "
                    "tokenizer.json, or a run's workdir holding one")  # fmt: skip
  try:
    raw = path.read_bytes()
    vocab_size = tokenizers.Tokenizer.from_str(raw.decode()).get_vocab_size()
  except BaseException as e:  # tokenizers raises Exception, or a Rust panic (BaseException)
    if isinstance(e, KeyboardInterrupt | SystemExit):
      raise
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    raise DataError(f"--tokenizer {spec}: {path} is not a readable tokenizer ({why})") from e
  return Tokenizer("json", os.path.abspath(path), raw.decode(), _sha256(raw), vocab_size)


def _trained_bpe(
  spec: str, paths: list[str], scans: list[Scan], field: str, out: pathlib.Path
) -> Tokenizer:
  """`bpe:N`: a byte-level BPE tokenizer of N tokens trained on the inputs' first documents.

  A rerun into the same `out` (a killed run's, or a finished one's) reads the
  tokenizer that run trained, so its shards stay valid.
  """
  saved, plan = out / shards.TOKENIZER, _load_json(out / shards.PLAN)
  if saved.is_file() and isinstance(plan, dict) and plan.get("tokenizer", {}).get("path") == spec:
    return load_tokenizer(str(saved))._replace(path=spec)
  texts, size = [], 0
  for text in _documents(_tasks(paths, scans, BPE_TRAIN_BYTES, str(out), field)[0]):
    texts.append(text)
    size += len(text)
    if size >= BPE_TRAIN_BYTES:
      break
  vocab = int(BPE_SPEC.fullmatch(spec)[1])
  try:
    trained = bpe.train("\n".join(texts), vocab).to_str()
  except DataError as e:  # its message names the experiments' key
    raise DataError(str(e).replace(f"data.vocab_size={vocab}", f"--tokenizer={spec}")) from e
  vocab_size = tokenizers.Tokenizer.from_str(trained).get_vocab_size()
  return Tokenizer("json", spec, trained, _sha256(trained.encode()), vocab_size)


def _check_out_before_training(out: pathlib.Path, spec: str) -> None:
  """`out` must be new, empty, or a `spec` run's before a tokenizer trains for minutes.

  The full check (the same inputs, no other files) follows once the plan is known.
  """
  if not out.is_dir() or not any(out.iterdir()):
    return
  plan = _load_json(out / shards.PLAN)
  if not isinstance(plan, dict) or (plan.get("tokenizer") or {}).get("path") != spec:
    raise DataError(f"--out {out} holds other data than the tokens of a --tokenizer={spec} "
                    "run; give a new or empty folder")  # fmt: skip


def _output(out: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(out).expanduser()
  if not str(out).strip() or (path.exists() and not path.is_dir()):
    raise DataError(f"--out {str(out)!r} must name a folder (new, empty, or this command's)")
  return path


def expand(inputs: Sequence[str], out: pathlib.Path | None = None) -> list[str]:
  """The absolute paths of the files `inputs` name, in order, each once; none inside `out`.

  Raises:
    DataError: an input matches no file.
  """
  found, skip = {}, out.resolve() if out is not None else None
  for spec in inputs:
    files = [f for f in _files(spec) if skip is None or not f.resolve().is_relative_to(skip)]
    if not files:
      raise DataError(f"INPUT {spec!r} matches no file")
    found.update((os.path.abspath(f), None) for f in files)
  return list(found)


def _files(spec: str) -> Iterator[pathlib.Path]:
  """A file, a folder's files (recursively, sorted), or a glob's matches (sorted)."""
  matches = [spec] if os.path.lexists(spec) else sorted(glob.glob(spec, recursive=True))
  for match in map(pathlib.Path, matches):
    if match.is_dir():
      yield from sorted(p for p in match.rglob("*") if p.is_file())
    elif match.is_file():
      yield match


def is_jsonl(path: str) -> bool:
  """Whether `path` is read as JSON Lines, one document a line."""
  return path.endswith(JSONL_SUFFIXES)


def scan(path: str, field: str, skip_binary: bool = False) -> Scan:
  """Checks one input file and measures its documents, reading it once, a block at a time.

  With `skip_binary`, a text file that is not UTF-8 text holds no document
  instead (its size and hash still go into the plan).

  Raises:
    DataError: a binary file, or a JSON line that is not JSON or lacks `field`.
  """
  try:
    with open(path, "rb") as f:
      if is_jsonl(path):
        return _scan_jsonl(path, f, field)
      try:
        return _scan_text(path, f)
      except DataError:
        if not skip_binary:
          raise
      size, sha256 = _hash(pathlib.Path(path))
      return Scan(size, sha256, np.zeros(0, np.int64), np.zeros(0, np.int64))
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e


def _scan_text(path: str, f: BinaryIO) -> Scan:
  """A text file: one document, the whole file."""
  digest, decoder, size = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
  while block := f.read(_READ_BYTES):
    _check_text(path, block, size, decoder)
    digest.update(block)
    size += len(block)
  _check_text(path, b"", size, decoder, final=True)
  return Scan(size, digest.hexdigest(), np.array([size]), np.array([size]))


def _scan_jsonl(path: str, f: BinaryIO, field: str) -> Scan:
  """JSON Lines: a document for each non-blank line; each one's end is the byte after it."""
  digest, sizes, ends, size = hashlib.sha256(), [], [], 0
  for number, line in enumerate(f, 1):
    text = _check_text(path, line, size)
    digest.update(line)
    size += len(line)
    if not _blank(line):
      sizes.append(len(_field(text, field, f"{path}:{number}").encode()))
      ends.append(size)
  return Scan(size, digest.hexdigest(), np.array(sizes, np.int64), np.array(ends, np.int64))


def _blank(line: bytes) -> bool:
  """Whether a JSON line is blank: JSON's whitespace only. Blank lines are no documents."""
  return not line.strip(b" \t\r\n")


def _check_text(path: str, block: bytes, offset: int, decoder=None, final: bool = False) -> str:
  """`block` (at `offset` in the file) as text; a NUL byte or bad UTF-8 is a `DataError`.

  With an incremental `decoder`, a character may span blocks: its bytes wait in
  the decoder, and `final` says no block follows.
  """
  nul = block.find(b"\0")
  if nul >= 0:
    raise DataError(f"{path}: a binary file (a NUL byte at offset {offset + nul}); give UTF-8 "
                    "text")  # fmt: skip
  waiting = len(decoder.getstate()[0]) if decoder else 0
  try:
    return decoder.decode(block, final) if decoder else block.decode()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text (a bad byte at offset {offset - waiting + e.start}); "
                    "a binary file? give UTF-8 text") from e  # fmt: skip


def _read(path: str, start: int, stop: int) -> bytes:
  try:
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(stop - start)
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e


def _field(line: str | bytes, field: str, where: str) -> str:
  """The text in one JSON line's `field`."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise DataError(f"{where}: not a JSON line ({getattr(e, 'msg', e)})") from e
  if not isinstance(record, dict) or field not in record:
    raise DataError(f"{where}: the JSON line has no field {field!r} (--field names it)")
  text = record[field]
  if not isinstance(text, str):
    raise DataError(f"{where}: field {field!r} holds {type(text).__name__}, not text")
  try:
    text.encode()
  except UnicodeEncodeError as e:  # a lone surrogate escape, such as "\\ud800"
    raise DataError(f"{where}: field {field!r} is not UTF-8 text ({e.reason})") from e
  return text


def _plan(paths: list[str], scans: list[Scan], tok: Tokenizer, field: str, shard_bytes: int):
  """What this run is asked to do: a rerun with another plan is someone else's output."""
  tokenizer = {"kind": tok.kind, "path": tok.path, "sha256": tok.sha256,
               "vocab_size": tok.vocab_size}  # fmt: skip
  return {
    "format": shards.FORMAT,
    "tokenizer": tokenizer,
    "dtype": tok.dtype,
    "field": field if any(map(is_jsonl, paths)) else None,
    "shard_bytes": shard_bytes,
    "sources": [
      {"path": p, "size": s.size, "sha256": s.sha256} for p, s in zip(paths, scans, strict=True)
    ],
  }


def _tasks(paths: list[str], scans: list[Scan], shard_bytes: int, out: str, field: str):
  """The shards, cut between documents by text size: the same for any worker count."""
  sizes = np.concatenate([s.sizes for s in scans])
  if not sizes.size:
    raise DataError("the inputs hold no document (their JSON Lines files only blank lines, "
                    "or --skip_binary left every file out)")  # fmt: skip
  cuts = _cuts(sizes, shard_bytes)
  first = np.cumsum([0] + [s.sizes.size for s in scans])  # each file's first document
  return [Task(i, out, field, _pieces(paths, scans, first, a, b))
          for i, (a, b) in enumerate(itertools.pairwise(cuts))]  # fmt: skip


def _cuts(sizes: np.ndarray, target: int) -> list[int]:
  """Where shards start, and the end: a shard ends with the document that brings it to `target`."""
  total = np.concatenate([[0], np.cumsum(sizes)])
  cuts = [0]
  while cuts[-1] < sizes.size:
    stop = int(np.searchsorted(total, total[cuts[-1]] + target, "left"))
    cuts.append(min(max(stop, cuts[-1] + 1), sizes.size))
  return cuts


def _pieces(paths, scans, first, a: int, b: int) -> tuple[tuple[str, int, int, int], ...]:
  """Documents `[a, b)` as byte ranges of the files that hold them."""
  pieces = []
  for f in range(int(np.searchsorted(first, a, "right")) - 1, len(paths)):
    if first[f] >= b:
      break
    lo, hi = max(a, first[f]) - first[f], min(b, first[f + 1]) - first[f]
    if hi > lo:
      ends = scans[f].ends
      pieces.append((paths[f], int(ends[lo - 1]) if lo else 0, int(ends[hi - 1]), int(hi - lo)))
  return tuple(pieces)


def _our_names(plan: dict, count: int) -> set[str]:
  names = {shards.PLAN, shards.MANIFEST}
  names |= {shards.TOKENIZER} if plan["tokenizer"]["kind"] != "bytes" else set()
  return names | {f(i) for i in range(count) for f in (shards.shard_file, shards.lengths_file)}


def _existing(out: pathlib.Path, plan: dict, count: int) -> dict | None:
  """The manifest when `out` already holds this output, finished; None for a new or unfinished one.

  Raises:
    DataError: `out` holds other data: files this command would not write,
      or the output of other inputs or another tokenizer.
  """
  if not out.is_dir():
    return None
  names = sorted(p.name for p in out.iterdir())
  planned = shards.PLAN in names
  saved = _load_json(out / shards.PLAN) if planned else plan
  if saved != plan:
    differ = [k for k in plan if not isinstance(saved, dict) or saved.get(k) != plan[k]]
    raise DataError(f"--out {out} holds the tokens of another run (its plan.json differs in "
                    f"{', '.join(differ) or 'its keys'}); give a new or empty folder")  # fmt: skip
  others = _others(names, _our_names(plan, count), planned)
  if others:
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    raise DataError(f"--out {out} holds other data ({shown}); give a new or empty folder")
  if not planned:
    return None
  return _finished_manifest(out, plan, count)


def _others(names: list[str], ours: set[str], planned: bool) -> list[str]:
  """The names this run would not write; without a plan, only a killed run's temporary files."""
  return [n for n in names if _TMP.sub("", n) not in ours or not (planned or _TMP.search(n))]


def _finished_manifest(out: pathlib.Path, plan: dict, count: int) -> dict | None:
  """The manifest, if it is this plan's and every file it names is in place."""
  manifest = _load_json(out / shards.MANIFEST)
  if not isinstance(manifest, dict) or {k: manifest.get(k) for k in plan} != plan:
    return None
  try:
    entries = manifest["shards"]
    present = all((out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["bytes"]
                  and (out / e["lengths"]).is_file() for e in entries)  # fmt: skip
  except (KeyError, TypeError):  # a damaged manifest: the run writes it again
    return None
  tokenizer = plan["tokenizer"]["kind"] == "bytes" or (out / shards.TOKENIZER).is_file()
  return manifest if len(entries) == count and present and tokenizer else None


def _load_json(path: pathlib.Path):
  """The JSON in `path`; None when missing or damaged."""
  try:
    return json.loads(path.read_bytes())
  except (OSError, ValueError):
    return None


def _prepare(out: pathlib.Path, plan: dict, tok: Tokenizer) -> None:
  """Makes `out`, removes a killed run's temporary files, and writes the plan and tokenizer."""
  out.mkdir(parents=True, exist_ok=True)
  for path in out.iterdir():
    if _TMP.search(path.name):
      path.unlink(missing_ok=True)
  _write_atomic(out / shards.PLAN, _json(plan))
  if tok.json is not None:
    _write_atomic(out / shards.TOKENIZER, tok.json.encode())


@contextlib.contextmanager
def _mapper(workers: int, tok: Tokenizer) -> Iterator[tuple[Callable, int]]:
  """`map(fn, items, chunksize)` over `workers` spawned processes, or in this one; and the count."""
  if workers <= 1:
    _start_worker(tok.json, tok.dtype)
    yield (lambda fn, items, chunk: map(fn, items)), 1
    return
  # spawn, not fork: jax may be imported, and a forked copy of its threads can hang
  context = multiprocessing.get_context("spawn")
  with context.Pool(workers, _start_worker, (tok.json, tok.dtype)) as pool:
    yield pool.imap, workers


def _chunk(items: int, workers: int) -> int:
  return max(1, min(64, items // (4 * workers)))


def _start_worker(tokenizer_json: str | None, dtype: str) -> None:
  """Loads the tokenizer into this process (each worker's initializer)."""
  # one thread per process: --workers alone sets how many cores tokenize
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  if tokenizer_json is None:
    _worker["encode"] = lambda texts: [np.frombuffer(t.encode(), np.uint8).astype(dtype)
                                       for t in texts]  # fmt: skip
    return
  tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
  _worker["encode"] = lambda texts: [
    np.asarray(e.ids, dtype) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)
  ]


def write_shard(task: Task) -> Written:
  """Tokenizes and writes one shard, or reads back the one a killed run finished."""
  out = pathlib.Path(task.out)
  path, lengths_path = out / shards.shard_file(task.index), out / shards.lengths_file(task.index)
  lengths = _kept_lengths(path, lengths_path, sum(p[3] for p in task.pieces))
  if lengths is not None:
    return Written(task.index, lengths, *_hash(path), kept=True)
  tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
  try:
    lengths = _write_records(tmp, _token_arrays(task))
    size, digest = _hash(tmp, sync=True)
    _write_atomic(lengths_path, _npy(lengths), sync=False)  # a rerun checks it, so no fsync
    tmp.replace(path)  # last: the shard's name is the sign that both files are complete
  finally:
    tmp.unlink(missing_ok=True)
  return Written(task.index, lengths, size, digest, kept=False)


def _kept_lengths(path: pathlib.Path, lengths_path: pathlib.Path, documents: int):
  """A finished shard's token counts; None when it is still to write."""
  if not (path.is_file() and lengths_path.is_file()):
    return None
  try:
    lengths = np.load(lengths_path, allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return None
  return lengths if lengths.shape == (documents,) and lengths.dtype == np.int64 else None


def _write_records(path: pathlib.Path, arrays: Iterable[np.ndarray]) -> np.ndarray:
  """Writes one `{"tokens": ids}` record per array; returns their lengths."""
  lengths = []
  writer = array_record_module.ArrayRecordWriter(str(path), shards.WRITER_OPTIONS)
  try:
    for ids in arrays:
      writer.write(records.encode({"tokens": ids}))
      lengths.append(ids.size)
  finally:
    writer.close()
  return np.array(lengths, np.int64)


def _token_arrays(task: Task) -> Iterator[np.ndarray]:
  """The task's documents' ids, encoded a batch of about `_BATCH_CHARS` characters at a time."""
  batch, chars = [], 0
  for text in _documents(task):
    batch.append(text)
    chars += len(text)
    if chars >= _BATCH_CHARS:
      yield from _worker["encode"](batch)
      batch, chars = [], 0
  if batch:
    yield from _worker["encode"](batch)


def _documents(task: Task) -> Iterator[str]:
  """The texts of a shard's documents, read back from the byte ranges the scan found."""
  for path, start, stop, count in task.pieces:
    data = _read(path, start, stop)
    if not is_jsonl(path):
      texts = [data.decode()]
    else:
      texts = [_field(line, task.field, path) for line in data.split(b"\n") if not _blank(line)]
    if len(texts) != count or len(data) != stop - start:
      raise DataError(f"{path} changed while it was tokenized; rerun the command")
    yield from texts


def _hash(path: pathlib.Path, sync: bool = False) -> tuple[int, str]:
  """The file's size and SHA-256; with `sync`, flushed to disk before a rename publishes it."""
  digest, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_READ_BYTES):
      digest.update(chunk)
      size += len(chunk)
    if sync:
      os.fsync(f.fileno())
  return size, digest.hexdigest()


def _write_atomic(path: pathlib.Path, data: bytes, sync: bool = True) -> None:
  """Writes `data` to `path` through a temporary file; leaves an identical file untouched."""
  if path.is_file() and path.read_bytes() == data:
    return  # a rerun keeps the file, mtime and all
  tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      if sync:  # on disk before the rename publishes it
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def _manifest(plan: dict, written: list[Written]) -> dict:
  entries = [
    {"file": shards.shard_file(w.index), "lengths": shards.lengths_file(w.index),
     "documents": int(w.lengths.size), "tokens": int(w.lengths.sum()), "bytes": w.size,
     "sha256": w.sha256}
    for w in written
  ]  # fmt: skip
  documents, tokens = sum(e["documents"] for e in entries), sum(e["tokens"] for e in entries)
  return {**plan, "documents": documents, "tokens": tokens, "shards": entries}


def _summary(out, manifest: dict, started: float, workers: int, **how) -> Summary:
  return Summary(
    str(out), manifest["documents"], manifest["tokens"], len(manifest["shards"]),
    sum(s["size"] for s in manifest["sources"]), time.perf_counter() - started, workers, **how,
  )  # fmt: skip


def _count(n: int, what: str) -> str:
  return f"{n:,} {what}{'' if n == 1 else 's'}"


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _npy(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def _json(value) -> bytes:
  return (json.dumps(value, indent=1) + "\n").encode()


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing the module defines none."""
  flags.DEFINE_string(
    "tokenizer", None,
    "bytes, a tokenizer.json, a run's workdir holding tokenizer.json, or bpe:N (trained here).",
    required=True,
  )  # fmt: skip
  flags.DEFINE_string("out", None, "The folder to write the shards into.", required=True)
  flags.DEFINE_string("field", "text", "The text's field in JSON Lines (.jsonl, .json).")
  flags.DEFINE_integer(
    "workers", None, "Tokenizing processes; 0 or 1 tokenizes in this process. Default: the CPUs."
  )
  flags.DEFINE_float("shard_mb", 64.0, "Input text per shard, in MB (10^6 bytes).")
  flags.DEFINE_bool(
    "skip_binary",
    False,
    "Leave out text files (not JSON Lines) that are not UTF-8 text instead of refusing them.",
  )


def main(argv: list[str]) -> None:
  """Tokenizes the INPUTs that follow the flags."""
  f = flags.FLAGS
  print(tokenize(argv[1:], f.tokenizer, f.out, field=f.field, workers=f.workers,
                 shard_mb=f.shard_mb, skip_binary=f.skip_binary))  # fmt: skip


if __name__ == "__main__":
  define_flags()
  cli.run_tool(main)
