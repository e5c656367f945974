"""Transfer learning on fortunes topics: from scratch, frozen, LoRA and full fine-tuning.

    python benchmarks/finetune.py [--out runs/bench_finetune] [--modes full,frozen,lora,scratch]

Runs `python -m experiments.finetune_text --config=experiments/finetune_text.py:MODE`
for each mode, one after another on this machine from the repository root, as a
user would, and prints per mode: the
trainable parameters, the train step time (of the fastest 20-step log window, so
that other work on a shared machine inflates it less; the median is printed
too), its ratio to full fine-tuning's, the compiled chunk's peak memory per device, a checkpoint
step's size on disk, the steps trained before early stopping, and the best
eval accuracy. A linear probe comes first: logistic regression (scikit-learn)
on the frozen encoder's sentence embeddings of the same texts and split.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np


def probe() -> tuple[float, float]:
  """Logistic regression on frozen MiniLM sentence embeddings: eval accuracy, seconds."""
  import tokenizers  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

  import jaxtrain  # noqa: PLC0415
  from jaxtrain import weights  # noqa: PLC0415
  from jaxtrain.models import bert  # noqa: PLC0415

  start = time.perf_counter()
  folder = bert.minilm_dir()
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  ds = jaxtrain.data.fortunes(tok, max_len=64)
  encoder = bert.BertEncoder(bert.BertConfig.from_json(folder / "config.json"), rngs=nnx.Rngs(0))
  weights.load(encoder, folder / "model.safetensors", convert="bert", rename=["^encoder/="])
  encoder.eval()
  embed = nnx.jit(lambda m, ids, mask: m.embed(ids, mask))

  def features(source: jaxtrain.data.ArraySource) -> np.ndarray:
    a = source.arrays
    return np.concatenate([np.asarray(embed(encoder, a["ids"][i:i + 128],
                                            a["attention_mask"][i:i + 128]))
                           for i in range(0, len(source), 128)])  # fmt: skip

  classifier = LogisticRegression(max_iter=2000).fit(features(ds.train), ds.train.arrays["label"])
  accuracy = classifier.score(features(ds.eval), ds.eval.arrays["label"])
  return float(accuracy), time.perf_counter() - start


def run_mode(mode: str, out: pathlib.Path) -> dict:
  """Trains one mode into `out/mode` and reads its record."""
  workdir = out / mode
  command = [sys.executable, "-m", "experiments.finetune_text",
             f"--config=experiments/finetune_text.py:{mode}", f"--workdir={workdir}"]  # fmt: skip
  start = time.perf_counter()
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  return summarize(mode, workdir, time.perf_counter() - start)


def summarize(mode: str, workdir: pathlib.Path, wall: float) -> dict:
  """One mode's row, from its workdir's records."""
  run = json.loads((workdir / "run.json").read_text())
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [x["steps_per_sec"] for x in lines if x["split"] == "train" and "steps_per_sec" in x]
  step_dirs = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  size = sum(f.stat().st_size for f in step_dirs[0].rglob("*") if f.is_file())
  return {
    "mode": mode,
    "trainable": run["parameters"]["trainable"],
    "total": run["parameters"]["total"],
    "step_s": 1 / max(rates),
    "median_step_s": 1 / statistics.median(rates),
    "peak_mib": run["memory"]["peak"] / 2**20,
    "ckpt_mib": size / 2**20,
    "steps": run["final_step"],
    "best_step": run.get("restored_step", run["final_step"]),
    "accuracy": run["eval"]["accuracy"],
    "wall_s": wall,
  }


def main() -> None:
  """Runs the probe and the modes, and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/bench_finetune")
  parser.add_argument("--modes", default="full,frozen,lora,scratch")
  parsed = parser.parse_args()
  out = pathlib.Path(parsed.out)
  print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
  accuracy, seconds = probe()
  print(f"linear probe (logistic regression on frozen sentence embeddings): "
        f"eval accuracy {accuracy:.4f} ({seconds:.0f} s)")  # fmt: skip
  rows = [run_mode(mode, out) for mode in parsed.modes.split(",")]
  full = next((r for r in rows if r["mode"] == "full"), rows[0])
  print(
    "| mode | trainable params | step time (median) | vs full | peak memory | checkpoint step "
    "| steps (best) | eval accuracy | wall |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mode']} | {r['trainable']:,} of {r['total']:,} | {r['step_s'] * 1e3:.0f} ms "
          f"({r['median_step_s'] * 1e3:.0f} ms) | {r['step_s'] / full['step_s']:.2f}x "
          f"| {r['peak_mib']:.0f} MiB "
          f"| {r['ckpt_mib']:.1f} MiB | {r['steps']} ({r['best_step']}) | {r['accuracy']:.4f} "
          f"| {r['wall_s']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
  main()
