"""`train`: restore or build the sharded state, then run the explicit host loop.

The loop dispatches one compiled chunk of `train.steps_per_loop` steps at a
time. While chunk `n` runs on the devices, a background thread puts chunk `n+1`
on them, and the host fetches and logs the metrics of chunk `n-1`, so it waits
on the devices only for evaluations and checkpoints. Periodic work is an `if`
below. Rerunning the same command on the same workdir resumes from the newest
readable checkpoint and continues exactly as an uninterrupted run would.
"""

import functools
import logging
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxtrain import checkpoint, metrics, optim, record, sharding
from jaxtrain import config as config_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import pipeline
from jaxtrain.data.sources import Dataset
from jaxtrain.evaluate import Evaluator

# Config keys that fix which batches a step sees; a resumed run must keep them.
DATA_ORDER_KEYS = ("train.batch_size", "train.steps_per_loop", "train.seed", "data.workers")


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    state: the final `TrainState`.
    graphdef: the model's graph definition; `merge_model(graphdef, state)`
      rebuilds the trained model.
    eval_metrics: the last evaluation's metrics, such as `loss` and `accuracy`.
    status: `completed`, or `preempted` when a SIGTERM stopped the run after a
      checkpoint (rerun the same command to resume).
  """

  state: state_lib.TrainState
  graphdef: nnx.GraphDef
  eval_metrics: dict[str, float]
  status: str


def train(  # noqa: PLR0912, PLR0915 (the loop reads top to bottom by design)
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  workdir: str | pathlib.Path,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainResult:
  """Trains `model` on `data` as `config` says, writing the run into `workdir`.

  Args:
    config: the resolved config (see `jaxtrain.config`); validated first.
    model: builds the Flax NNX model from `rngs=nnx.Rngs(...)`, for example
      `functools.partial(models.MLP, 64, (128,), 10)`.
    data: the train and eval sources.
    loss_fn: `loss_fn(model, batch, rngs) -> dict of [B] arrays` with `loss`.
    workdir: receives `config.json`, `run.json`, `metrics.jsonl` and
      `checkpoints/`; a workdir with checkpoints is resumed.
    rules: the sharding rules table for the state.

  Returns:
    The final state, the model's graph definition, the last eval metrics and
    the status.

  Raises:
    ConfigError: for an invalid config, an unusable workdir, or a checkpoint
      whose data order the config contradicts, before anything is written.
    CheckpointError: when a checkpoint cannot be written; training stops.
  """
  config_lib.validate(config, jax.device_count())
  workdir = record.prepare_workdir(workdir)
  mesh = sharding.make_mesh(config_lib.mesh_shape(config.mesh, jax.device_count()))
  logging.info("devices: %s, mesh: %s", jax.devices(), dict(mesh.shape))
  t, k, c = config.train, config.train.steps_per_loop, config.ckpt
  tx, schedule = _optimizer(config)
  graphdef, abstract = state_lib.abstract_state(model, tx, seed=t.seed, mesh=mesh, rules=rules)
  _check_best_metric(config, graphdef, abstract, data, loss_fn)
  ckpt, restored = _restore(config, workdir, abstract)  # before anything is written
  step = restored.step if restored else 0
  is_main = jax.process_index() == 0
  meter = metrics.Meter(t.batch_size)
  eval_metrics = restored.meta["eval"] if restored else {}
  if restored:
    meter.load(restored.meta["meter"])
  status, run, prefetch, writer, progress, preemption = "completed", None, None, None, None, None

  def finish(end_step: int, chunk_metrics: Any, wait: float) -> bool:
    """Logs a chunk's metrics; returns whether any process voted to stop."""
    host = jax.device_get(chunk_metrics)  # one chunk late: already computed
    stop_vote = bool(host.pop("stop"))
    meter.add(host, wait)
    progress.update(k, loss=float(np.mean(host["loss"])))
    if end_step % t.log_every == 0:
      writer.write(end_step, "train", meter.summary(time.perf_counter(), host))
    return stop_vote

  try:
    run = _open_records(config, workdir, mesh, data, restored=restored, is_main=is_main)
    preemption = checkpoint.PreemptionWatch(mesh)
    writer = metrics.JsonlWriter(workdir / "metrics.jsonl" if is_main else None)
    progress = metrics.Progress(t.steps, step, is_main)
    state = (
      restored.state
      if restored
      else state_lib.init_state(model, tx, seed=t.seed, abstract=abstract)
    )
    train_chunk, evaluate, prefetch = _build(
      config,
      data,
      loss_fn,
      graphdef=graphdef,
      state=state,
      tx=tx,
      schedule=schedule,
      mesh=mesh,
      restored=restored,
    )
    pending, stop, deferred = None, False, None
    data_state = restored.data_state if restored else None
    meter.start_clock(time.perf_counter())
    while step < t.steps:
      chunk, wait, data_state = prefetch.next()
      start = time.perf_counter()
      with jax.transfer_guard("disallow"):  # nothing moves implicitly in the hot loop
        state, chunk_metrics = train_chunk(state, chunk, preemption.votes())
      step += k
      if _compiled(train_chunk, step, run):  # compiling is not training time
        meter.exclude(time.perf_counter() - start)
      if pending:
        stop = finish(*pending)  # every process reads the same vote: all stop here
      if deferred:  # taken at the last boundary; saved while this chunk runs
        ckpt.save(deferred._replace(meta=_bundle_meta(config, mesh, meter, eval_metrics)))
        deferred = None
      ckpt.check()  # a failed background save stops the run at once
      pending = (step, chunk_metrics, wait)
      evaluated = step == t.steps or (
        config.eval.every_steps and step % config.eval.every_steps == 0
      )
      if evaluated or stop:  # the last step is always evaluated
        stop = finish(*pending) or stop
        pending = None
      if evaluated:
        start = time.perf_counter()
        eval_metrics = evaluate(state)
        meter.exclude(time.perf_counter() - start)  # throughput counts training only
        writer.write(step, "eval", eval_metrics)
        progress.update(0, **{f"eval_{n}": v for n, v in eval_metrics.items()})
      if stop or _save_due(config, step) or (evaluated and c.best_metric):
        metrics_ = _prefixed(eval_metrics) if evaluated else None
        if stop or step == t.steps:  # nothing left to overlap with: save now
          meta = _bundle_meta(config, mesh, meter, eval_metrics)
          ckpt.save(checkpoint.bundle(step, state, data_state, meta, metrics_))
        else:  # a device copy, so the next chunk can take the state
          deferred = checkpoint.bundle(step, state, data_state, {}, metrics_, copy=True)
      if stop and step < t.steps:
        status = "preempted"
        break
    ckpt.wait()
    run.update(
      status=status,
      final_step=step,
      eval=eval_metrics,
      reason="SIGTERM: checkpoint saved; rerun to resume" if status == "preempted" else None,
    )
  except BaseException as e:
    try:
      if run:
        run.update(status="failed", reason=f"{type(e).__name__}: {e}", final_step=step)
    except OSError as write_error:  # a full disk: the first error is the one to report
      logging.error("could not record the failure in run.json: %s", write_error)
    raise
  finally:
    for part in (prefetch, writer, progress, preemption, ckpt):
      if part:
        part.close()
  return TrainResult(state, graphdef, eval_metrics, status)


