"""Instruction tuning SmolLM2-135M-Instruct on WordNet: the base model against LoRA and full.

    python benchmarks/sft.py [--out runs/bench_sft] [--modes lora,full] [--steps 60] [--show 4]

Runs `python -m experiments.sft --config=experiments/sft.py:MODE` for each mode,
one after another, from the repository root as a user would. Then, on the
same held-out exchanges the runs evaluate on, it computes the base model's
response loss (the loss on the answers' tokens only, as the runs' `eval/loss`),
and prints per mode: the trainable parameters, the step time (the median of
the logged windows), the steps trained, and the best held-out loss; then the
greedy answers of the base model and of each tuned one for `--show` held-out
words.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def train(mode: str, workdir: pathlib.Path, steps: int) -> None:
  """One fine-tuning run, as a user runs it (skipped if the workdir finished already)."""
  if (workdir / "run.json").is_file() and '"completed"' in (workdir / "run.json").read_text():
    return
  command = [sys.executable, "-m", "experiments.sft", f"--config=experiments/sft.py:{mode}",
             f"--workdir={workdir}", f"--config.train.steps={steps}", "--show=0"]  # fmt: skip
  subprocess.run(command, cwd=ROOT, check=True)


def summary(workdir: pathlib.Path) -> dict:
  """Trainable parameters, median step seconds, steps trained and best held-out loss of a run."""
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in lines if x["split"] == "train"]
  evals = [x["loss"] for x in lines if x["split"] == "eval"]
  run = json.loads((workdir / "run.json").read_text())
  return {
    "trainable": run.get("parameters", {}).get("trainable"),
    "step_s": statistics.median(1 / x["steps_per_sec"] for x in train[1:] or train),
    "steps": train[-1]["step"],
    "best": min(evals),
  }


def base_loss(config) -> float:
  """The base model's mean response loss over the held-out windows the runs evaluate on."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from experiments import sft  # noqa: PLC0415
  from jaxtrain import losses  # noqa: PLC0415
  from jaxtrain.models import pretrained  # noqa: PLC0415

  _, dataset, _ = sft.task(config)
  model, _, _ = pretrained.load_pretrained(config.init.source, seq_len=config.model.seq_len)
  held = dataset.eval
  loss = jax.jit(lambda batch: losses.next_token(model, batch, None)["loss"])
  per_window = []
  for start in range(0, len(held), 16):
    batch = held.read(np.arange(start, min(start + 16, len(held))))
    per_window += np.asarray(loss({k: jnp.asarray(v) for k, v in batch.items()})).tolist()
  return float(np.mean(per_window))


def main() -> None:
  """Trains each mode, then prints the table and the answers."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_sft")
  parser.add_argument("--modes", default="lora,full")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--show", type=int, default=4)
  args = parser.parse_args()
  out = ROOT / args.out
  modes = args.modes.split(",")
  for mode in modes:
    train(mode, out / mode, args.steps)

  from experiments import sft  # noqa: PLC0415

  config = sft.get_config(modes[0])
  print("| model | trainable | step (s) | steps | held-out response loss |")
  print("|---|---|---|---|---|")
  print(f"| base SmolLM2-135M-Instruct | - | - | - | {base_loss(config):.3f} |")
  for mode in modes:
    s = summary(out / mode)
    print(f"| {mode} | {s['trainable']} | {s['step_s']:.2f} | {s['steps']} | {s['best']:.3f} |")
  answers = {"base": sft.show(config.init.source, config, args.show)}
  answers.update((mode, sft.show(out / mode, config, args.show)) for mode in modes)
  for i, (asked, expected, _) in enumerate(answers["base"]):
    print(f"\n{asked}\n  WordNet: {expected}")
    for name, rows in answers.items():
      print(f"  {name}: {rows[i][2]}")


if __name__ == "__main__":
  main()
