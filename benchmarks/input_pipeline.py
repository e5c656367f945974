"""Input pipeline rates against what training consumes.

1. Fashion-MNIST with augmentation (crop after 2 pixels of padding, flip): the
   pipeline's standalone rate (samples/s, reading chunks as fast as it can with
   `--workers` Grain workers), then a full-speed CNN run with the same pipeline,
   its samples/s and its `data_wait_frac` (the share of the loop's time spent
   waiting for data).
2. ArrayRecord reads: one chunk's records (1,280, at random) in one batch read,
   record by record, and record by record in the earlier `np.savez` format.
   Then the automatic choice, `data.workers=-1`, on the same augmented pipeline:
   for the CNN and the (much faster) MLP on arrays and the MLP on ArrayRecord,
   the workers it picks from its measured rates, the run's samples/s and
   `data_wait_frac`; and the last run again with 0 and with 2 workers.
3. Byte-level text (this Python's standard library, windows of 256): the
   pipeline's standalone rate against the samples/s a small Transformer's train
   step consumes (vocabulary 256, width 128, 2 blocks, batch 32).
4. Packed token shards (the whole standard library tokenized as bytes by
   `jaxtrain.data.tokenize`, windows of 1,024 as the `gpu` preset reads them,
   batch 64): tokens/s the packed pipeline delivers, `concat` and `pad`, with 0
   and `--workers` workers, against the 330,000 tokens/s the `gpu` preset
   consumes at 45% MFU of an H100.

    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --steps 300 --workers 2
    python benchmarks/input_pipeline.py --only_tokens
"""

import functools
import io
import json
import pathlib
import sysconfig
import tempfile
import time

import jax
import numpy as np
import optax
from absl import app, flags
from array_record.python import array_record_module

import jaxtrain
from jaxtrain import data, logs, losses, models, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import pipeline, tokenize, transforms

_STEPS = flags.DEFINE_integer("steps", 300, "CNN training steps (after 20 of warm-up).")
_MLP_STEPS = flags.DEFINE_integer("mlp_steps", 2000, "MLP training steps (after 20 of warm-up).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes for the image pipeline.")
_ONLY_TOKENS = flags.DEFINE_bool("only_tokens", False, "Measure only the packed token shards.")
_K = 10
_BATCH = 128
GPU_PRESET_TOKENS_PER_SEC = 330_000  # the gpu preset at 45% MFU of an H100 (989 TFLOP/s bf16)


def standalone_rate(source, batch_size, chunks, workers, transform=None):
  """Samples/s of reading `chunks` chunks of `_K` batches, after one to warm up."""
  it = iter(
    pipeline.train_chunks(
      source,
      batch_size=batch_size,
      seed=0,
      steps_per_loop=_K,
      rows=(0, batch_size),
      workers=workers,
      transform=transform,
    )
  )
  next(it)
  start = time.perf_counter()
  for _ in range(chunks):
    next(it)
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return chunks * _K * batch_size / seconds


def image_run(dataset, steps, workers, model_name="cnn"):
  """A full-speed run with augmentation.

  Returns:
    Its median samples/s and mean data_wait_frac after 20 steps of warm-up, and
    run.json's `data_workers` (the automatic choice; None without it).
  """
  from experiments import fashion_mnist  # noqa: PLC0415

  config = fashion_mnist.get_config()
  config.model.name = model_name
  config.train.steps = 20 + steps
  config.train.log_every = 10
  config.eval.every_steps = 0
  config.ckpt.every_steps = 0
  config.mesh.data = 1
  config.data.workers = workers
  config.data.crop_padding, config.data.flip = 2, True
  model = fashion_mnist.make_model(config.model)
  with tempfile.TemporaryDirectory() as workdir:
    jaxtrain.train(config, model, dataset, losses.classification, workdir=workdir)
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    chosen = json.loads((pathlib.Path(workdir) / "run.json").read_text()).get("data_workers")
  lines = [x for x in lines if x["split"] == "train" and x["step"] > 20]
  rate = np.median([x["samples_per_sec"] for x in lines])
  return rate, np.mean([x["data_wait_frac"] for x in lines]), chosen


def records_copy(dataset, directory):
  """Fashion-MNIST's train split as an ArrayRecord file, each record decoded on its own."""
  path = pathlib.Path(directory) / "train.array_record"
  arrays = dataset.train.arrays
  rows = ({k: v[i] for k, v in arrays.items()} for i in range(len(dataset.train)))
  data.write_records(path, rows)
  return data.Dataset(dataset.name, data.RecordSource(path), dataset.eval)


def npz_copy(dataset, directory):
  """The same file in the earlier record format, `np.savez` bytes, which is still read."""
  path = pathlib.Path(directory) / "train_npz.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  arrays = dataset.train.arrays
  for i in range(len(dataset.train)):
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v[i] for k, v in arrays.items()})
    writer.write(buffer.getvalue())
  writer.close()
  return data.RecordSource(path)


