"""`train`: restore or build the sharded state, then run the explicit host loop.

The loop dispatches one compiled chunk of `train.steps_per_loop` steps at a
time. While chunk `n` runs on the devices, a background thread puts chunk `n+1`
on them, and the host fetches and logs the metrics of chunk `n-1`, so it waits
on the devices only for evaluations and checkpoints. Periodic work is an `if`
below. Rerunning the same command on the same workdir resumes from the newest
readable checkpoint and continues exactly as an uninterrupted run would.

With `early_stop.metric` set, every evaluation feeds the state's monitor
(`jaxtrain.monitor`), which may stop the run or lower the learning rate; its
state is checkpointed with the rest, so a resumed run stops at the same step.
"""

import functools
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxtrain import checkpoint, metrics, optim, precision, record, sharding
from jaxtrain import config as config_lib
from jaxtrain import monitor as monitor_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import checks, pipeline, transforms
from jaxtrain.data.sources import DataError, Dataset
from jaxtrain.evaluate import Evaluator

# Config keys that fix which batches a step sees; a resumed run must keep them.
# (`data.workers` and `train.steps_per_loop` may change: batch `g` is the same anyway.)
DATA_ORDER_KEYS = ("train.batch_size", "train.seed")


class NonFiniteError(RuntimeError):
  """Too many updates in a row had a non-finite loss or gradient."""


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    state: the final `TrainState`; with `early_stop.restore_best`, the best
      checkpoint's.
    graphdef: the model's graph definition; `merge_model(graphdef, state)`
      rebuilds the trained model.
    eval_metrics: the metrics, such as `loss` and `accuracy`, of the last
      evaluation, or of the best one with `early_stop.restore_best`.
    status: `completed`; `stopped_early` when the monitor stopped the run; or
      `preempted` when a SIGTERM stopped it after a checkpoint (rerun the same
      command to resume).
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
  tx: optax.GradientTransformation | None = None,
  schedule: optax.Schedule | None = None,
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
    tx: an Optax transform to train with instead of the one the `optim`
      section describes (which is then not used).
    schedule: with `tx`, its learning-rate schedule of the update count, for
      the `lr` metric; without it, the `learning_rate` hyperparameter of an
      `optax.inject_hyperparams` state is reported when there is one.

  Returns:
    The final state, the model's graph definition, the last eval metrics and
    the status.

  Raises:
    ConfigError: for an invalid config, an unusable workdir, or a checkpoint
      whose data order the config contradicts, before anything is written.
    DataError: for an empty source or a record whose fields, shapes or dtypes
      differ from the first train record's, before anything is written.
    CheckpointError: when a checkpoint cannot be written; training stops.
    NonFiniteError: after `train.max_skipped` non-finite updates in a row;
      nothing is saved after them.
  """
  config_lib.validate(config, jax.device_count())
  checks.check_dataset(data)  # a bad record stops the run here, before anything is written
  workdir = record.prepare_workdir(workdir)
  mesh = sharding.make_mesh(config_lib.mesh_shape(config.mesh, jax.device_count()))
  logging.info("devices: %s, mesh: %s", jax.devices(), dict(mesh.shape))
  t, k, e = config.train, config.train.steps_per_loop, config.early_stop
  watch = monitor_lib.MonitorConfig.from_config(config)
  tx, schedule = _optimizer(config, tx, schedule)
  policy = precision.get_policy(
    config.precision.policy, config.precision.f32_modules, config.precision.loss_scale_period
  )
  graphdef, abstract = state_lib.abstract_state(
    model, tx, seed=t.seed, mesh=mesh, rules=rules, policy=policy
  )
  if len(optax.tree_utils.tree_get_all_with_path(abstract.opt_state, "lr_multiplier")) > 1:
    raise config_lib.ConfigError(
      "plateau.factor < 1 adds an optim.lr_multiplier(); the given tx must not hold one"
    )
  _check_metric_names(config, graphdef, abstract, data, loss_fn)
  ckpt, restored = _restore(config, workdir, abstract)  # before anything is written
  step = restored.step if restored else 0
  is_main = jax.process_index() == 0
  meter = metrics.Meter(t.batch_size)
  eval_metrics = restored.meta["eval"] if restored else {}
  skipped = restored.meta["skipped"] if restored else 0
  in_a_row = 0  # skipped updates at the end of the last chunk read
  saved = restored.step if restored else None
  if restored:
    meter.load(restored.meta["meter"])
  status, run, prefetch, writer, progress, preemption = "completed", None, None, None, None, None

  def finish(end_step: int, chunk_metrics: Any, wait: float) -> bool:
    """Logs a chunk's metrics; returns whether any process voted to stop."""
    nonlocal skipped, in_a_row
    host = jax.device_get(chunk_metrics)  # one chunk late: already computed
    stop_vote = bool(host.pop("stop"))
    runs = host.pop("skipped_in_a_row")
    in_a_row = int(runs[-1])
    skipped += int(np.sum(host["skipped"]))
    meter.add(host, wait)
    progress.update(k, loss=float(np.mean(host["loss"])))
    if end_step % t.log_every == 0:
      writer.write(end_step, "train", meter.summary(time.perf_counter(), host))
    if t.max_skipped and np.max(runs) >= t.max_skipped:
      kept = f"step {saved} is the newest checkpoint" if saved else "no checkpoint was saved"
      raise NonFiniteError(
        f"{np.max(runs)} updates in a row had a non-finite loss or gradient and were skipped "
        f"(train.max_skipped={t.max_skipped}, by step {end_step}); {kept}"
      )
    return stop_vote

  def save(bundle: checkpoint.Bundle) -> None:
    """Saves, unless the state follows skipped updates: a bad run must not evict good steps."""
    nonlocal saved
    if in_a_row:
      logging.warning("not saving step %d: its last %d updates were skipped", bundle.step, in_a_row)
      return
    ckpt.save(bundle)
    saved = bundle.step

  def meta() -> dict[str, Any]:
    return _bundle_meta(config, mesh, meter, eval_metrics, skipped)

  try:
    run = _open_records(config, workdir, mesh, data, restored=restored, is_main=is_main)
    preemption = checkpoint.PreemptionWatch(mesh)
    writer = metrics.JsonlWriter(workdir / "metrics.jsonl" if is_main else None)
    progress = metrics.Progress(t.steps, step, is_main)
    state = _start_state(
      config, model, tx, abstract=abstract, watch=watch, restored=restored, policy=policy
    )
    train_chunk, evaluate, stream = _build(
      config,
      data,
      loss_fn,
      graphdef=graphdef,
      state=state,
      tx=tx,
      schedule=schedule,
      mesh=mesh,
      policy=policy,
    )
    prefetch = stream(_start_batch(restored), max(config.data.workers, 0))
    tuner = pipeline.AutoWorkers(config.data.max_workers) if config.data.workers < 0 else None
    observe = step_lib.make_observe(watch, jax.tree.map(lambda x: x.sharding, abstract))
    pending, stop, deferred = None, False, None
    verdict = monitor_lib.summary(state.monitor, watch) if e.metric else None
    if verdict and verdict["reason"]:  # restored from a run the monitor stopped: it stays so
      status = "stopped_early"
    meter.start_clock(time.perf_counter())
    while step < t.steps and not (verdict and verdict["reason"]):
      chunk, wait = prefetch.next()
      timed = tuner is not None and tuner.timing
      if timed:  # time the devices alone: from a finished state to finished metrics
        jax.block_until_ready(state)
      start = time.perf_counter()
      with jax.transfer_guard("disallow"):  # nothing moves implicitly in the hot loop
        state, chunk_metrics = train_chunk(state, chunk, preemption.votes())
      step += k
      compiled = _compiled(train_chunk, step, run)
      if compiled:  # compiling is not training time
        meter.exclude(time.perf_counter() - start)
      if timed:
        jax.block_until_ready(chunk_metrics)
        chosen = tuner.add(time.perf_counter() - start, compiled, prefetch.timings())
        if chosen:
          prefetch = _switch_workers(prefetch, stream, step, chosen, run)
      data_state = {"next_batch": step}  # the stream's state after this chunk
      if pending:
        stop = finish(*pending)  # every process reads the same vote: all stop here
      if deferred:  # taken at the last boundary; saved while this chunk runs
        save(deferred._replace(meta=meta()))
        deferred = None
      ckpt.check()  # a failed background save stops the run at once
      pending = (step, chunk_metrics, wait)
      evaluated = step == t.steps or (
        config.eval.every_steps and step % config.eval.every_steps == 0
      )
      if evaluated or stop:  # the last step is always evaluated
        stop = finish(*pending) or stop
        pending = None
      best = None  # the metrics that rank this step among the checkpoints
      if evaluated:
        start = time.perf_counter()
        eval_metrics = evaluate(state)
        if e.metric:  # before the save, so the checkpoint holds the monitor's new state
          state = observe(state, eval_metrics[e.metric.removeprefix("eval/")])
          verdict = monitor_lib.summary(state.monitor, watch)
          progress.update(0, **_progress_fields(verdict))
        meter.exclude(time.perf_counter() - start)  # throughput counts training only
        writer.write(step, "eval", eval_metrics)
        progress.update(0, **{f"eval_{n}": v for n, v in eval_metrics.items()})
        if _best_rule(config)[0] and (not e.restore_best or verdict["best_step"] == step):
          best = _prefixed(eval_metrics)  # with restore_best, only the monitor's improvements
      halt = stop or bool(verdict and verdict["reason"])
      if halt or _save_due(config, step) or best:
        if halt or step == t.steps:  # nothing left to overlap with: save now
          save(checkpoint.bundle(step, state, data_state, meta(), best))
        else:  # a device copy, so the next chunk can take the state
          deferred = checkpoint.bundle(step, state, data_state, {}, best, copy=True)
      if verdict and verdict["reason"]:
        logging.info("early stop at step %d: %s", step, verdict["reason"])
        status = "stopped_early"
        break
      if stop and step < t.steps:
        status = "preempted"
        break
    ckpt.wait()
    kept = f"the newest checkpoint is step {saved}" if saved else "no checkpoint was saved"
    reasons = {"preempted": f"SIGTERM: {kept}; rerun to resume"}
    if verdict:
      reasons["stopped_early"] = _stop_reason(e.metric, verdict)
    fields = {"final_step": step, "reason": reasons.get(status), "skipped_steps": skipped}
    if verdict:
      fields.update(_monitor_fields(verdict, status))
      if e.restore_best and status != "preempted":
        fields["last_eval"] = eval_metrics
        state, eval_metrics = _restore_best(ckpt, abstract, verdict, state, eval_metrics)
        fields["restored_step"] = int(jax.device_get(state.step))
    run.update(status=status, eval=eval_metrics, **fields)
  except BaseException as error:
    try:
      if run:
        reason = f"{type(error).__name__}: {error}"
        run.update(status="failed", reason=reason, final_step=step, skipped_steps=skipped)
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
  tx: optax.GradientTransformation | None,
  schedule: optax.Schedule | None,
) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
  """The run's transform, and its schedule as a function of the step (for the `lr` metric).

  The `optim` section's schedule counts updates, `optim.accum_steps` steps each;
  a given `tx` and `schedule` are taken as they are.
  """
  plateau = config.plateau.factor < 1
  if tx is None:
    if schedule is not None:
      raise ValueError("train(schedule=...) describes a given tx; pass tx= too")
    tx, sched = optim.from_config(config, multiplier=plateau)
    accum = config.optim.accum_steps
    return tx, lambda n: sched(n // accum)
  return (optax.chain(tx, optim.lr_multiplier()) if plateau else tx), schedule


def _fresh_state(
  model: state_lib.ModelFn,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  abstract: state_lib.TrainState,
  watch: monitor_lib.MonitorConfig,
  policy: precision.Policy,
) -> state_lib.TrainState:
  """The initial state, with the monitor set up for the configured mode and baseline."""
  state = state_lib.init_state(model, tx, seed=seed, abstract=abstract, policy=policy)
  return state.replace(monitor=_fresh_monitor(abstract, watch))


def _fresh_monitor(
  abstract: state_lib.TrainState, watch: monitor_lib.MonitorConfig, lr_scale: Any = 1.0
) -> monitor_lib.MonitorState:
  """A monitor before any evaluation, with `lr_scale`, as new arrays in the state's layout."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract.monitor)
  init = lambda scale: monitor_lib.init(watch)._replace(lr_scale=jnp.asarray(scale, jnp.float32))  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(lr_scale)


def _start_state(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  tx: optax.GradientTransformation,
  *,
  abstract: state_lib.TrainState,
  watch: monitor_lib.MonitorConfig,
  restored: checkpoint.Restored | None,
  policy: precision.Policy,
) -> state_lib.TrainState:
  """The restored state, or a fresh one; the monitor restarts if what it watches changed."""
  if not restored:
    return _fresh_state(
      model, tx, seed=config.train.seed, abstract=abstract, watch=watch, policy=policy
    )
  if restored.meta.get("monitor") == _monitor_key(config):
    return restored.state
  if config.early_stop.metric:
    logging.warning(
      "early_stop.metric, mode or baseline differ from the checkpoint's: the monitor starts afresh"
    )
  scale = restored.state.monitor.lr_scale  # the learning rate carries on
  return restored.state.replace(monitor=_fresh_monitor(abstract, watch, scale))


def _monitor_key(config: ml_collections.ConfigDict) -> list[Any]:
  """The settings that give the monitor's state its meaning."""
  e = config.early_stop
  return [e.metric, e.mode, e.baseline]


def _stop_reason(metric: str, verdict: dict[str, Any]) -> str:
  best = "no improvement at all"
  if verdict["best_step"] is not None:
    best = f"best {verdict['best_value']:.6g} at step {verdict['best_step']}"
  return f"{metric}: {verdict['reason']} ({best})"


def _progress_fields(verdict: dict[str, Any]) -> dict[str, float]:
  fields = {"patience_left": verdict["patience_left"]}
  if verdict["best_value"] is not None:
    fields["best"] = verdict["best_value"]
  return fields


def _monitor_fields(verdict: dict[str, Any], status: str) -> dict[str, Any]:
  """What `run.json` records of the monitor."""
  return {
    "stopped_early": status == "stopped_early",
    "best_step": verdict["best_step"],
    "best_value": verdict["best_value"],
    "lr_scale": verdict["lr_scale"],
  }


def _restore_best(
  ckpt: checkpoint.Checkpointer,
  abstract: state_lib.TrainState,
  verdict: dict[str, Any],
  state: state_lib.TrainState,
  eval_metrics: dict[str, float],
) -> tuple[state_lib.TrainState, dict[str, float]]:
  """The best checkpoint's state and eval metrics; the given ones if there is none to read."""
  best_step = verdict["best_step"]
  if best_step is None:
    logging.warning("early_stop.restore_best: no evaluation improved; keeping the final state")
    return state, eval_metrics
  if best_step == int(jax.device_get(state.step)):
    return state, eval_metrics
  try:
    best = ckpt.restore_step(best_step, abstract)
  except checkpoint.CheckpointError as error:  # not saved, say restore_best was off until now
    logging.warning("early_stop.restore_best: keeping the final state: %s", error)
    return state, eval_metrics
  logging.info("early_stop.restore_best: restored the state of step %d", best_step)
  return best.state, best.meta["eval"]


def _best_rule(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The metric and mode that pick the best checkpoint: the monitor's with restore_best."""
  e = config.early_stop
  if e.restore_best:
    return e.metric, e.mode
  return config.ckpt.best_metric, config.ckpt.best_mode


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
  policy: precision.Policy,
) -> tuple[Any, Evaluator, Callable[[int, int], pipeline.Prefetcher]]:
  """The compiled chunk, the evaluator, and `stream(start_batch, workers)`.

  `stream` starts the prefetching training stream at a global batch, with a
  number of Grain workers; the batches do not depend on that number.
  """
  t = config.train
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=loss_fn,
    schedule=schedule,
    policy=policy,
  )
  unroll = t.unroll or step_lib.auto_unroll(
    step_fn, state, _abstract_batch(data.train, t.batch_size), t.steps_per_loop
  )
  logging.info("train_chunk: %d steps per dispatch, unroll %d", t.steps_per_loop, unroll)
  train_tf, eval_tf = _transforms(config.data, data)

  def stream(start_batch: int, workers: int) -> pipeline.Prefetcher:
    chunks = pipeline.train_chunks(
      data.train,
      batch_size=t.batch_size,
      seed=t.seed,
      steps_per_loop=t.steps_per_loop,
      workers=workers,
      rows=sharding.process_rows(mesh, t.batch_size),
      transform=train_tf,
      start_batch=start_batch,
    )
    put = lambda c: sharding.put_batch(c, mesh, t.batch_size, leading_dims=1)  # noqa: E731
    return pipeline.Prefetcher(iter(chunks), put)

  evaluator = Evaluator(
    graphdef,
    loss_fn,
    data.eval,
    batch_size=config.eval.batch_size,
    shardings=shardings,
    mesh=mesh,
    policy=policy,
    transform=eval_tf,
  )
  return step_lib.make_train_chunk(step_fn, shardings, mesh, unroll), evaluator, stream


