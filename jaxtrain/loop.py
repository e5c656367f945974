"""`train`: check everything, restore or build the sharded state, then run the host loop.

The loop dispatches one compiled chunk of `train.steps_per_loop` steps at a
time. While chunk `n` runs on the devices, a background thread puts chunk `n+1`
on them, and the host fetches and logs the metrics of chunk `n-1`, so it waits
on the devices only for evaluations and checkpoints. Periodic work is an `if`
in `_loop`. Rerunning on the same workdir resumes from the newest readable
checkpoint and continues exactly as an uninterrupted run would, as long as the
config changes only what a resume allows (`jaxtrain.workdir.RESUMABLE`).

With `early_stop.metric` set, every evaluation feeds the state's monitor
(`jaxtrain.monitor`), which may stop the run or lower the learning rate; its
state is checkpointed with the rest, so a resumed run stops at the same step.
SIGTERM and the first Ctrl-C save a checkpoint at the next chunk boundary and
stop (`preempted`, `interrupted`); a second Ctrl-C stops at once. A `prune`
callback (a sweep's pruner, `jaxtrain.sweep`) sees every evaluation and may stop
the run after its checkpoint (`pruned`).
"""

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxtrain import checkpoint, interrupt, logs, metrics, profiler, record, sharding, throughput
from jaxtrain import monitor as monitor_lib
from jaxtrain import parts as parts_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain import workdir as workdir_lib
from jaxtrain.config import ConfigError
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataError, Dataset


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
    status: `completed`; `stopped_early` when the monitor stopped the run;
      `pruned` when the `prune` callback did;
      `preempted` (SIGTERM) or `interrupted` (Ctrl-C) when it stopped after a
      checkpoint: run it again to resume.
    reason: why it stopped, in a line (None when completed).
    workdir: the run's folder, absolute (a fresh temporary one for `workdir=None`).
  """

  state: state_lib.TrainState
  graphdef: nnx.GraphDef
  eval_metrics: dict[str, float]
  status: str
  reason: str | None
  workdir: pathlib.Path

  @property
  def step(self) -> int:
    """The final state's step (the restored best one's with `early_stop.restore_best`)."""
    return int(jax.device_get(self.state.step))

  def __repr__(self) -> str:
    shown = ", ".join(f"{k!r}: {v:.4g}" for k, v in sorted(self.eval_metrics.items()))
    return (
      f"TrainResult(status={self.status!r}, step={self.step}, eval_metrics={{{shown}}}, "
      f"workdir='{self.workdir}')"
    )


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
  workdir_lib.check_mode(resume)
  path = workdir_lib.resolve(workdir)
  spec = parts_lib.prepare(config, model, data, loss_fn, rules=rules, tx=tx, schedule=schedule)
  path = path or workdir_lib.fresh()
  lock = workdir_lib.hold(path)
  session = None
  try:
    with logs.to_file(path, enabled=jax.process_index() == 0, expected=(ConfigError, DataError)):
      try:
        prints = record.fingerprints(spec.data)
        ckpt, restored = workdir_lib.open_checkpoints(
          config, parts_lib.checkpointed(spec, spec.abstract), path, resume,
          best=workdir_lib.best_rule(config), initial=spec.initial, prints=prints,
        )  # fmt: skip
        session = _Session(config, spec, ckpt, path, restored, prints=prints, prune=prune)
        return session.run()
      finally:
        if session:
          session.close()
  finally:
    lock.release()


@dataclasses.dataclass
class _Carry:
  """What the loop carries from one chunk to the next."""

  step: int
  eval_metrics: dict[str, float]
  skipped: int  # updates skipped so far
  in_a_row: int = 0  # skipped at the end of the last chunk logged
  saved: int | None = None  # the newest step checkpointed
  verdict: dict[str, Any] | None = None  # the monitor's summary
  stop: int = interrupt.RUNNING  # the processes' top vote to stop
  pending: tuple[int, Any, float] | None = None  # a chunk's (end step, metrics, wait), unread
  deferred: checkpoint.Bundle | None = None  # taken at a boundary, saved while the next runs
  pruned: bool = False  # the prune callback stopped the run


class _Session:
  """One attempt at a run: set-up (records, state, parts), the loop, the finish."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    spec: parts_lib.Spec,
    ckpt: checkpoint.Checkpointer,
    path: pathlib.Path,
    restored: checkpoint.Restored | None,
    *,
    prints: dict[str, Any],
    prune: Callable[[int, dict[str, float]], bool] | None = None,
  ):
    self.config, self.spec, self.ckpt, self.path, self.restored = config, spec, ckpt, path, restored
    self.prints = prints  # the data's fingerprints, which each checkpoint records
    self.prune = prune
    self.run_record = self.prefetch = self.writer = self.progress = self.signals = None
    self.profiler = None
    step = restored.step if restored else 0
    meta = restored.meta if restored else {"eval": {}, "skipped": 0}
    self.carry = _Carry(step, meta["eval"], meta["skipped"], saved=restored and restored.step)
    self.started = time.perf_counter()
    self.throughput = throughput.describe(spec.model_fn, spec.data.train[0], spec.batch_size)
    self.meter = metrics.Meter(config.train.batch_size, self.throughput)
    if restored:
      self.meter.load(restored.meta["meter"])
    self.interrupted_at_once = False

  def run(self) -> TrainResult:
    """Opens the records, builds the parts, runs the loop and records how it ended."""
    c, is_main = self.carry, jax.process_index() == 0
    try:
      self.run_record = record.start(
        self.config,
        self.spec.mesh,
        self.spec.data,
        self.path,
        resumed_from=self.restored.step if self.restored else None,
        forced=workdir_lib.forced_changes(self.config, self.restored),
        throughput=self.throughput,
        rules=self.spec.rules,
        initial=self.spec.initial,
        parameters=parts_lib.parameter_counts(self.spec),
        prints=self.prints,
        lines=self.restored.meta.get("lines") if self.restored else None,
      )
      self.signals = interrupt.StopSignals(self.spec.mesh)
      self.writer = metrics.Writers(
        self.path, enabled=is_main, purge_step=c.step + 1 if self.restored else 0,
        attempt=self.run_record.fields.get("attempt", 1),
      )  # fmt: skip
      t, p = self.config.train, self.config.profile
      self.progress = metrics.Progress(t.steps, c.step, is_main, every=t.log_every)
      self.profiler = profiler.Window(p.start_step, p.steps, self.path / "tb" if is_main else None)
      parts = parts_lib.assemble(
        self.spec, workdir_lib.resumed_state(self.config, self.spec, self.restored)
      )
      state = _loop(self, parts)
      return self._finish(state, parts)
    except BaseException as error:
      self._record_failure(error)
      raise

  def _finish(self, state: state_lib.TrainState, parts: parts_lib.Parts) -> TrainResult:
    self.ckpt.wait()
    c, e = self.carry, self.config.early_stop
    status = "completed"
    if c.pruned:
      status = "pruned"
    elif c.verdict and c.verdict["reason"]:
      status = "stopped_early"
    elif c.stop and c.step < self.config.train.steps:
      status = interrupt.STATUS[c.stop]
    reason = self._reason(status)
    fields = {"final_step": c.step, "reason": reason, "skipped_steps": c.skipped}
    eval_metrics = c.eval_metrics
    if c.verdict:
      fields.update(monitor_lib.record_fields(c.verdict, status))
      if status == "stopped_early":
        logs.note(f"stopped early at step {c.step}: {reason}")
      if e.restore_best and status in ("completed", "stopped_early"):  # not when pruned
        fields["last_eval"] = eval_metrics
        state, eval_metrics = workdir_lib.restore_best(
          self.ckpt, self.spec, c.verdict["best_step"], state, eval_metrics
        )
        fields["restored_step"] = int(jax.device_get(state.step))
    self.run_record.update(status=status, eval=eval_metrics, **fields)
    return TrainResult(state, parts.graphdef, eval_metrics, status, reason, self.path)

  def _reason(self, status: str) -> str | None:
    kept = self._kept()
    if status == "stopped_early":
      return monitor_lib.stop_reason(self.config.early_stop.metric, self.carry.verdict)
    if status == "pruned":
      return f"pruned at step {self.carry.step} by the sweep's pruner"
    if status in ("preempted", "interrupted"):
      signal = "SIGTERM" if status == "preempted" else "Ctrl-C"
      return f"{signal} at step {self.carry.step}; {kept}: rerun the same command to resume"
    return None

  def _kept(self) -> str:
    saved = self.carry.saved
    return f"the newest checkpoint is step {saved}" if saved else "no checkpoint was saved"

  def _record_failure(self, error: BaseException) -> None:
    if not self.run_record:
      return
    c = self.carry
    if isinstance(error, KeyboardInterrupt):
      status, reason = "interrupted", f"a second Ctrl-C stopped it at once; {self._kept()}"
      self.interrupted_at_once = True
    else:
      status, reason = "failed", f"{type(error).__name__}: {error}"
    self.run_record.fail(status, reason, final_step=c.step, skipped_steps=c.skipped)

  def close(self) -> None:
    """Stops the stream and the writers, waits for saves, puts the signal handlers back."""
    for part in (self.prefetch, self.writer, self.progress, self.signals, self.profiler):
      if part:
        part.close()
    self.ckpt.close(abandon=self.interrupted_at_once)