def record_reads(records, npz, count=_K * _BATCH, repeats=5):
  """Prints the median milliseconds to read one chunk's records, three ways."""
  indices = np.random.default_rng(0).permutation(len(records))[:count]
  ways = {
    "one batch read": lambda: records.read(indices),
    "record by record": lambda: [records[int(i)] for i in indices],
    "record by record, np.savez format": lambda: [npz[int(i)] for i in indices],
  }
  for label, fn in ways.items():
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      seconds.append(time.perf_counter() - start)
    print(f"ArrayRecord, {count:,} random records, {label}: {np.median(seconds) * 1e3:.1f} ms")


def auto_choice(dataset, steps, mlp_steps):
  """Prints what `data.workers=-1` picks, and what it gives, for three input-to-compute balances.

  For the MLP on ArrayRecord, the slowest reader, it also prints the samples/s
  of the same run with 0 and with 2 workers, against which the choice is judged.
  """
  with tempfile.TemporaryDirectory() as directory:
    records = records_copy(dataset, directory)
    record_reads(records.train, npz_copy(dataset, directory))
    cases = [("CNN", "cnn", dataset, steps), ("MLP", "mlp", dataset, mlp_steps)]
    cases.append(("MLP, ArrayRecord", "mlp", records, mlp_steps))
    for label, model_name, source, n in cases:
      rate, wait, chosen = image_run(source, n, -1, model_name)
      print(
        f"{label}, data.workers=-1: {chosen['workers']} workers at step {chosen['at_step']} "
        f"(a chunk reads in {chosen['read_s'] * 1e3:.1f} ms, puts in "
        f"{chosen['put_s'] * 1e3:.1f} ms, trains in {chosen['train_s'] * 1e3:.1f} ms): "
        f"{rate:,.0f} samples/s, data_wait_frac {wait:.4f}"
      )
    for workers in (0, 2):
      fixed, wait, _ = image_run(records, mlp_steps, workers, "mlp")
      print(
        f"MLP, ArrayRecord, data.workers={workers}: {fixed:,.0f} samples/s, data_wait_frac "
        f"{wait:.4f}; auto/this {rate / fixed:.2f}x"
      )


def transformer_rate(batch_size=32, length=256, steps=20):
  """Samples/s the small Transformer's jitted train step consumes."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = optax.adam(1e-3)
  model = functools.partial(models.Transformer, 256, length, 128, 2, 4)
  graphdef, state = state_lib.create_state(model, tx, seed=0, mesh=mesh)
  step = jax.jit(
    functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=losses.next_token),
    donate_argnums=0,
  )
  batch = {"tokens": np.zeros((batch_size, length + 1), np.int32)}
  state, m = step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return steps * batch_size / (time.perf_counter() - start)


def packed_tokens(workers: int) -> None:
  """Section 4: the packed pipeline's tokens/s against the gpu preset's consumption."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    summary = tokenize.tokenize([f"{stdlib}/**/*.py"], "bytes", folder, skip_binary=True)
    print(f"tokenized in {time.perf_counter() - started:.1f} s: {summary}")
    shards = data.Shards(folder)
    for packing in ("concat", "pad"):
      source = data.Packed(shards, 1024, packing)
      for n in sorted({0, workers}):
        rate = standalone_rate(source, 64, 20, n) * 1024
        print(f"packed shards, {packing}, {n} workers: {rate:,.0f} tokens/s standalone, "
              f"{rate / GPU_PRESET_TOKENS_PER_SEC:.1f}x the gpu preset's "
              f"{GPU_PRESET_TOKENS_PER_SEC:,} at 45% MFU of an H100")  # fmt: skip


def main(argv):
  del argv
  logs.quiet_orbax_logs()
  if jax.device_count() != 1:
    raise app.UsageError("measures one device: expose one device")
  if _ONLY_TOKENS.value:
    packed_tokens(_WORKERS.value)
    return
  fashion = data.fashion_mnist()
  augment = transforms.Augment(padding=2, flip=True)
  rate = standalone_rate(fashion.train, _BATCH, 30, _WORKERS.value, augment)
  consumed, wait, _ = image_run(fashion, _STEPS.value, _WORKERS.value)
  print(f"image pipeline, {_WORKERS.value} workers, crop+flip: {rate:,.0f} samples/s standalone")
  print(
    f"CNN training consumes {consumed:,.0f} samples/s: pipeline/consumption {rate / consumed:.1f}x,"
    f" data_wait_frac {wait:.4f}"
  )
  auto_choice(fashion, _STEPS.value, _MLP_STEPS.value)
  text = data.python_stdlib(length=256)
  text_rate = standalone_rate(text.train, 32, 50, 0)
  step_rate = transformer_rate()
  print(
    f"byte text pipeline: {text_rate:,.0f} samples/s standalone; Transformer step consumes "
    f"{step_rate:,.0f} samples/s: ratio {text_rate / step_rate:.1f}x"
  )
  packed_tokens(_WORKERS.value)


if __name__ == "__main__":
  app.run(main)
