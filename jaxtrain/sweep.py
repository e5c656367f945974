r"""Hyperparameter sweeps: Optuna trials, each an ordinary run, pruned by its evaluations.

    python -m jaxtrain.sweep --experiment experiments.digits --workdir runs/sweep \
      --space 'optim.lr=loguniform(1e-4,1e-2)' --space 'optim.name=choice(adam,rmsprop,adagrad)' \
      --trials 8 --metric eval/accuracy --mode max

Each trial trains the experiment (its `get_config()`, or a preset's with
`--config=FILE.py:PRESET`, and `task(config, workdir)`, with the sweep's
`--config.KEY=VALUE` overrides and the trial's values) into
`DIR/trials/NNNN` with `jaxtrain.train`: its own config, run record, metrics
and checkpoints. Optuna's sampler (`--sampler`, TPE by default) proposes the
values, and its pruner (`--pruner`, the median rule by default) sees every
evaluation of `--metric`, stopping trials that fall behind (status `pruned` in
their `run.json`). A trial's objective is the best value of the metric among
its evaluations.

The study lives in `DIR/study.db` (SQLite), or in `--storage`, such as
`postgresql://user:password@host/db`, where the same command on several
machines shares the trials: `--trials` counts the whole study's trials. Rerunning the
command resumes: finished trials are kept and a trial that was killed runs
again with the same values, from its checkpoint (at once when it ran on this
machine; when elsewhere, after 60 s without the heartbeat its process records).
At the end, `DIR/report/` holds the trials' table and plots, and the command
that reproduces the best trial is printed (with the sweep's `--config` and
overrides, then the trial's values).

With `--population P` and a space of only float keys that one compiled
program can vary (`jaxtrain.population.KEYS`), P trials at a time train
together as one vmapped population.
"""

import functools
import math
import shlex
import sys
import time
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import flags

from jaxtrain import cli, logs, loop, parts, population, report, space
from jaxtrain import config as config_lib
from jaxtrain import study as study_lib
from jaxtrain import workdir as workdir_lib
from jaxtrain.checkpoint import CheckpointError
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError

try:
  import optuna
except ImportError as e:  # the sweep extra
  raise cli.missing("sweep", "optuna") from e


class Sweep(NamedTuple):
  """A sweep's settings and its open study."""

  experiment: Any  # the module
  base: ml_collections.ConfigDict
  overrides: list[str]  # the command line's --config=FILE:PRESET and --config.KEY=VALUE
  dims: list[space.Dimension]
  metric: str  # eval/NAME
  mode: str
  trials: int
  root: Any  # pathlib.Path
  shown_root: str  # --workdir as given
  study: optuna.Study
  storage: optuna.storages.RDBStorage
  population: int
  sampler: str  # --sampler; a seeded one is made anew for each trial (`study.sampler`)


class _TrialError(Exception):
  """A trial failed for a reason of its own (recorded as the trial's `error`)."""


class _StoppedError(Exception):
  """SIGTERM or Ctrl-C stopped a trial after its checkpoint; the sweep stops too."""

  def __init__(self, status: str, reason: str):
    super().__init__(reason)
    self.status = status


def objective(base: ml_collections.ConfigDict, metric: str | None, mode: str | None):
  """The metric and mode: the given ones, else `early_stop.metric`'s, else `eval/loss`, min.

  Without `--mode`, a metric other than `early_stop.metric` is maximised when
  its name holds `accuracy` and minimised otherwise.
  """
  e = base.early_stop
  metric = metric or e.metric or "eval/loss"
  if not metric.startswith("eval/"):
    metric = f"eval/{metric}"
  if mode is None:
    mode = e.mode if metric == e.metric else ("max" if "accuracy" in metric else "min")
  return metric, mode


def check_run(experiment: Any, config: ml_collections.ConfigDict) -> parts.Spec:
  """Checks a trial's run as `train` would, with abstract shapes: its model, data and loss."""
  model, data, loss = experiment.task(config, None)[:3]
  return parts.prepare(config, model, data, loss)


def check_metric(experiment: Any, base: ml_collections.ConfigDict, metric: str) -> None:
  """Checks the base run (model, loss, data, with abstract shapes) and that it reports `metric`."""
  names = check_run(experiment, base).eval_names
  if metric.removeprefix("eval/") not in names:
    raise ConfigError(f"--metric={metric}: the evaluations report "
                      f"{', '.join('eval/' + n for n in names)}")  # fmt: skip


