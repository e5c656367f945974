"""Checkpoint overhead: a run saving every 100 steps (async) against the same run without.

Both train a Fashion-MNIST model with jaxtrain (Adam, batch 128), alternating
runs in one process: `--model=cnn` (2 conv blocks and a dense head, 0.8 M
parameters, about 50 ms a step here) or `--model=mlp` (784-512-512-10, 0.7 M
parameters, under 4 ms a step: the worst case, a save every 0.4 s). One run
saves a checkpoint every 100 steps with asynchronous writes
(`ckpt.every_steps=100`, `ckpt.async=True`); the other saves only after its
last step, outside the timed part (`ckpt.every_steps=0`). Each 100-step
interval of the first holds one save: the state's device copy and checksum,
Orbax's blocking part (which runs while the next chunk trains) and its
background writing, all competing with training for the CPU. The script
prints the step-time ratio, with checkpoints over without, by the median
interval and by total time.

    python benchmarks/checkpoint_overhead.py --model=cnn --steps 500 --repeats 3
    python benchmarks/checkpoint_overhead.py --model=mlp
"""

import functools
import itertools
import json
import pathlib
import statistics
import tempfile

import numpy as np
from absl import app, flags

import jaxtrain
from jaxtrain import data, logs, losses, models

_STEPS = flags.DEFINE_integer("steps", 1000, "Timed steps per run (a multiple of 100).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating runs of each kind.")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp"], "The model to train.")
MODELS = {
  "cnn": functools.partial(models.CNN, 28, 10),
  "mlp": functools.partial(models.MLP, 784, (512, 512), 10),
}
_WARMUP = 100
_INTERVAL = 100


def step_times(dataset: data.Dataset, steps: int, every: int) -> list[float]:
  """Returns the seconds per step of each timed 100-step interval of one run."""
  config = jaxtrain.config.get_config()
  config.train.steps = _WARMUP + steps
  config.train.batch_size = 128
  config.train.log_every = _INTERVAL
  config.eval.every_steps = 0
  config.eval.batch_size = 1000
  config.ckpt.every_steps = every
  config.ckpt.keep = 3
  with tempfile.TemporaryDirectory() as workdir:
    jaxtrain.train(config, MODELS[_MODEL.value], dataset, losses.classification, workdir=workdir)
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    saved = sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir())
  assert every == 0 or saved[-1] == config.train.steps, saved
  return [1 / x["steps_per_sec"] for x in lines if x["split"] == "train" and x["step"] > _WARMUP]


def main(argv: list[str]) -> None:
  """Alternates runs with and without checkpoints and prints the step-time ratio."""
  del argv
  logs.quiet_orbax_logs()
  if _STEPS.value % _INTERVAL:
    raise app.UsageError(f"--steps must be a multiple of {_INTERVAL}")
  dataset = data.fashion_mnist()
  without, with_ckpt = [], []
  for r in range(_REPEATS.value):
    without.append(step_times(dataset, _STEPS.value, every=0))
    with_ckpt.append(step_times(dataset, _STEPS.value, every=_INTERVAL))
    print(
      f"run {r}: median ms/step without {1e3 * statistics.median(without[-1]):.3f}, "
      f"with {1e3 * statistics.median(with_ckpt[-1]):.3f}"
    )
  without, with_ckpt = [*itertools.chain(*without)], [*itertools.chain(*with_ckpt)]
  median = statistics.median(with_ckpt) / statistics.median(without)
  total = float(np.sum(with_ckpt) / np.sum(without))
  print(
    f"{_MODEL.value}: step-time ratio, saving every {_INTERVAL} steps (async) / none: "
    f"median interval {median:.3f}, total time {total:.3f} ({len(with_ckpt)} intervals each)"
  )


if __name__ == "__main__":
  app.run(main)