def _start_batch(restored: checkpoint.Restored | None) -> int:
  """The first global batch to read: the restored step's, as its data state records."""
  if not restored:
    return 0
  if isinstance(restored.data_state, dict) and "next_batch" in restored.data_state:
    return int(restored.data_state["next_batch"])
  return restored.step  # a state saved by Grain itself: batch g is trained at step g


def _switch_workers(
  prefetch: pipeline.Prefetcher,
  stream: Callable[[int, int], pipeline.Prefetcher],
  step: int,
  measured: dict[str, Any],
  run: record.RunRecord,
) -> pipeline.Prefetcher:
  """Restarts the stream at `step` with the workers `AutoWorkers` chose; records why.

  Each process decides from its own timings (the batches do not depend on it);
  `run.json` records process 0's choice.
  """
  workers = measured["workers"]
  logging.info(
    "data.workers=-1: %d Grain workers (a chunk reads in %.4f s, puts in %.4f s, trains in %.4f s)",
    workers,
    measured["read_s"],
    measured["put_s"],
    measured["train_s"],
  )
  if workers:
    try:
      started = stream(step, workers)
    except DataError as error:  # not picklable: reading stays in this process
      logging.warning("%s", error)
      workers, started = 0, None
    if started:
      prefetch.close()  # the chunks it read ahead are read again by the workers
      prefetch = started
  run.update(data_workers={"at_step": step, **measured, "workers": workers})
  return prefetch


