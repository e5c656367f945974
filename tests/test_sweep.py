"""Sweeps (`python -m jaxtrain.sweep`) and populations (`jaxtrain.population`) on digits."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optuna
import pytest
from absl import flags

from experiments import digits
from jaxtrain import loop, population, sweep
from tests import commands, helpers

flags.FLAGS.mark_as_parsed()

TINY = ["--config.model.hidden=(16,)", "--config.train.steps_per_loop=10",
        "--config.train.log_every=20", "--config.ckpt.async=false"]  # fmt: skip
POSTGRES = os.environ.get("JAXTRAIN_TEST_POSTGRES")  # set by .ci/run, which starts the server


def sweep_command(*args, trials=3, steps=100):
  """The sweep of `optim.lr` on digits, with a relative workdir `sweep`."""
  return [sys.executable, "-m", "jaxtrain.sweep", "--experiment", "experiments.digits",
          "--workdir", "sweep", "--space", "optim.lr=loguniform(1e-3,3e-2)", "--trials",
          str(trials), "--metric", "eval/accuracy", *TINY, f"--config.train.steps={steps}",
          "--config.eval.every_steps=20", *args]  # fmt: skip


def run(command, cwd, timeout=300):
  """`command` (`python -m ...`) as a user runs it, through the tests' fork server."""
  assert command[:2] == [sys.executable, "-m"], command
  return commands.run(command[2:], cwd=cwd, env=helpers.subprocess_env(), timeout=timeout)


def trials(workdir, storage=None):
  """The study's trials (read through Optuna), by number."""
  url = storage or f"sqlite:///{workdir / 'study.db'}"
  study = optuna.load_study(study_name="sweep" if storage is None else "shared", storage=url)
  return {t.number: t for t in study.get_trials()}


def record(path):
  return json.loads((path / "run.json").read_text())


def test_sweep_records_each_trial_resumes_after_kill_and_reproduces_the_best(tmp_path):
  command = sweep_command("--config.ckpt.every_steps=20", "--sampler=random:seed=0", steps=160)
  proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=helpers.subprocess_env())  # fmt: skip
  ckpts = tmp_path / "sweep/trials/0001/checkpoints"
  deadline = time.time() + 240
  while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)  # mid-trial: trial 1 has a checkpoint, not its end
  proc.wait()
  assert record(tmp_path / "sweep/trials/0001")["status"] == "running"

  done = run(command, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  root = tmp_path / "sweep"
  # Trial 1 was killed and ran again, as trial 2, in its workdir; trial 3 is new.
  assert sorted(p.name for p in (root / "trials").iterdir()) == ["0000", "0001", "0003"]
  for name in ("0000", "0001", "0003"):
    rec = record(root / "trials" / name)
    assert rec["status"] == "completed" and rec["final_step"] == 160
  resumed = record(root / "trials/0001")
  assert resumed["attempt"] == 2 and resumed["resumed_from"] >= 20
  study = trials(root)
  assert [study[n].state.name for n in sorted(study)] == ["COMPLETE", "FAIL", "COMPLETE",
                                                           "COMPLETE"]  # fmt: skip
  assert study[1].params == study[2].params and study[2].user_attrs["workdir"] == "trials/0001"
  summary = (root / "report/summary.md").read_text()
  assert summary.count("| completed |") == 3
  assert all((root / "report" / f).exists() for f in ("best_so_far.png", "runs/summary.md"))
  assert (root / "report/accuracy_vs_optim.lr.png").exists()

  best = max((study[n] for n in (0, 2, 3)), key=lambda t: t.value)
  assert f"best: trial {best.number}," in done.stdout
  rerun = done.stdout.split("rerun it with:\n")[1].strip()
  assert rerun.startswith("python -m experiments.digits --workdir sweep/best ")
  again = run([sys.executable, *shlex.split(rerun)[1:]], tmp_path)  # as a shell reads it
  assert again.returncode == 0, again.stderr[-2000:]
  trial_dir = root / best.user_attrs["workdir"]
  assert record(root / "best")["eval"] == record(trial_dir)["eval"]  # the same run, exactly


def test_the_pruner_stops_a_trial_that_falls_behind(tmp_path):
  command = sweep_command("--sampler=grid:seed=3", "--pruner=median:n_startup_trials=1",
                          steps=100)  # fmt: skip
  command[command.index("optim.lr=loguniform(1e-3,3e-2)")] = "optim.lr=choice(0.01,0.003,1e-07)"
  done = run(command, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  study = trials(tmp_path / "sweep")
  states = {t.params["optim.lr"]: t.state.name for t in study.values()}
  assert states == {"0.01": "COMPLETE", "0.003": "COMPLETE", "1e-07": "PRUNED"}
  pruned = next(t for t in study.values() if t.state.name == "PRUNED")
  rec = record(tmp_path / "sweep" / pruned.user_attrs["workdir"])
  assert rec["status"] == "pruned" and rec["final_step"] < 100
  assert "| pruned |" in (tmp_path / "sweep/report/summary.md").read_text()


def _two_sweeps(tmp_path, *args):
  """Two sweep processes at once on one study: each trial runs once, in one of them."""
  commands = [sweep_command(f"--sampler=random:seed={i}", "--study=shared", "--pruner=none",
                            *args, trials=6, steps=40) for i in (1, 2)]  # fmt: skip
  procs = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=helpers.subprocess_env()) for c in commands]  # fmt: skip
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  ran = [{int(line.split()[1]) for line in out.splitlines() if line.startswith("trial ")}
         for out, _ in outs]  # fmt: skip
  assert all(ran) and not ran[0] & ran[1] and len(ran[0] | ran[1]) == 6, ran
  return ran


