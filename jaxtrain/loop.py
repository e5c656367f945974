"""`train`: one call that runs a whole training job into a workdir.

`train` makes a `jaxtrain.run.Run` (every check, the workdir's lock, the
restored or fresh sharded state, the records) and iterates it to the end; a
notebook that wants to look between chunks, stop, save and resume steps the
`Run` itself. Rerunning on the same workdir resumes from the newest readable
checkpoint and continues exactly as an uninterrupted run would, as long as the
config changes only what a resume allows (`jaxtrain.resume.RESUMABLE`).
"""

import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import optax

from jaxtrain import metrics, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data.sources import Dataset
from jaxtrain.run import NonFiniteError, Run, TrainResult

__all__ = ["NonFiniteError", "TrainResult", "train"]


def train(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  workdir: str | pathlib.Path | None = None,
  resume: str = "auto",
  rules: sharding.Rules | sharding.LogicalRules | None = None,
  tx: optax.GradientTransformation | None = None,
  schedule: optax.Schedule | None = None,
  prune: Callable[[int, dict[str, float]], bool] | None = None,
  writers: Sequence[metrics.Writer] = (),
) -> TrainResult:
  """Trains `model` on `data` as `config` says, writing the run into `workdir`.

  Args:
    config: the resolved config (see `jaxtrain.config`); validated first.
    model: builds the Flax NNX model from `rngs=nnx.Rngs(...)`, for example
      `functools.partial(models.MLP, 64, (128,), 10)`.
    data: the train and eval sources.
    loss_fn: `loss_fn(model, batch, rngs) -> dict of [B] arrays` with `loss`.
    workdir: receives `config.json`, `run.json`, `metrics.jsonl` and
      `checkpoints/`; relative, `.` and `~` paths work. None trains into a
      fresh temporary folder, which the result names.
    resume: what to do with a workdir that holds checkpoints: `auto` resumes
      unless the config changed a key a resume may not change (then it
      refuses, naming each); `never` refuses to train over checkpoints;
      `force` resumes anyway and records the changed keys in `run.json`.
    rules: path or logical-axis rules for the state; None: `mesh.rules`'s.
    tx: an Optax transform to train with instead of the one the `optim`
      section describes (which is then not used).
    schedule: with `tx`, its learning-rate schedule of the update count, for
      the `lr` metric; without it, the `learning_rate` hyperparameter of an
      `optax.inject_hyperparams` state is reported when there is one.
    prune: called as `prune(step, eval_metrics)` after each evaluation (in
      process 0, whose answer every process follows); True stops the run,
      after a checkpoint, with status `pruned`.
    writers: more metric sinks (`jaxtrain.metrics.Writer`) that get every
      line `metrics.jsonl` gets, in process 0.

  Returns:
    The final state, the model's graph definition, the last eval metrics, the
    status and the workdir.

  Raises:
    ConfigError: for an invalid config, model, loss or optimizer, a busy or
      unusable workdir, or a checkpoint the config contradicts, before
      anything is compiled or written.
    DataError: for bad records, or a field the loss reads that they lack,
      before anything is written.
    CheckpointError: when a checkpoint cannot be written, or no checkpoint of
      the workdir is readable; training stops.
    NonFiniteError: after `train.max_skipped` non-finite updates in a row;
      nothing is saved after them.
  """
  with Run(config, model, data, loss_fn, workdir=workdir, resume=resume, rules=rules, tx=tx,
           schedule=schedule, prune=prune, writers=writers) as run:  # fmt: skip
    for _ in run:
      pass
  return run.result
