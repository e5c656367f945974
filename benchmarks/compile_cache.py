"""Time to the first step of the language model: cold, with the compilation cache, without.

Runs `python -m experiments.lm` (the default preset, 20 steps) three times in
fresh processes: with an empty persistent compilation cache, again with the
cache it filled, and with the cache off. Each run records `first_chunk_seconds`
(from the session's start to the first chunk's metrics, compiling included)
and `train_chunk_compilations` in `run.json`.

    python benchmarks/compile_cache.py
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config.train.steps=20", "--config.optim.warmup_steps=5", "--config.train.log_every=10",
        "--config.eval.every_steps=0", "--sample_tokens=1"]  # fmt: skip


def run(workdir: pathlib.Path, cache: str) -> dict:
  env = dict(os.environ, JAXTRAIN_COMPILE_CACHE=cache, PYTHONPATH=str(ROOT))
  subprocess.run(
    [sys.executable, "-m", "experiments.lm", f"--workdir={workdir}", *ARGS],
    check=True, capture_output=True, env=env, cwd=ROOT,
  )  # fmt: skip
  return json.loads((workdir / "run.json").read_text())


def main():
  with tempfile.TemporaryDirectory() as name:
    tmp = pathlib.Path(name)
    cache = str(tmp / "xla")
    runs = {
      "cold (empty cache)": run(tmp / "a", cache),
      "warm (cache filled by the run above)": run(tmp / "b", cache),
      "cache off": run(tmp / "c", "off"),
    }
    entries = len(list(pathlib.Path(cache).iterdir()))
  print(f"cache entries written: {entries}")
  print("| run | first chunk (s) | chunk compilations |")
  print("| --- | --- | --- |")
  for name, r in runs.items():
    print(f"| {name} | {r['first_chunk_seconds']:.2f} | {r['train_chunk_compilations']} |")
  cold, warm = (r["first_chunk_seconds"] for r in list(runs.values())[:2])
  print(f"warm / cold: {warm / cold:.2f}")


if __name__ == "__main__":
  main()
