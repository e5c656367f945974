r"""Optimizers compared on the Fashion-MNIST CNN, each at its best learning rate.

Adam, AdamW, RMSprop, AdaGrad and SGD with momentum train the same CNN for the
same steps on a cosine schedule with a short warm-up. Each runs at every
learning rate of its grid (`GRID`, chosen so that each optimizer's best rate
lies inside it); the table reports the best rate's final test
accuracy and the steps it took to reach `--target` accuracy, and is written to
`WORKDIR/table.md`. Each run has its own workdir below `WORKDIR`, so rerunning
the command resumes unfinished runs and skips finished ones.

    python -m experiments.optimizers --workdir runs/optimizers
    python -m experiments.optimizers --workdir runs/opt_quick --optimizers=adam,sgd \
      --config.train.steps=470
"""

import json
import pathlib

import ml_collections
from absl import flags

from experiments import fashion_mnist
from jaxtrain import cli, logs
from jaxtrain import workdir as workdir_lib

# Learning rates tried for each optimizer, and its other settings.
GRID = {
  "adam": (1e-3, 3e-3, 1e-2, 3e-2),
  "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
  "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
  "adagrad": (1e-2, 3e-2, 1e-1, 3e-1, 1.0),
  "sgd": (3e-2, 1e-1, 3e-1),
}
SETTINGS = {
  "adamw": {"weight_decay": 1e-4},
  "sgd": {"momentum": 0.9},
}


def get_config() -> ml_collections.ConfigDict:
  """The CNN for two epochs (940 steps of 128), cosine after 47 warm-up steps."""
  config = fashion_mnist.get_config()
  config.model.name = "cnn"
  config.train.steps = 940
  config.train.log_every = 100
  config.eval.every_steps = 100
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 47
  config.ckpt.every_steps = 0
  return config


def run_one(base: ml_collections.ConfigDict, name: str, lr: float, workdir: pathlib.Path,
            resume: str) -> dict:  # fmt: skip
  """Trains one optimizer at one learning rate; returns its eval lines."""
  config = base.copy_and_resolve_references()
  config.optim.name, config.optim.lr = name, lr
  for key, value in SETTINGS.get(name, {}).items():
    config.optim[key] = value
  logs.note(f"{name}, lr {lr:g}: {workdir}")
  fashion_mnist.run(config, str(workdir), resume)
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {"lr": lr, "evals": [x for x in lines if x["split"] == "eval"]}


def summarize(name: str, runs: list[dict], target: float) -> dict:
  """The best learning rate's final accuracy and first step at `target`."""
  best = max(runs, key=lambda r: r["evals"][-1]["accuracy"])
  reached = [x["step"] for x in best["evals"] if x["accuracy"] >= target]
  return {
    "optimizer": name,
    "lr": best["lr"],
    "final": best["evals"][-1]["accuracy"],
    "steps_to_target": reached[0] if reached else None,
    "others": {r["lr"]: r["evals"][-1]["accuracy"] for r in runs if r is not best},
  }


def table(rows: list[dict], target: float, config: ml_collections.ConfigDict) -> str:
  """A markdown table of the comparison."""
  header = [
    f"Fashion-MNIST CNN, {config.train.steps} steps of {config.train.batch_size}, cosine "
    f"schedule after {config.optim.warmup_steps} warm-up steps; best learning rate of each grid.",
    "",
    f"| optimizer | lr | final test accuracy | steps to {target:.0%} | other lrs: final accuracy |",
    "| --- | --- | --- | --- | --- |",
  ]
  body = []
  for r in rows:
    settings = ", ".join(f"{k} {v:g}" for k, v in SETTINGS.get(r["optimizer"], {}).items())
    name = f"{r['optimizer']} ({settings})" if settings else r["optimizer"]
    steps = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
    others = ", ".join(f"{lr:g}: {acc:.2%}" for lr, acc in sorted(r["others"].items()))
    body.append(f"| {name} | {r['lr']:g} | {r['final']:.2%} | {steps} | {others} |")
  return "\n".join(header + body) + "\n"


def main(argv: list[str]) -> str:
  """Runs the grid and writes `table.md`."""
  del argv
  f = flags.FLAGS
  root = workdir_lib.resolve(f.workdir)
  unknown = sorted(set(f.optimizers) - set(GRID))
  if unknown:
    cli.fail(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(GRID)})")
  rows = []
  for name in f.optimizers:
    runs = [run_one(f.config, name, lr, root / name / f"lr_{lr:g}", f.resume)
            for lr in GRID[name]]  # fmt: skip
    rows.append(summarize(name, runs, f.target))
  text = table(rows, f.target, f.config)
  (root / "table.md").write_text(text)
  print(text)
  return text


if __name__ == "__main__":  # flags only when run: --config loads this file
  cli.define_flags(__file__, fashion_mnist.MODEL_HELP,
                   workdir_help="Folder for all the runs, one each.")  # fmt: skip
  flags.DEFINE_list("optimizers", list(GRID), "Optimizers to compare.")
  flags.DEFINE_float("target", 0.88, "The test accuracy whose first step is reported.")
  cli.run(main)
