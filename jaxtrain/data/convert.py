"""Converts arrays or text into an ArrayRecord file of dict records (`jaxtrain.data.records`).

    python -m jaxtrain.data.convert --npz data.npz --out data.array_record
    python -m jaxtrain.data.convert --text 'corpus/*.txt' --length 256 --out text.array_record

An `.npz` of equal-length arrays gives one record per row, with the arrays'
names as fields; text files (sorted by path) give one `{"tokens": ...}` record
per byte window, as `jaxtrain.data.text` cuts them. Any bad input (a missing or
unreadable file, arrays of different lengths, no records at all, an unusable
`--out`, or one that exists, unless `--overwrite`) is one line on stderr and
exit status 2; the output is written under a temporary name and renamed only
when complete, so nothing half-written is left.
"""

import glob
import pathlib
import sys
import zipfile
from collections.abc import Iterable

import numpy as np
from absl import app, flags

from jaxtrain import cli
from jaxtrain.data import text
from jaxtrain.data.records import write_records
from jaxtrain.data.sources import DataError

_NPZ = flags.DEFINE_string("npz", None, "An .npz of equal-length arrays: one record per row.")
_TEXT = flags.DEFINE_string("text", None, "A glob of text files: one record per byte window.")
_LENGTH = flags.DEFINE_integer("length", 256, "With --text: the window length (records hold +1).")
_OUT = flags.DEFINE_string("out", None, "The ArrayRecord file to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def _rows(npz_path: str) -> Iterable[dict[str, np.ndarray]]:
  try:
    with np.load(npz_path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"--npz {npz_path}: not a readable .npz of arrays ({e})") from e
  if not arrays:
    raise DataError(f"--npz {npz_path}: holds no arrays")
  scalars = [k for k, v in arrays.items() if v.ndim == 0]
  if scalars:
    raise DataError(f"--npz {npz_path}: {', '.join(scalars)} has no rows (a scalar)")
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise DataError(f"--npz {npz_path}: arrays of different lengths {lengths}")
  for i in range(next(iter(lengths.values()))):
    yield {k: v[i] for k, v in arrays.items()}


def _windows(pattern: str, length: int) -> Iterable[dict[str, np.ndarray]]:
  if length < 1:
    raise DataError(f"--length={length} must be positive")
  paths = sorted(p for p in glob.glob(pattern) if pathlib.Path(p).is_file())
  if not paths:
    raise DataError(f"--text {pattern!r} matches no file")
  source = text.ByteTextSource(pattern, text.read_files(paths), length)
  for i in range(len(source)):
    yield source[i]


def _output(path: str) -> pathlib.Path:
  out = pathlib.Path(path).expanduser()
  if not str(path).strip() or out.is_dir():
    raise DataError(f"--out {path!r} must name a file, not a folder")
  if not out.parent.is_dir():
    raise DataError(f"--out {path}: the folder {out.parent} does not exist")
  if (out.exists() or out.is_symlink()) and not _OVERWRITE.value:
    raise DataError(f"--out {path} exists; give a new file, or --overwrite to replace it")
  return out


def main(argv: list[str]) -> None:
  """Converts arrays or text into an ArrayRecord file."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}; give --npz or --text, and --out")
  if (_NPZ.value is None) == (_TEXT.value is None):
    cli.fail("give exactly one of --npz and --text")
  try:
    out = _output(_OUT.value)
    rows = _rows(_NPZ.value) if _NPZ.value else _windows(_TEXT.value, _LENGTH.value)
    count = write_records(out, rows)
  except (DataError, OSError, RuntimeError, ValueError) as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    cli.fail("stopped by Ctrl-C; nothing was written", cli.EXIT_INTERRUPTED)
  print(f"wrote {count} records to {_OUT.value}")


if __name__ == "__main__":
  if cli.asks_help():
    print(cli.usage())
    sys.exit(0)
  try:
    app.run(main, flags_parser=cli.parse_flags)
  except KeyboardInterrupt:
    cli.fail("stopped by Ctrl-C; nothing was written", cli.EXIT_INTERRUPTED)
