"""Plots and a Markdown summary of one run or several side by side.

    python -m jaxtrain.report runs/digits
    python -m jaxtrain.report runs/a runs/b --out runs/compare

It reads each workdir's `run.json`, `config.json` and `metrics.jsonl` and writes
PNG plots (the losses against step and against wall time, each eval metric, the
learning rate, throughput and the data wait), one line per run in each, with
each run's best evaluation and early stop marked, and `summary.md`: the final
and best metrics, how each run ended, its time and versions, and the config keys
whose values differ between the runs. The output goes to `DIR/report/` for one
run, to `report/` beside the runs for several, or to `--out`.

From Python:
  >>> runs = [report.load("runs/a"), report.load("runs/b")]
  >>> figures = report.figures(runs)        # {"loss": Figure, ...}
  >>> report.write(runs, "runs/compare")    # the PNGs and summary.md
"""

import datetime
import json
import os
import pathlib
from typing import Any, NamedTuple

from absl import flags

from jaxtrain import cli, metrics
from jaxtrain import config as config_lib
from jaxtrain import record as record_lib
from jaxtrain.config import ConfigError

try:
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
except ImportError as e:  # the report extra
  raise cli.missing("report", "matplotlib") from e

LOG_SPAN = 10.0  # a quantity whose largest value is this many times its smallest: log scale
VERSIONS = ("python", "jax", "flax", "optax", "orbax-checkpoint", "grain")