def _optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and learning-rate schedule that the `optim` section names."""
  t, o = config.train, config.optim
  schedule = optim.schedule(
    o.schedule,
    lr=o.lr,
    total_steps=t.steps // o.accum_steps,
    warmup_steps=o.warmup_steps,
    decay_fraction=o.decay_fraction,
  )
  tx = optim.optimizer(
    o.name, schedule, weight_decay=o.weight_decay, clip_norm=o.clip_norm, accum_steps=o.accum_steps
  )
  return tx, schedule


def _build(
  config: ml_collections.ConfigDict,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  graphdef: nnx.GraphDef,
  state: state_lib.TrainState,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  restored: checkpoint.Restored | None,
) -> tuple[Any, Evaluator, pipeline.Prefetcher]:
  """The compiled chunk, the evaluator and the prefetching data stream."""
  t = config.train
  shardings = jax.tree.map(lambda x: x.sharding, state)
  accum = config.optim.accum_steps
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=loss_fn,
    schedule=lambda n: schedule(n // accum),
  )
  unroll = t.unroll or step_lib.auto_unroll(
    step_fn, state, _abstract_batch(data.train, t.batch_size), t.steps_per_loop
  )
  logging.info("train_chunk: %d steps per dispatch, unroll %d", t.steps_per_loop, unroll)
  chunks = iter(
    pipeline.train_chunks(
      data.train,
      batch_size=t.batch_size,
      seed=t.seed,
      steps_per_loop=t.steps_per_loop,
      workers=config.data.workers,
      rows=sharding.process_rows(mesh, t.batch_size),
    )
  )
  if restored and restored.data_state is not None:
    chunks.set_state(restored.data_state)
  evaluator = Evaluator(
    graphdef, loss_fn, data.eval, batch_size=config.eval.batch_size, shardings=shardings, mesh=mesh
  )
  prefetch = pipeline.Prefetcher(
    chunks, lambda c: sharding.put_batch(c, mesh, t.batch_size, leading_dims=1)
  )
  return step_lib.make_train_chunk(step_fn, shardings, mesh, unroll), evaluator, prefetch


def _restore(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, abstract: state_lib.TrainState
) -> tuple[checkpoint.Checkpointer, checkpoint.Restored | None]:
  """Opens the workdir's checkpoints and restores the newest readable one, if any."""
  c = config.ckpt
  ckpt = checkpoint.Checkpointer(
    workdir / "checkpoints",
    keep=c.keep,
    async_save=c["async"],
    best_metric=c.best_metric,
    best_mode=c.best_mode,
  )
  try:
    restored = ckpt.restore(abstract)
    if restored:
      _check_resumable(config, restored)
      logging.info("resuming from the checkpoint at step %d", restored.step)
  except BaseException:
    ckpt.close()
    raise
  return ckpt, restored


