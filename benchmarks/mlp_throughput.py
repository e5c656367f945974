"""Training throughput: jaxtrain against a minimal hand-written jax.jit + optax loop.

Both train the same Fashion-MNIST MLP (784-512-512-10, ReLU, Adam 1e-3, batch
128) on one device (the script refuses to run with more), in one process,
alternating runs to share the machine's noise. The hand-written loop shuffles
numpy arrays each epoch, passes each batch to a jitted, donating step and reads
the loss every 100 steps. jaxtrain
runs `train.steps_per_loop` steps per dispatch from its Grain pipeline. Both
are timed over 100-step intervals after a warm-up (compilation excluded); the
script prints each run's median interval and, over all intervals, the median
and the 90th percentile of samples/s and their ratios. On a shared machine
other load only ever slows an interval down, so the 90th percentile is the
steadier estimate of each loop's own speed.

    python benchmarks/mlp_throughput.py
    python benchmarks/mlp_throughput.py --steps 1000 --repeats 2 --steps_per_loop 20
"""

import functools
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import jaxtrain
from jaxtrain import cli, data, losses, models

_STEPS = flags.DEFINE_integer("steps", 1000, "Timed steps per run.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Alternating runs of each loop.")
_K = flags.DEFINE_integer("steps_per_loop", 10, "jaxtrain's steps per dispatch.")
_BATCH = 128
_WARMUP = 100
_INTERVAL = 100


def hand_written(x_train: np.ndarray, y_train: np.ndarray, steps: int) -> list[float]:
  """Returns the samples/s of each 100-step interval of a plain jit + optax loop."""
  sizes = [784, 512, 512, 10]
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  init = jax.nn.initializers.lecun_normal()
  params = [
    {"w": init(k, (a, b)), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  per_epoch = len(x_train) // _BATCH
  rates, last, loss = [], None, None
  for i in range(_WARMUP + steps + 1):
    if i % per_epoch == 0:
      order = rng.permutation(len(x_train))
    if i % _INTERVAL == 0:  # the loop's periodic loss read, a sync point
      if loss is not None:
        float(loss)
      now = time.perf_counter()
      if i > _WARMUP:
        rates.append(_INTERVAL * _BATCH / (now - last))
      last = now
    idx = order[(i % per_epoch) * _BATCH : (i % per_epoch + 1) * _BATCH]
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
  return rates


def with_jaxtrain(dataset: data.Dataset, steps: int, k: int) -> list[float]:
  """Returns jaxtrain's samples/s of each logged interval, from its own log lines."""
  config = jaxtrain.config.get_config()
  log_every = _INTERVAL
  config.train.steps = _WARMUP + steps
  config.train.batch_size = _BATCH
  config.train.steps_per_loop = k
  config.train.log_every = log_every
  config.eval.every_steps = 0
  config.eval.batch_size = 1000
  config.mesh.data = 1
  config.ckpt.every_steps = 0  # one save, after the last timed interval
  model = functools.partial(models.MLP, 784, (512, 512), 10)
  with tempfile.TemporaryDirectory() as workdir:
    jaxtrain.train(config, model, dataset, losses.classification, workdir=workdir)
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").open()]
  return [x["samples_per_sec"] for x in lines if x["split"] == "train" and x["step"] > _WARMUP]


def main(argv: list[str]) -> None:
  """Alternates both loops and prints samples/s and the ratio."""
  del argv
  cli.quiet_orbax_logs()
  if jax.device_count() != 1:
    raise app.UsageError(
      "compares one-device loops: expose one device, e.g. CUDA_VISIBLE_DEVICES=0"
    )
  if _STEPS.value % _INTERVAL or _INTERVAL % _K.value:
    raise app.UsageError(f"--steps must be a multiple of {_INTERVAL}, which K must divide")
  dataset = data.fashion_mnist()
  x, y = dataset.train.arrays["image"], dataset.train.arrays["label"]
  print(f"device: {jax.devices()[0].device_kind} x1, steps {_STEPS.value}, K={_K.value}")
  base, ours = [], []
  for r in range(_REPEATS.value):
    base.append(hand_written(x, y, _STEPS.value))
    ours.append(with_jaxtrain(dataset, _STEPS.value, _K.value))
    b, o = statistics.median(base[-1]), statistics.median(ours[-1])
    print(
      f"run {r}: median of 100-step intervals: hand-written {b:,.0f} samples/s, "
      f"jaxtrain {o:,.0f} samples/s, ratio {o / b:.3f}"
    )
  base_all = [v for run in base for v in run]
  ours_all = [v for run in ours for v in run]
  for name, stat in [("median", statistics.median), ("90th percentile", _p90)]:
    b, o = stat(base_all), stat(ours_all)
    print(
      f"{name} of all {len(base_all)} intervals: hand-written {b:,.0f} samples/s, "
      f"jaxtrain {o:,.0f} samples/s, ratio jaxtrain/hand-written {o / b:.3f}"
    )


def _p90(values: list[float]) -> float:
  """The 90th percentile: the rate with the machine's other load mostly absent."""
  return float(np.percentile(values, 90))


if __name__ == "__main__":
  app.run(main)
