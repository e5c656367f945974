"""Byte-text windows, ArrayRecord files and their converter, and the up-front data checks."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

import jaxtrain
from jaxtrain import data, losses
from jaxtrain.data import checks, records, text
from tests import commands, helpers


def test_byte_windows_overlap_by_one_byte():
  raw = np.frombuffer(b"abcdefghijk", np.uint8)
  source = text.ByteTextSource("t", raw, length=4)
  assert len(source) == 2  # 11 bytes: windows at 0 and 4 (each 5 bytes); 8 + 5 > 11
  assert bytes(source[0]["tokens"].astype(np.uint8)) == b"abcde"
  assert bytes(source[1]["tokens"].astype(np.uint8)) == b"efghi"
  batch = source.read(np.array([1, 0, 1]))["tokens"]
  assert batch.shape == (3, 5) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch[0], source[1]["tokens"])
  with pytest.raises(IndexError):
    source.read(np.array([2]))


def test_python_stdlib_is_offline_and_deterministic():
  a = text.python_stdlib(length=64, limit_bytes=200_000)
  b = text.python_stdlib(length=64, limit_bytes=200_000)
  assert len(a.train) > 2500 and len(a.eval) > 100
  np.testing.assert_array_equal(
    a.train.read(np.arange(50))["tokens"], b.train.read(np.arange(50))["tokens"]
  )
  tokens = a.train.read(np.arange(len(a.train)))["tokens"]
  assert tokens.min() >= 0 and tokens.max() < text.VOCAB


def test_a_missing_text_file_is_one_line(tmp_path):
  with pytest.raises(data.DataError, match=r"text file .*nope\.txt: No such file"):
    text.byte_text("t", [tmp_path / "nope.txt"], length=8)


def test_records_round_trip(tmp_path):
  rows = [
    {"image": np.full((2, 3), i, np.float32), "label": np.int32(i), "name": np.array(b"x%d" % i)}
    for i in range(5)
  ]
  assert records.write_records(tmp_path / "r.array_record", rows) == 5
  source = records.RecordSource(tmp_path / "r.array_record")
  assert len(source) == 5
  for i in (0, 4):
    got = source[i]
    assert got.keys() == rows[i].keys()
    for k in got:
      np.testing.assert_array_equal(got[k], rows[i][k])
      assert got[k].dtype == np.asarray(rows[i][k]).dtype


def test_record_batch_read_and_the_npz_format(tmp_path):
  """`read` stacks what `[i]` returns; records in the earlier np.savez format still decode."""
  rows = [{"image": np.full((2, 3), i, np.uint8), "label": np.int64(i)} for i in range(6)]
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "old.array_record"), "group_size:1")
  for row in rows:
    buffer = io.BytesIO()
    np.savez(buffer, **row)
    writer.write(buffer.getvalue())
  writer.close()
  records.write_records(tmp_path / "new.array_record", rows)
  for name in ("old", "new"):
    source = records.RecordSource(tmp_path / f"{name}.array_record")
    batch = source.read(np.array([4, 1, 4]))
    np.testing.assert_array_equal(batch["label"], [4, 1, 4])
    np.testing.assert_array_equal(batch["image"], np.stack([rows[i]["image"] for i in (4, 1, 4)]))
    assert batch["image"].dtype == np.uint8 and source[2]["image"].flags.writeable


def test_record_decode_errors(tmp_path):
  raw = records.encode({"x": np.arange(3, dtype=np.int16)})
  with pytest.raises(ValueError, match="2 bytes past the fields"):
    records.decode(raw + b"ab")
  with pytest.raises(ValueError, match="not a record"):
    records.decode(b"junk" + raw)
  with pytest.raises(ValueError, match="a torn header: 5 bytes"):
    records.decode(raw[:5])
  with pytest.raises(data.DataError, match=r"field p: dtype .* cannot be stored"):
    records.encode({"p": np.zeros(2, [("a", "<i4"), ("b", "<f8")])})
  with pytest.raises(data.DataError, match="field x: dtype object"):
    records.encode({"x": np.array([None])})
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "bad.array_record"), "group_size:1")
  for payload in (raw, raw[:-1]):
    writer.write(payload)
  writer.close()
  source = records.RecordSource(tmp_path / "bad.array_record")
  with pytest.raises(data.DataError, match=r"bad\.array_record: record 1 cannot be decoded"):
    source.read(np.array([0, 1]))


def test_record_source_errors(tmp_path):
  with pytest.raises(data.DataError, match=r"missing ArrayRecord file\(s\) \['.*absent"):
    records.RecordSource(tmp_path / "absent.array_record")
  with pytest.raises(data.DataError, match="no records to write"):
    records.write_records(tmp_path / "none.array_record", [])
  assert not list(tmp_path.iterdir())  # no file, no temporary file
  array_record_module.ArrayRecordWriter(str(tmp_path / "empty.array_record")).close()
  with pytest.raises(data.DataError, match="is empty"):
    records.RecordSource(tmp_path / "empty.array_record")


def test_converter_command(tmp_path):
  np.savez(tmp_path / "a.npz", image=np.zeros((7, 4), np.float32), label=np.arange(7))
  (tmp_path / "t.txt").write_bytes(b"0123456789" * 10)
  run = lambda *args: commands.run(  # noqa: E731
    ["jaxtrain.data.convert", *args], cwd=helpers.ROOT, timeout=120,
    env=dict(os.environ, PYTHONPATH=helpers.ROOT),
  )  # fmt: skip
  out = run(f"--npz={tmp_path / 'a.npz'}", f"--out={tmp_path / 'a.array_record'}")
  assert out.returncode == 0 and "wrote 7 records" in out.stdout, out.stderr[-2000:]
  source = records.RecordSource(tmp_path / "a.array_record")
  np.testing.assert_array_equal([int(source[i]["label"]) for i in range(7)], np.arange(7))
  out = run(f"--text={tmp_path / '*.txt'}", "--length=16", f"--out={tmp_path / 't.array_record'}")
  assert out.returncode == 0 and "wrote 6 records" in out.stdout, out.stderr[-2000:]  # 101 bytes
  assert (
    bytes(records.RecordSource(tmp_path / "t.array_record")[1]["tokens"].astype(np.uint8))
    == ((b"0123456789" * 10 + b"\n")[16:33])
  )
  out = run(f"--text={tmp_path / '*.none'}", f"--out={tmp_path / 'x.array_record'}")
  assert out.returncode == 2 and out.stderr.strip().startswith("error: --text")


def _digits_records(tmp_path, digits, bad=None):
  rows = [digits.train[i] for i in range(64)]
  if bad:
    index, field, value = bad  # a value of None drops the field
    rows[index] = {k: v for k, v in {**rows[index], field: value}.items() if v is not None}
  records.write_records(tmp_path / "train.array_record", rows)
  return data.Dataset("d", records.RecordSource(tmp_path / "train.array_record"), digits.eval)


WRONG_SHAPE = "record 7 field image has shape (8, 9) dtype float32, expected shape (8, 8)"


@pytest.mark.parametrize(
  "bad,message",
  [
    ((7, "image", np.zeros((8, 9), np.float32)), WRONG_SHAPE),
    ((9, "image", np.zeros((8, 8), np.float64)), "record 9 field image has shape (8, 8) dtype f"),
    ((3, "label", np.int32(12)), "record 3 field label=12 is outside [0, 10)"),
    ((11, "label", np.int16(3)), "record 11 field label has shape () dtype int16"),
    ((13, "extra", np.float32(0)), "record 13 has fields ['extra', 'image', 'label']"),
    ((15, "label", None), "record 15 has fields ['image'], expected ['image', 'label']"),
  ],
)
def test_a_bad_record_is_named(tmp_path, digits, bad, message):
  ds = _digits_records(tmp_path, digits, bad)
  with pytest.raises(data.DataError) as e:
    checks.check_dataset(ds, num_classes={"label": 10})
  assert message in str(e.value) and "train.array_record" in str(e.value)
  assert "\n" not in str(e.value)


def test_train_stops_on_bad_data_before_writing(tmp_path, digits):
  ds = _digits_records(tmp_path, digits, (5, "image", np.zeros((8, 9), np.float32)))
  config = helpers.tiny_config()
  with pytest.raises(data.DataError, match="record 5 field image"):
    jaxtrain.train(config, helpers.mlp(), ds, losses.classification, workdir=tmp_path / "w")
  assert not (tmp_path / "w").exists()
  empty = data.Dataset("e", digits.train, data.ArraySource("x", image=np.zeros((1, 8, 8))))
  with pytest.raises(data.DataError, match="fields \\['image'\\], expected \\['image', 'label'\\]"):
    jaxtrain.train(config, helpers.mlp(), empty, losses.classification, workdir=tmp_path / "w")


def test_a_record_source_trains_like_the_arrays(tmp_path, digits):
  """The same 64 records from memory and from an ArrayRecord file give the same run."""
  arrays = data.ArraySource(
    "mem", **{k: np.stack([digits.train[i][k] for i in range(64)]) for k in ("image", "label")}
  )
  from_file = _digits_records(tmp_path, digits)
  config = helpers.tiny_config(**{"train.steps": 20, "eval.every_steps": 20})
  runs = [
    jaxtrain.train(
      config,
      helpers.mlp(),
      data.Dataset("d", src, digits.eval),
      losses.classification,
      workdir=tmp_path / name,
    )
    for name, src in (("mem", arrays), ("file", from_file.train))
  ]
  assert helpers.max_abs_diff(runs[0].state.params, runs[1].state.params) == 0


CONVERT_CASES = {
  "no flags": ([], "--out"),
  "no input": (["--out=o.ar"], "give exactly one of --npz and --text"),
  "both inputs": (["--npz=ok.npz", "--text=t.txt", "--out=o.ar"], "exactly one"),
  "missing npz": (["--npz=missing.npz", "--out=o.ar"], "--npz missing.npz: not a readable .npz"),
  "not an npz": (["--npz=t.txt", "--out=o.ar"], "--npz t.txt: not a readable .npz"),
  "object arrays": (["--npz=objects.npz", "--out=o.ar"], "not a readable .npz"),
  "no arrays": (["--npz=none.npz", "--out=o.ar"], "holds no arrays"),
  "a scalar": (["--npz=scalar.npz", "--out=o.ar"], "x has no rows"),
  "ragged arrays": (["--npz=ragged.npz", "--out=o.ar"], "arrays of different lengths"),
  "zero records": (["--npz=empty.npz", "--out=o.ar"], "no records to write"),
  "out is a folder": (["--npz=ok.npz", "--out=folder"], "must name a file"),
  "out in no folder": (["--npz=ok.npz", "--out=absent/o.ar"], "the folder absent does not exist"),
  "out exists": (["--npz=ok.npz", "--out=t.txt"], "--out t.txt exists; give a new file"),
  "too little text": (["--text=t.txt", "--out=o.ar"], "hold no window of 257"),
  "zero length": (["--text=t.txt", "--length=0", "--out=o.ar"], "--length=0 must be positive"),
  "a length that is no number": (["--text=t.txt", "--length=abc", "--out=o.ar"], "--length=abc"),
  "a glob of folders": (["--text=folder", "--out=o.ar"], "matches no file"),
  "an unknown flag": (["--npz=ok.npz", "--out=o.ar", "--bogus=1"], "bogus"),
  "a stray argument": (["--npz=ok.npz", "--out=o.ar", "extra"], "unexpected arguments extra"),
}


@pytest.mark.parametrize("name", list(CONVERT_CASES))
def test_converter_refuses_bad_input_in_one_line(name, tmp_path):
  args, expected = CONVERT_CASES[name]
  np.savez(tmp_path / "ok.npz", x=np.zeros((5, 3)), y=np.arange(5))
  np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3)))
  np.savez(tmp_path / "scalar.npz", x=np.float32(3))
  np.savez(tmp_path / "ragged.npz", x=np.zeros((5, 3)), y=np.arange(4))
  np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
  np.savez(tmp_path / "none.npz")
  (tmp_path / "t.txt").write_text("ab")
  (tmp_path / "folder").mkdir()
  before = sorted(p.name for p in tmp_path.iterdir())
  result = commands.run(["jaxtrain.data.convert", *args], cwd=tmp_path, timeout=120,
                        env=dict(os.environ, PYTHONPATH=helpers.ROOT))  # fmt: skip
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no .tmp file
  assert (tmp_path / "t.txt").read_text() == "ab"


def test_the_digits_are_scikit_learns_without_importing_it():
  code = ("import sys; from jaxtrain import data; d = data.digits(); "
          "print('sklearn' in sys.modules, len(d.train), len(d.eval))")  # fmt: skip
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=helpers.subprocess_env(), timeout=120, check=True)  # fmt: skip
  assert done.stdout.split() == ["False", "1438", "359"]
  from sklearn.datasets import load_digits  # noqa: PLC0415

  raw, ours = load_digits(), data.digits()
  order = np.random.default_rng(0).permutation(len(raw.target))[:1438]  # the train split
  expected = (raw.images[order] / 16.0).astype(np.float32)
  np.testing.assert_array_equal(ours.train.arrays["image"], expected)
  np.testing.assert_array_equal(ours.train.arrays["label"], raw.target[order].astype(np.int32))
