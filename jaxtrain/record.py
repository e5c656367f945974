"""The run record: `config.json` and `run.json` in the workdir.

`run.json` says what ran, where and how it ended: status (`running`,
`completed`, `failed`, ...), the stop reason, the final step, the command line,
the git commit and dirty flag (with the diff saved as `git.diff`), every
installed package's version, the host, devices, mesh and sharding rules, the
data's fingerprints, seeds, where the initial weights came from, times, the
compiled chunk's memory, and how often it was compiled. Every update rewrites the
file atomically, so a crash never leaves half a record.

Example:
  >>> rec = RunRecord(workdir, enabled=True, base={"seed": 0})
  >>> rec.update(status="completed", final_step=1000)
"""

import datetime
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh

from jaxtrain import config as config_lib
from jaxtrain import logs, metrics
from jaxtrain.data.sources import Dataset

if TYPE_CHECKING:
  from jaxtrain import parts

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
  """Writes JSON to `path` through a temporary file and an atomic rename.

  On a full disk, where no second copy fits, the file is rewritten in place,
  so that a failure can still be recorded.
  """
  text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
  tmp = path.with_name(path.name + ".tmp")
  with logs.naming(path):
    try:
      tmp.write_text(text)
      os.replace(tmp, path)
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
      tmp.unlink(missing_ok=True)
      path.write_text(text)


def read_object(path: pathlib.Path) -> dict[str, Any]:
  """A run's `run.json` or `config.json` as a dict.

  Raises:
    ConfigError: naming the file, when it is missing, unreadable, or not a
      JSON object.
  """
  try:
    value = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f"{path.parent}: not a run's workdir (no {path.name})") from e
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"{path} is damaged: {logs.brief(e, 120)}") from e
  if not isinstance(value, dict):
    raise config_lib.ConfigError(
      f"{path} is damaged: it holds a {type(value).__name__}, not a JSON object"
    )
  return value


def enclosing_run(path: pathlib.Path) -> pathlib.Path | None:
  """The run folder (one holding `run.json`) that `path` is, or lies inside; None if none."""
  path = path.resolve()
  return next((p for p in (path, *path.parents) if (p / "run.json").is_file()), None)


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
  """Returns `{"commit", "dirty", "diff"}` of the git checkout holding `path`, or nulls.

  `diff` is the text of `git diff HEAD` (tracked files) plus the names of
  untracked files, when the tree is dirty; `save_diff` writes it beside the record.
  """

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout

  try:
    status = git("status", "--porcelain")
    info = {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(status.strip())}
    if info["dirty"]:
      untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
      info["diff"] = git("diff", "HEAD") + "".join(f"untracked: {n}\n" for n in untracked)
    return info
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def installed() -> dict[str, str]:
  """Every installed distribution and its version, as `pip freeze` lists them."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"]
    if name:
      found[name] = dist.version
  return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def host() -> dict[str, Any]:
  """The machine: host name, operating system, CPU model and count."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"hostname": platform.node(), "os": platform.platform(), "cpu": cpu,
          "cpu_count": os.cpu_count()}  # fmt: skip


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
    "argv": [sys.executable, *sys.argv],
    "module": _main_module(),
    "host": host(),
  }


def _main_module() -> str | None:
  """The experiment run as `python -m NAME` (what `jaxtrain.replay` reruns), else None.

  An experiment module defines `get_config` and `task`; any other main module
  (a notebook, a script, pytest) is not one.
  """
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is None or not (hasattr(main, "get_config") and hasattr(main, "task")):
    return None
  return spec.name


def check_writable(path: pathlib.Path) -> None:
  """Creates folder `path` if needed and writes a file in it; raises `OSError` if it cannot."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f".write-test-{jax.process_index()}"  # processes may share the folder
  probe.write_text("")
  probe.unlink()


def mark_failed(workdir: pathlib.Path, reason: str) -> None:
  """Records in `run.json` that a run failed before it started (the rest of the record stays)."""
  path = workdir / "run.json"
  try:
    fields = json.loads(path.read_text())
  except (OSError, ValueError):
    fields = {}
  if not isinstance(fields, dict):
    fields = {}
  fields.update(status="failed", reason=reason, end_time=now())
  write_json(path, fields)


def describe_rules(rules: Any) -> dict[str, Any] | None:
  """The sharding rules as JSON: a logical table by name, or the path rules' patterns."""
  if rules is None:
    return None
  if hasattr(rules, "table"):
    return {"kind": "logical", "name": rules.name, "table": [list(r) for r in rules.table]}
  return {"kind": "path", "patterns": [pattern for pattern, _ in rules]}


