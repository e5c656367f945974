"""Pure train and eval steps, and the scanned chunk of K steps.

A loss function has the signature `loss_fn(model, batch, rngs)` and returns a
dict of per-example arrays `[B]` that includes `"loss"`; `rngs` is an
`nnx.Rngs` whose `default` stream is `fold_in(state.rng, state.step)` and whose
`dropout` stream is derived from it (`step_rngs`) in training, and `None` in
evaluation. Per-example values let the eval step mask padded examples and
reduce every metric exactly.

Example:
  >>> step = functools.partial(train_step, graphdef=graphdef, tx=tx,
  ...                          loss_fn=losses.classification, schedule=schedule)
  >>> chunk = make_train_chunk(step, shardings, mesh)
  >>> state, metrics = chunk(state, batches_KxB, votes)   # metrics["loss"] is [K]
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import monitor, precision, sharding
from jaxtrain.state import TrainState, split_model

DROPOUT_STREAM = 1  # folded into the step's key for the dropout stream
Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, nnx.Rngs | None], dict[str, jax.Array]]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_fn: LossFn,
  schedule: optax.Schedule | None = None,
  policy: precision.Policy = precision.POLICIES["f32"],
  log_norms: bool = False,
  frozen: frozenset[str] = frozenset(),
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step.

  Args:
    state: the current state.
    batch: a global batch of `[B, ...]` arrays.
    graphdef: the model's graph definition.
    tx: the optimizer.
    loss_fn: per-example loss and metrics, see the module docstring.
    schedule: the learning-rate schedule, reported as `lr`; without one, the
      `learning_rate` in an `optax.inject_hyperparams` state is, if any.
    policy: the precision policy (`jaxtrain.precision`); with loss scaling,
      `loss_scale` joins the metrics.
    log_norms: add the global norms `grad_norm`, `param_norm` (after the
      update) and `update_norm` (the change of the parameters) to the metrics.
    frozen: paths of parameters the optimizer never trains (`optim.freeze`,
      `optim.trainable`): their gradients are not computed (`stop_gradient`),
      so a frozen backbone costs no weight gradients.

  Returns:
    The new state, and scalar metrics: the batch means of the loss function's
    values, `lr` (times any `lr_multiplier` in the optimizer state), `skipped`
    (1 when a non-finite loss or gradient left the state unchanged) and
    `skipped_in_a_row` (the non-finite updates in a row; a loss-scale overflow
    is skipped but not counted there). (A gradient norm is left out: XLA computes it in a pass
    of its own over the gradients, 20% more memory traffic for the reference MLP.)
  """
  key = jax.random.fold_in(state.rng, state.step)

  scaling = policy.loss_scaling

  def objective(params: Any) -> tuple[jax.Array, tuple[Any, ...]]:
    if frozen:
      params = jax.tree.map_with_path(
        lambda p, x: jax.lax.stop_gradient(x) if sharding.path_str(p) in frozen else x, params
      )
    model = compute_model(graphdef, params, state.model_state, policy)
    model.train()
    per_example = loss_fn(model, policy.cast_to_compute(batch), step_rngs(key))
    loss = per_example["loss"].astype(jnp.float32).mean()
    model_state = _like(split_model(model)[2], state.model_state)
    return precision.scale_loss(state.loss_scale, loss) if scaling else loss, (
      loss,
      per_example,
      model_state,
    )

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (_, (loss, per_example, model_state)), grads = grad_fn(state.params)
  if scaling:
    grads = _like(precision.unscale(state.loss_scale, grads), state.params)
  finite = jnp.isfinite(loss) & precision.all_finite(grads)
  # A loss-scale overflow (finite loss, scale still above 1) is routine: the
  # step is skipped and the scale lowered, but it does not count as a failure.
  overflow = scaling & jnp.isfinite(loss) & (state.loss_scale.scale > 1.0)
  new_state = _update_if_finite(finite, state, grads, model_state, tx, loss=loss)
  new_state = new_state.replace(skipped=jnp.where(finite | overflow, 0, state.skipped + 1))
  metrics = {k: v.mean() for k, v in policy.cast_to_output(per_example).items()}
  if scaling:
    metrics["loss_scale"] = state.loss_scale.scale
    new_state = new_state.replace(
      loss_scale=precision.adjust(state.loss_scale, finite, period=policy.loss_scale_period)
    )
  lr = _learning_rate(state, new_state, schedule)
  if lr is not None:
    metrics["lr"] = lr
  metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
  metrics["skipped_in_a_row"] = new_state.skipped
  if log_norms:
    metrics.update(norms(grads, state.params, new_state.params))
  return new_state, metrics


