"""The README's front door, exactly as written: read from README.md and run in a fresh copy.

The quick-start block creates its own virtual environment and installs the project from
the copy (pip's cache makes that quick), then trains with a relative workdir; the "From
Python" snippet runs in an empty folder. If either breaks, this fails.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(heading, language):
  """The first fenced `language` block after the `## heading` line."""
  section = README.split(f"\n## {heading}\n", 1)[1]
  return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1).strip()


def _fresh_copy(target):
  """The project's files as a fresh clone of this tree would hold them (no venv, no runs)."""
  listed = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
    cwd=ROOT, capture_output=True, check=True,
  ).stdout.decode().split("\0")  # fmt: skip
  for name in filter(None, listed):
    if (ROOT / name).is_file():
      (target / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, target / name)


def _user_env():
  """The environment of a user's shell: no test settings, no active virtual environment."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
  venv_bin = str(pathlib.Path(sys.executable).parent)
  env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
  return env


def test_quick_start_as_written(tmp_path):
  command = _block("Two commands", "bash")
  assert command.endswith("python -m experiments.digits --workdir runs/digits")
  _fresh_copy(tmp_path)
  result = subprocess.run(
    ["bash", "-c", command], cwd=tmp_path, env=_user_env(), capture_output=True, text=True,
    timeout=900, check=False,
  )  # fmt: skip
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  run = json.loads((tmp_path / "runs" / "digits" / "run.json").read_text())
  assert run["status"] == "completed" and run["final_step"] == 600
  assert run["eval"]["accuracy"] >= 0.95
  assert run["workdir"] == str(tmp_path / "runs" / "digits")
  assert run["environment"]["device_count"] == 1  # the user's machine, not the tests' 8


def test_from_python_as_written(tmp_path):
  snippet = _block("From Python", "python")
  assert 'workdir="runs/nb"' in snippet
  result = subprocess.run(
    [sys.executable, "-c", snippet], cwd=tmp_path, env=_user_env(), capture_output=True,
    text=True, timeout=300, check=False,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  printed = result.stdout.strip().splitlines()
  assert printed[0].startswith("{'accuracy': 0.9") and "'loss': " in printed[0]
  assert printed[1].startswith("TrainResult(status='completed', step=600, eval_metrics={")
  assert printed[2] == "600 completed"
  assert json.loads((tmp_path / "runs" / "nb" / "run.json").read_text())["status"] == "completed"


def test_stepping_a_run_as_written(tmp_path):
  section = README.split("\n## From Python\n", 1)[1]
  first, *_, stepped = (b for b in re.findall(r"```python\n(.*?)```", section, re.DOTALL)
                        if "config = " in b or "jaxtrain.Run(" in b)  # fmt: skip
  setup = first.split("result = jaxtrain.train(")[0]  # the config and the model, not the run
  result = subprocess.run(
    [sys.executable, "-c", setup + stepped], cwd=tmp_path, env=_user_env(), capture_output=True,
    text=True, timeout=300, check=False,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  printed = result.stdout.strip().splitlines()
  assert [x.split(" loss=")[0] for x in printed] == ["100 train", "200 train", "interrupted"]
  run = json.loads((tmp_path / "runs" / "nb2" / "run.json").read_text())
  assert run["status"] == "interrupted" and run["final_step"] == 300
