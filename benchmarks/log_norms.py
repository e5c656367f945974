"""The step-time cost of `train.log_norms` (gradient, parameter and update norms).

Builds the digits MLP and the `experiments.lm` cpu-preset Transformer twice, with
`train.log_norms` off and on, and times alternating chunks of each (median of
`--chunks`), in one run:

    python benchmarks/log_norms.py
"""

import argparse
import statistics
import time

import jax
from absl import flags

import jaxtrain
from experiments import digits, lm


def timed(parts):
  """A generator of one chunk's seconds per call, on a fresh stream."""
  state = parts.state
  with parts.batches() as batches:
    while True:
      chunk = next(batches)
      jax.block_until_ready(state)
      start = time.perf_counter()
      state, metrics = parts.chunk(state, chunk)
      jax.block_until_ready(metrics)
      yield time.perf_counter() - start


def compare(name: str, config, task: tuple, chunks: int) -> float:
  runs = {}
  for on in (False, True):
    config = config.copy_and_resolve_references()
    config.train.log_norms = on
    runs[on] = timed(jaxtrain.build(config, *task[:3]))
    next(runs[on])  # compiles
  times = {False: [], True: []}
  for _ in range(chunks):
    for on in (False, True):
      times[on].append(next(runs[on]))
  off, on = (statistics.median(times[k]) for k in (False, True))
  print(f"| {name} | {off * 1e3:.2f} | {on * 1e3:.2f} | {on / off:.3f} |")
  return on / off


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunks", type=int, default=30)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); ms per chunk, median")
  print("| model | log_norms off | on | on / off |")
  print("| --- | --- | --- | --- |")
  config = digits.get_config()
  compare("digits MLP 64-128-10, batch 64, 10 steps a chunk", config, digits.task(config),
          args.chunks)  # fmt: skip
  config = lm.get_config("cpu")
  compare("LM cpu preset (0.8M), batch 32, 10 steps a chunk", config, lm.task(config),
          max(args.chunks // 3, 5))  # fmt: skip


if __name__ == "__main__":
  main()