def run_trial(sw: Sweep, trial: optuna.Trial) -> float:
  """Trains one trial into its workdir; returns its best value of the metric."""
  inherited = trial.user_attrs.get("workdir", "")
  fresh = not inherited or inherited.startswith("populations/")  # no checkpoint to resume
  _new_trial(sw, trial, trial_folder(sw, trial.number) if fresh else inherited)
  values = {d.key: d.suggest(trial) for d in sw.dims}
  path = sw.root / trial.user_attrs["workdir"]
  started = time.time()
  try:
    config = space.apply(sw.base, values)
    parts.validate(config, jax.device_count())
    model, data, loss = sw.experiment.task(config, str(path))[:3]
    result = loop.train(config, model, data, loss, workdir=path,
                        prune=functools.partial(_report, trial, sw.metric))  # fmt: skip
  except (ConfigError, DataError, loop.NonFiniteError, CheckpointError) as e:
    trial.set_user_attr("error", " ".join(str(e).split()))
    raise _TrialError(str(e)) from e
  except KeyboardInterrupt:
    _again(sw, trial)
    raise
  finally:
    trial.set_user_attr("seconds", trial.user_attrs.get("seconds", 0) + time.time() - started)
  trial.set_user_attr("status", result.status)
  if result.status in ("preempted", "interrupted"):
    _again(sw, trial)
    raise _StoppedError(result.status, result.reason)
  try:
    value = best_value(path, sw.metric, sw.mode)
  except ConfigError as e:  # its metrics.jsonl is damaged: this trial fails, the sweep goes on
    trial.set_user_attr("error", " ".join(str(e).split()))
    raise _TrialError(str(e)) from e
  if value is None or not math.isfinite(value):
    trial.set_user_attr("error", f"no finite {sw.metric} among its evaluations")
    raise _TrialError(trial.user_attrs["error"])
  trial.set_user_attr("best", value)
  if result.status == "pruned":
    raise optuna.TrialPruned(result.reason)
  return value


class _SurplusError(Exception):
  """The study already has its `--trials`."""


def _report(trial: optuna.Trial, metric: str, step: int, eval_metrics: dict[str, float]) -> bool:
  trial.report(eval_metrics[metric.removeprefix("eval/")], step)
  return trial.should_prune()


def _again(sw: Sweep, trial: optuna.Trial) -> None:
  """Queues the trial to run again with its values (it resumes from its checkpoint)."""
  study_lib.RETRY(sw.study, sw.storage.get_trial(trial._trial_id))


def best_value(path: Any, metric: str, mode: str) -> float | None:
  """The best evaluation of `metric` in a run's `metrics.jsonl`."""
  values = report.load(path).series("eval", metric.removeprefix("eval/"))[1]
  if not values:
    return None
  return max(values) if mode == "max" else min(values)


def trial_folder(sw: Sweep, number: int, kind: str = "trials") -> str:
  """`trials/NNNN` (or `populations/NNNN`), `trials/STUDY-NNNN` for a study not named as DIR."""
  return f"{kind}/{study_lib.prefix(sw.root, sw.study.study_name)}{number:04d}"


def _new_trial(sw: Sweep, trial: optuna.Trial, workdir: str) -> None:
  """Claims `trial` for this process; raises `_SurplusError` when the study is already full."""
  if "workdir" not in trial.user_attrs:  # a new trial, not one run again
    before = [t for t in sw.study.get_trials(deepcopy=False) if t.number < trial.number]
    if sum(map(study_lib.counts, before)) >= sw.trials:
      trial.set_user_attr("surplus", True)  # another process took the last one first
      raise _SurplusError()
  if workdir != trial.user_attrs.get("workdir") and (sw.root / workdir).exists():
    trial.set_user_attr("surplus", True)
    raise ConfigError(f"{sw.shown_root}/{workdir} holds a run that is not trial {trial.number} "
                      f"of study {sw.study.study_name!r} (was its storage replaced?); give a "
                      "new --workdir or --study")  # fmt: skip
  trial.set_user_attr("workdir", workdir)
  study_lib.claim(trial)


def run(sw: Sweep) -> str:
  """Runs trials until the study has `--trials`; returns completed, preempted or interrupted."""
  try:
    return run_populations(sw) if sw.population > 1 else run_trials(sw)
  except _StoppedError as e:
    print(f"sweep stopped: {e}", flush=True)
    return e.status


