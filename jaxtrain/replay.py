"""Rerun a run from its record and check, step by step, that it reproduces.

    python -m jaxtrain.replay runs/digits
    python -m jaxtrain.replay runs/digits --out runs/digits_again

It reads the run's `config.json`, `run.json` and `metrics.jsonl`, refuses with
one line (exit 2) when the code or the data differ from the record (the git
commit and the saved diff; the data's fingerprints), unless `--force`, then
trains the same config (the run's `--config=FILE.py:PRESET`, then every key as
`config.json` holds it), seeds included, with the experiment module that ran it
(`python -m NAME`) into a new workdir (default `DIR_replay`), and compares every
line of the two `metrics.jsonl` files, timing fields aside: exit 0 when all
match (to `--atol`, exactly by default), 1 naming the first step that does not.
Like the run, it reads FILE from the current folder: replay from where the run
was started (the repository root).
Before anything trains, a damaged or missing record, a run with no metric lines
to compare, and an `--out` that is the run, lies inside it, holds it, or holds
files already, are each one line and exit 2: a replay never writes into a run.

From Python:
  >>> replay.compare(original_lines, new_lines, atol=0.0)   # [] when they match
"""

import math
import pathlib
import sys
from typing import Any

import ml_collections
from absl import flags

import jaxtrain
from jaxtrain import cli, metrics, record
from jaxtrain import config as config_lib
from jaxtrain.config import ConfigError

TIMING = ("time", "steps_per_sec", "samples_per_sec", "tokens_per_sec", "mfu", "data_wait_frac")


def rebuild_config(module: Any, saved: dict[str, Any],
                   spec: str | None = None) -> ml_collections.ConfigDict:  # fmt: skip
  """The run's config: its `--config=spec` (else `get_config()`), every key as `config.json` has it.

  `spec` is `FILE.py[:PRESET]` as the run's command gave it, a path from the
  current folder, so a replay runs from the folder the run was started in.
  """
  config = cli.load_config(spec, module.__file__) if spec else module.get_config()
  known = dict(config_lib.flatten(config))
  for key, raw in config_lib.flatten_dict(saved).items():
    if key not in known:
      raise ConfigError(f"config.json records {key}, which is not a key of {module.__name__}'s "
                        "config (any more)")  # fmt: skip
    value = raw
    if isinstance(known[key], tuple) and isinstance(raw, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in raw)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.json records {key}={raw!r}, not of the key's type "
                        f"{type(known[key]).__name__}") from e  # fmt: skip
  return config


def code_problems(recorded: dict[str, Any], workdir: pathlib.Path) -> list[str]:
  """How the code here differs from the record's: commit, dirty tree, diff."""
  here = record.git_info(pathlib.Path.cwd())
  if recorded.get("commit") is None:
    return ["the run was not started in a git checkout, so its code cannot be checked"]
  problems = []
  if here.get("commit") != recorded["commit"]:
    problems.append(f"the code is at commit {str(here.get('commit'))[:10]}, the run's at "
                    f"{str(recorded['commit'])[:10]}")  # fmt: skip
  diff_file = recorded.get("diff_file")
  saved = workdir / diff_file if isinstance(diff_file, str) and diff_file else None
  old = saved.read_text() if saved and saved.exists() else ""
  if here.get("diff", "") != old:
    problems.append("the uncommitted changes differ from the run's git.diff")
  return problems


def data_problems(recorded: dict[str, Any], dataset: Any) -> list[str]:
  """How the dataset here differs from the record's fingerprints and sizes."""
  problems = []
  for split in ("train", "eval"):
    source = getattr(dataset, split)
    was = recorded.get(f"{split}_fingerprint")
    now = source.fingerprint() if hasattr(source, "fingerprint") else None
    if was != now:
      problems.append(
        f"the {split} data's fingerprint is {str(now)[:12]}, the run's {str(was)[:12]}"
      )
    if recorded.get(f"{split}_size") not in (None, len(source)):
      problems.append(
        f"the {split} data has {len(source)} records, the run's {recorded[f'{split}_size']}"
      )
  return problems