def _transforms(
  d: ml_collections.ConfigDict, data: Dataset
) -> tuple[transforms.Augment | None, transforms.Augment | None]:
  """The train and eval image transforms that the `data` section asks for, if any."""
  mean, std = transforms.image_stats(data.train) if d.normalize else (0.0, 1.0)
  train = transforms.Augment(padding=d.crop_padding, flip=d.flip, mean=mean, std=std)
  evaluation = transforms.Augment(mean=mean, std=std)
  return (train if train.active else None), (evaluation if evaluation.active else None)


def _restore(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, abstract: state_lib.TrainState
) -> tuple[checkpoint.Checkpointer, checkpoint.Restored | None]:
  """Opens the workdir's checkpoints and restores the newest readable one, if any."""
  c = config.ckpt
  best_metric, best_mode = _best_rule(config)
  ckpt = checkpoint.Checkpointer(
    workdir / "checkpoints",
    keep=c.keep,
    async_save=c["async"],
    best_metric=best_metric,
    best_mode=best_mode,
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
  skipped: int,
) -> dict[str, Any]:
  """What a checkpoint records beside the state: enough to resume and to audit."""
  return {
    "config_hash": config_lib.config_hash(config),
    "data_order": {key: config_lib.get(config, key) for key in DATA_ORDER_KEYS},
    "mesh": dict(mesh.shape),
    "versions": record.versions(),
    "meter": meter.state_dict(),
    "eval": eval_metrics,
    "skipped": skipped,
    "monitor": _monitor_key(config),
    "time": record.now(),
  }