def norms(grads: Any, old: Any, new: Any) -> dict[str, jax.Array]:
  """The global norms of the gradients, the new parameters and the update, in float32."""
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
  change = jax.tree.map(jnp.subtract, f32(new), f32(old))
  return {
    "grad_norm": optax.global_norm(f32(grads)),
    "param_norm": optax.global_norm(f32(new)),
    "update_norm": optax.global_norm(change),
  }


def compute_model(
  graphdef: nnx.GraphDef, params: Any, model_state: Any, policy: precision.Policy
) -> nnx.Module:
  """The NNX model with the parameters cast for computing and its modules set to the policy."""
  model = nnx.merge(graphdef, policy.compute_params(params), model_state)
  policy.apply_to_model(model)
  return model


def _like(tree: Any, reference: Any) -> Any:
  """`tree` with each leaf cast to the dtype of the matching leaf of `reference`."""
  return jax.tree.map(lambda x, r: x.astype(r.dtype) if x.dtype != r.dtype else x, tree, reference)


def step_rngs(key: jax.Array) -> nnx.Rngs:
  """The step's random streams: `default` is `key`, `dropout` its own stream from it."""
  return nnx.Rngs(default=key, dropout=jax.random.fold_in(key, DROPOUT_STREAM))


def _learning_rate(
  state: TrainState, new_state: TrainState, schedule: optax.Schedule | None
) -> jax.Array | None:
  """The step's learning rate times any `lr_multiplier` of the optimizer state, if known."""
  if schedule is not None:
    lr = schedule(state.step)
  else:  # inject_hyperparams records the value its update used in the new state
    found = optax.tree_utils.tree_get_all_with_path(new_state.opt_state, "learning_rate")
    values = [v for _, v in found if isinstance(v, jax.Array) and v.ndim == 0]
    if not values:
      return None
    lr = values[0]
  multiplier = optax.tree_utils.tree_get(state.opt_state, "lr_multiplier", 1.0)
  for _, plateau in optax.tree_utils.tree_get_all_with_path(
    state.opt_state, "ReduceLROnPlateauState"
  ):
    multiplier = multiplier * plateau.scale
  return jnp.asarray(lr * multiplier, jnp.float32)


def _update_if_finite(
  finite: jax.Array,
  state: TrainState,
  grads: Any,
  model_state: Any,
  tx: optax.GradientTransformation,
  *,
  loss: jax.Array,
) -> TrainState:
  """Applies the update, or only counts a skip when the loss or a gradient is not finite.

  `finite` tests one sum over all gradients, which any inf or NaN makes
  non-finite; `cond` then runs one branch, so a finite step pays one reduction
  and no pass over the state (a `where` over every leaf cost 7-8% of the MLP step
  on CPU; `benchmarks/nonfinite_guard.py`). Transforms that take extra
  arguments (`optax.contrib.reduce_on_plateau`) get the batch's mean loss as
  `value`.
  """
  extra = {"value": loss} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}

  def apply(_: None) -> tuple[Any, Any, Any]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    return optax.apply_updates(state.params, updates), opt_state, model_state

  params, opt_state, model_state = jax.lax.cond(
    finite, apply, lambda _: (state.params, state.opt_state, state.model_state), None
  )
  return state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    model_state=model_state,
  )


def eval_step(
  state: TrainState,
  batch: Batch,
  *,
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  policy: precision.Policy = precision.POLICIES["f32"],
) -> dict[str, jax.Array]:
  """Sums of the per-example metrics over the real examples of `batch`.

  Args:
    state: the state to evaluate.
    batch: a global batch with a `mask` array `[B]`: 1 for real examples, 0 for
      the padding of the last partial batch.
    graphdef: the model's graph definition.
    loss_fn: per-example loss and metrics.
    policy: the precision policy.

  Returns:
    A dict of masked sums, plus `count`, the number of real examples.
  """
  model = compute_model(graphdef, state.params, state.model_state, policy)
  model.eval()
  mask = batch["mask"].astype(jnp.float32)
  per_example = loss_fn(model, policy.cast_to_compute(batch), None)
  per_example = policy.cast_to_output(per_example)
  sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in per_example.items()}
  sums["count"] = jnp.sum(mask)
  return sums


def observe(state: TrainState, value: jax.Array, *, config: monitor.MonitorConfig) -> TrainState:
  """Feeds one evaluation of the monitored metric to the state's monitor.

  With reduce-on-plateau on, the monitor's learning-rate scale is copied into
  the optimizer state's `lr_multiplier`, where the next train step reads it:
  a scalar of the state changes, so nothing recompiles.

  Args:
    state: the state the evaluation measured.
    value: the metric's value, a scalar.
    config: the monitor's settings.

  Returns:
    The state with the monitor (and multiplier) updated.
  """
  watch = monitor.update(config, state.monitor, value, state.step)
  opt_state = state.opt_state
  if config.plateau_factor < 1:
    opt_state = optax.tree_utils.tree_set(opt_state, lr_multiplier=watch.lr_scale)
  return state.replace(monitor=watch, opt_state=opt_state)