def fingerprints(data: Dataset) -> dict[str, Any]:
  """What identifies a run's data: each split's fingerprint and the sha256 of its files.

  A checkpoint records them; a resume on other data, or with another
  tokenizer, is refused (`jaxtrain.workdir`).
  """

  def fingerprint(source: Any) -> str | None:
    return source.fingerprint() if hasattr(source, "fingerprint") else None

  files = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in
           sorted((data.files or {}).items())}  # fmt: skip
  return {"train": fingerprint(data.train), "eval": fingerprint(data.eval), "files": files}


def run_fields(
  spec: "parts.Spec", workdir: pathlib.Path, *, prints: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Returns what `run.json` records about a run before it starts."""
  mesh, data, rules = spec.mesh, spec.data, spec.rules
  prints = prints or fingerprints(data)
  git = git_info(pathlib.Path.cwd())
  diff, saved = git.pop("diff", None), workdir / "git.diff"
  if jax.process_index() == 0:
    with logs.naming(saved):
      if diff is None:
        saved.unlink(missing_ok=True)  # an earlier attempt's: this one ran clean code
      else:
        saved.write_text(diff)
  if diff is not None:
    git["diff_file"] = saved.name
  return {
    "workdir": str(workdir.resolve()),
    "config_hash": spec.run.config.hash,
    "git": git,
    "versions": versions(),
    "packages": installed(),
    "environment": environment(mesh),
    "sharding": describe_rules(rules),
    "data": {
      "name": data.name,
      "train_size": len(data.train),
      "eval_size": len(data.eval),
      "folder": data.folder or None,
      "train_fingerprint": prints["train"],
      "eval_fingerprint": prints["eval"],
      **(data.info or {}),
    },
    "seeds": {"train.seed": spec.seed, "data.seed": spec.data_seed},
    "train_chunk_compilations": 0,
  }


def start(
  spec: "parts.Spec",
  workdir: pathlib.Path,
  *,
  resumed_from: int | None,
  forced: dict[str, Any] | None = None,
  throughput: dict[str, Any] | None = None,
  parameters: dict[str, int] | None = None,
  prints: dict[str, Any] | None = None,
  lines: list[dict[str, Any]] | None = None,
) -> "RunRecord":
  """Writes `config.json`, trims `metrics.jsonl` to the resumed step, starts `run.json`.

  Only process 0 writes; the others get a record that does nothing.

  Args:
    spec: the prepared run (`jaxtrain.parts.prepare`): its config, mesh, data,
      sharding rules and initial weights are recorded.
    workdir: the absolute workdir.
    resumed_from: the restored step, or None for a fresh run.
    forced: the changed keys a forced resume let through, `{key: (old, new)}`.
    throughput: the tokens and model FLOPs a step takes and the devices' peak, if known.
    parameters: the model's parameter count, `total` and `trainable`.
    prints: the data's `fingerprints`, if already taken.
    lines: the metric lines of the resumed step, as its checkpoint recorded
      them: written again if a crash cut them from `metrics.jsonl`.
  """
  is_main = jax.process_index() == 0
  if is_main:
    with logs.naming(workdir / "config.json"):
      (workdir / "config.json").write_text(spec.run.config.json + "\n")
    for name, text in (spec.data.files or {}).items():  # a trained tokenizer, say
      with logs.naming(workdir / name):
        (workdir / name).write_text(text)
    metrics.truncate_jsonl(workdir / "metrics.jsonl", resumed_from or 0, lines)  # a crash's tail
  fields = run_fields(spec, workdir, prints=prints)
  fields["forced_changes"] = {k: list(v) for k, v in (forced or {}).items()} or None
  fields["throughput"] = throughput
  fields["initial_weights"] = initial_weights(spec.seed, resumed_from, spec.initial)
  fields["parameters"] = parameters
  return RunRecord(workdir, is_main, fields, resumed_from=resumed_from)


def initial_weights(seed: int, resumed_from: int | None, initial: Any) -> dict[str, Any]:
  """Where the first state came from: `fresh` (the seed), `loaded` (a source) or `resumed`."""
  loaded = initial.describe() if initial else None
  if resumed_from is not None:
    return {"source": "resumed", "step": resumed_from, **({"base": loaded} if loaded else {})}
  return {**loaded, "seed": seed} if loaded else {"source": "fresh", "seed": seed}


def checkpoint_meta(
  config: config_lib.Snapshot,
  mesh: Mesh,
  *,
  meter: dict[str, Any],
  eval_metrics: dict[str, float],
  skipped: int,
  monitor: list[Any],
  initial: str | None = None,
  prints: dict[str, Any] | None = None,
  lines: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
  """What a checkpoint records beside the state: enough to resume exactly and to audit.

  Args:
    config: the run's config, saved whole: a resume compares it key by key.
    mesh: the mesh.
    meter: the log interval's partial sums (`metrics.Meter.state_dict`).
    eval_metrics: the last evaluation's metrics.
    skipped: the updates skipped so far.
    monitor: the settings the monitor's state means something under.
    initial: the sha256 of the initial weights' source, if any (a resume
      reads the parameters a checkpoint leaves out from it again).
    prints: the data's `fingerprints` (a resume on other data is refused).
    lines: the metric lines written at this step (a resume writes them again
      if a crash cut them off).
  """
  return {
    "config": config.tree,
    "config_hash": config.hash,
    "mesh": dict(mesh.shape),
    "versions": versions(),
    "meter": meter,
    "eval": eval_metrics,
    "skipped": skipped,
    "monitor": monitor,
    "initial_sha256": initial,
    "fingerprints": prints,
    "lines": lines or [],
    "time": now(),
  }


class RunRecord:
  """`run.json`, kept up to date by `update`; a no-op when not `enabled`.

  A resumed run counts its `attempt` on from the previous record and notes
  the step it `resumed_from`.
  """

  def __init__(
    self,
    workdir: pathlib.Path,
    enabled: bool,
    base: dict[str, Any],
    resumed_from: int | None = None,
  ):
    self.path = workdir / "run.json"
    self.enabled = enabled
    self.fields = {
      "status": "running",
      "reason": None,
      "final_step": resumed_from or 0,
      "attempt": self._previous_attempt() + 1 if resumed_from is not None else 1,
      "resumed_from": resumed_from,
      "start_time": now(),
      "end_time": None,
      **base,
    }
    self.update()

  def _previous_attempt(self) -> int:
    try:
      return int(json.loads(self.path.read_text()).get("attempt", 1))
    except (OSError, ValueError, AttributeError):
      return 1

  def update(self, **fields: Any) -> None:
    """Sets `fields` and rewrites the file."""
    self.fields.update(fields)
    if fields.get("status", "running") != "running":
      self.fields["end_time"] = now()
    if self.enabled:
      write_json(self.path, self.fields)

  def first_chunk(self, started: float) -> None:
    """Records once the seconds from `started` to the first chunk's metrics, compiling included."""
    if "first_chunk_seconds" not in self.fields:
      self.update(first_chunk_seconds=round(time.perf_counter() - started, 3))

  def count_compilations(self, count: int, step: int) -> bool:
    """Records the chunk's executables; returns whether the last call compiled.

    A second executable means a shape, dtype or sharding of the state or batch
    changed between chunks, which costs a compilation and is a bug: warned.
    """
    before = self.fields["train_chunk_compilations"]
    if count == before:
      return False
    if before:
      logging.warning(
        "train_chunk compiled again at step %d (%d executables): a shape, dtype "
        "or sharding of the state or batch changed",
        step,
        count,
      )
    self.update(train_chunk_compilations=count)
    return True

  def fail(
    self, status: str, reason: str, make_room: Callable[[], None] | None = None, **fields: Any
  ) -> None:
    """Records how a run ended early; a full disk is logged, not raised over the first error.

    On a full disk, `make_room()` (dropping unfinished checkpoint saves, say)
    runs first and the write is tried once more.
    """
    for attempt in range(2):
      try:
        self.update(status=status, reason=reason, **fields)
        return
      except OSError as write_error:
        if attempt == 0 and write_error.errno == errno.ENOSPC and make_room is not None:
          make_room()
          continue
        logging.error("could not record the failure in run.json: %s", write_error,
                      extra=logs.DETAIL)  # fmt: skip
