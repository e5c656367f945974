"""Early stopping, restore_best, reduce-on-plateau and the non-finite limit, end to end."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses
from jaxtrain.evaluate import Evaluator
from tests import helpers

# Digits with Adam 1e-2, evaluated every 10 steps of a 400-step schedule: the
# accuracy stops improving by 0.005 well before step 400, and the monitor stops the run.
EARLY = {
  "train.steps": 400,
  "optim.lr": 1e-2,
  "eval.every_steps": 10,
  "ckpt.every_steps": 0,
  "early_stop.metric": "eval/accuracy",
  "early_stop.mode": "max",
  "early_stop.patience": 2,
  "early_stop.min_delta": 0.005,
}


def _run(digits, workdir, resume="auto", **overrides):
  config = helpers.tiny_config(**{**EARLY, **overrides})
  return jaxtrain.train(
    config, helpers.mlp(), digits, losses.classification, workdir=workdir, resume=resume
  )


def _json(path):
  return json.loads(path.read_text())


def _lines(workdir, split):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  timing = lambda k: "per_sec" in k or "wait" in k or k == "time"  # noqa: E731
  return [{k: v for k, v in x.items() if not timing(k)} for x in lines if x["split"] == split]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
  workdir = tmp_path_factory.mktemp("early")
  return workdir, _run(digits, workdir)


def test_stops_when_patience_runs_out(reference):
  workdir, result = reference
  run = _json(workdir / "run.json")
  evals = _lines(workdir, "eval")
  accuracy = [x["accuracy"] for x in evals]
  best = int(np.argmax(accuracy))  # the first of the ties
  assert result.status == run["status"] == "stopped_early"
  assert run["best_step"] == evals[best]["step"]
  assert run["stopped_early"] is True
  assert run["reason"] == (
    "eval/accuracy: early_stop.patience evaluations in a row without improvement "
    f"(best {accuracy[best]:.6g} at step {run['best_step']})"
  )
  assert run["best_value"] == pytest.approx(accuracy[best])
  # Two evaluations (patience 2) without an improvement of 0.005 after the best: the 2nd stops.
  assert run["final_step"] == int(result.state.step) == evals[best]["step"] + 20 < 400
  assert all(x < accuracy[best] + 0.005 for x in accuracy[best + 1 :])
  assert run["train_chunk_compilations"] == 1


def test_resume_mid_patience_stops_at_the_same_step(reference, tmp_path, digits):
  ref_dir, ref = reference
  best_step = _json(ref_dir / "run.json")["best_step"]
  _run(digits, tmp_path, **{"train.steps": best_step + 10})  # ends with one evaluation waited
  waited = _json(tmp_path / "run.json")
  assert waited["status"] == "completed" and waited["best_step"] == best_step
  resumed = _run(digits, tmp_path)  # the full schedule again: resumes mid-patience
  run, ref_run = _json(tmp_path / "run.json"), _json(ref_dir / "run.json")
  assert run["resumed_from"] == best_step + 10
  for key in ("status", "final_step", "best_step", "best_value", "reason", "eval"):
    assert run[key] == ref_run[key], key
  assert helpers.max_abs_diff(resumed.state.params, ref.state.params) == 0
  assert _lines(tmp_path, "eval") == _lines(ref_dir, "eval")


def test_a_stopped_run_stays_stopped(reference, tmp_path, digits):
  ref_dir, _ = reference
  shutil.copytree(ref_dir, tmp_path / "w")
  again = _run(digits, tmp_path / "w")
  run = _json(tmp_path / "w" / "run.json")
  assert again.status == run["status"] == "stopped_early"
  assert run["final_step"] == _json(ref_dir / "run.json")["final_step"]
  assert run["attempt"] == 2


def _monitor_best(values, min_delta):
  """The step the monitor counts best in max mode, replayed on the host."""
  best, best_step = -float("inf"), None
  for step, value in values:
    if value > best + min_delta:
      best, best_step = value, step
  return best_step


def test_restore_best_returns_the_best_checkpoint(reference, tmp_path, digits):
  """Only the newest checkpoint and the monitor's best are kept (keep=1, a save every chunk).

  With min_delta 0.02, a later evaluation beats the monitor's best by less than that:
  the step kept and restored must be the monitor's, not the best by raw value.
  """
  result = _run(
    digits,
    tmp_path,
    **{
      "early_stop.restore_best": True,
      "early_stop.min_delta": 0.02,
      "early_stop.patience": 3,
      "ckpt.keep": 1,
      "ckpt.every_steps": 5,
    },
  )
  run = _json(tmp_path / "run.json")
  evals = _lines(tmp_path, "eval")
  best_step = _monitor_best([(x["step"], x["accuracy"]) for x in evals], 0.02)
  raw_best = max(evals, key=lambda x: x["accuracy"])
  assert raw_best["step"] != best_step  # the case this test is for
  best_eval = next(x for x in evals if x["step"] == best_step)
  assert run["best_step"] == run["restored_step"] == int(result.state.step) == best_step
  assert best_step < run["final_step"]
  assert run["eval"] == result.eval_metrics == {k: best_eval[k] for k in ("accuracy", "loss")}
  assert run["last_eval"] == {k: evals[-1][k] for k in ("accuracy", "loss")}
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert kept == [best_step, run["final_step"]]

  mesh = jax.tree.leaves(result.state.params)[0].sharding.mesh
  shardings = jax.tree.map(lambda x: x.sharding, result.state)
  evaluate = Evaluator(
    result.graphdef, losses.classification, digits.eval, batch_size=64, shardings=shardings,
    mesh=mesh,
  )  # fmt: skip
  again = evaluate(result.state)  # the returned weights really score the best evaluation
  assert again["accuracy"] == pytest.approx(best_eval["accuracy"], abs=1e-6)
  assert again["loss"] == pytest.approx(best_eval["loss"], abs=1e-6)
  assert again["loss"] != pytest.approx(evals[-1]["loss"], abs=1e-4)


def test_plateau_halves_the_lr_at_the_expected_evaluations(tmp_path, digits):
  """min_delta 10 on the loss: only the first evaluation improves; each later one halves."""
  result = _run(
    digits,
    tmp_path,
    **{
      "train.steps": 40,
      "train.log_every": 5,
      "early_stop.metric": "eval/loss",
      "early_stop.mode": "min",
      "early_stop.patience": 100,
      "early_stop.min_delta": 10.0,
      "plateau.factor": 0.5,
      "plateau.patience": 0,
    },
  )
  lr = {x["step"]: x["lr"] for x in _lines(tmp_path, "train")}
  want = {5: 1, 10: 1, 15: 1, 20: 1, 25: 0.5, 30: 0.5, 35: 0.25, 40: 0.25}  # evals at 10, 20, 30
  assert lr == pytest.approx({step: 1e-2 * scale for step, scale in want.items()})
  run = _json(tmp_path / "run.json")
  assert result.status == "completed" and run["stopped_early"] is False
  assert run["lr_scale"] == 0.125  # the evaluation at step 40 halved it once more
  assert run["train_chunk_compilations"] == 1


def test_max_skipped_fails_the_run_and_keeps_the_good_checkpoint(tmp_path, digits):
  """Ten good SGD steps, then a resume at lr 1e30: one update overflows, the next ones skip.

  The states inside the run of skips are not saved, so with keep=1 the good step 10
  survives, unchanged.
  """
  sgd = {
    "optim.name": "sgd",
    "train.max_skipped": 7,
    "train.log_every": 5,
    "ckpt.every_steps": 5,
    "ckpt.keep": 1,
    "early_stop.metric": "",
  }
  good = _run(digits, tmp_path, **{**sgd, "train.steps": 10})
  with pytest.raises(
    jaxtrain.NonFiniteError, match=r"9 updates in a row .*max_skipped=7.*checkpoint is step 10"
  ):
    _run(digits, tmp_path, resume="force", **{**sgd, "optim.lr": 1e30})
  run = _json(tmp_path / "run.json")
  assert run["status"] == "failed" and "NonFiniteError" in run["reason"]
  assert run["forced_changes"] == {"optim.lr": [1e-2, 1e30]}
  assert run["skipped_steps"] == 9
  assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir()] == [10]
  skips = {x["step"]: x["skipped"] for x in _lines(tmp_path, "train")}
  assert skips == {5: 0, 10: 0, 15: pytest.approx(0.8), 20: 1}  # steps 12 to 20 skipped
  again = _run(digits, tmp_path, **{**sgd, "train.steps": 10})  # the good step is intact
  assert helpers.max_abs_diff(again.state.params, good.state.params) == 0


def test_cli_exit_statuses(tmp_path):
  """Stopped early: 0, twice (the rerun stays stopped); too many skips: 1 with one line."""
  stop = [
    "--config.train.steps=400",
    "--config.eval.every_steps=100",
    "--config.early_stop.metric=eval/accuracy",
    "--config.early_stop.mode=max",
    "--config.early_stop.baseline=0.999",  # not reached: nothing improves
    "--config.early_stop.patience=0",
  ]
  for attempt in (1, 2):
    result = helpers.digits_cli(tmp_path / "stop", *stop)
    assert result.returncode == 0, result.stderr[-2000:]
    run = _json(tmp_path / "stop" / "run.json")
    assert (run["status"], run["final_step"], run["best_step"]) == ("stopped_early", 100, None)
    assert run["attempt"] == attempt
  nan = ["--config.optim.name=sgd", "--config.optim.lr=1e30", "--config.train.max_skipped=3"]
  result = helpers.digits_cli(tmp_path / "nan", *nan)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "train.max_skipped=3" in errors[0]
  assert "Traceback" not in result.stderr


def test_monitor_starts_afresh_when_what_it_watches_changes(tmp_path, digits):
  _run(digits, tmp_path, **{"train.steps": 20, "early_stop.metric": ""})  # no monitor
  _run(digits, tmp_path, resume="force", **{"train.steps": 40})  # now watching eval/accuracy
  run = _json(tmp_path / "run.json")
  assert run["resumed_from"] == 20
  assert run["forced_changes"] == {"early_stop.metric": ["", "eval/accuracy"]}
  assert run["best_step"] in (30, 40)  # the first evaluation after the resume improves


def test_a_restarted_monitor_keeps_the_plateau_lr(tmp_path, digits):
  plateau = {"plateau.factor": 0.5, "plateau.patience": 0, "train.log_every": 5}
  only_first = {"early_stop.min_delta": 10.0, "early_stop.patience": 100}  # one improvement
  loss = {"early_stop.metric": "eval/loss", "early_stop.mode": "min"}
  _run(digits, tmp_path, **{**plateau, **only_first, **loss, "train.steps": 20})
  assert _json(tmp_path / "run.json")["lr_scale"] == 0.5  # halved at the evaluation at 20
  _run(digits, tmp_path, "force", **{**plateau, **only_first, "train.steps": 30})  # eval/accuracy
  run = _json(tmp_path / "run.json")
  assert run["best_step"] == 30 and run["lr_scale"] == 0.5  # a first evaluation: no cut
  lr = {x["step"]: x["lr"] for x in _lines(tmp_path, "train")}
  assert lr[25] == lr[30] == pytest.approx(5e-3)
