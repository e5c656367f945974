"""The run record: `config.json` and `run.json` in the workdir.

`run.json` says what ran, where and how it ended: status (`running`,
`completed`, `failed`, ...), the stop reason, the final step, the git commit and
dirty flag, package versions, devices and mesh, the data fingerprint, seeds,
times, and how often the training chunk was compiled. Every update rewrites the
file atomically, so a crash never leaves half a record.

Example:
  >>> rec = RunRecord(workdir, enabled=True, base={"seed": 0})
  >>> rec.update(status="completed", final_step=1000)
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

import jax
from jax.sharding import Mesh

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "numpy",
  "ml-collections",
  "absl-py",
  "jaxtrain",
)


def write_json(path: pathlib.Path, value: Any) -> None:
  """Writes JSON to `path` through a temporary file and an atomic rename."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
  os.replace(tmp, path)


def now() -> str:
  """Returns the current UTC time in ISO 8601."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
  """Returns the Python version and the installed versions of the stack."""
  out: dict[str, str | None] = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_info(path: str | os.PathLike) -> dict[str, Any]:
  """Returns `{"commit", "dirty"}` of the git checkout holding `path`, or nulls."""

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()

  try:
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def environment(mesh: Mesh) -> dict[str, Any]:
  """Returns the devices, processes and mesh of this run."""
  devices = jax.devices()
  return {
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "process_count": jax.process_count(),
    "mesh": dict(mesh.shape),
    "command": " ".join(sys.argv),
  }


class RunRecord:
  """`run.json`, kept up to date by `update`; a no-op when not `enabled`."""

  def __init__(self, workdir: pathlib.Path, enabled: bool, base: dict[str, Any]):
    self.path = workdir / "run.json"
    self.enabled = enabled
    self.fields = {
      "status": "running",
      "reason": None,
      "final_step": 0,
      "start_time": now(),
      "end_time": None,
      **base,
    }
    self.update()

  def update(self, **fields: Any) -> None:
    """Sets `fields` and rewrites the file."""
    self.fields.update(fields)
    if fields.get("status", "running") != "running":
      self.fields["end_time"] = now()
    if self.enabled:
      write_json(self.path, self.fields)