def test_two_sweep_processes_split_one_sqlite_study(tmp_path):
  _two_sweeps(tmp_path)
  study = trials(tmp_path / "sweep", f"sqlite:///{tmp_path / 'sweep/study.db'}")
  done = [t for t in study.values() if t.state.name == "COMPLETE"]
  assert {t.user_attrs["workdir"] for t in done} == {f"trials/shared-{n:04d}" for n in range(6)}
  for t in done:
    assert record(tmp_path / "sweep" / t.user_attrs["workdir"])["attempt"] == 1


@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server: .ci/run starts one and sets "
                    "JAXTRAIN_TEST_POSTGRES=postgresql://user@host:port/db")  # fmt: skip
def test_two_sweep_processes_split_one_postgresql_study(tmp_path):
  optuna.delete_study(study_name="shared", storage=POSTGRES) if "shared" in [
    s.study_name for s in optuna.get_all_study_summaries(POSTGRES)] else None  # fmt: skip
  _two_sweeps(tmp_path, f"--storage={POSTGRES}")
  done = [t for t in trials(tmp_path, POSTGRES).values() if t.state.name == "COMPLETE"]
  assert len(done) == 6 and len({t.user_attrs["workdir"] for t in done}) == 6
  assert not (tmp_path / "sweep/study.db").exists()


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--space", "optim.lr=loguniform(0,1)"], "loguniform needs LOW > 0"),
    (["--space", "optim.nmae=choice(adam,sgd)"], "did you mean optim.name?"),
    (["--space", "optim.name=choice(adam,nope)"], "optim.name='nope' must be one of"),
    (["--metric", "eval/bleu"], "the evaluations report eval/accuracy, eval/loss"),
    (["--pruner", "median:n_startup=1"], "--pruner='median:n_startup=1'"),
    (["--sampler", "tpe:nope=1"], "--sampler='tpe:nope=1'"),
    (["--storage", "runs/study.db"], "--storage='runs/study.db' is not a database URL"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study"),
    (["optim.lr=choice(0.1,0.2)"], "unexpected argument 'optim.lr=choice(0.1,0.2)'"),
    (["--experiment", "experiments.nope"], "experiments.nope"),
  ],
)
def test_a_bad_sweep_flag_is_one_line_and_exit_2(tmp_path, args, message):
  command = sweep_command(*args)
  if args[0] == "--experiment":
    command[command.index("experiments.digits")] = args[1]
    del command[-2:]
  done = run(command, tmp_path)
  assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
  assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
  assert not (tmp_path / "sweep").exists()


def test_overrides_given_as_two_words_reach_the_best_command_as_one():
  args = ["--config", "experiments/lm.py:gpu", "--config.train.steps", "300", "--space",
          "optim.lr=uniform(0,1)", "--config.optim.name=adam", "--workdir", "w"]  # fmt: skip
  given = sweep.overrides(args)
  assert given == ["--config=experiments/lm.py:gpu", "--config.train.steps=300",
                   "--config.optim.name=adam"]  # fmt: skip
  from experiments import lm  # noqa: PLC0415

  sw = sweep.Sweep(lm, None, given, [], "eval/loss", "min", 2, None, "runs/s", None, None, 1, "tpe")
  assert sweep.best_command(sw, {"params": {"optim.lr": 0.001}}) == (
    "python -m experiments.lm --workdir runs/s/best --config=experiments/lm.py:gpu "
    "--config.train.steps=300 --config.optim.name=adam --config.optim.lr=0.001"
  )  # the trial's own command: the sweep's preset, its overrides, then the trial's values


