"""`build`: the parts that `train` runs, for a notebook or a debugger to drive one by one.

`prepare` resolves a config into explicit pieces (mesh, abstract state,
optimizer, policy, step) and checks the user's model, loss and data with
abstract shapes (`jaxtrain.preflight`); nothing is allocated, compiled or
written. `assemble` then makes the state and compiles the chunk; `build` does
both. Single-host defaults fill in what a multi-process run adds: the mesh
comes from the config, the preemption votes default to "keep going", and the
evaluator masks the padding of the last eval batch itself.

Example:
  >>> parts = jaxtrain.build(config, model, data.digits(), losses.classification)
  >>> state = parts.state
  >>> with parts.batches() as batches:       # device chunks [K, B, ...], read ahead
  ...   for _ in range(3):
  ...     state, metrics = parts.chunk(state, next(batches))   # K steps, compiled once
  >>> parts.evaluate(state)
  {'accuracy': 0.83..., 'loss': 0.61...}
"""

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxtrain import cache, logs, optim, precision, preflight, sharding, weights
from jaxtrain import config as config_lib
from jaxtrain import monitor as monitor_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import checks, pipeline, transforms
from jaxtrain.data.sources import DataError, Dataset
from jaxtrain.evaluate import Evaluator


class Cadence(NamedTuple):
  """When the run does what, in steps (the `train`, `eval`, `ckpt` and `profile` keys).

  Attributes:
    steps: the run's last step.
    steps_per_loop: steps per compiled chunk.
    log_every: steps between train lines.
    eval_every: steps between evaluations; 0: only at the end.
    ckpt_every: steps between checkpoints; 0: only at the end and on a stop.
    max_skipped: non-finite updates in a row that fail the run; 0: never.
    profile_start: the profiler window's first step.
    profile_steps: the steps its trace covers; 0: no trace.
  """

  steps: int
  steps_per_loop: int
  log_every: int
  eval_every: int
  ckpt_every: int
  max_skipped: int
  profile_start: int
  profile_steps: int

  def evaluates(self, step: int) -> bool:
    """Whether `step` ends with an evaluation (the last step always does)."""
    return step == self.steps or _every(self.eval_every, step)

  def saves(self, step: int) -> bool:
    """Whether `step` ends with a periodic checkpoint (the last step always does)."""
    return step == self.steps or _every(self.ckpt_every, step)


class Resolved(NamedTuple):
  """The rest of what a run takes from its config, as plain values.

  Attributes:
    config: the config as run (`config.json`; resumes compare it key by key).
    cadence: when the run logs, evaluates and saves.
    keep: newest checkpoint steps kept (`ckpt.keep`).
    async_save: write checkpoints in the background (`ckpt.async`).
    workers: Grain worker processes; -1: chosen from timings (`data.workers`).
    max_workers: the most that -1 starts (`data.max_workers`).
    wandb: also log to Weights & Biases (`logging.wandb`).
    mlflow: also log to MLflow (`logging.mlflow`).
  """

  config: config_lib.Snapshot
  cadence: Cadence
  keep: int
  async_save: bool
  workers: int
  max_workers: int
  wandb: bool = False
  mlflow: bool = False


def _every(every: int, step: int) -> bool:
  return bool(every and step % every == 0)


class Spec(NamedTuple):
  """What `prepare` resolves a config into; nothing in it is allocated.

  Attributes:
    mesh: the device mesh.
    rules: the path or logical-axis rules that placed the state.
    graphdef: the model's graph definition.
    abstract: the `TrainState`'s shapes, dtypes and shardings.
    tx: the optimizer.
    schedule: its learning rate as a function of the step, if known.
    policy: the precision policy.
    watch: the early-stopping and plateau settings.
    step_fn: the pure train step `(state, batch) -> (state, metrics)`.
    unroll: the chunk's `lax.scan` unroll.
    eval_names: the metrics an evaluation reports.
    data: the dataset.
    loss_fn: the loss.
    model_fn: builds the model from `rngs=`.
    seed: the run's seed.
    data_seed: the data order's seed (`data.seed`, else `seed`).
    batch_size: the global train batch.
    eval_batch_size: the global eval batch.
    steps_per_loop: steps per compiled chunk.
    augment: the train and the eval image transform (or None).
    initial: the initial weights loaded from `init.source`, or None.
    frozen: the parameters the optimizer never trains (`optim.freeze`, `optim.trainable`).
    omit: parameters loaded from `init.source` and never trained, which
      checkpoints leave out (they are read from the source again on resume).
    run: the rest of the config a run reads (`Resolved`); None outside `prepare`.
  """

  mesh: Mesh
  rules: Any
  graphdef: nnx.GraphDef
  abstract: state_lib.TrainState
  tx: optax.GradientTransformation
  schedule: optax.Schedule | None
  policy: precision.Policy
  watch: monitor_lib.MonitorConfig
  step_fn: step_lib.StepFn
  unroll: int
  eval_names: tuple[str, ...]
  data: Dataset
  loss_fn: step_lib.LossFn
  model_fn: state_lib.ModelFn
  seed: int
  data_seed: int
  batch_size: int
  eval_batch_size: int
  steps_per_loop: int
  augment: tuple[Any, Any]
  initial: weights.Initial | None = None
  frozen: frozenset[str] = frozenset()
  omit: frozenset[str] = frozenset()
  run: Resolved | None = None