def run_trials(sw: Sweep) -> str:
  """Runs one trial at a time until the study is full."""
  objective_fn = functools.partial(run_trial, sw)
  shown = lambda _, frozen: print(trial_line(sw, frozen), flush=True)  # noqa: E731
  while True:
    study_lib.take_over(sw.study, sw.storage)
    if not study_lib.remaining(sw.study, sw.trials):
      return "completed"
    _reseed(sw)
    try:
      sw.study.optimize(objective_fn, n_trials=1, catch=(_TrialError,), callbacks=[shown])
    except _SurplusError:
      return "completed"


def _reseed(sw: Sweep) -> None:
  """A seeded sampler for the trial drawn next: its values do not depend on earlier runs."""
  if study_lib.seeded(sw.sampler):
    number = len(sw.study.get_trials(deepcopy=False))
    sw.study.sampler = study_lib.sampler(sw.sampler, sw.dims, sw.trials, number)


def run_populations(sw: Sweep) -> str:
  """Runs `--population` trials at a time as one vmapped population, until the study is full."""
  while True:
    study_lib.take_over(sw.study, sw.storage)
    if not (left := study_lib.remaining(sw.study, sw.trials)):
      return "completed"
    asked = []
    for _ in range(min(sw.population, left)):
      _reseed(sw)
      trial = sw.study.ask()
      name = trial_folder(sw, (asked or [trial])[0].number, "populations")
      try:
        _new_trial(sw, trial, name)
      except _SurplusError:
        sw.study.tell(trial, state=study_lib.TrialState.FAIL)
        break
      except ConfigError:
        for t in [*asked, trial]:
          sw.study.tell(t, state=study_lib.TrialState.FAIL)
        raise
      trial.set_user_attr("member", len(asked))
      asked.append(trial)
    if not asked:
      return "completed"
    _train_population(sw, asked)


def _train_population(sw: Sweep, asked: list[optuna.Trial]) -> None:
  """Trains the asked trials together and tells the study each one's outcome."""
  members = [{d.key: d.suggest(t) for d in sw.dims} for t in asked]
  path = sw.root / asked[0].user_attrs["workdir"]
  started = time.time()

  def prune(i: int, step: int, eval_metrics: dict[str, float]) -> bool:
    return _report(asked[i], sw.metric, step, eval_metrics)

  try:
    with study_lib.Heartbeats(sw.storage, [t._trial_id for t in asked]):
      model, data, loss = sw.experiment.task(sw.base, str(path))[:3]
      result = population.train(sw.base, model, data, loss, members, workdir=path,
                                metric=sw.metric, mode=sw.mode, prune=prune)  # fmt: skip
  except (ConfigError, DataError, loop.NonFiniteError, CheckpointError) as e:
    for trial in asked:
      trial.set_user_attr("error", " ".join(str(e).split()))
      sw.study.tell(trial, state=study_lib.TrialState.FAIL)
    if isinstance(e, ConfigError | DataError):  # every population would fail the same way
      raise
    print(f"population {path.name} failed: {e}", flush=True)
    return
  if result.stopped:  # SIGTERM or Ctrl-C: the trials run again, afresh, on a rerun
    for trial in asked:
      _again(sw, trial)
      sw.study.tell(trial, state=study_lib.TrialState.FAIL)
    raise _StoppedError(*result.stopped)
  for i, trial in enumerate(asked):
    best = result.best_values[i]
    trial.set_user_attr("status", result.status[i])
    trial.set_user_attr("seconds", time.time() - started)
    if best is None or not math.isfinite(best):
      trial.set_user_attr("error", f"no finite {sw.metric} among its evaluations")
      sw.study.tell(trial, state=study_lib.TrialState.FAIL)
    elif result.status[i] == "pruned":
      trial.set_user_attr("best", best)
      sw.study.tell(trial, state=study_lib.TrialState.PRUNED)
    else:
      trial.set_user_attr("best", best)
      sw.study.tell(trial, best)
    print(trial_line(sw, sw.storage.get_trial(trial._trial_id)), flush=True)


def trial_line(sw: Sweep, frozen: optuna.trial.FrozenTrial) -> str:
  """`trial 3 completed in 12 s: optim.lr=0.0012 ...; eval/accuracy 0.97`."""
  attrs = frozen.user_attrs
  status = attrs.get("status") or frozen.state.name.lower()
  values = " ".join(f"{k}={_show(v)}" for k, v in frozen.params.items())
  line = f"trial {frozen.number} {status} in {attrs.get('seconds', 0):.0f} s: {values}"
  if "error" in attrs:
    return f"{line}; failed: {attrs['error']}"
  best = attrs.get("best")
  return line + (f"; {sw.metric} {best:.4g}" if best is not None else "")