def test_a_workdir_that_is_not_this_sweeps_is_refused(tmp_path):
  (tmp_path / "file").write_text("")
  for workdir, message in [("file", "--workdir=file is a file"),
                           ("run", "--workdir=run holds a run (run.json)"),
                           ("run/sub", "--workdir=run/sub lies inside the run")]:  # fmt: skip
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run/run.json").write_text("{}")
    done = run([*sweep_command(trials=1), f"--workdir={workdir}"], tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]

  first = run(sweep_command(trials=1, steps=20), tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  (tmp_path / "sweep/study.db").unlink()  # the old trials' study is gone: none is made anew
  kept = (tmp_path / "sweep/trials/0000/run.json").read_text()
  before = sorted(p.name for p in (tmp_path / "sweep").iterdir())
  again = run(sweep_command(trials=1, steps=20), tmp_path)
  assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr[-2000:]
  assert "sweep holds trials of study 'sweep' (trials/0000), but" in again.stderr
  assert "study.db is missing" in again.stderr
  assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == before
  assert (tmp_path / "sweep/trials/0000/run.json").read_text() == kept


def small_config(steps=60):
  config = digits.get_config()
  config.model.hidden = (16,)
  config.train.steps, config.train.log_every, config.eval.every_steps = steps, 20, 20
  config.optim.name, config.optim.schedule, config.optim.warmup_steps = "adamw", "cosine", 10
  config.ckpt["async"] = False
  return config


def test_population_members_equal_training_each_alone(tmp_path):
  config = small_config()
  config.early_stop.metric, config.early_stop.mode = "eval/accuracy", "max"
  config.early_stop.patience, config.early_stop.min_delta = 1, 0.01
  config.early_stop.restore_best = False  # the population keeps each member's last state
  members = [
    {"optim.lr": 3e-3},
    {"optim.lr": 1e-2, "optim.weight_decay": 0.1, "train.seed": 7},
    {"optim.lr": 5e-3, "loss.label_smoothing": 0.1},
    {"optim.lr": 1e-6},  # learns nothing: the monitor stops it early
  ]
  model, data, loss = digits.task(config)
  result = population.train(config, model, data, loss, members, workdir=tmp_path / "pop")
  steps = np.asarray(jax.device_get(result.states.step))
  assert result.status[3] == "stopped_early" and steps[3] < config.train.steps
  assert max(steps) == config.train.steps  # the others trained on, past member 3's stop
  for i, member in enumerate(result.configs):
    alone = loop.train(member, *digits.task(member), workdir=tmp_path / f"alone{i}")
    assert alone.status == result.status[i]
    mine = jax.tree.map(lambda x, i=i: x[i], result.states.params)
    assert helpers.max_abs_diff(mine, alone.state.params) < 1e-5, i
    assert result.eval_metrics[i] == pytest.approx(alone.eval_metrics, abs=1e-5)
  lines = [json.loads(x) for x in (tmp_path / "pop/metrics.jsonl").read_text().splitlines()]
  assert {x["member"] for x in lines if x["split"] == "eval"} == {0, 1, 2, 3}

  best = tmp_path / "pop" / "best"  # an ordinary run of the best member, which train resumes
  member = result.configs[result.best]
  assert json.loads((best / "config.json").read_text())["optim"]["lr"] == member.optim.lr
  member.train.steps = 80
  resumed = loop.train(member, *digits.task(member), workdir=best)
  assert record(best)["resumed_from"] == 60 and int(resumed.state.step) == 80


def test_a_population_sweep_trains_its_trials_together_and_reproduces_the_best(tmp_path):
  command = sweep_command("--population=3", "--sampler=random:seed=0", "--space",
                          "loss.label_smoothing=uniform(0,0.2)", steps=60)  # fmt: skip
  done = run(command, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  study = trials(tmp_path / "sweep")
  assert [t.state.name for t in study.values()] == ["COMPLETE"] * 3
  assert {t.user_attrs["workdir"] for t in study.values()} == {"populations/0000"}
  pop = record(tmp_path / "sweep/populations/0000")["population"]
  assert pop["members"][1]["optim.lr"] == study[1].params["optim.lr"]
  best = max(study.values(), key=lambda t: t.value)
  assert pop["best_member"] == best.user_attrs["member"]
  rerun = done.stdout.split("rerun it with:\n")[1].strip()
  again = run([sys.executable, *shlex.split(rerun)[1:]], tmp_path)
  assert again.returncode == 0, again.stderr[-2000:]
  alone, together = (record(tmp_path / "sweep" / d) for d in ("best", "populations/0000/best"))
  assert alone["eval"] == pytest.approx(together["eval"], abs=1e-5)


def test_a_space_a_population_cannot_hold_runs_one_trial_at_a_time(tmp_path):
  command = sweep_command("--population=2", "--space", "optim.name=choice(adam,sgd)", trials=2,
                          steps=20)  # fmt: skip
  done = run(command, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "--population=2: optim.name cannot vary within one compiled program" in done.stdout
  assert sorted(p.name for p in (tmp_path / "sweep/trials").iterdir()) == ["0000", "0001"]