class Chunk:
  """The compiled chunk: `chunk(state, batches) -> (state, metrics)`, `K` steps per call.

  `batches` is a `[K, B, ...]` device chunk; the state is donated. `votes` (one
  int32 per device, `jaxtrain.interrupt`) defaults to nobody voting to stop.
  """

  def __init__(self, jitted: Callable[..., Any], mesh: Mesh):
    self.jitted = jitted
    self._no_votes = sharding.votes(mesh, 0)

  def __call__(
    self, state: state_lib.TrainState, batches: Any, votes: jax.Array | None = None
  ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """Runs `K` steps; each metric comes back as a `[K]` array, `stop` as the top vote."""
    return self.jitted(state, batches, self._no_votes if votes is None else votes)

  def compilations(self) -> int:
    """How many executables the chunk holds: 1 after the first call, unless shapes changed."""
    return step_lib.compilations(self.jitted)

  def memory(self, state: Any, batches: Any) -> dict[str, int]:
    """One device's bytes for these shapes (`step.compiled_memory`); compiles unless called."""
    return step_lib.compiled_memory(self.jitted, state, batches, self._no_votes)


class Parts(NamedTuple):
  """The pieces of a run, as `build` makes them and `train` runs them.

  Attributes:
    spec: what the config resolved to (mesh, abstract state, optimizer, ...).
    state: the initial `TrainState` (or the one given), sharded on the mesh.
    chunk: `chunk(state, batches) -> (state, metrics)`, a `Chunk`.
    evaluate: `evaluate(state) -> {metric: mean}` over the whole eval source.
    batches: `batches(start=0, workers=0)`: a `Prefetcher`, iterating device
      chunks from global batch `start`; close it (or use `with`) when done.
    observe: `observe(state, value) -> state` feeds the monitor one evaluation
      of `early_stop.metric`.
  """

  spec: Spec
  state: state_lib.TrainState
  chunk: Chunk
  evaluate: Evaluator
  batches: Callable[..., pipeline.Prefetcher]
  observe: Callable[[state_lib.TrainState, Any], state_lib.TrainState]

  @property
  def graphdef(self) -> nnx.GraphDef:
    """The model's graph definition: `merge_model(parts.graphdef, state)` rebuilds it."""
    return self.spec.graphdef


def build(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  rules: sharding.Rules | sharding.LogicalRules | None = None,
  tx: optax.GradientTransformation | None = None,
  schedule: optax.Schedule | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Parts:
  """Checks everything, then makes the state, the compiled chunk, the evaluator and the stream.

  Args:
    config: the run's config (see `jaxtrain.config`).
    model: builds the Flax NNX model from `rngs=nnx.Rngs(...)`.
    data: the train and eval sources.
    loss_fn: `loss_fn(model, batch, rngs) -> dict of [B] arrays` with `loss`.
    rules: path or logical-axis rules for the state; None: `mesh.rules`'s.
    tx: an Optax transform to use instead of the `optim` section's.
    schedule: with `tx`, its learning rate as a function of the step.
    devices: the devices the mesh spans; all of them by default.

  Returns:
    The `Parts`, with a fresh state.

  Raises:
    ConfigError: for a bad config, model, loss or optimizer, before anything
      is compiled.
    DataError: for bad records, or a field the loss reads that they lack.
  """
  return assemble(
    prepare(config, model, data, loss_fn, rules=rules, tx=tx, schedule=schedule, devices=devices)
  )


def prepare(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Dataset,
  loss_fn: step_lib.LossFn,
  *,
  rules: sharding.Rules | sharding.LogicalRules | None = None,
  tx: optax.GradientTransformation | None = None,
  schedule: optax.Schedule | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Spec:
  """Resolves and checks a run with abstract shapes only; the arguments are `build`'s."""
  devices = list(jax.devices() if devices is None else devices)
  shape = validate(config, len(devices))
  cache.enable(config.train.compile_cache)  # before anything compiles
  preflight.check_model_fn(model)
  checks.check_dataset(data)  # every record like the first train record
  t, d = config.train, config.data
  train_batch = preflight.abstract_batch(data.train, t.batch_size)
  eval_batch = preflight.abstract_batch(data.eval, config.eval.batch_size, mask=True)
  preflight.check_sizes(train_size=len(data.train), batch_size=t.batch_size,
                        crop_padding=d.crop_padding, batch=train_batch)  # fmt: skip
  mesh = sharding.make_mesh(shape, devices)
  rules = sharding.logical(config.mesh.rules) if rules is None else rules
  if isinstance(rules, sharding.LogicalRules):  # the model's activations are constrained too
    loss_fn = sharding.with_rules(loss_fn, rules, mesh)
  p = config.precision
  policy = precision.get_policy(p.policy, p.f32_modules, p.loss_scale_period)
  from_config = tx is None
  tx, schedule = _optimizer(config, tx, schedule)
  with jax.set_mesh(mesh):
    graphdef = preflight.graphdef(model)
    abstract = _abstract_state(model, tx, seed=t.seed, mesh=mesh, rules=rules, policy=policy)
    frozen = preflight.check_paths(abstract.params, _path_patterns(config, from_config))
    initial = weights.plan(init_config(config), abstract.params)
    step_fn = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                                schedule=schedule, policy=policy, log_norms=t.log_norms,
                                frozen=frozen)  # fmt: skip
    eval_names, jaxpr = preflight.check_steps(
      loss_fn=loss_fn,
      step_fn=step_fn,
      graphdef=graphdef,
      abstract=abstract,
      policy=policy,
      data=data,
      batches=(train_batch, eval_batch),
      mesh=mesh,
      metrics={k: config_lib.get(config, k) for k in ("ckpt.best_metric", "early_stop.metric")},
      steps_per_loop=t.steps_per_loop,
    )
  return Spec(
    mesh=mesh,
    rules=rules,
    graphdef=graphdef,
    abstract=abstract,
    tx=tx,
    schedule=schedule,
    policy=policy,
    watch=monitor_config(config),
    step_fn=step_fn,
    unroll=t.unroll or step_lib.auto_unroll(jaxpr, t.steps_per_loop),
    eval_names=tuple(eval_names),
    data=data,
    loss_fn=loss_fn,
    model_fn=model,
    seed=t.seed,
    data_seed=config_lib.data_seed(config),
    batch_size=t.batch_size,
    eval_batch_size=config.eval.batch_size,
    steps_per_loop=t.steps_per_loop,
    augment=_transforms(d, data),
    initial=initial,
    frozen=frozen,
    omit=frozenset(initial.names) & frozen if initial else frozenset(),
    run=resolve(config),
  )


def resolve(config: ml_collections.ConfigDict) -> Resolved:
  """What the host loop, the workdir and the records read of a (validated) config."""
  t, c, d, p = config.train, config.ckpt, config.data, config.profile
  cadence = Cadence(
    steps=t.steps,
    steps_per_loop=t.steps_per_loop,
    log_every=t.log_every,
    eval_every=config.eval.every_steps,
    ckpt_every=c.every_steps,
    max_skipped=t.max_skipped,
    profile_start=p.start_step,
    profile_steps=p.steps,
  )
  return Resolved(
    config=config_lib.snapshot(config),
    cadence=cadence,
    keep=c.keep,
    async_save=c["async"],
    workers=d.workers,
    max_workers=d.max_workers,
    wandb=config.logging.wandb,
    mlflow=config.logging.mlflow,
  )


def optim_settings(config: ml_collections.ConfigDict) -> optim.Settings:
  """The `optim` keys as `optim.Settings` (the schedule runs over `train.steps`)."""
  return optim.settings(config.optim.to_dict(), total_steps=config.train.steps)


def init_config(config: ml_collections.ConfigDict) -> weights.InitConfig:
  """The `init` keys as a `weights.InitConfig`."""
  return weights.InitConfig(**{k: config.init[k] for k in weights.InitConfig._fields})


def monitor_config(config: ml_collections.ConfigDict) -> monitor_lib.MonitorConfig:
  """The `early_stop`, `plateau` and best-checkpoint keys as a `MonitorConfig`."""
  e, p, c = config.early_stop, config.plateau, config.ckpt
  return monitor_lib.MonitorConfig(
    mode=e.mode,
    patience=e.patience,
    min_delta=e.min_delta,
    relative=e.relative,
    baseline=e.baseline,
    warmup_steps=e.warmup_steps,
    divergence=e.divergence,
    plateau_factor=p.factor,
    plateau_patience=p.patience,
    plateau_cooldown=p.cooldown,
    plateau_min_scale=p.min_scale,
    metric=e.metric,
    restore_best=e.restore_best,
    best_metric=c.best_metric,
    best_mode=c.best_mode,
  )


def _path_patterns(config: ml_collections.ConfigDict, from_config: bool) -> dict[str, Any]:
  """The `optim` keys' path regexes (only for the optimizer the section describes)."""
  if not from_config:
    return {}
  o = config.optim
  patterns = {
    "optim.freeze": o.freeze,
    "optim.trainable": o.trainable,
    "optim.lr_groups": config_lib.parse_lr_groups(o.lr_groups),
    "optim.unfreeze": config_lib.parse_unfreeze(o.unfreeze),
  }
  if o.layer_decay < 1:
    patterns["optim.layer_pattern"] = (o.layer_pattern,)
  return patterns


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks every framework key, the mesh and the batch split; returns the mesh's shape.

  Raises:
    ConfigError: naming the first bad key and the problem.
  """
  config_lib.validate(config)
  optim_settings(config)  # the optimizer's name and options: its table checks them
  weights.check_config(init_config(config))
  shape = sharding.mesh_shape(config.mesh, num_devices)
  batches = {k: config_lib.get(config, k) for k in ("train.batch_size", "eval.batch_size")}
  sharding.check_batches(shape, batches)
  for key in ("data.workers", "data.max_workers"):
    most = pipeline.most_workers()
    if config_lib.get(config, key) > most:
      raise config_lib.ConfigError(
        f"{key}={config_lib.get(config, key)} is more Grain worker processes than this "
        f"machine runs well (at most {most}: twice its CPUs, or 8)"
      )
  return shape


def _abstract_state(
  model: state_lib.ModelFn,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  mesh: Mesh,
  rules: sharding.Rules | sharding.LogicalRules,
  policy: precision.Policy,
) -> state_lib.TrainState:
  """The abstract state; a failing optimizer init is one line."""
  try:
    _, abstract = state_lib.abstract_state(
      model, tx, seed=seed, mesh=mesh, rules=rules, policy=policy
    )
  except (config_lib.ConfigError, DataError):
    raise
  except Exception as e:
    raise config_lib.ConfigError(f"the optimizer's init failed: {logs.brief(e)}") from e
  if len(optax.tree_utils.tree_get_all_with_path(abstract.opt_state, "lr_multiplier")) > 1:
    raise config_lib.ConfigError(
      "plateau.factor < 1 adds an optim.lr_multiplier(); the given tx must not hold one"
    )
  return abstract


def assemble(spec: Spec, state: state_lib.TrainState | None = None) -> Parts:
  """Makes the state (unless given, say restored), compiles the chunk, opens the evaluator."""
  if state is None:
    state = fresh_state(spec)
  shardings = jax.tree.map(lambda x: x.sharding, spec.abstract)
  jitted = step_lib.make_train_chunk(spec.step_fn, shardings, spec.mesh, spec.unroll)
  evaluator = Evaluator(
    spec.graphdef,
    spec.loss_fn,
    spec.data.eval,
    batch_size=spec.eval_batch_size,
    shardings=shardings,
    mesh=spec.mesh,
    policy=spec.policy,
    transform=spec.augment[1],
  )
  return Parts(
    spec=spec,
    state=state,
    chunk=Chunk(jitted, spec.mesh),
    evaluate=evaluator,
    batches=functools.partial(stream, spec),
    observe=step_lib.make_observe(spec.watch, shardings),
  )


def fresh_state(spec: Spec) -> state_lib.TrainState:
  """The initial state, born sharded, with the monitor set up for its mode and baseline."""
  loaded = spec.initial.arrays() if spec.initial else None
  state = state_lib.init_state(spec.model_fn, spec.tx, seed=spec.seed, abstract=spec.abstract,
                               policy=spec.policy, loaded=loaded)  # fmt: skip
  return state.replace(monitor=fresh_monitor(spec))


def fresh_monitor(spec: Spec, lr_scale: Any = 1.0) -> monitor_lib.MonitorState:
  """A monitor before any evaluation, with `lr_scale`, as new arrays in the state's layout."""
  shardings = jax.tree.map(lambda x: x.sharding, spec.abstract.monitor)

  def init(scale: jax.Array) -> monitor_lib.MonitorState:
    return monitor_lib.init(spec.watch)._replace(lr_scale=jnp.asarray(scale, jnp.float32))

  return jax.jit(init, out_shardings=shardings)(lr_scale)


def parameter_counts(spec: Spec) -> dict[str, int]:
  """The model's parameter values in all, and those the optimizer trains."""
  leaves = jax.tree_util.tree_flatten_with_path(spec.abstract.params)[0]
  sizes = {sharding.path_str(p): math.prod(x.shape) for p, x in leaves}
  total = sum(sizes.values())
  return {"total": total, "trainable": total - sum(sizes[p] for p in spec.frozen)}


def checkpointed(spec: Spec, state: Any) -> Any:
  """What a checkpoint holds of `state` (or of its abstract form): all but `spec.omit`."""
  if not spec.omit:
    return state
  return state.replace(params=weights.strip(state.params, spec.omit))


def completed(spec: Spec, state: state_lib.TrainState) -> state_lib.TrainState:
  """A restored `checkpointed` state with the parameters it left out read from the source."""
  if not spec.omit:
    return state
  base = fresh_state(spec).params
  return state.replace(params=weights.fill(state.params, base))


def stream(spec: Spec, start: int = 0, workers: int = 0) -> pipeline.Prefetcher:
  """The training stream from global batch `start`, put on the devices ahead of use.

  The batches do not depend on `workers`, the Grain worker processes reading.
  """
  chunks = pipeline.train_chunks(
    spec.data.train,
    batch_size=spec.batch_size,
    seed=spec.data_seed,
    steps_per_loop=spec.steps_per_loop,
    workers=workers,
    rows=sharding.process_rows(spec.mesh, spec.batch_size),
    transform=spec.augment[0],
    start_batch=start,
  )
  put = functools.partial(sharding.put_batch, mesh=spec.mesh, batch_size=spec.batch_size,
                          leading_dims=1)  # fmt: skip
  return pipeline.Prefetcher(iter(chunks), put)


def switch_workers(
  prefetch: pipeline.Prefetcher, parts: Parts, start: int, workers: int
) -> tuple[pipeline.Prefetcher, int]:
  """Restarts the training stream at global batch `start` with `workers` Grain workers.

  The batches are the same with any number of workers. A source that cannot be
  sent to worker processes keeps being read in this one, with a warning.

  Returns:
    The stream to read from now, and the workers it uses.
  """
  logging.info("data.workers=-1: %d Grain workers from step %d", workers, start)
  if not workers:
    return prefetch, 0
  try:
    started = parts.batches(start, workers)
  except DataError as error:  # not picklable
    logging.warning("%s", error)
    return prefetch, 0
  prefetch.close()  # the chunks it read ahead are read again by the workers
  return started, workers


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
      raise config_lib.ConfigError("train(schedule=...) describes a given tx; pass tx= too")
    settings = optim_settings(config)
    tx, sched = optim.from_settings(settings, multiplier=plateau)
    return tx, lambda n: sched(n // settings.accum_steps)
  return (optax.chain(tx, optim.lr_multiplier()) if plateau else tx), schedule


def _transforms(
  d: ml_collections.ConfigDict, data: Dataset
) -> tuple[transforms.Augment | None, transforms.Augment | None]:
  """The train and eval image transforms that the `data` section asks for, if any."""
  mean, std = transforms.image_stats(data.train) if d.normalize else (0.0, 1.0)
  train = transforms.Augment(padding=d.crop_padding, flip=d.flip, mean=mean, std=std)
  evaluation = transforms.Augment(mean=mean, std=std)
  return (train if train.active else None), (evaluation if evaluation.active else None)
