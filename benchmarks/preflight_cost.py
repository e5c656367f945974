"""What the checks before compiling cost: `parts.prepare` against compiling the first chunk.

`train` traces the model, the loss and both steps with abstract shapes and checks every
record before it compiles anything (`jaxtrain.preflight`). This measures that against the
work it precedes, in the same process: making the state and compiling and running the
first chunk. Three models: the digits MLP, the Fashion-MNIST CNN and a byte-level
Transformer on CPython's sources.

    python benchmarks/preflight_cost.py
"""

import functools
import time

import jax

import jaxtrain
from jaxtrain import data, losses, models, parts


def _config(batch, eval_batch):
  config = jaxtrain.config.get_config()
  config.train.batch_size, config.eval.batch_size = batch, eval_batch
  config.train.steps, config.train.log_every, config.eval.every_steps = 100, 10, 0
  return config


def measure(name, config, model, dataset, loss_fn, *, repeats=3):
  """Median seconds of `prepare`, and of assembling and running the first chunk."""
  prepares, firsts = [], []
  for _ in range(repeats):
    jax.clear_caches()
    start = time.perf_counter()
    spec = parts.prepare(config, model, dataset, loss_fn)
    prepared = time.perf_counter()
    built = parts.assemble(spec)
    with built.batches() as batches:
      state, _ = built.chunk(built.state, next(batches))
      jax.block_until_ready(state)
    prepares.append(prepared - start)
    firsts.append(time.perf_counter() - prepared)
  p, f = sorted(prepares)[repeats // 2], sorted(firsts)[repeats // 2]
  print(f"| {name} | {p:.2f} s | {f:.2f} s | {p / f:.2f} |")


def main():
  print(f"devices: {jax.devices()}")
  print("| model | checks (prepare) | state + first chunk compiled and run | ratio |")
  print("| --- | --- | --- | --- |")
  digits = data.digits()
  measure("digits MLP 64-128-10, batch 64", _config(64, 128),
          functools.partial(models.MLP, 64, (128,), 10), digits, losses.classification)  # fmt: skip
  fmnist = data.fashion_mnist()
  measure("Fashion-MNIST CNN, batch 128", _config(128, 1000),
          functools.partial(models.CNN, 28, 10), fmnist, losses.classification)  # fmt: skip
  text = data.python_stdlib(256)
  measure("Transformer 256 wide, 4 blocks, context 256, batch 16", _config(16, 64),
          functools.partial(models.Transformer, 256, 256, 256, 4, 4), text,
          losses.next_token)  # fmt: skip


if __name__ == "__main__":
  main()