def _open_records(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  mesh: Mesh,
  data: Dataset,
  *,
  restored: checkpoint.Restored | None,
  is_main: bool,
) -> record.RunRecord:
  """Writes `config.json`, trims `metrics.jsonl` to the resumed step, starts `run.json`."""
  step = restored.step if restored else 0
  if is_main:
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    metrics.truncate_jsonl(workdir / "metrics.jsonl", step)  # drop what a killed run logged
  return record.RunRecord(
    workdir,
    is_main,
    record.run_fields(config, mesh, data, workdir),
    resumed_from=step if restored else None,
  )


def _save_due(config: ml_collections.ConfigDict, step: int) -> bool:
  every = config.ckpt.every_steps
  return step == config.train.steps or bool(every and step % every == 0)


def _prefixed(eval_metrics: dict[str, float]) -> dict[str, float]:
  return {f"eval/{name}": value for name, value in eval_metrics.items()}


def _bundle_meta(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  meter: metrics.Meter,
  eval_metrics: dict[str, float],
) -> dict[str, Any]:
  """What a checkpoint records beside the state: enough to resume and to audit."""
  return {
    "config_hash": config_lib.config_hash(config),
    "data_order": {key: config_lib.get(config, key) for key in DATA_ORDER_KEYS},
    "mesh": dict(mesh.shape),
    "versions": record.versions(),
    "meter": meter.state_dict(),
    "eval": eval_metrics,
    "time": record.now(),
  }


def _check_resumable(config: ml_collections.ConfigDict, restored: checkpoint.Restored) -> None:
  """Raises `ConfigError` when the config changes which batches the next steps see."""
  for key, saved in restored.meta["data_order"].items():
    if config_lib.get(config, key) != saved:
      raise config_lib.ConfigError(
        f"{key}={config_lib.get(config, key)!r} differs from {saved!r} in the checkpoint at "
        f"step {restored.step}; keep it to resume, or use another workdir"
      )
  if restored.meta["config_hash"] != config_lib.config_hash(config):
    logging.warning("resuming step %d with a changed config", restored.step)


def _check_best_metric(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  abstract: state_lib.TrainState,
  data: Dataset,
  loss_fn: step_lib.LossFn,
) -> None:
  """Raises `ConfigError` when `ckpt.best_metric` is not an eval metric of `loss_fn`."""
  name = config.ckpt.best_metric.removeprefix("eval/")
  if not name:
    return
  batch = _abstract_batch(data.eval, config.eval.batch_size)
  batch["mask"] = jax.ShapeDtypeStruct((config.eval.batch_size,), np.int32)
  eval_fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=loss_fn)
  names = sorted(set(jax.eval_shape(eval_fn, abstract, batch)) - {"count"})
  if name not in names:
    raise config_lib.ConfigError(
      f"ckpt.best_metric={config.ckpt.best_metric!r} is not an eval metric "
      f"(eval/{', eval/'.join(names)})"
    )


def _abstract_batch(source: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch, from the source's first record."""
  return {
    k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype)
    for k, v in source[0].items()
  }


def _compiled(train_chunk: Any, step: int, run: record.RunRecord) -> bool:
  """Returns whether the last call compiled; reports any compilation after the first.

  A second executable means a shape, dtype or sharding of the state or batch
  changed between chunks, which costs a compilation and is a bug.
  """
  count, before = step_lib.compilations(train_chunk), run.fields["train_chunk_compilations"]
  if count == before:
    return False
  if before:
    logging.warning(
      "train_chunk compiled again at step %d (%d executables): a shape, dtype "
      "or sharding of the state or batch changed",
      step,
      count,
    )
  run.update(train_chunk_compilations=count)
  return True
