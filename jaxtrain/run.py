"""`Run`: one training run that a notebook can step, chunk by chunk; `train` drains it.

A `Run` checks everything, locks the workdir, restores or builds the sharded
state and opens the records when it is made; iterating it trains. Each
iteration dispatches one compiled chunk of `train.steps_per_loop` steps and
yields a `Tick`: the step reached, the metric lines written since the last
tick, and whether the run is about to stop. While chunk `n` runs on the
devices, a background thread puts chunk `n+1` on them and the host fetches and
logs the metrics of chunk `n-1`, so it waits on the devices only for
evaluations and checkpoints. Periodic work is an `if` in `_chunks`.

With `early_stop.metric` set, every evaluation feeds the state's monitor
(`jaxtrain.monitor`), which may stop the run or lower the learning rate; its
state is checkpointed with the rest, so a resumed run stops at the same step.
SIGTERM and the first Ctrl-C save a checkpoint at the next chunk boundary and
stop (`preempted`, `interrupted`); a second Ctrl-C stops at once. A `prune`
callback (a sweep's pruner) sees every evaluation and may stop the run after
its checkpoint (`pruned`). A run closed before its end (`close`) records
`interrupted`; `save` first keeps where it got to, and a new `Run` on the same
workdir resumes there exactly.

Example:
  >>> with jaxtrain.Run(config, model, data, loss, workdir="runs/nb") as run:
  ...   for tick in run:
  ...     if tick.step == 100:
  ...       run.save()
  ...       break
  >>> run.result.status
  'interrupted'
"""

import contextlib
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxtrain import (
  checkpoint,
  interrupt,
  logs,
  metrics,
  profiler,
  record,
  sharding,
  sinks,
  throughput,
)
from jaxtrain import monitor as monitor_lib
from jaxtrain import parts as parts_lib
from jaxtrain import resume as resume_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain import workdir as workdir_lib
from jaxtrain.config import ConfigError
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataError, Dataset


class NonFiniteError(RuntimeError):
  """Too many updates in a row had a non-finite loss or gradient."""


