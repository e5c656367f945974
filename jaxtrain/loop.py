"""`train`: build the sharded state, then run the explicit host loop.

The loop dispatches one compiled chunk of `train.steps_per_loop` steps at a
time. While chunk `n` runs on the devices, a background thread puts chunk `n+1`
on them, and the host fetches and logs the metrics of chunk `n-1`, so it waits
on the devices only for evaluation results. Periodic work is an `if` below.
"""

import functools
import logging
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import config as config_lib
from jaxtrain import metrics, optim, record, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import pipeline
from jaxtrain.data.sources import Dataset


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    state: the final `TrainState`.
    graphdef: the model's graph definition; `state_lib.merge_model(graphdef,
      state)` rebuilds the trained model.
    eval_metrics: the final evaluation's metrics, such as `loss` and `accuracy`.
  """

  state: state_lib.TrainState
  graphdef: nnx.GraphDef
  eval_metrics: dict[str, float]


class _Parts(NamedTuple):
  """What the loop runs: built from the config before the first step."""

  graphdef: nnx.GraphDef
  state: state_lib.TrainState
  train_chunk: Any
  evaluate: "Evaluator"
  prefetch: pipeline.Prefetcher


def train(
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
    workdir: receives `config.json`, `run.json` and `metrics.jsonl`.
    rules: the sharding rules table for the state.

  Returns:
    The final state, the model's graph definition and the final eval metrics.

  Raises:
    ConfigError: for an invalid config or an unusable workdir, before anything
      is compiled or written.
  """
  config_lib.validate(config, jax.device_count())
  workdir = _prepare_workdir(workdir)
  mesh = sharding.make_mesh(config_lib.mesh_shape(config.mesh, jax.device_count()))
  logging.info("devices: %s, mesh: %s", jax.devices(), dict(mesh.shape))
  t, k = config.train, config.train.steps_per_loop
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    (workdir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
  run = record.RunRecord(workdir, is_main, _run_fields(config, mesh, data, workdir))
  meter = metrics.Meter(t.batch_size)

  def finish(end_step: int, chunk_metrics: Any, wait: float) -> None:
    host = jax.device_get(chunk_metrics)  # one chunk late: already computed
    meter.add(host, wait)
    progress.update(k, loss=float(np.mean(host["loss"])))
    if end_step % t.log_every == 0:
      writer.write(end_step, "train", meter.summary(time.perf_counter(), host))

  step, pending, eval_metrics, prefetch, writer, progress = 0, None, {}, None, None, None
  try:
    writer = metrics.JsonlWriter(workdir / "metrics.jsonl" if is_main else None)
    progress = metrics.Progress(t.steps, is_main)
    graphdef, state, train_chunk, evaluate, prefetch = _build(
      config, model, data, loss_fn, mesh=mesh, rules=rules
    )
    meter.reset(time.perf_counter())
    while step < t.steps:
      chunk, wait = prefetch.next()
      start = time.perf_counter()
      with jax.transfer_guard("disallow"):  # nothing moves implicitly in the hot loop
        state, chunk_metrics = train_chunk(state, chunk)
      step += k
      if _compiled(train_chunk, step, run):  # compiling is not training time
        meter.exclude(time.perf_counter() - start)
      if pending:
        finish(*pending)
      pending = (step, chunk_metrics, wait)
      if step == t.steps or (config.eval.every_steps and step % config.eval.every_steps == 0):
        finish(*pending)
        pending, start = None, time.perf_counter()
        eval_metrics = evaluate(state)
        meter.exclude(time.perf_counter() - start)
        writer.write(step, "eval", eval_metrics)
        progress.update(0, **{f"eval_{n}": v for n, v in eval_metrics.items()})
    run.update(status="completed", final_step=step, eval=eval_metrics)
  except BaseException as e:
    run.update(status="failed", reason=f"{type(e).__name__}: {e}", final_step=step)
    raise
  finally:
    for part in (prefetch, writer, progress):
      if part:
        part.close()
  return TrainResult(state, graphdef, eval_metrics)


def _build(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  mesh: Mesh,
  rules: sharding.Rules,
) -> _Parts:
  """Creates the sharded state, the compiled functions and the data streams."""
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
  graphdef, state = state_lib.create_state(model, tx, seed=t.seed, mesh=mesh, rules=rules)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=loss_fn,
    schedule=lambda n: schedule(n // o.accum_steps),
  )
  unroll = t.unroll or step_lib.auto_unroll(
    step_fn, state, _abstract_batch(data.train, t.batch_size), t.steps_per_loop
  )
  logging.info("train_chunk: %d steps per dispatch, unroll %d", t.steps_per_loop, unroll)
  chunks = pipeline.train_chunks(
    data.train,
    batch_size=t.batch_size,
    seed=t.seed,
    steps_per_loop=t.steps_per_loop,
    workers=config.data.workers,
    rows=sharding.process_rows(mesh, t.batch_size),
  )
  return _Parts(
    graphdef,
    state,
    step_lib.make_train_chunk(step_fn, shardings, mesh, unroll),
    Evaluator(
      graphdef,
      loss_fn,
      data.eval,
      batch_size=config.eval.batch_size,
      shardings=shardings,
      mesh=mesh,
    ),
    pipeline.Prefetcher(
      iter(chunks), lambda c: sharding.put_batch(c, mesh, t.batch_size, leading_dims=1)
    ),
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


class Evaluator:
  """One exact pass over an eval source: `evaluator(state) -> metric means`.

  Padded examples are masked out and every metric is summed on the devices,
  then divided by the number of real examples once, at the end.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    loss_fn: step_lib.LossFn,
    source: Any,
    *,
    batch_size: int,
    shardings: state_lib.TrainState,
    mesh: Mesh,
  ):
    eval_fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=loss_fn)
    self._accumulate = step_lib.make_eval_accumulate(eval_fn, shardings, mesh)
    # Zero sums made on the devices (XLA drops the unused eval computation).
    self._zeros = jax.jit(
      lambda state, batch: jax.tree.map(jnp.zeros_like, eval_fn(state, batch)),
      out_shardings=NamedSharding(mesh, P()),
    )
    self._batches = pipeline.eval_batches(
      source, batch_size=batch_size, rows=sharding.process_rows(mesh, batch_size)
    )
    self._put = lambda b: sharding.put_batch(b, mesh, batch_size)

  def __call__(self, state: state_lib.TrainState) -> dict[str, float]:
    """Returns the mean of every metric over the eval source."""
    sums = self.sums(state)
    count = sums.pop("count")
    return {name: float(value / count) for name, value in sums.items()}

  def sums(self, state: state_lib.TrainState) -> dict[str, np.ndarray]:
    """Returns the masked sums of every metric and `count`, on the host."""
    sums = None
    for j in range(len(self._batches)):  # read in order, in this thread
      batch = self._put(self._batches[j])
      if sums is None:
        sums = self._zeros(state, batch)
      sums = self._accumulate(sums, state, batch)
    return jax.device_get(sums)


def _prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{jax.process_index()}"  # processes may share the folder
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise config_lib.ConfigError(f"workdir {path} is not writable ({e.strerror})") from e
  return path


def _run_fields(
  config: ml_collections.ConfigDict, mesh: Mesh, data: Dataset, workdir: pathlib.Path
) -> dict[str, Any]:
  def fingerprint(source: Any) -> str | None:
    return source.fingerprint() if hasattr(source, "fingerprint") else None

  return {
    "workdir": str(workdir.resolve()),
    "config_hash": config_lib.config_hash(config),
    "git": record.git_info(pathlib.Path.cwd()),
    "versions": record.versions(),
    "environment": record.environment(mesh),
    "data": {
      "name": data.name,
      "train_size": len(data.train),
      "eval_size": len(data.eval),
      "train_fingerprint": fingerprint(data.train),
      "eval_fingerprint": fingerprint(data.eval),
    },
    "seeds": {"train.seed": config.train.seed},
    "train_chunk_compilations": 0,
  }
