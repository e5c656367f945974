"""Image transforms: exact crops and flips, seeded by stream position, the same with workers."""

import json

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses
from jaxtrain.data import pipeline, transforms
from jaxtrain.evaluate import Evaluator
from tests import helpers


def test_crop_flip_moves_pixels_exactly():
  images = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5) + 1
  hashes = transforms.record_hash(3, np.array([10, 11]))
  out = transforms.crop_flip(images, hashes, padding=2, flip=True)
  for i in range(2):
    h = int(hashes[i])
    dy, dx, flip = h % 5, (h >> 16) % 5, h >> 63
    padded = np.pad(images[i], 2)
    want = padded[dy : dy + 4, dx : dx + 5]
    np.testing.assert_array_equal(out[i], want[:, ::-1] if flip else want)
  assert out.shape == images.shape


def test_hashes_cover_offsets_and_flips_evenly():
  hashes = transforms.record_hash(0, np.arange(20_000))
  offsets = np.bincount((hashes % np.uint64(9)).astype(int), minlength=9) / 20_000
  flips = float(((hashes >> np.uint64(63)) & np.uint64(1)).mean())
  assert np.all(np.abs(offsets - 1 / 9) < 0.01) and abs(flips - 0.5) < 0.02
  assert not np.array_equal(hashes, transforms.record_hash(1, np.arange(20_000)))


def test_augmented_chunks_do_not_depend_on_workers_or_order(digits):
  augment = transforms.Augment(padding=2, flip=True, mean=0.3, std=0.4)
  make = lambda workers: iter(  # noqa: E731
    pipeline.train_chunks(
      digits.train, batch_size=32, seed=5, steps_per_loop=4, rows=(0, 32), workers=workers,
      transform=augment,
    )
  )  # fmt: skip
  plain, with_workers = make(0), make(2)
  chunks = [next(plain) for _ in range(3)]
  try:
    for chunk in chunks:
      np.testing.assert_array_equal(chunk["image"], next(with_workers)["image"])
  finally:
    with_workers.close()
  direct = pipeline.TrainChunks(
    digits.train, batch_size=32, seed=5, rows=(0, 32), steps_per_loop=4, transform=augment
  )
  np.testing.assert_array_equal(direct(2)["image"], chunks[2]["image"])  # any chunk alone
  raw = pipeline.TrainChunks(digits.train, batch_size=32, seed=5, rows=(0, 32), steps_per_loop=4)
  assert not np.allclose(raw(0)["image"], chunks[0]["image"])
  np.testing.assert_array_equal(raw(0)["label"], chunks[0]["label"])


def test_config_augmentation_trains_and_normalizes_eval_too(tmp_path, digits):
  """Eval inputs get the train statistics too: unnormalised, they would score far lower."""
  config = helpers.tiny_config(
    **{
      "data.crop_padding": 1,
      "data.normalize": True,
      "train.steps": 200,
      "eval.every_steps": 100,
      "optim.lr": 1e-2,
    }
  )
  result = jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)
  mean, std = transforms.image_stats(digits.train)
  assert 0.2 < mean < 0.4 and 0.3 < std < 0.5
  evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in evals if x["split"] == "eval"] == [100, 200]
  assert result.eval_metrics["accuracy"] > 0.9
  shardings = jax.tree.map(lambda x: x.sharding, result.state)
  mesh = jax.tree.leaves(shardings)[0].mesh
  raw = Evaluator(
    result.graphdef, losses.classification, digits.eval, batch_size=64, shardings=shardings,
    mesh=mesh,
  )(result.state)  # fmt: skip
  assert raw["accuracy"] < result.eval_metrics["accuracy"] - 0.05


@pytest.mark.parametrize("value", [-1])
def test_negative_padding_is_refused(value):
  config = helpers.tiny_config(**{"data.crop_padding": value})
  with pytest.raises(jaxtrain.ConfigError, match=r"data\.crop_padding=-1 must not be negative"):
    jaxtrain.parts.validate(config, 8)


def test_resume_mid_epoch_with_workers_sees_the_same_batches(tmp_path, digits):
  """Two Grain workers and augmentation: stop at step 20 (of a 45-step epoch), resume to 60."""
  base = {"data.workers": 2, "data.crop_padding": 1, "eval.every_steps": 20, "ckpt.every_steps": 20}
  run = lambda steps, workdir, **extra: jaxtrain.train(  # noqa: E731
    helpers.tiny_config(**{**base, "train.steps": steps, **extra}),
    helpers.mlp(), digits, losses.classification, workdir=workdir,
  )  # fmt: skip
  whole = run(60, tmp_path / "whole")
  run(20, tmp_path / "resumed")
  resumed = run(60, tmp_path / "resumed")
  in_process = run(60, tmp_path / "in_process", **{"data.workers": 0})
  assert json.loads((tmp_path / "resumed" / "run.json").read_text())["resumed_from"] == 20
  assert helpers.max_abs_diff(resumed.state.params, whole.state.params) == 0
  assert helpers.max_abs_diff(in_process.state.params, whole.state.params) == 0
