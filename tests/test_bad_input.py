"""A user's mistakes, as real commands: exit 2, one line naming the key or field, nothing written.

Every case runs the command the user would run (`python -m MODULE ARGS` in its
folder and environment, through `tests.commands`' fork server) against a copy
of a finished run's workdir: the files must come out byte for byte as they went in.
"""

import os
import pathlib
import shutil

import pytest

from tests import commands, helpers

ROOT = pathlib.Path(helpers.ROOT)

# (experiment module, arguments after --workdir, text the one error line must hold)
CLI_CASES = {
  "seed beyond 32 bits": ("digits", ["--config.train.seed=4294967296"], "train.seed=4294967296"),
  "steps beyond int32": ("digits", ["--config.train.steps=2147483650"], "train.steps=2147483650"),
  "zero hidden width": ("digits", ["--config.model.hidden=(0,)"], "hidden=(0,)"),
  "negative hidden width": ("digits", ["--config.model.hidden=(-5,)"], "hidden=(-5,)"),
  "override with a space, unknown key": ("digits", ["--config.train.stepz", "100"], "train.stepz"),
  "infinite learning rate": ("digits", ["--config.optim.lr=inf"], "optim.lr=inf must be finite"),
  "overflowing learning rate": ("digits", ["--config.optim.lr=1e400"], "optim.lr=inf"),
  "infinite weight decay": (
    "digits",
    ["--config.optim.name=adamw", "--config.optim.weight_decay=inf"],
    "optim.weight_decay=inf",
  ),
  "infinite decay rate": ("digits", ["--config.optim.decay_rate=inf"], "optim.decay_rate=inf"),
  "infinite min_delta": ("digits", ["--config.early_stop.min_delta=inf"], "early_stop.min_delta"),
  "monitored metric the loss lacks": (
    "digits",
    ["--config.early_stop.metric=eval/f1"],
    "early_stop.metric='eval/f1' is not an eval metric",
  ),
  "best metric the loss lacks": (
    "digits",
    ["--config.ckpt.best_metric=eval/f1"],
    "ckpt.best_metric='eval/f1' is not an eval metric",
  ),
  "dropout of 1.5": ("digits", ["--config.model.dropout=1.5"], "dropout=1.5"),
  "negative dropout": ("digits", ["--config.model.dropout=-0.1"], "dropout=-0.1"),
  "crop padding of the image size": (
    "digits",
    ["--config.data.crop_padding=8"],
    "data.crop_padding=8 must be below the images' size 8x8",
  ),
  "freezing every parameter": (
    "digits",
    ["--config.optim.freeze=('.*',)"],
    "matches every parameter",
  ),
  "a batch larger than the train set": (
    "digits",
    ["--config.train.batch_size=2048"],
    "train.batch_size=2048 is larger than the 1438 train records",
  ),
  "an eval batch too large to allocate": (
    "digits",
    ["--config.eval.batch_size=2000000000"],
    "eval.batch_size=2000000000 needs about",
  ),
  "data.dir for a bundled dataset": ("digits", ["--config.data.dir=/nonexistent"], "data.dir"),
  "data.dir that does not exist": (
    "fashion_mnist",
    ["--config.data.dir=/nonexistent"],
    "data.dir='/nonexistent' is not a folder",
  ),
  "data.dir without the dataset": (
    "fashion_mnist",
    ["--config.data.dir={empty}"],
    "holds no Fashion-MNIST",
  ),
  "an unknown resume mode": ("digits", ["--resume=sometimes"], "--resume=sometimes"),
  "a stray argument": ("digits", ["extra"], "unexpected argument 'extra'"),
  "a non-boolean for a keyword key": ("digits", ["--config.ckpt.async", "maybe"], "ckpt.async"),
  "an override with no key": ("digits", ["--config.=5"], "no key in --config.=5"),
  "a freeze pattern matching nothing": (
    "digits",
    ["--config.optim.freeze=('^nothing/',)"],
    "optim.freeze: '^nothing/' matches no parameter",
  ),
  "an lr group matching nothing": (
    "digits",
    ["--config.optim.lr_groups=('^nothing/=2',)"],
    "optim.lr_groups: '^nothing/' matches no parameter",
  ),
  "boundaries without the piecewise schedule": (
    "digits",
    ["--config.optim.boundaries=(100,)", "--config.optim.scales=(0.5,)"],
    "optim.boundaries=(100,) needs optim.schedule='piecewise'",
  ),
  "boundaries beyond the run": (
    "digits",
    [
      "--config.optim.schedule=piecewise",
      "--config.optim.boundaries=(900,)",
      "--config.optim.scales=(0.5,)",
    ],
    "optim.boundaries=(900,) must lie from optim.warmup_steps=0 to below the 600 updates",
  ),
  "a monitor warm-up beyond the run": (
    "digits",
    ["--config.early_stop.metric=eval/loss", "--config.early_stop.warmup_steps=1000"],
    "early_stop.warmup_steps=1000 must be below train.steps=600",
  ),
  "a thousand Grain workers": ("digits", ["--config.data.workers=1000"], "data.workers=1000"),
  "a model too large to fit": (
    "digits",
    ["--config.model.hidden=(100000000,)"],
    "the step's largest value (an activation or parameter of the model)",
  ),
}