def make_observe(config: monitor.MonitorConfig, state_shardings: TrainState) -> Callable:
  """Compiles `observe(state, value) -> state`; the state is donated, so nothing is copied."""
  return jax.jit(
    functools.partial(observe, config=config),
    out_shardings=state_shardings,
    donate_argnums=0,
  )


def make_train_chunk(
  step_fn: StepFn, state_shardings: TrainState, mesh: Mesh, unroll: int = 1
) -> Callable:
  """Compiles `K` steps per dispatch: `chunk(state, batches_KxB, votes) -> (state, metrics)`.

  The chunk runs `step_fn` under `lax.scan` over the leading axis of a
  `[K, B, ...]` batch, donates the incoming state, and returns each metric as a
  `[K]` array. Its shardings are fixed, so it compiles once per chunk shape.

  `votes` holds one int32 per device (`sharding.vote_sharding`), set by each
  process; `metrics["stop"]` is their maximum, the same in every process. This
  is how processes agree to stop at one step when a preemption notice reaches
  only some of them.

  Args:
    step_fn: a pure `(state, batch) -> (state, metrics)` step.
    state_shardings: the shardings of the state.
    mesh: the mesh the batch is split over.
    unroll: steps per iteration of the compiled loop (`lax.scan`'s `unroll`);
      `K` or more removes the loop.

  Returns:
    The jitted chunk function.
  """

  def chunk(
    state: TrainState, batches: Batch, votes: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    state, metrics = jax.lax.scan(step_fn, state, batches, unroll=unroll)
    return state, {**metrics, "stop": jnp.max(votes)}

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    chunk,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh, 1), sharding.vote_sharding(mesh)),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def compiled_memory(jitted: Callable, *args: Any) -> dict[str, int]:
  """One device's memory for `jitted` on `args` (arrays or `jax.ShapeDtypeStruct`s), in bytes.

  From XLA's `memory_analysis()` of the executable compiled ahead of time, which
  is the one a call has already compiled when there was one (no second compile).
  `peak` is the arguments plus the outputs that do not reuse a donated argument
  (`alias`), plus the temporaries: everything the executable's buffers hold at
  once. (XLA's own `peak_memory_in_bytes` leaves temporaries out on CPU.)
  """
  stats = jitted.lower(*args).compile().memory_analysis()
  get = lambda name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)  # noqa: E731
  out = {k: get(k) for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def make_eval_accumulate(
  eval_fn: Callable[[TrainState, Batch], dict[str, jax.Array]],
  state_shardings: TrainState,
  mesh: Mesh,
) -> Callable:
  """Compiles `accumulate(sums, state, batch) -> sums`, adding one batch's sums."""

  def accumulate(
    sums: dict[str, jax.Array], state: TrainState, batch: Batch
  ) -> dict[str, jax.Array]:
    return jax.tree.map(jnp.add, sums, eval_fn(state, batch))

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    accumulate,
    in_shardings=(replicated, state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=replicated,
    donate_argnums=0,
  )


def auto_unroll(jaxpr: jax.extend.core.ClosedJaxpr, steps_per_loop: int) -> int:
  """Chooses the chunk's unroll: all `steps_per_loop` steps, or 1.

  XLA:CPU runs convolutions inside a compiled loop on a slow path (about 12x
  slower for the reference CNN; jax-ml/jax#12868), so on CPU a step that
  convolves is unrolled fully. Elsewhere, and for steps without convolutions,
  a rolled loop runs as fast and compiles in a fraction of the time.

  Args:
    jaxpr: the train step's jaxpr (`jax.make_jaxpr(step_fn)(state, batch)`).
    steps_per_loop: `K`.

  Returns:
    The `unroll` for `make_train_chunk`.
  """
  if jax.default_backend() != "cpu":
    return 1
  return steps_per_loop if "conv_general_dilated" in _primitives(jaxpr.jaxpr) else 1


def _primitives(jaxpr: jax.extend.core.Jaxpr) -> set[str]:
  names = {eqn.primitive.name for eqn in jaxpr.eqns}
  for sub in jax.extend.core.subjaxprs(jaxpr):
    names |= _primitives(sub)
  return names


def compilations(jitted: Callable) -> int:
  """Returns how many executables a jitted function holds (1 after warm-up)."""
  return jitted._cache_size()
