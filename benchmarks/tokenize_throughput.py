"""Token shards: how fast `jaxtrain.data.tokenize` writes them, and how fast spans read back.

This Python's standard library (its `.py` files as `jaxtrain.data.text.python_stdlib`
lists them, less the few that are not UTF-8 text) is tokenized with `bytes`
and with a BPE tokenizer of `--vocab` tokens trained on its first `--train_mb`
MB, at 1 and 2 workers (and `--workers N`), each run into a fresh folder with
`--shard_mb` shards (workers tokenize whole shards, so small shards keep them
all busy on this small corpus). Each line is the run's MB/s of text, worker
start-up included (each spawned worker imports jaxtrain, and with it jax), and
its ratio against 1 worker; then the same for the tokenizing alone, the time
after the scan of the inputs (which the workers start up for). Then the
reader: random spans of `--span` tokens from each output (`Shards.span`), in
tokens/s.

    python benchmarks/tokenize_throughput.py
    python benchmarks/tokenize_throughput.py --workers 4 --shard_mb 1

(Not `tokenize.py`: a script's folder comes first on `sys.path`, and a file of that
name would stand in for the standard library's `tokenize` in every benchmark here.)
"""

import argparse
import os
import pathlib
import sysconfig
import tempfile
import time

import numpy as np

from jaxtrain.data import bpe
from jaxtrain.data import tokenize as tokenize_lib
from jaxtrain.data.shards import Shards


def stdlib_files() -> tuple[list[pathlib.Path], int]:
  """The standard library's `.py` files, sorted as `python_stdlib` reads them; those left out."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
  kept = [p for p in paths if is_text(p.read_bytes())]
  return kept, len(paths) - len(kept)


def is_text(data: bytes) -> bool:
  try:
    data.decode()
  except UnicodeDecodeError:
    return False
  return b"\0" not in data


def train_tokenizer(paths: list[pathlib.Path], train_mb: float, vocab: int, folder: pathlib.Path):
  """Trains a BPE tokenizer on the first `train_mb` MB of `paths` into folder/tokenizer.json."""
  chunks, size = [], 0
  for path in paths:
    chunks.append(path.read_text())
    size += path.stat().st_size
    if size >= train_mb * 1e6:
      break
  started = time.perf_counter()
  bpe.train("".join(chunks), vocab).save(str(folder / bpe.FILE))
  print(f"BPE of {vocab} tokens trained on {size / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip


def read_rate(folder: pathlib.Path, span: int, reads: int) -> str:
  """Random spans of `span` tokens read back: tokens/s and microseconds a read."""
  shards = Shards(folder)
  starts = np.random.default_rng(0).integers(0, shards.tokens - span, reads)
  shards.span(0, span)  # opens the readers
  started = time.perf_counter()
  for start in starts:
    shards.span(int(start), int(start) + span)
  seconds = time.perf_counter() - started
  return f"{reads * span / seconds / 1e3:,.0f}k tokens/s ({seconds / reads * 1e6:.0f} us a span)"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=0, help="another worker count to run")
  parser.add_argument("--shard_mb", type=float, default=2.0)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--train_mb", type=float, default=2.0)
  parser.add_argument("--span", type=int, default=1025)
  parser.add_argument("--reads", type=int, default=3000)
  args = parser.parse_args()
  paths, skipped = stdlib_files()
  size = sum(p.stat().st_size for p in paths)
  print(f"{len(paths)} files, {size / 1e6:.1f} MB of text ({skipped} not UTF-8 left out); "
        f"{os.cpu_count()} CPUs")  # fmt: skip
  counts = sorted({1, 2, args.workers} - {0})
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    train_tokenizer(paths, args.train_mb, args.vocab, root)
    for name, tokenizer in (("bytes", "bytes"), ("bpe", str(root))):
      base = base_tokenizing = None
      for workers in counts:
        out = root / f"{name}-{workers}"
        done = tokenize_lib.tokenize([str(p) for p in paths], tokenizer, out, workers=workers,
                                     shard_mb=args.shard_mb)  # fmt: skip
        rate = done.text_bytes / 1e6 / done.seconds
        tokenizing = done.text_bytes / 1e6 / done.tokenizing
        base, base_tokenizing = base or rate, base_tokenizing or tokenizing
        print(f"{name:>5} workers={workers}: {rate:6.2f} MB/s x{rate / base:.2f} in all "
              f"({done.seconds:.1f} s); tokenizing {tokenizing:6.2f} MB/s "
              f"x{tokenizing / base_tokenizing:.2f} ({done.tokenizing:.1f} s); "
              f"{done.tokens:,} tokens, {done.shards} shards")  # fmt: skip
      print(f"{name:>5} reads: {read_rate(root / f'{name}-1', args.span, args.reads)}")


if __name__ == "__main__":
  main()