class Run(NamedTuple):
  """One workdir's records."""

  name: str
  path: pathlib.Path
  record: dict[str, Any]
  config: dict[str, Any]
  lines: list[dict[str, Any]]

  def series(self, split: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, values and wall-clock minutes (since the first line) of one metric."""
    rows = [x for x in self.lines if x["split"] == split and x.get(key) is not None]
    start = self.lines[0].get("time", 0.0) if self.lines else 0.0
    minutes = [(x.get("time", start) - start) / 60 for x in rows]
    return [x["step"] for x in rows], [x[key] for x in rows], minutes


def load(workdir: str | os.PathLike, name: str | None = None) -> Run:
  """Reads a workdir's records; raises `ConfigError` when it holds no run, or a damaged one.

  A cut-off last line of `metrics.jsonl` (a crash while writing it) is left
  out with a warning.
  """
  path = pathlib.Path(workdir).expanduser().resolve()
  if not path.is_dir():
    raise ConfigError(f"{workdir}: no such run folder")
  record = record_lib.read_object(path / "run.json")
  config = record_lib.read_object(path / "config.json")
  jsonl = path / "metrics.jsonl"
  lines = metrics.read_jsonl(jsonl) if jsonl.exists() else []
  return Run(
    name or pathlib.Path(workdir).name or str(path),
    path,
    record,
    config_lib.flatten_dict(config),
    lines,
  )


def _keys(runs: list[Run], split: str) -> list[str]:
  found = []
  for run in runs:
    for line in run.lines:
      if line["split"] == split:
        found += [k for k, v in line.items() if isinstance(v, int | float) and k not in found]
  return [k for k in found if k not in ("step", "time")]


def _scale(ax: Any, values: list[float]) -> None:
  positive = [v for v in values if v > 0]
  if positive and len(positive) == len(values) and max(positive) / min(positive) > LOG_SPAN:
    ax.set_yscale("log")


def _marks(ax: Any, run: Run, color: Any) -> None:
  """The run's best evaluation (dotted) and an early stop (dashed), if any."""
  best, final = run.record.get("best_step"), run.record.get("final_step")
  if best is not None:
    ax.axvline(best, color=color, linestyle=":", linewidth=1, label="_best")
  if run.record.get("status") == "stopped_early" and final is not None:
    ax.axvline(final, color=color, linestyle="--", linewidth=1, label="_stopped")


def _plot(runs: list[Run], series: list[tuple[str, str, str]], *, ylabel: str, title: str,
          time: bool = False) -> Any:  # fmt: skip
  """One figure: for each run, each `(split, key, style)` series against step or time."""
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  values = []
  for i, run in enumerate(runs):
    color = f"C{i % 10}"
    for split, key, style in series:
      steps, ys, minutes = run.series(split, key)
      if not ys:
        continue
      label = f"{run.name} {split} {key}" if len(series) > 1 else run.name
      ax.plot(minutes if time else steps, ys, style, color=color, label=label, markersize=4)
      values += ys
    if not time:
      _marks(ax, run, color)
  _scale(ax, values)
  ax.set_xlabel("wall time (minutes from the first line)" if time else "step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
  if not time and any(r.record.get("best_step") is not None for r in runs):
    ax.text(0.99, 0.01, "dotted: best eval; dashed: early stop", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="gray")  # fmt: skip
  fig.tight_layout()
  return fig


UNITS = {"loss": "loss (nats)", "bits_per_byte": "bits per byte", "accuracy": "accuracy",
         "lr": "learning rate", "tokens_per_sec": "tokens / s", "samples_per_sec": "samples / s",
         "data_wait_frac": "share of wall time waiting for data"}  # fmt: skip


def figures(runs: list[Run]) -> dict[str, Any]:
  """Every plot by file stem: `loss`, `loss_time`, `eval_<metric>`, `lr`, throughput, data wait."""
  train, evals = _keys(runs, "train"), _keys(runs, "eval")
  out = {}
  loss = [("train", "loss", "-"), ("eval", "loss", "o--")]
  out["loss"] = _plot(runs, loss, ylabel=UNITS["loss"], title="loss against step")
  out["loss_time"] = _plot(runs, loss, ylabel=UNITS["loss"], title="loss against wall time",
                           time=True)  # fmt: skip
  for key in (k for k in evals if k != "loss" and not k.startswith("monitor_")):
    out[f"eval_{key}"] = _plot(runs, [("eval", key, "o-")], ylabel=UNITS.get(key, key),
                               title=f"eval {key}")  # fmt: skip
  if "lr" in train:
    out["lr"] = _plot(runs, [("train", "lr", "-")], ylabel=UNITS["lr"], title="learning rate")
  rate = "tokens_per_sec" if "tokens_per_sec" in train else "samples_per_sec"
  if rate in train:
    out["throughput"] = _plot(runs, [("train", rate, "-")], ylabel=UNITS[rate],
                              title="training throughput")  # fmt: skip
  if "data_wait_frac" in train:
    wait = [("train", "data_wait_frac", "-")]
    out["data_wait"] = _plot(runs, wait, ylabel=UNITS["data_wait_frac"], title="data wait")
  return out


def differences(runs: list[Run]) -> dict[str, list[Any]]:
  """The config keys whose values differ between the runs, each with every run's value."""
  keys = sorted(set().union(*(r.config for r in runs)))
  return {
    k: [r.config.get(k) for r in runs]
    for k in keys
    if len({json.dumps(r.config.get(k)) for r in runs}) > 1
  }


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if value == "":
    return '""'
  return "—" if value is None else str(value)


def summary(runs: list[Run], plots: list[str]) -> str:
  """The Markdown summary."""
  metrics = sorted({k for r in runs for k in (r.record.get("eval") or {})})
  head = ["run", "status", "reason", "final step", "best step", "best value",
          *[f"eval {m}" for m in metrics], "wall time", "first chunk (s)"]  # fmt: skip
  lines = [f"# Report: {', '.join(r.name for r in runs)}", "", "| " + " | ".join(head) + " |",
           "|" + " --- |" * len(head)]  # fmt: skip
  for r in runs:
    rec = r.record
    cells = [r.name, rec.get("status"), rec.get("reason"), rec.get("final_step"),
             rec.get("best_step"), rec.get("best_value"),
             *[(rec.get("eval") or {}).get(m) for m in metrics], _duration(rec),
             rec.get("first_chunk_seconds")]  # fmt: skip
    lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
  lines += ["", "## Where and with what", "", "| run | devices | " + " | ".join(VERSIONS)
            + " | git commit |", "|" + " --- |" * (len(VERSIONS) + 3)]  # fmt: skip
  for r in runs:
    env, ver, git = (r.record.get(k) or {} for k in ("environment", "versions", "git"))
    devices = f"{env.get('device_count')} x {env.get('device_kind')}"
    commit = (git.get("commit") or "—")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines.append(f"| {r.name} | {devices} | " + " | ".join(_fmt(ver.get(v)) for v in VERSIONS)
                 + f" | {commit} |")  # fmt: skip
  diff = differences(runs)
  lines += ["", "## Config differences", ""]
  if len(runs) < 2:
    lines.append("One run: nothing to compare.")
  elif not diff:
    lines.append("The runs' configs are the same.")
  else:
    lines += [
      "| key | " + " | ".join(r.name for r in runs) + " |",
      "|" + " --- |" * (len(runs) + 1),
    ]
    lines += [f"| `{k}` | " + " | ".join(_fmt(v) for v in vs) + " |" for k, vs in diff.items()]
  lines += ["", "## Plots", ""] + [f"![{p}]({p}.png)" for p in plots]
  return "\n".join(lines) + "\n"


def _duration(record: dict[str, Any]) -> str:
  try:
    start, end = (datetime.datetime.fromisoformat(record[k]) for k in ("start_time", "end_time"))
  except (KeyError, TypeError, ValueError):
    return "—"
  seconds = int((end - start).total_seconds())
  return f"{seconds // 60}m{seconds % 60:02d}s"


def write(runs: list[Run], out: str | os.PathLike) -> pathlib.Path:
  """Writes the PNGs and `summary.md` into `out`; returns the folder."""
  folder = pathlib.Path(out).expanduser().resolve()
  folder.mkdir(parents=True, exist_ok=True)
  plots = figures(runs)
  for stem, fig in plots.items():
    fig.savefig(folder / f"{stem}.png")
    plt.close(fig)
  (folder / "summary.md").write_text(summary(runs, list(plots)))
  return folder


def sweep_figures(table: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
  """A sweep's plots: its metric against each parameter, and the best so far against trial."""
  scored = [r for r in table if r["best"] is not None]
  out = {}
  for key in dict.fromkeys(k for r in table for k in r["params"]):
    fig, ax = plt.subplots(figsize=(6, 4))
    for status, marker in (("pruned", "x"), ("", "o")):
      rows = [r for r in scored if (r["status"] == "pruned") == bool(status) and key in r["params"]]
      xs = [r["params"][key] for r in rows]
      ax.scatter([str(x) if isinstance(x, str) else x for x in xs], [r["best"] for r in rows],
                 marker=marker, label=status or "finished")  # fmt: skip
    numbers = [r["params"][key] for r in scored if isinstance(r["params"].get(key), float)]
    if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= LOG_SPAN:
      ax.set_xscale("log")
    ax.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} against {key}")
    ax.legend()
    out[f"{metric.removeprefix('eval/')}_vs_{key}"] = fig
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["trial"] for r in scored], [r["best"] for r in scored], "o", label="trial")
  best, running = [], None
  for r in scored:
    better = running is None or (r["best"] > running if mode == "max" else r["best"] < running)
    running = r["best"] if better else running
    best.append(running)
  ax.step([r["trial"] for r in scored], best, where="post", label="best so far")
  ax.set(xlabel="trial", ylabel=f"best {metric}", title="best so far against trial")
  ax.legend()
  out["best_so_far"] = fig
  return out