def _loop(s: _Session, parts: parts_lib.Parts) -> state_lib.TrainState:
  """The host loop: dispatch a chunk, log the one before, evaluate, checkpoint, stop."""
  t, c, state = s.config.train, s.carry, parts.state
  tuner = pipeline.AutoWorkers(s.config.data.max_workers) if s.config.data.workers < 0 else None
  s.prefetch = parts.batches(workdir_lib.start_batch(s.restored), max(s.config.data.workers, 0))
  if s.config.early_stop.metric:  # a run the monitor stopped stays stopped
    c.verdict = monitor_lib.summary(state.monitor, s.spec.watch)
  if c.step >= t.steps:
    logs.note(f"step {c.step} is train.steps={t.steps}: nothing to train (raise it to go on)")
  s.meter.start_clock(time.perf_counter())
  while c.step < t.steps and not _monitor_stopped(c) and not c.pruned:
    chunk = next(s.prefetch)
    state, chunk_metrics = _dispatch(s, parts, tuner, state, chunk)
    if c.pending:
      _log(s, *c.pending)  # every process reads the same vote: all stop here
    if c.deferred:
      _save(s, c.deferred._replace(meta=_meta(s, c.deferred.step)))
      c.deferred = None
    s.ckpt.check()  # a failed background save stops the run at once
    c.pending = (c.step, chunk_metrics, s.prefetch.waited)
    evaluated = c.step == t.steps or _every(s.config.eval.every_steps, c.step)
    if evaluated or c.stop:  # the last step is always evaluated
      _log(s, *c.pending)
      c.pending = None
    best = None
    if evaluated:
      state, best = _evaluate(s, parts, state)
    halt = bool(c.stop) or _monitor_stopped(c) or c.pruned
    if halt or c.step == t.steps or _every(s.config.ckpt.every_steps, c.step) or best:
      now = halt or c.step == t.steps  # nothing left to overlap with: save in place
      saved = parts_lib.checkpointed(s.spec, state)
      bundle = checkpoint.bundle(c.step, saved, {"next_batch": c.step}, {}, best, copy=not now)
      if now:
        _save(s, bundle._replace(meta=_meta(s, bundle.step)))
      else:  # a device copy, saved while the next chunk trains on the state
        c.deferred = bundle
    if halt:
      break
  return state


