"""Data: exact eval passes, seeded global batches, IDX files, Fashion-MNIST."""

import functools
import gzip
import http.server
import pathlib
import shutil
import threading

import jax
import numpy as np
import pytest

from jaxtrain import data, evaluate, sharding
from jaxtrain import state as state_lib
from jaxtrain.data import pipeline
from tests import helpers


@pytest.mark.parametrize("n", [1, 37, 64, 65, 130])
def test_eval_counts_each_example_once(n):
  mesh = helpers.mesh((8, 1, 1))
  ids = np.arange(n, dtype=np.float32)
  source = data.ArraySource("ids", image=np.zeros((n, 8, 8), np.float32), id=ids)

  def loss_fn(model, batch, rngs):
    del model, rngs
    return {"loss": batch["id"], "id_sq": batch["id"] ** 2}

  graphdef, state = state_lib.create_state(helpers.mlp(), helpers.adam(), seed=0, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  evaluator = evaluate.Evaluator(
    graphdef, loss_fn, source, batch_size=16, shardings=shardings, mesh=mesh
  )
  sums = evaluator.sums(state)
  assert sums["count"] == n
  assert sums["loss"] == ids.sum()
  assert sums["id_sq"] == (ids**2).sum()
  assert evaluator(state)["loss"] == pytest.approx(ids.mean())


def test_eval_batches_pad_and_mask():
  source = data.ArraySource("ids", id=np.arange(10))
  batches = list(pipeline.eval_batches(source, batch_size=4, rows=(0, 4)))
  assert len(batches) == 3
  assert batches[2]["id"].tolist() == [8, 9, 0, 0]
  assert batches[2]["mask"].tolist() == [1, 1, 0, 0]


def _batches(source, b, seed, rows, count):
  chunks = pipeline.TrainChunks(source, batch_size=b, seed=seed, rows=rows, steps_per_loop=count)
  return chunks(0)["id"]


def test_global_batches_split_over_processes_and_cover_epochs():
  n, b = 64, 16
  source = data.ArraySource("ids", id=np.arange(n))
  whole = _batches(source, b, 3, (0, b), 10)
  halves = [_batches(source, b, 3, r, 10) for r in [(0, 8), (8, 16)]]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
  epoch0, epoch1 = whole[:4].ravel(), whole[4:8].ravel()
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))
  assert epoch0.tolist() != epoch1.tolist()  # each epoch is shuffled anew
  assert _batches(source, b, 4, (0, b), 1).tolist() != whole[:1].tolist()


def test_chunks_are_consecutive_batches():
  source = data.ArraySource("ids", id=np.arange(50))
  by_three = pipeline.TrainChunks(source, batch_size=4, seed=0, rows=(0, 4), steps_per_loop=3)
  by_one = pipeline.TrainChunks(source, batch_size=4, seed=0, rows=(0, 4), steps_per_loop=1)
  joined = np.concatenate([by_three(c)["id"] for c in range(4)])
  np.testing.assert_array_equal(joined, np.concatenate([by_one(c)["id"] for c in range(12)]))


def test_batches_straddle_epochs_without_loss():
  source = data.ArraySource("ids", id=np.arange(10))
  stream = _batches(source, 4, 0, (0, 4), 5).ravel()  # 20 = two epochs
  assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))


def test_train_chunks_shape_and_workers_agree():
  source = data.ArraySource("ids", id=np.arange(100), x=np.arange(100.0)[:, None] * [1, 2])
  make = functools.partial(
    pipeline.train_chunks, source, batch_size=8, seed=0, steps_per_loop=3, rows=(0, 8)
  )
  in_process = iter(make())
  with_workers = iter(make(workers=2))
  for _ in range(4):
    a, b = next(in_process), next(with_workers)
    assert a["x"].shape == (3, 8, 2)
    np.testing.assert_array_equal(a["x"], a["id"][..., None] * [1, 2])  # fields stay paired
    for key in ("id", "x"):
      np.testing.assert_array_equal(a[key], b[key])


