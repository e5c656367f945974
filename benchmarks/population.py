"""P vmapped population members against P sequential runs of the same model, in one process.

    python benchmarks/population.py
    python benchmarks/population.py --members 8 --hidden 128 --hidden 512,512

For each MLP width on digits (batch 64, Adam with P learning rates), it
measures two things: the whole job, `population.train` against P calls of
`jaxtrain.train` (each compiles, evaluates and checkpoints, as a sweep's trials
do), and the steady state, member steps per second of the compiled population
chunk against the steps per second of one run's chunk (compilation left out,
median of timed windows). Ratios above 1 favour the population.
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import flags

from experiments import digits
from jaxtrain import build, loop, population

flags.FLAGS.mark_as_parsed()


def config_for(hidden: tuple[int, ...], steps: int):
  config = digits.get_config()
  config.model.hidden = hidden
  config.train.steps, config.eval.every_steps, config.train.log_every = steps, steps // 3, 100
  config.ckpt.every_steps = steps // 3
  return config


def members(size: int) -> list[dict[str, float]]:
  return [{"optim.lr": float(lr)} for lr in np.geomspace(3e-4, 1e-2, size)]


def whole_jobs(config, size: int) -> tuple[float, float]:
  """Seconds for P sequential `train` runs, and for one population of P."""
  model, data, loss = digits.task(config)
  configs = population.member_configs(config, members(size))
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for i, member in enumerate(configs):
      loop.train(member, *digits.task(member), workdir=f"{tmp}/run{i}")
  sequential = time.perf_counter() - start
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    population.train(config, model, data, loss, members(size), workdir=f"{tmp}/pop")
  return sequential, time.perf_counter() - start


def _timed(call, state, batches, windows: int) -> float:
  """Median seconds per call over `windows` calls, after two warm-up calls."""
  for _ in range(2):
    state = call(state, batches)
  jax.block_until_ready(state)
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    state = call(state, batches)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def steady(config, size: int, windows: int) -> tuple[float, float]:
  """Steps per second of one run's chunk, and member steps per second of the population's."""
  model, data, loss = digits.task(config)
  parts = build(config, model, data, loss)
  with parts.batches() as stream:
    batches = next(stream)
  one = _timed(lambda s, b: parts.chunk(s, b)[0], parts.state, batches, windows)
  configs = population.member_configs(config, members(size))
  program = population.program(configs, model, data, loss)
  states = program.initial(configs)
  active = jax.numpy.ones((size,), bool)
  many = _timed(lambda s, b: program.chunk(s, b, active)[0], states, batches, windows)
  k = config.train.steps_per_loop
  return k / one, size * k / many


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=8)
  parser.add_argument("--hidden", action="append", help="comma-separated widths")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--windows", type=int, default=30)
  args = parser.parse_args()
  p = args.members
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s); P={p} members, "
        f"{args.steps} steps of batch 64 each")  # fmt: skip
  print(f"| MLP hidden | {p} runs (s) | population (s) | whole job | run steps/s "
        f"| population member steps/s | steady state |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for text in args.hidden or ["128", "1024,1024"]:
    hidden = tuple(int(w) for w in text.split(","))
    config = config_for(hidden, args.steps)
    sequential, together = whole_jobs(config, p)
    alone, members_rate = steady(config, p, args.windows)
    print(f"| {text} | {sequential:.1f} | {together:.1f} | {sequential / together:.2f}x "
          f"| {alone:,.0f} | {members_rate:,.0f} | {members_rate / alone:.2f}x |")  # fmt: skip


if __name__ == "__main__":
  main()