def compare(original: list[dict], new: list[dict], atol: float = 0.0) -> list[str]:
  """Each line where the replay's metrics differ from the original's, as text; [] if none."""
  out = []
  index = {(x["step"], x["split"]): x for x in new}
  for line in original:
    key = (line["step"], line["split"])
    other = index.pop(key, None)
    if other is None:
      out.append(f"step {key[0]} {key[1]}: missing from the replay")
      continue
    for name, value in line.items():
      if name in ("step", "split", *TIMING):
        continue
      if not _close(value, other.get(name), atol):
        out.append(f"step {key[0]} {key[1]}: {name} {value!r} in the run, {other.get(name)!r} now")
  out += [f"step {s} {split}: only in the replay" for s, split in index]
  return out


def _close(a: Any, b: Any, atol: float) -> bool:
  if isinstance(a, int | float) and isinstance(b, int | float):
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol)
  return a == b


def _lines(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return metrics.read_jsonl(path) if path.exists() else []


def check_out(run: pathlib.Path, out: pathlib.Path, shown: str) -> None:
  """Refuses an `--out` that is the run, lies inside it or holds it, or holds files already."""
  run, out = run.resolve(), out.resolve()
  if out == run or run in out.parents:
    raise ConfigError(f"--out={shown} is {'the run' if out == run else 'inside the run'} "
                      f"{run}: a replay must not write into the run it checks")  # fmt: skip
  if out in run.parents:
    raise ConfigError(f"--out={shown} holds the run {run}: give a new folder")
  if other := record.enclosing_run(out):
    where = "holds a run" if other == out else f"lies inside the run {other}"
    raise ConfigError(f"--out={shown} {where}; give a new folder")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConfigError(f"--out={shown} is not an empty folder; give a new one")


def main(argv: list[str]) -> None:
  """Replays the run named on the command line."""
  if len(argv) != 2:
    raise ConfigError("usage: python -m jaxtrain.replay DIR [--out NEW] [--force] [--atol=0]")
  f = flags.FLAGS
  if not math.isfinite(f.atol):
    raise ConfigError(f"--atol={f.atol} must be a finite number, 0 or more")
  workdir = jaxtrain.workdir.resolve(argv[1])
  if not workdir.is_dir():
    raise ConfigError(f"{argv[1]}: no such run folder")
  run, saved = record.read_object(workdir / "run.json"), record.read_object(workdir / "config.json")
  original = _lines(workdir)
  if not original:
    raise ConfigError(f"{argv[1]}/metrics.jsonl is missing or empty: the replay would have "
                      "nothing to compare with")  # fmt: skip
  out = jaxtrain.workdir.resolve(f.out or f"{workdir}_replay")
  check_out(workdir, out, f.out or f"{argv[1]}_replay")
  environment = run.get("environment")
  name = environment.get("module") if isinstance(environment, dict) else None
  if not isinstance(name, str) or not name:
    raise ConfigError(f"{argv[1]}: run.json names no experiment module; replay reruns runs "
                      "started as python -m NAME")  # fmt: skip
  recorded = environment.get("argv")  # the command that started the run
  spec = cli.config_argument(recorded) if _strings(recorded) else None
  try:
    module = cli.import_experiment(name)
    config = rebuild_config(module, saved, spec)
  except ConfigError as e:
    raise ConfigError(f"{argv[1]}: {e}") from e
  model, dataset, loss = module.task(config, None)[:3]
  problems = code_problems(_section(run, "git"), workdir) + data_problems(
    _section(run, "data"), dataset
  )
  if problems and not f.force:
    raise ConfigError(f"not replaying {argv[1]}: {'; '.join(problems)} (--force replays anyway)")
  shown = f"{name} --config={spec}" if spec else name
  print(f"replaying {shown} from {workdir} into {out}", file=sys.stderr)
  for problem in problems:
    print(f"warning: {problem}", file=sys.stderr)
  jaxtrain.train(config, model, dataset, loss, workdir=out, resume="never")
  new = _lines(out)
  differences = compare(original, new, f.atol)
  if differences:
    print(f"replay differs from the run at {len(differences)} value(s); first: {differences[0]}")
    sys.exit(1)
  print(f"replay matches the run: {len(original)} metric lines, every value equal"
        + (f" to {f.atol}" if f.atol else ""))  # fmt: skip


def _strings(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _section(run: dict[str, Any], name: str) -> dict[str, Any]:
  value = run.get(name)
  return value if isinstance(value, dict) else {}


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "The new workdir; default DIR_replay. It must hold no run.")
  flags.DEFINE_bool("force", False, "Replay even when the code or the data differ from the record.")
  flags.DEFINE_float(
    "atol", 0.0, "Largest difference of a metric that still matches.", lower_bound=0
  )
  cli.run_tool(main)
