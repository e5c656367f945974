"""The example notebooks run as scripts and produce what they promise."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxtrain import optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_custom_chain_notebook(tmp_path):
  steps = 200
  env = dict(os.environ)
  env.update(
    JAXTRAIN_EXAMPLE_WORKDIR=str(tmp_path),
    JAXTRAIN_EXAMPLE_STEPS=str(steps),
    PYTHONPATH=str(ROOT),
  )
  proc = subprocess.run(
    [sys.executable, "examples/custom_chain.py"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  curves = tmp_path / "curves.png"
  assert curves.is_file()
  assert curves.stat().st_size > len(PNG_SIGNATURE)
  assert curves.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE

  assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"

  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [m for m in lines if m["split"] == "train"]
  evals = [m for m in lines if m["split"] == "eval"]
  assert train and evals
  assert train[-1]["step"] == evals[-1]["step"] == steps
  assert evals[-1]["accuracy"] >= 0.85
  assert train[-1]["loss"] < 0.5 * train[0]["loss"]

  # `lr` is the rate of the window's last update, whose update count is `step - 1`.
  sched = optim.schedule("cosine", lr=3e-3, total_steps=steps, warmup_steps=steps // 10)
  for m in train:
    assert m["lr"] == pytest.approx(float(sched(m["step"] - 1)), rel=1e-5), m["step"]
