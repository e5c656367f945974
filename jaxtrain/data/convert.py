"""Converts arrays or text into an ArrayRecord file of dict records (`jaxtrain.data.records`).

    python -m jaxtrain.data.convert --npz data.npz --out data.array_record
    python -m jaxtrain.data.convert --text 'corpus/*.txt' --length 256 --out text.array_record

An `.npz` of equal-length arrays gives one record per row, with the arrays'
names as fields; text files (sorted by path) give one `{"tokens": ...}` record
per byte window, as `jaxtrain.data.text` cuts them. A bad input is one line on
stderr and exit status 2.
"""

import glob
import sys
from collections.abc import Iterable

import numpy as np
from absl import app, flags

from jaxtrain.data import text
from jaxtrain.data.records import write_records
from jaxtrain.data.sources import DataError

_NPZ = flags.DEFINE_string("npz", None, "An .npz of equal-length arrays: one record per row.")
_TEXT = flags.DEFINE_string("text", None, "A glob of text files: one record per byte window.")
_LENGTH = flags.DEFINE_integer("length", 256, "With --text: the window length (records hold +1).")
_OUT = flags.DEFINE_string("out", None, "The ArrayRecord file to write.", required=True)


def _rows(npz_path: str) -> Iterable[dict[str, np.ndarray]]:
  with np.load(npz_path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  lengths = {len(v) for v in arrays.values()}
  if len(lengths) != 1:
    raise DataError(f"{npz_path}: arrays of different lengths {sorted(lengths)}")
  for i in range(lengths.pop()):
    yield {k: v[i] for k, v in arrays.items()}


def _windows(pattern: str, length: int) -> Iterable[dict[str, np.ndarray]]:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise DataError(f"--text {pattern!r} matches no file")
  source = text.ByteTextSource(pattern, text.read_files(paths), length)
  for i in range(len(source)):
    yield source[i]


def main(argv: list[str]) -> None:
  """Converts arrays or text into an ArrayRecord file."""
  del argv
  if (_NPZ.value is None) == (_TEXT.value is None):
    raise app.UsageError("give exactly one of --npz and --text")
  try:
    rows = _rows(_NPZ.value) if _NPZ.value else _windows(_TEXT.value, _LENGTH.value)
    count = write_records(_OUT.value, rows)
  except (DataError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(2) from e
  print(f"wrote {count} records to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