def sweep_summary(table: list[dict[str, Any]], metric: str, plots: list[str],
                  command: str | None, runs: bool = False) -> str:  # fmt: skip
  """The Markdown table of a sweep's trials."""
  keys = list(dict.fromkeys(k for r in table for k in r["params"]))
  head = ["trial", *keys, f"best {metric}", "status", "time (s)", "workdir"]
  lines = ["# Sweep", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in table:
    cells = [r["trial"], *[r["params"].get(k) for k in keys], r["best"], r["status"],
             r["seconds"] and round(r["seconds"], 1), r["workdir"]]  # fmt: skip
    lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
  if command:
    lines += ["", "The best trial again:", "", "```", command, "```"]
  lines += ["", "## Plots", ""] + [f"![{p}]({p}.png)" for p in plots]
  if runs:
    lines += ["", "The trials' curves side by side: [runs/summary.md](runs/summary.md)."]
  return "\n".join(lines) + "\n"


def write_sweep(table: list[dict[str, Any]], root: pathlib.Path, metric: str, mode: str,
                command: str | None = None) -> pathlib.Path:  # fmt: skip
  """Writes a sweep's `report/`: `summary.md`, its plots, and `runs/`, the trials' report."""
  folder = root / "report"
  folder.mkdir(parents=True, exist_ok=True)
  plots = sweep_figures(table, metric, mode)
  for stem, fig in plots.items():
    fig.savefig(folder / f"{stem}.png")
    plt.close(fig)
  runs = [load(root / r["workdir"], f"trial {r['trial']}") for r in table
          if r["workdir"] and (root / r["workdir"] / "run.json").exists()]  # fmt: skip
  runs = [r for r in runs if "population" not in r.record]  # one run per trial only
  if runs:
    write(runs, folder / "runs")
  summary = sweep_summary(table, metric, list(plots), command, runs=bool(runs))
  (folder / "summary.md").write_text(summary)
  return folder


def default_out(dirs: list[str]) -> pathlib.Path:
  """`DIR/report` for one run; `report/` in the runs' common folder for several."""
  paths = [pathlib.Path(d).expanduser().resolve() for d in dirs]
  if len(paths) == 1:
    return paths[0] / "report"
  return pathlib.Path(os.path.commonpath(paths)) / "report"


def main(argv: list[str]) -> None:
  """Loads the runs named on the command line and writes their report."""
  dirs = argv[1:]
  if not dirs:
    raise ConfigError("usage: python -m jaxtrain.report DIR [DIR ...] [--out FOLDER]")
  runs = [load(d) for d in dirs]
  names = [r.name for r in runs]
  if len(set(names)) < len(names):  # runs/a/x and runs/b/x: name them by their paths
    runs = [r._replace(name=d) for r, d in zip(runs, dirs, strict=True)]
  folder = write(runs, flags.FLAGS.out or default_out(dirs))
  print(f"report of {len(runs)} run(s) written to {folder}")


if __name__ == "__main__":
  flags.DEFINE_string(
    "out", None, "The report's folder; default DIR/report (several: report/ beside)."
  )
  cli.run_tool(main)