def _check_resumable(config: ml_collections.ConfigDict, restored: checkpoint.Restored) -> None:
  """Raises `ConfigError` when the config changes which batches the next steps see."""
  saved_order = restored.meta["data_order"]
  for key in (key for key in DATA_ORDER_KEYS if key in saved_order):
    saved = saved_order[key]
    if config_lib.get(config, key) != saved:
      raise config_lib.ConfigError(
        f"{key}={config_lib.get(config, key)!r} differs from {saved!r} in the checkpoint at "
        f"step {restored.step}; keep it to resume, or use another workdir"
      )
  k = config.train.steps_per_loop
  if restored.step % k:
    raise config_lib.ConfigError(
      f"train.steps_per_loop={k} does not divide the checkpoint's step {restored.step}; "
      "pick one that does to resume"
    )
  if restored.meta["config_hash"] != config_lib.config_hash(config):
    logging.warning("resuming step %d with a changed config", restored.step)


def _check_metric_names(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  abstract: state_lib.TrainState,
  data: Dataset,
  loss_fn: step_lib.LossFn,
) -> None:
  """Raises `ConfigError` when a configured metric is not an eval metric of `loss_fn`."""
  keys = [key for key in ("ckpt.best_metric", "early_stop.metric") if config_lib.get(config, key)]
  if not keys:
    return
  batch = _abstract_batch(data.eval, config.eval.batch_size)
  batch["mask"] = jax.ShapeDtypeStruct((config.eval.batch_size,), np.int32)
  eval_fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=loss_fn)
  names = sorted(set(jax.eval_shape(eval_fn, abstract, batch)) - {"count"})
  for key in keys:
    if config_lib.get(config, key).removeprefix("eval/") not in names:
      raise config_lib.ConfigError(
        f"{key}={config_lib.get(config, key)!r} is not an eval metric "
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