def test_put_batch_single_process_rows():
  mesh = helpers.mesh((2, 4, 1))
  assert sharding.process_rows(mesh, 16) == (0, 16)
  chunk = {"x": np.arange(3 * 16 * 2, dtype=np.float32).reshape(3, 16, 2)}
  placed = sharding.put_batch(chunk, mesh, 16, leading_dims=1)
  np.testing.assert_array_equal(np.asarray(placed["x"]), chunk["x"])
  assert placed["x"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


def _write_idx(path, array, code=0x08):
  header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  if path.suffix == ".gz":
    with gzip.open(path, "wb") as f:
      f.write(raw)
  else:
    path.write_bytes(raw)


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_read_idx_round_trip(tmp_path, name):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / name, array)
  np.testing.assert_array_equal(data.read_idx(tmp_path / name), array)
  floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
  _write_idx(tmp_path / "f.idx", floats, code=0x0D)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx"), floats)


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(data.DataError, match="bad magic"):
    data.read_idx(tmp_path / "bad")
  _write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
  (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
  with pytest.raises(data.DataError, match="header says shape"):
    data.read_idx(tmp_path / "short")


def test_array_source_rejects_bad_input():
  with pytest.raises(data.DataError, match="different lengths"):
    data.ArraySource("s", a=np.zeros(3), b=np.zeros(4))
  with pytest.raises(data.DataError, match="is empty"):
    data.ArraySource("s", a=np.zeros((0, 2)))
  with pytest.raises(data.DataError, match="record 2 field label=10"):
    data.check_labels(data.ArraySource("s", label=np.array([0, 9, 10, 3])), 10)


DEBIAN = pathlib.Path(data.sources.DEBIAN_DIR)
needs_debian = pytest.mark.skipif(
  not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@needs_debian
def test_fashion_mnist_from_debian_package(tmp_path):
  ds = data.fashion_mnist(cache_dir=str(tmp_path))
  assert ds.train.arrays["image"].shape == (60000, 28, 28)
  assert ds.eval.arrays["image"].shape == (10000, 28, 28)
  assert np.bincount(ds.train.arrays["label"]).tolist() == [6000] * 10
  assert np.bincount(ds.eval.arrays["label"]).tolist() == [1000] * 10
  assert 0.0 <= ds.train.arrays["image"].min() < ds.train.arrays["image"].max() <= 1.0


@pytest.fixture
def file_server(tmp_path):
  """Serves tmp_path/"site" over HTTP on 127.0.0.1."""
  site = tmp_path / "site"
  site.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield site, f"http://127.0.0.1:{server.server_port}/"
  server.shutdown()


@needs_debian
def test_fashion_mnist_download_is_checked_and_cached(tmp_path, file_server, monkeypatch):
  site, url = file_server
  for f in DEBIAN.iterdir():
    shutil.copy(f, site / f.name)
  monkeypatch.setattr(data.sources, "DEBIAN_DIR", str(tmp_path / "absent"))
  cache = tmp_path / "cache"
  ds = data.fashion_mnist(cache_dir=str(cache), url=url)
  assert len(ds.train) == 60000
  assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in DEBIAN.iterdir())

  # A corrupt download is rejected and leaves nothing behind in the cache.
  bad_cache = tmp_path / "bad_cache"
  with gzip.open(DEBIAN / "t10k-labels-idx1-ubyte.gz") as f:
    raw = f.read()
  with gzip.open(site / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(raw[:-1] + bytes([(raw[-1] + 1) % 10]))
  with pytest.raises(data.DataError, match="sha256"):
    data.fashion_mnist(cache_dir=str(bad_cache), url=url)
  kept = {p.name for p in bad_cache.iterdir()}  # the three good files, nothing partial
  assert kept == {p.name for p in DEBIAN.iterdir()} - {"t10k-labels-idx1-ubyte.gz"}


def test_fashion_mnist_absent_and_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(data.sources, "DEBIAN_DIR", str(tmp_path / "absent"))
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
    data.fashion_mnist(cache_dir=str(tmp_path / "cache"), url="http://127.0.0.1:9/")


def test_prefetcher_passes_on_errors_and_stops():
  def chunks():
    yield 1
    yield 2
    raise ValueError("record 7 is broken")

  with pipeline.Prefetcher(chunks(), lambda c: c * 10) as prefetch:
    assert next(prefetch) == 10
    assert next(prefetch) == 20
    assert prefetch.waited >= 0
    with pytest.raises(ValueError, match="record 7"):
      next(prefetch)

  endless = pipeline.Prefetcher(iter(range(10**9)), lambda c: c, size=1)
  assert next(endless) == 0
  endless.close()  # the thread is blocked on the full queue and must still stop
  assert not endless._thread.is_alive()