def _dispatch(
  s: _Session,
  parts: parts_lib.Parts,
  tuner: pipeline.AutoWorkers | None,
  state: state_lib.TrainState,
  chunk: Any,
) -> tuple[state_lib.TrainState, Any]:
  """Runs one chunk; counts compilations, and times it when choosing the worker count."""
  c, timed = s.carry, tuner is not None and tuner.timing
  if timed:  # time the devices alone: from a finished state to finished metrics
    jax.block_until_ready(state)
  s.profiler.before(c.step)
  start = time.perf_counter()
  with jax.transfer_guard("disallow"), s.profiler.annotate(c.step):  # no implicit transfers
    state, chunk_metrics = parts.chunk(state, chunk, s.signals.votes())
  c.step += s.config.train.steps_per_loop
  stopped = time.perf_counter()
  if window := s.profiler.after(c.step, state):  # waiting and writing the trace: not training
    s.meter.exclude(time.perf_counter() - stopped)
    s.run_record.update(profile=window)
  compiled = s.run_record.count_compilations(parts.chunk.compilations(), c.step)
  if compiled:  # compiling is not training time
    s.meter.exclude(time.perf_counter() - start)
    if "memory" not in s.run_record.fields:  # the executable just compiled: no second compile
      s.run_record.update(memory=parts.chunk.memory(parts.spec.abstract, chunk))
  if timed:
    jax.block_until_ready(chunk_metrics)
    chosen = tuner.add(time.perf_counter() - start, compiled, s.prefetch.timings())
    if chosen:  # each process chooses for itself; run.json records process 0's choice
      s.prefetch, workers = parts_lib.switch_workers(s.prefetch, parts, c.step, chosen["workers"])
      s.run_record.update(data_workers={"at_step": c.step, **chosen, "workers": workers})
  return state, chunk_metrics