def _show(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(sw: Sweep) -> list[dict[str, Any]]:
  """The table of trials: number, values, best metric, status, seconds, workdir."""
  out = []
  for t in sw.study.get_trials(deepcopy=False):
    if t.user_attrs.get("surplus") or not study_lib.counts(t):
      continue  # left over, or killed and run again under a new number
    status = t.user_attrs.get("status") or t.state.name.lower()
    status = "failed" if "error" in t.user_attrs else status
    out.append({"trial": t.number, "params": dict(t.params), "best": t.user_attrs.get("best"),
                "status": status, "seconds": t.user_attrs.get("seconds"),
                "workdir": t.user_attrs.get("workdir")})  # fmt: skip
  return out


def best_command(sw: Sweep, best: dict[str, Any]) -> str:
  """The command that trains the best trial again, into `DIR/best`."""
  args = ["python", "-m", sw.experiment.__name__, "--workdir", f"{sw.shown_root}/best"]
  args += sw.overrides
  if sw.population > 1:  # the members' data order is the base config's
    args.append(f"--config.data.seed={config_lib.data_seed(sw.base)}")
  args += [f"--config.{k}={v!r}" if isinstance(v, float) else f"--config.{k}={v}"
           for k, v in best["params"].items()]  # fmt: skip
  return " ".join(shlex.quote(a) for a in args)


def finish(sw: Sweep) -> bool:
  """Writes `DIR/report/`, prints the best trial and its command; False if every trial failed.

  Trials that other processes are still running (a shared study) are named,
  and the best is then only the best so far.
  """
  table = rows(sw)
  scored = [r for r in table if r["status"] in FINISHED]  # a pruned trial's best is partial
  best = None
  if scored:
    best = (max if sw.mode == "max" else min)(scored, key=lambda r: r["best"])
  folder = report.write_sweep(table, sw.root, sw.metric, sw.mode,
                              command=best and best_command(sw, best))  # fmt: skip
  done = sum(r["status"] in FINISHED for r in table)
  pruned = sum(r["status"] == "pruned" for r in table)
  running = [r["trial"] for r in table if r["status"] == "running"]
  print(f"{len(table)} trials ({done} finished, {pruned} pruned); report in {folder}")
  label = "best"
  if running:
    label = "best so far"
    print(f"still running elsewhere: trial {', '.join(map(str, running))}; rerun this command "
          "when they end for the final report")  # fmt: skip
  if best:
    print(f"{label}: trial {best['trial']}, {sw.metric} {best['best']:.4g} "
          f"({sw.root / best['workdir']})\nrerun it with:\n  {best_command(sw, best)}")  # fmt: skip
  return not table or any(r["status"] in (*FINISHED, "pruned", "running") for r in table)


FINISHED = ("completed", "stopped_early")
MOST_TRIALS = 1_000_000  # each trial is a run with its own folder


def main(argv: list[str]) -> int:
  """Runs the sweep the flags describe."""
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
  f = flags.FLAGS
  experiment = sys.modules["jaxtrain_sweep_experiment"]
  metric, mode = objective(f.config, f.metric, f.mode)
  check_metric(experiment, f.config, metric)  # the base run first: its model, data and loss
  dims = space.parse(f.space, f.config, functools.partial(check_run, experiment))
  samplers = {"sampler": study_lib.sampler(f.sampler, dims, f.trials),
              "pruner": study_lib.make(study_lib.PRUNERS, f.pruner, "pruner")}  # fmt: skip
  trials = f.trials
  if f.sampler.partition(":")[0] == "grid" and (points := space.size(dims)) < trials:
    print(f"--sampler=grid: the space holds {points} points; the sweep runs {points} trials")
    trials = points
  size = population_size(f.population, f.sampler, dims, f.config)
  signature = {"experiment": experiment.__name__, "space": [d.text() for d in dims],
               "metric": metric, "mode": mode, "config": list(_OVERRIDES)}  # fmt: skip
  root = workdir_lib.resolve(f.workdir)
  study, storage = study_lib.open_sweep(
    root, f.workdir, f.study, f.storage, signature,
    direction="maximize" if mode == "max" else "minimize", **samplers,
  )  # fmt: skip
  sw = Sweep(experiment, f.config, list(_OVERRIDES), dims, metric, mode, trials, root,
             f.workdir, study, storage, size, f.sampler)  # fmt: skip
  with logs.to_file(root, expected=cli.USAGE_ERRORS):
    status = run(sw)
    if not finish(sw) and status == "completed":
      print("error: every trial failed; the trial lines above say why", file=sys.stderr)
      return cli.EXIT_FAILED
  return {"completed": 0, "preempted": cli.EXIT_PREEMPTED}.get(status, cli.EXIT_INTERRUPTED)


def population_size(size: int, sampler: str, dims: list[space.Dimension],
                    base: ml_collections.ConfigDict) -> int:  # fmt: skip
  """`--population`, or 1 (said why) where the sampler or the space cannot train one."""
  if size > 1 and sampler.startswith("grid"):
    print(f"--population={size}: --sampler=grid asks for one trial at a time; "
          "the trials run one at a time", flush=True)  # fmt: skip
    return 1
  if size > 1 and (why := population.why_not(dims, base)):
    print(f"--population={size}: {why}; the trials run one at a time", flush=True)
    return 1
  return size


_OVERRIDES: list[str] = []


def _load(argv: list[str]) -> Any:
  """Imports the `--experiment` module before flags are defined (its config is the flag's)."""
  name = next((a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
               for i, a in enumerate(argv) if a.split("=")[0] == "--experiment"), None)  # fmt: skip
  if not name and cli.asks_help():  # the sweep's own flags; an experiment's keys need it named
    define_flags()
    print(cli.usage())
    sys.exit(0)
  if not name:
    cli.fail(
      "usage: python -m jaxtrain.sweep --experiment experiments.NAME --workdir DIR "
      "--space KEY=DIST [--space ...] --trials N [--metric eval/NAME --mode max]"
    )
  try:
    module = cli.import_experiment(name)
  except ConfigError as e:
    cli.fail(str(e))
  sys.modules["jaxtrain_sweep_experiment"] = module
  _OVERRIDES.extend(overrides(argv[1:]))
  return module


def overrides(args: list[str]) -> list[str]:
  """The `--config=FILE:PRESET` and `--config.KEY=VALUE` arguments, two words joined by `=`."""
  out = []
  for i, a in enumerate(args):
    if a != "--config" and not a.startswith(("--config=", "--config.")):
      continue
    two_words = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
    out.append(f"{a}={args[i + 1]}" if two_words else a)
  return out


def define_flags() -> None:
  """The sweep's own flags (the experiment's `--config` is defined from its module)."""
  flags.DEFINE_string("experiment", None, "The experiment module, such as experiments.digits.")
  flags.DEFINE_string("workdir", None, "The sweep's folder: study.db, trials/, report/.",
                      required=True)  # fmt: skip
  flags.DEFINE_multi_string("space", [], "KEY=DIST, once per key: uniform(LOW,HIGH), "
                            "loguniform(LOW,HIGH), int(LOW,HIGH) or choice(A,B,...).")  # fmt: skip
  flags.DEFINE_integer("trials", 10, "Trials in the study, from every process.", lower_bound=1,
                       upper_bound=MOST_TRIALS)  # fmt: skip
  flags.DEFINE_string("metric", None, "The eval metric to optimise (default: early_stop.metric, "
                      "else eval/loss).")  # fmt: skip
  flags.DEFINE_enum("mode", None, config_lib.MODES, "max or min (default: from the metric).")
  flags.DEFINE_string("storage", None, "An Optuna RDB URL, such as postgresql://user:pw@host/db "
                      "(default: sqlite:///DIR/study.db).")  # fmt: skip
  flags.DEFINE_string("study", None, "The study's name in the storage (default: DIR's name).")
  flags.DEFINE_string("sampler", "tpe", "tpe, random, qmc or grid, optionally NAME:KEY=VALUE,... "
                      "with the Optuna sampler's arguments (tpe:seed=0).")  # fmt: skip
  flags.DEFINE_string("pruner", "median", "median, percentile, halving, hyperband or none, "
                      "optionally NAME:KEY=VALUE,... (median:n_startup_trials=2).")  # fmt: skip
  flags.DEFINE_integer(
    "population", 1, "Train this many trials at once as one vmapped population (float keys "
    "of jaxtrain.population.KEYS only).", lower_bound=1,
  )  # fmt: skip


if __name__ == "__main__":
  experiment = _load(sys.argv)
  cli.define_experiment_config(experiment)
  define_flags()
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  cli.run_tool(lambda argv: sys.exit(main(argv)))
