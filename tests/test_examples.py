"""The example notebooks run top to bottom in a Jupyter kernel and show what they promise.

Each notebook is executed with `nbclient`; a probe cell run afterwards in the same kernel
reads the results the notebook computed, and the plots must be in its outputs.
"""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from jaxtrain import optim

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _execute(name, probe, tmp_path, monkeypatch, **env):
  """Runs `examples/NAME.ipynb` in a fresh kernel, then `probe`; returns the notebook and probe."""
  for key, value in env.items():
    monkeypatch.setenv(key, str(value))
  notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell(f"import json as _j\nprint(_j.dumps({probe}))"))
  client = NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  printed = notebook.cells[-1].outputs[-1]["text"]
  return notebook, json.loads(printed)


def _images(notebook):
  return [
    o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
  ]


def test_custom_chain_notebook(tmp_path, monkeypatch):
  steps = 200
  probe = '{"status": result.status, "workdir": str(result.workdir)}'
  notebook, out = _execute(
    "custom_chain", probe, tmp_path, monkeypatch,
    JAXTRAIN_EXAMPLE_STEPS=steps, JAXTRAIN_EXAMPLE_WORKDIR=tmp_path / "run",
  )  # fmt: skip
  assert out == {"status": "completed", "workdir": str(tmp_path / "run")}
  assert len(_images(notebook)) == 1
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [m for m in lines if m["split"] == "train"]
  evals = [m for m in lines if m["split"] == "eval"]
  assert train[-1]["step"] == evals[-1]["step"] == steps
  assert evals[-1]["accuracy"] >= 0.85
  assert train[-1]["loss"] < 0.5 * train[0]["loss"]
  # `lr` is the rate of the window's last update, whose update count is `step - 1`.
  sched = optim.schedule("cosine", lr=3e-3, total_steps=steps, warmup_steps=steps // 10)
  for m in train:
    assert m["lr"] == pytest.approx(float(sched(m["step"] - 1)), rel=1e-5), m["step"]


def test_own_model_notebook(tmp_path, monkeypatch):
  probe = '{"status": result.status, **result.eval_metrics, "grid": float(probability.mean())}'
  notebook, out = _execute("own_model", probe, tmp_path, monkeypatch, JAXTRAIN_EXAMPLE_STEPS=200)
  assert out["status"] == "completed"
  assert out["accuracy"] >= 0.95  # the moons are separable but noisy
  assert 0.2 < out["grid"] < 0.8  # both classes have their side of the boundary
  assert len(_images(notebook)) == 1


def test_composable_notebook(tmp_path, monkeypatch):
  probe = (
    '{"step": int(state.step), "compiled": parts.chunk.compilations(), **eval_metrics,'
    ' "first": losses_per_step[0], "last": losses_per_step[-1], "n": len(losses_per_step)}'
  )
  notebook, out = _execute("composable", probe, tmp_path, monkeypatch, JAXTRAIN_EXAMPLE_CHUNKS=30)
  assert (out["step"], out["n"], out["compiled"]) == (300, 300, 1)
  assert out["last"] < 0.25 * out["first"]
  assert out["accuracy"] >= 0.9
  assert len(_images(notebook)) == 1