# (the mistake in tests/user_experiment.py, text the error line must hold)
CODE_CASES = {
  "no_loss_key": "loss_fn returned no 'loss'",
  "scalar_loss": "loss_fn's 'loss' has shape () on a train batch of 16",
  "per_class_loss": "loss_fn's 'loss' has shape (16, 10)",
  "model_instance": "model is an already built MLP",
  "missing_field": "loss_fn reads batch field 'pixels', which the records lack",
  "float_labels": "batch field label has dtype float32; class labels must be integers",
  "labels_outside": "record 11 field label=11 is outside [0, 10) (the model's 10 logits)",
  "tokens_beyond_vocab": "is outside [0, 128) (the model's vocabulary of 128 tokens)",
  "too_long": "sequences of 64 tokens are longer than its 32 positions",
  "loss_bug": "loss_fn on a train batch (image float32[16, 8, 8], label int32[16]) failed",
  "model_without_rngs": "model: building it with rngs= failed",
  "int_logits": "the model returned int32 logits; they must be floating point",
  "int_loss": "loss_fn's 'loss' has dtype int32; it must be floating point",
  "no_params": "the model has no parameters",
  "string_field": "field label has dtype <U1; batches hold numeric or bool arrays",
  "source_raises": "reading it failed: IndexError: record 42 went missing",
  "not_a_dataset": "data is a tuple; pass a jaxtrain.data.Dataset",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A short finished digits run, copied into each case's workdir."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = helpers.digits_cli(workdir, "--config.train.steps=20", "--config.train.log_every=10")
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def _run(module, args, cwd):
  return commands.run([module, *args], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                      timeout=180)  # fmt: skip


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_flag_or_config(name, finished, tmp_path):
  experiment, args, expected = CLI_CASES[name]
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = helpers.snapshot(workdir)
  (tmp_path / "empty").mkdir()
  args = [a.format(empty=tmp_path / "empty") for a in args]
  result = _run(f"experiments.{experiment}", ["--workdir=run", *args], cwd=tmp_path)
  helpers.refused(result, expected)
  assert helpers.snapshot(workdir) == before


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_bad_model_loss_or_data(case, finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = helpers.snapshot(workdir)
  result = _run("tests.user_experiment", ["--workdir=run", f"--case={case}"], cwd=tmp_path)
  helpers.refused(result, CODE_CASES[case])
  assert helpers.snapshot(workdir) == before


@pytest.mark.parametrize(
  "args,expected",
  [
    (["--workdir="], "workdir is empty"),
    (["--workdir=new", "--config.early_stop.metric=eval/f1"], "early_stop.metric"),
    (["--workdir=new/deeper", "--config.model.hidden=(0,)"], "hidden=(0,)"),
  ],
)
def test_nothing_is_created_for_a_new_workdir(args, expected, tmp_path):
  result = _run("experiments.digits", args, cwd=tmp_path)
  helpers.refused(result, expected)
  assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("notes")
  helpers.refused(_run("experiments.digits", ["--workdir=run"], cwd=tmp_path), "is a file")
  assert (tmp_path / "run").read_text() == "notes"


def test_user_experiment_trains_when_nothing_is_wrong(tmp_path):
  """The harness itself is sound: its `ok` case trains."""
  result = _run("tests.user_experiment", ["--workdir=run", "--case=ok"], cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "20").is_dir()
