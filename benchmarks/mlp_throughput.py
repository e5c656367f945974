"""Training throughput: jaxtrain against a hand-written jax.jit loop, Keras 3 and PyTorch.

All train the same Fashion-MNIST MLP (784-512-512-10, ReLU, Adam 1e-3, batch
128) on one device (the script refuses to run with more), in one process,
alternating runs to share the machine's noise. The hand-written loop shuffles
numpy arrays each epoch, passes each batch to a jitted, donating step and reads
the loss every 100 steps. jaxtrain
runs `train.steps_per_loop` steps per dispatch from its Grain pipeline. Both
are timed over 100-step intervals after a warm-up (compilation excluded); the
script prints each run's median interval and, over all intervals, the median
and the 90th percentile of samples/s and their ratios. On a shared machine
other load only ever slows an interval down, so the 90th percentile is the
steadier estimate of each loop's own speed. With the `bench` extra installed,
Keras 3 on the JAX backend (`model.fit`, its default one step per dispatch) and
PyTorch eager (a plain `torch.nn` loop over shuffled tensors) run the same
model and optimizer, timed the same way.

    python benchmarks/mlp_throughput.py
    python benchmarks/mlp_throughput.py --steps 1000 --repeats 2 --steps_per_loop 20
"""

import functools
import importlib.util
import itertools
import json
import os
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
from jaxtrain import data, logs, losses, models

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


def with_keras(x_train: np.ndarray, y_train: np.ndarray, steps: int) -> list[float]:
  """Keras 3 on the JAX backend: `model.fit` on the arrays, timed by a batch callback."""
  os.environ["KERAS_BACKEND"] = "jax"
  import keras  # noqa: PLC0415

  model = keras.Sequential([
    keras.Input((784,)),
    keras.layers.Dense(512, activation="relu"),
    keras.layers.Dense(512, activation="relu"),
    keras.layers.Dense(10),
  ])  # fmt: skip
  model.compile(
    keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  )
  rates, marks = [], []

  class Timer(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      if batch % _INTERVAL == 0:
        marks.append(time.perf_counter())  # Keras reads the loss each batch: synced

  n = (_WARMUP + steps) * _BATCH
  x = x_train.reshape(len(x_train), -1)[np.resize(np.arange(len(x_train)), n)]
  y = y_train[np.resize(np.arange(len(y_train)), n)]
  model.fit(x, y, batch_size=_BATCH, epochs=1, shuffle=True, verbose=0, callbacks=[Timer()])
  for a, b in itertools.pairwise(marks[_WARMUP // _INTERVAL :]):
    rates.append(_INTERVAL * _BATCH / (b - a))
  return rates


def with_torch(x_train: np.ndarray, y_train: np.ndarray, steps: int) -> list[float]:
  """PyTorch eager: the same MLP and Adam over shuffled tensors."""
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = torch.nn.Sequential(
    torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
    torch.nn.Linear(512, 10),
  )  # fmt: skip
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(x_train.reshape(len(x_train), -1).astype(np.float32))
  y = torch.from_numpy(y_train.astype(np.int64))
  per_epoch, rates, last = len(x) // _BATCH, [], None
  for i in range(_WARMUP + steps + 1):
    if i % per_epoch == 0:
      order = torch.randperm(len(x))
    if i % _INTERVAL == 0:
      now = time.perf_counter()
      if i > _WARMUP:
        rates.append(_INTERVAL * _BATCH / (now - last))
      last = now
    idx = order[(i % per_epoch) * _BATCH : (i % per_epoch + 1) * _BATCH]
    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
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
  logs.quiet_orbax_logs()
  if jax.device_count() != 1:
    raise app.UsageError(
      "compares one-device loops: expose one device, e.g. CUDA_VISIBLE_DEVICES=0"
    )
  if _STEPS.value % _INTERVAL or _INTERVAL % _K.value:
    raise app.UsageError(f"--steps must be a multiple of {_INTERVAL}, which K must divide")
  dataset = data.fashion_mnist()
  x, y = dataset.train.arrays["image"], dataset.train.arrays["label"]
  print(f"device: {jax.devices()[0].device_kind} x1, steps {_STEPS.value}, K={_K.value}")
  loops = {
    "hand-written": lambda: hand_written(x, y, _STEPS.value),
    "jaxtrain": lambda: with_jaxtrain(dataset, _STEPS.value, _K.value),
  }
  for name, module, loop in (
    ("Keras 3 (JAX)", "keras", with_keras),
    ("PyTorch", "torch", with_torch),
  ):
    if importlib.util.find_spec(module):
      loops[name] = functools.partial(loop, x, y, _STEPS.value)
    else:
      print(f"{module} is not installed (pip install -e '.[bench]'): {name} left out")
  rates = {name: [] for name in loops}
  for r in range(_REPEATS.value):
    for name, loop in loops.items():
      rates[name].append(loop())
    shown = ", ".join(f"{n} {statistics.median(v[-1]):,.0f}" for n, v in rates.items())
    print(f"run {r}: median samples/s of 100-step intervals: {shown}")
  for stat_name, stat in [("median", statistics.median), ("90th percentile", _p90)]:
    pooled = {n: stat([v for run in runs for v in run]) for n, runs in rates.items()}
    ratios = ", ".join(f"vs {n} {pooled['jaxtrain'] / v:.3f}x" for n, v in pooled.items()
                       if n != "jaxtrain")  # fmt: skip
    values = ", ".join(f"{n} {v:,.0f}" for n, v in pooled.items())
    print(f"{stat_name} of all intervals (samples/s): {values}; jaxtrain {ratios}")


def _p90(values: list[float]) -> float:
  """The 90th percentile: the rate with the machine's other load mostly absent."""
  return float(np.percentile(values, 90))


if __name__ == "__main__":
  app.run(main)