def _log(s: _Session, end_step: int, chunk_metrics: Any, wait: float) -> None:
  """Logs a chunk's metrics, one chunk late; reads the processes' vote to stop."""
  c, t = s.carry, s.config.train
  host = jax.device_get(chunk_metrics)  # already computed
  c.stop = max(c.stop, int(host.pop("stop")))
  s.run_record.first_chunk(s.started)
  runs = host.pop("skipped_in_a_row")
  c.in_a_row = int(runs[-1])
  c.skipped += int(np.sum(host["skipped"]))
  s.meter.add(host, wait)
  if end_step % t.log_every == 0:
    summary = s.meter.summary(time.perf_counter(), host)
    s.writer.write(end_step, "train", summary)
    rate = "tokens_per_sec" if "tokens_per_sec" in summary else "samples_per_sec"
    s.progress.update(0, **{rate: summary[rate]})
  s.progress.update(t.steps_per_loop, loss=float(np.mean(host["loss"])))
  if t.max_skipped and np.max(runs) >= t.max_skipped:
    raise NonFiniteError(
      f"{np.max(runs)} updates in a row had a non-finite loss or gradient and were skipped "
      f"(train.max_skipped={t.max_skipped}, by step {end_step}); {s._kept()}"
    )


def _evaluate(
  s: _Session, parts: parts_lib.Parts, state: state_lib.TrainState
) -> tuple[state_lib.TrainState, dict[str, float] | None]:
  """Evaluates, feeds the monitor, logs; returns the metrics that rank this checkpoint, if any."""
  c, e = s.carry, s.config.early_stop
  start = time.perf_counter()
  c.eval_metrics = parts.evaluate(state)
  if e.metric:  # before the save, so the checkpoint holds the monitor's new state
    state = parts.observe(state, c.eval_metrics[e.metric.removeprefix("eval/")])
    c.verdict = monitor_lib.summary(state.monitor, s.spec.watch)
    s.progress.update(0, **monitor_lib.progress_fields(c.verdict))
  s.meter.exclude(time.perf_counter() - start)  # throughput counts training only
  watched = monitor_lib.line_fields(c.verdict) if e.metric else {}
  s.writer.write(c.step, "eval", {**c.eval_metrics, **watched})
  s.progress.update(0, **{f"eval_{n}": v for n, v in c.eval_metrics.items()})
  if s.prune:
    c.pruned = _agreed(s.prune(c.step, c.eval_metrics) if jax.process_index() == 0 else False)
  if workdir_lib.best_rule(s.config)[0] and (
    not e.restore_best or c.verdict["best_step"] == c.step
  ):
    return state, _prefixed(c.eval_metrics)  # with restore_best, only the monitor's improvements
  return state, None


def _save(s: _Session, bundle: checkpoint.Bundle) -> None:
  """Saves, unless the state follows skipped updates: a bad run must not evict good steps."""
  if s.carry.in_a_row:
    logging.warning(
      "not saving step %d: its last %d updates were skipped", bundle.step, s.carry.in_a_row
    )
    return
  s.ckpt.save(bundle)
  s.carry.saved = bundle.step


def _meta(s: _Session, step: int) -> dict[str, Any]:
  c = s.carry
  return record.checkpoint_meta(
    s.config, s.spec.mesh, meter=s.meter.state_dict(), eval_metrics=c.eval_metrics,
    skipped=c.skipped, monitor=workdir_lib.monitor_key(s.config),
    initial=s.spec.initial and s.spec.initial.sha256, prints=s.prints,
    lines=s.writer.lines_at(step),
  )  # fmt: skip


def _agreed(verdict: bool) -> bool:
  """Process 0's verdict, in every process."""
  if jax.process_count() == 1:
    return bool(verdict)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(verdict)))


def _every(every: int, step: int) -> bool:
  return bool(every and step % every == 0)


def _monitor_stopped(c: _Carry) -> bool:
  return bool(c.verdict and c.verdict["reason"])


def _prefixed(eval_metrics: dict[str, float]) -> dict[str, float]:
  return {f"eval/{name}": value for name, value in eval_metrics.items()}