class TrainResult(NamedTuple):
  """What a run ends with (`train`'s return value, `Run.result`).

  Attributes:
    state: the final `TrainState`; with `early_stop.restore_best`, the best
      checkpoint's.
    graphdef: the model's graph definition; `merge_model(graphdef, state)`
      rebuilds the trained model.
    eval_metrics: the metrics, such as `loss` and `accuracy`, of the last
      evaluation, or of the best one with `early_stop.restore_best`.
    status: `completed`; `stopped_early` when the monitor stopped the run;
      `pruned` when the `prune` callback did;
      `preempted` (SIGTERM) or `interrupted` (Ctrl-C, or a `Run` closed
      before its end) when it stopped after a checkpoint: run it again to resume.
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


class Tick(NamedTuple):
  """What a `Run` yields after each chunk.

  Attributes:
    step: the steps trained so far.
    lines: the metric lines written since the last tick (`metrics.jsonl`'s,
      without `time`); train lines come one chunk late.
    stopping: True when this is the last chunk: the monitor, the pruner, a
      signal or `train.steps` ends the run here.
  """

  step: int
  lines: list[dict[str, Any]]
  stopping: bool


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
  lines: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # since the last tick


class Run:
  """One training run: made ready at construction, trained by iterating it.

  Args:
    config: the run's config (see `jaxtrain.config`); validated first.
    model: builds the Flax NNX model from `rngs=nnx.Rngs(...)`, for example
      `functools.partial(models.MLP, 64, (128,), 10)`.
    data: the train and eval sources.
    loss_fn: `loss_fn(model, batch, rngs) -> dict of [B] arrays` with `loss`.
    workdir: receives `config.json`, `run.json`, `metrics.jsonl` and
      `checkpoints/`; relative, `.` and `~` paths work. None trains into a
      fresh temporary folder.
    resume: what to do with a workdir that holds checkpoints: `auto` resumes
      unless the config changed a key a resume may not change (then it
      refuses, naming each); `never` refuses to train over checkpoints;
      `force` resumes anyway and records the changed keys in `run.json`.
    rules: path or logical-axis rules for the state; None: `mesh.rules`'s.
    tx: an Optax transform to train with instead of the `optim` section's.
    schedule: with `tx`, its learning-rate schedule of the update count, for
      the `lr` metric.
    prune: called as `prune(step, eval_metrics)` after each evaluation (in
      process 0, whose answer every process follows); True stops the run,
      after a checkpoint, with status `pruned`.
    writers: more metric sinks (`metrics.Writer`) for process 0's lines,
      besides `metrics.jsonl`, TensorBoard and the `logging` keys' sinks.

  Raises:
    ConfigError: for an invalid config, model, loss or optimizer, a busy or
      unusable workdir, or a checkpoint the config contradicts, before
      anything is compiled or written.
    DataError: for bad records, or a field the loss reads that they lack.
    CheckpointError: no checkpoint of the workdir is readable.
  """

  def __init__(
    self,
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
  ):
    resume_lib.check_mode(resume)
    path = workdir_lib.resolve(workdir)
    spec = parts_lib.prepare(config, model, data, loss_fn, rules=rules, tx=tx, schedule=schedule)
    self.prune = prune
    self._start(spec, path, resume, writers)

  def _start(
    self,
    spec: parts_lib.Spec,
    path: pathlib.Path | None,
    resume: str,
    writers: Sequence[metrics.Writer],
  ) -> None:
    """Locks the workdir, then restores or starts the state and opens the records."""
    self.spec, self.path = spec, path or workdir_lib.fresh()
    self.result, self._resume = None, resume
    self.run_record = self.prefetch = self.writer = self.progress = self.signals = None
    self.profiler = self.ckpt = self.parts = self._chunk_iter = None
    self.interrupted_at_once = False
    self._stack = contextlib.ExitStack()
    try:
      self._stack.callback(workdir_lib.hold(self.path).release)
      is_main = jax.process_index() == 0
      self._stack.enter_context(
        logs.to_file(self.path, enabled=is_main, expected=(ConfigError, DataError))
      )
      self._restore()
      self._records(writers)
      self._build()
    except BaseException as error:
      self._record_failure(error)
      self._close_parts()
      self._stack.__exit__(type(error), error, error.__traceback__)  # log.txt gets the error
      raise

  def _restore(self) -> None:
    """Opens the checkpoints and restores the newest readable step the config may resume."""
    spec = self.spec
    self.prints = record.fingerprints(spec.data)  # each checkpoint records them
    self.ckpt, self.restored = resume_lib.open_checkpoints(spec, self.path, self._resume,
                                                           prints=self.prints)  # fmt: skip
    restored = self.restored
    meta = restored.meta if restored else {"eval": {}, "skipped": 0}
    step = restored.step if restored else 0
    self.carry = _Carry(step, meta["eval"], meta["skipped"], saved=restored and restored.step)

  def _records(self, writers: Sequence[metrics.Writer]) -> None:
    """Starts `run.json` and the metric writers, the signal handlers, progress and profiler."""
    spec, restored, is_main = self.spec, self.restored, jax.process_index() == 0
    self.started = time.perf_counter()
    self.throughput = throughput.describe(spec.model_fn, spec.data.train[0], spec.batch_size)
    self.meter = metrics.Meter(spec.batch_size, self.throughput)
    if restored:
      self.meter.load(restored.meta["meter"])
    self.run_record = record.start(
      spec, self.path, resumed_from=restored.step if restored else None,
      forced=resume_lib.forced_changes(spec.run.config, restored), throughput=self.throughput,
      parameters=self._parameters(), prints=self.prints,
      lines=restored.meta.get("lines") if restored else None,
    )  # fmt: skip
    self.signals = interrupt.StopSignals(spec.mesh)
    step = self.carry.step
    sinks = _sinks(self.path, spec.run, resumed=bool(restored)) if is_main else []
    self.writer = metrics.Writers(
      self.path, enabled=is_main, purge_step=step + 1 if restored else 0,
      attempt=self.run_record.fields.get("attempt", 1), extra=[*sinks, *writers],
    )  # fmt: skip
    c = spec.run.cadence
    self.progress = metrics.Progress(c.steps, step, is_main, every=c.log_every)
    tb = self.path / "tb" if is_main else None
    self.profiler = profiler.Window(c.profile_start, c.profile_steps, tb)

  def _parameters(self) -> dict[str, int]:
    return parts_lib.parameter_counts(self.spec)

  def _build(self) -> None:
    """The state (restored, or fresh) and the compiled parts."""
    self.parts = parts_lib.assemble(self.spec, resume_lib.resumed_state(self.spec, self.restored))
    self.state = self.parts.state
    if self.spec.watch.metric:  # a run the monitor stopped stays stopped
      self.carry.verdict = monitor_lib.summary(self.state.monitor, self.spec.watch)

  def __iter__(self) -> Iterator[Tick]:
    if self._chunk_iter is None:
      self._chunk_iter = self._guarded()
    return self._chunk_iter

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @property
  def step(self) -> int:
    """The steps trained so far."""
    return self.carry.step

  def _guarded(self) -> Iterator[Tick]:
    """The chunks, with a failure recorded in `run.json` and the run finished at its end."""
    try:
      yield from self._chunks()
      self.result = self._finish()
    except GeneratorExit:
      raise
    except BaseException as error:
      self._record_failure(error)
      logs.log_failure(error, (ConfigError, DataError))  # the loop runs outside to_file's block
      raise

  def _chunks(self) -> Iterator[Tick]:
    """The host loop: dispatch a chunk, log the one before, evaluate, checkpoint, stop."""
    c, cad, spec = self.carry, self.spec.run.cadence, self.spec
    workers, most = spec.run.workers, spec.run.max_workers
    tuner = pipeline.AutoWorkers(most) if workers < 0 else None
    self.prefetch = self.parts.batches(resume_lib.start_batch(self.restored), max(workers, 0))
    if c.step >= cad.steps:
      logs.note(f"step {c.step} is train.steps={cad.steps}: nothing to train (raise it to go on)")
    self.meter.start_clock(time.perf_counter())
    while c.step < cad.steps and not self._done():
      chunk = next(self.prefetch)
      chunk_metrics = self._dispatch(tuner, chunk)
      if c.pending:
        self._log(*c.pending)  # every process reads the same vote: all stop here
      if c.deferred:
        self._save(c.deferred._replace(meta=self._meta(c.deferred.step)))
        c.deferred = None
      self.ckpt.check()  # a failed background save stops the run at once
      c.pending = (c.step, chunk_metrics, self.prefetch.waited)
      evaluated = cad.evaluates(c.step)
      if evaluated or c.stop:  # the last step is always evaluated
        self._log(*c.pending)
        c.pending = None
      best = self._evaluate() if evaluated else None
      halt = bool(c.stop) or self._done()
      if halt or cad.saves(c.step) or best:
        now = halt or c.step == cad.steps  # nothing left to overlap with: save in place
        self._checkpoint(best, copy=not now)
      yield self._tick(halt or c.step >= cad.steps)
      if halt:
        break

  def _done(self) -> bool:
    """Whether the monitor or the pruner ended the run."""
    return _monitor_stopped(self.carry) or self.carry.pruned

  def _tick(self, stopping: bool) -> Tick:
    lines, self.carry.lines = self.carry.lines, []
    return Tick(self.carry.step, lines, stopping)

  def _checkpoint(self, best: dict[str, float] | None, copy: bool) -> None:
    """Saves the state at this step; a `copy` is saved while the next chunk trains."""
    c = self.carry
    saved = parts_lib.checkpointed(self.spec, self.state)
    bundle = checkpoint.bundle(c.step, saved, {"next_batch": c.step}, {}, best, copy=copy)
    if copy:  # a device copy, saved while the next chunk trains on the state
      c.deferred = bundle
    else:
      self._save(bundle._replace(meta=self._meta(bundle.step)))

  def save(self) -> int:
    """Checkpoints the state now (after logging the last chunk); returns the step saved."""
    c = self.carry
    if c.pending:
      self._log(*c.pending)
      c.pending = None
    c.deferred = None  # superseded: this step is saved in place
    if c.saved != c.step:
      self._checkpoint(None, copy=False)
    self.ckpt.wait()
    return c.step

  def _dispatch(self, tuner: pipeline.AutoWorkers | None, chunk: Any) -> Any:
    """Runs one chunk; counts compilations, and times it when choosing the worker count."""
    c, timed, parts = self.carry, tuner is not None and tuner.timing, self.parts
    if timed:  # time the devices alone: from a finished state to finished metrics
      jax.block_until_ready(self.state)
    self.profiler.before(c.step)
    start = time.perf_counter()
    with jax.transfer_guard("disallow"), self.profiler.annotate(c.step):  # no implicit transfers
      self.state, chunk_metrics = parts.chunk(self.state, chunk, self.signals.votes())
    c.step += self.spec.steps_per_loop
    stopped = time.perf_counter()
    if window := self.profiler.after(c.step, self.state):  # waiting and tracing: not training
      self.meter.exclude(time.perf_counter() - stopped)
      self.run_record.update(profile=window)
    compiled = self.run_record.count_compilations(parts.chunk.compilations(), c.step)
    if compiled:  # compiling is not training time
      self.meter.exclude(time.perf_counter() - start)
      if "memory" not in self.run_record.fields:  # the executable just compiled
        self.run_record.update(memory=parts.chunk.memory(self.spec.abstract, chunk))
    if timed:
      jax.block_until_ready(chunk_metrics)
      chosen = tuner.add(time.perf_counter() - start, compiled, self.prefetch.timings())
      if chosen:  # each process chooses for itself; run.json records process 0's choice
        self.prefetch, n = parts_lib.switch_workers(self.prefetch, parts, c.step, chosen["workers"])
        self.run_record.update(data_workers={"at_step": c.step, **chosen, "workers": n})
    return chunk_metrics

  def _write(self, step: int, split: str, values: dict[str, float]) -> None:
    self.writer.write(step, split, values)
    self.carry.lines.append({"step": step, "split": split, **values})

  def _log(self, end_step: int, chunk_metrics: Any, wait: float) -> None:
    """Logs a chunk's metrics, one chunk late; reads the processes' vote to stop."""
    c, cad = self.carry, self.spec.run.cadence
    host = jax.device_get(chunk_metrics)  # already computed
    c.stop = max(c.stop, int(host.pop("stop")))
    self.run_record.first_chunk(self.started)
    runs = host.pop("skipped_in_a_row")
    c.in_a_row = int(runs[-1])
    c.skipped += int(np.sum(host["skipped"]))
    self.meter.add(host, wait)
    if end_step % cad.log_every == 0:
      summary = self.meter.summary(time.perf_counter(), host)
      self._write(end_step, "train", summary)
      rate = "tokens_per_sec" if "tokens_per_sec" in summary else "samples_per_sec"
      self.progress.update(0, **{rate: summary[rate]})
    self.progress.update(cad.steps_per_loop, loss=float(np.mean(host["loss"])))
    if cad.max_skipped and np.max(runs) >= cad.max_skipped:
      raise NonFiniteError(
        f"{np.max(runs)} updates in a row had a non-finite loss or gradient and were skipped "
        f"(train.max_skipped={cad.max_skipped}, by step {end_step}); {self._kept()}"
      )

  def _evaluate(self) -> dict[str, float] | None:
    """Evaluates, feeds the monitor, logs; returns the metrics that rank this checkpoint, if any."""
    c, watch = self.carry, self.spec.watch
    start = time.perf_counter()
    c.eval_metrics = self.parts.evaluate(self.state)
    if watch.metric:  # before the save, so the checkpoint holds the monitor's new state
      value = c.eval_metrics[watch.metric.removeprefix("eval/")]
      self.state = self.parts.observe(self.state, value)
      c.verdict = monitor_lib.summary(self.state.monitor, watch)
      self.progress.update(0, **monitor_lib.progress_fields(c.verdict))
    self.meter.exclude(time.perf_counter() - start)  # throughput counts training only
    watched = monitor_lib.line_fields(c.verdict) if watch.metric else {}
    self._write(c.step, "eval", {**c.eval_metrics, **watched})
    self.progress.update(0, **{f"eval_{n}": v for n, v in c.eval_metrics.items()})
    if self.prune:
      c.pruned = _agreed(self.prune(c.step, c.eval_metrics) if jax.process_index() == 0 else False)
    if watch.best[0] and (not watch.restore_best or c.verdict["best_step"] == c.step):
      return _prefixed(c.eval_metrics)  # with restore_best, only the monitor's improvements
    return None

  def _save(self, bundle: checkpoint.Bundle) -> None:
    """Saves, unless the state follows skipped updates: a bad run must not evict good steps."""
    if self.carry.in_a_row:
      logging.warning(
        "not saving step %d: its last %d updates were skipped", bundle.step, self.carry.in_a_row
      )
      return
    self.ckpt.save(bundle)
    self.carry.saved = bundle.step

  def _meta(self, step: int) -> dict[str, Any]:
    c, spec = self.carry, self.spec
    return record.checkpoint_meta(
      spec.run.config, spec.mesh, meter=self.meter.state_dict(), eval_metrics=c.eval_metrics,
      skipped=c.skipped, monitor=spec.watch.key, initial=spec.initial and spec.initial.sha256,
      prints=self.prints, lines=self.writer.lines_at(step),
    )  # fmt: skip

  def _finish(self) -> TrainResult:
    self.ckpt.wait()
    c, watch, steps = self.carry, self.spec.watch, self.spec.run.cadence.steps
    status = "completed"
    if c.pruned:
      status = "pruned"
    elif c.verdict and c.verdict["reason"]:
      status = "stopped_early"
    elif c.stop and c.step < steps:
      status = interrupt.STATUS[c.stop]
    reason = self._reason(status)
    fields = {"final_step": c.step, "reason": reason, "skipped_steps": c.skipped}
    state, eval_metrics = self.state, c.eval_metrics
    if c.verdict:
      fields.update(monitor_lib.record_fields(c.verdict, status))
      if status == "stopped_early":
        logs.note(f"stopped early at step {c.step}: {reason}")
      if watch.restore_best and status in ("completed", "stopped_early"):  # not when pruned
        fields["last_eval"] = eval_metrics
        state, eval_metrics = resume_lib.restore_best(
          self.ckpt, self.spec, c.verdict["best_step"], state, eval_metrics
        )
        fields["restored_step"] = int(jax.device_get(state.step))
    self.run_record.update(status=status, eval=eval_metrics, **fields)
    return TrainResult(state, self.spec.graphdef, eval_metrics, status, reason, self.path)

  def _reason(self, status: str) -> str | None:
    kept, step = self._kept(), self.carry.step
    if status == "stopped_early":
      return monitor_lib.stop_reason(self.spec.watch.metric, self.carry.verdict)
    if status == "pruned":
      return f"pruned at step {step} by the sweep's pruner"
    if status in ("preempted", "interrupted"):
      signal = "SIGTERM" if status == "preempted" else "Ctrl-C"
      return f"{signal} at step {step}; {kept}: rerun the same command to resume"
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
    make_room = self.ckpt.drop_unfinished if self.ckpt else None
    self.run_record.fail(status, reason, make_room, final_step=c.step, skipped_steps=c.skipped)

  def close(self) -> None:
    """Stops the stream and the writers, waits for saves, releases the workdir.

    A run closed before its end is recorded as `interrupted` at its step;
    `result` then holds its state.
    """
    if self._chunk_iter is not None:
      self._chunk_iter.close()
    running = self.run_record and self.run_record.fields.get("status") == "running"
    if self.result is None and running and self.parts:
      self.ckpt.wait()
      c = self.carry
      reason = f"closed at step {c.step} before its end; {self._kept()}: run it again to resume"
      self.run_record.update(status="interrupted", reason=reason, final_step=c.step,
                             eval=c.eval_metrics, skipped_steps=c.skipped)  # fmt: skip
      self.result = TrainResult(self.state, self.spec.graphdef, c.eval_metrics, "interrupted",
                                reason, self.path)  # fmt: skip
    self._close_parts()
    self._stack.close()

  def _close_parts(self) -> None:
    for part in (self.prefetch, self.writer, self.progress, self.signals, self.profiler):
      if part:
        part.close()
    self.prefetch = self.writer = self.progress = self.signals = self.profiler = None
    if self.ckpt:
      self.ckpt.close(abandon=self.interrupted_at_once)
      self.ckpt = None


def _sinks(path: pathlib.Path, run: parts_lib.Resolved, *, resumed: bool) -> list[Any]:
  """The `logging` keys' sinks (W&B, MLflow), made in process 0 only."""
  if not (run.wandb or run.mlflow):
    return []
  return sinks.from_flags(path, run.config.tree, wandb=run.wandb, mlflow=run.mlflow,
                          resumed=resumed)  # fmt: skip


def _agreed(verdict: bool) -> bool:
  """Process 0's verdict, in every process."""
  if jax.process_count() == 1:
    return bool(verdict)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(verdict)))


def _monitor_stopped(c: _Carry) -> bool:
  return bool(c.verdict and c.verdict["reason"])


def _prefixed(eval_metrics: dict[str, float]) -> dict[str, float]:
  return {f"eval/{name}": value for name, value in eval_metrics.items()}
