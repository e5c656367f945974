"""Per-device memory and step time of the language model under each `mesh.rules` preset.

Builds the `experiments.lm` model (the `cpu` preset by default) on all devices
under data parallelism, FSDP, tensor parallelism and FSDP x TP, and prints each
one's per-device parameter and optimizer bytes, its compiled chunk's peak, and
its median time per step as a ratio to data parallelism's, all in one run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py
    python benchmarks/sharding.py --config=experiments/lm.py:gpu --chunks=5  # the devices here
"""

import argparse
import statistics
import time

import jax
from absl import flags

import jaxtrain
from experiments import lm
from jaxtrain import cli, plan


def meshes(n: int, tensor: int) -> dict[str, tuple[int, int, int]]:
  """Each preset's `(data, fsdp, tensor)` sizes over `n` devices."""
  return {
    "dp": (n, 1, 1),
    "fsdp": (1, n, 1),
    "tp": (n // tensor, 1, tensor),
    "fsdp_tp": (1, n // tensor, tensor),
  }


def measure(config, task, rules: str, shape: tuple[int, int, int], chunks: int) -> dict:
  """Builds the run under `rules` on a mesh of `shape`; its bytes and median step seconds."""
  config = config.copy_and_resolve_references()
  config.mesh.rules = rules
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  model, dataset, loss = task
  parts = jaxtrain.build(config, model, dataset, loss)
  held = plan.state_bytes(parts.spec.abstract)
  times, state = [], parts.state
  with parts.batches() as batches:
    for i in range(chunks + 1):  # the first compiles
      chunk = next(batches)
      start = time.perf_counter()
      state, metrics = parts.chunk(state, chunk)
      jax.block_until_ready(metrics)
      if i:
        times.append((time.perf_counter() - start) / config.train.steps_per_loop)
  peak = parts.chunk.memory(parts.spec.abstract, chunk)["peak"]
  step = statistics.median(times)
  return {**held, "peak": peak, "step": step, "loss": float(metrics["loss"][-1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/lm.py",
                      help="the language model's FILE.py[:PRESET]")  # fmt: skip
  parser.add_argument("--chunks", type=int, default=8, help="timed chunks per preset")
  parser.add_argument("--tensor", type=int, default=2, help="the tensor axis of tp and fsdp_tp")
  parser.add_argument("--steps_per_loop", type=int, default=5)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  config = cli.check(lambda: cli.load_config(args.config))
  config.train.steps_per_loop = config.train.log_every = args.steps_per_loop
  config.model.kv_heads = max(config.model.kv_heads, args.tensor)
  task = lm.task(config)[:3]
  n = jax.device_count()
  device = jax.devices()[0]
  print(
    f"{n} {device.platform} devices ({device.device_kind}); experiments.lm --config="
    f"{args.config}, kv_heads={config.model.kv_heads}, batch {config.train.batch_size}"
  )
  rows = {rules: measure(config, task, rules, shape, args.chunks)
          for rules, shape in meshes(n, args.tensor).items()}  # fmt: skip
  dp = rows["dp"]
  mib = lambda b: b / 2**20  # noqa: E731
  print(
    "| mesh.rules | mesh (data, fsdp, tensor) | params MiB/device | optimizer MiB/device "
    "| peak MiB/device | ms/step | step time vs dp |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for (rules, shape), r in zip(meshes(n, args.tensor).items(), rows.values(), strict=True):
    print(
      f"| {rules} | {shape} | {mib(r['params']):.2f} | {mib(r['opt_state']):.2f} | "
      f"{mib(r['peak']):.1f} | {r['step'] * 1e3:.1f} | {r['step'] / dp['step']:.2f}x |"
    )
  spread = max(abs(r["loss"] - dp["loss"]) for r in rows.values())
  print(f"largest difference of the last loss from dp's: {spread:.2e}")


if __name__ == "__main__":
  main()
