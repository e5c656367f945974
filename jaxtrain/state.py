"""The training state: a small pytree, built abstractly, then born sharded.

`TrainState` holds everything a step changes: the step counter, the model's
parameters, the optimizer state, the base random key and the model's other
variables (batch statistics, for example). Parameters are plain nested dicts of
arrays, so Optax, Orbax and the sharding rules all see ordinary pytrees; the
model's structure lives apart in an `nnx.GraphDef`.

Example:
  >>> model_fn = functools.partial(models.MLP, 64, (128,), 10)
  >>> graphdef, state = create_state(model_fn, optax.adam(1e-3), seed=0, mesh=mesh)
  >>> graphdef, abstract = abstract_state(model_fn, tx, seed=0, mesh=mesh)  # no allocation
  >>> model = merge_model(graphdef, state)
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxtrain import monitor as monitor_lib
from jaxtrain import precision, sharding

ModelFn = Callable[[nnx.Rngs], nnx.Module]


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: nested dict of the model's `nnx.Param` arrays.
    opt_state: the Optax state for `params`.
    rng: uint32[2] base key; step `n` draws from `fold_in(rng, n)`.
    model_state: nested dict of the model's other variables.
    skipped: int32, consecutive updates skipped for a non-finite loss or gradient.
    monitor: the early-stopping and plateau state (`jaxtrain.monitor`).
    loss_scale: the dynamic loss scale (`jaxtrain.precision`); used by policies
      with loss scaling, constant otherwise.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array
  model_state: Any
  skipped: jax.Array
  monitor: monitor_lib.MonitorState
  loss_scale: precision.LossScale


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
  """Splits a model into its graph definition, parameters and other variables."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_fn(
  model_fn: ModelFn,
  tx: optax.GradientTransformation,
  seed: int,
  policy: precision.Policy = precision.POLICIES["f32"],
) -> Callable[[], TrainState]:
  """Returns `init(loaded=None)`, which builds the initial state.

  `loaded` maps parameter paths to values that replace the model's own
  initialisation (pretrained weights, `jaxtrain.weights`). The parameters are
  stored in the policy's `param_dtype`, and the optimizer state is made for them.
  """

  def init(loaded: dict[str, jax.Array] | None = None) -> TrainState:
    key = jax.random.PRNGKey(seed)
    model = model_fn(rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
    _, params, rest = split_model(model)
    if loaded:
      params = jax.tree.map_with_path(
        lambda p, x: loaded[sharding.path_str(p)].astype(x.dtype)
        if sharding.path_str(p) in loaded else x, params,
      )  # fmt: skip
    params = policy.cast_to_param(params)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.fold_in(key, 1),
      model_state=rest,
      skipped=jnp.zeros((), jnp.int32),
      monitor=monitor_lib.init(),
      loss_scale=precision.loss_scale_init(),
    )

  return init


def graphdef_of(model_fn: ModelFn) -> nnx.GraphDef:
  """Returns the model's structure without allocating its parameters."""
  return split_model(abstract_model(model_fn))[0]


def abstract_model(model_fn: ModelFn) -> nnx.Module:
  """The model with shapes for arrays: nothing is allocated."""
  return nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0)))


def abstract_state(
  model_fn: ModelFn,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  mesh: Mesh,
  rules: sharding.Rules | sharding.LogicalRules = sharding.DEFAULT_RULES,
  policy: precision.Policy = precision.POLICIES["f32"],
) -> tuple[nnx.GraphDef, TrainState]:
  """Returns the model's graph definition and the state's shapes and shardings.

  Nothing is allocated: the shapes come from `jax.eval_shape`, the shardings
  from `rules` (with logical rules, by the axis names the model's parameters
  carry: `sharding.named_axes`). The result is the target of `init_state` and of a checkpoint
  restore.

  Args:
    model_fn: builds the Flax NNX model from `rngs=`.
    tx: the optimizer.
    seed: the run's seed.
    mesh: the device mesh.
    rules: path or logical-axis rules, applied to every leaf of the state.
    policy: the precision policy, whose `param_dtype` the parameters take.

  Returns:
    The graph definition, and a `TrainState` of `jax.ShapeDtypeStruct`s whose
    `sharding` is set.

  Raises:
    ConfigError: a logical rule that does not divide a dimension.
  """
  with jax.set_mesh(mesh):
    shapes = jax.eval_shape(init_fn(model_fn, tx, seed, policy))
    model = abstract_model(model_fn)
    shardings = sharding.tree_shardings(shapes, mesh, rules, sharding.named_axes(model))
    graphdef = split_model(model)[0]
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
  return graphdef, abstract


def init_state(
  model_fn: ModelFn,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  abstract: TrainState,
  policy: precision.Policy = precision.POLICIES["f32"],
  loaded: dict[str, Any] | None = None,
) -> TrainState:
  """Creates the initial state directly in the layout of `abstract`.

  A jitted init whose outputs carry the shardings, so no full copy ever lives
  on one device. `loaded` (`{parameter path: array}`, such as pretrained
  weights) replaces those parameters' initialisation; each array is put on the
  devices in its parameter's layout first, from any process's full copy.
  """
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  mesh = jax.tree.leaves(shardings)[0].mesh
  placed = None
  if loaded:
    where = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      abstract.params)[0]}  # fmt: skip
    placed = {path: _place(np.asarray(value), where[path].sharding)
              for path, value in loaded.items()}  # fmt: skip
  with jax.set_mesh(mesh):
    return jax.jit(init_fn(model_fn, tx, seed, policy), out_shardings=shardings)(placed)


def _place(value: np.ndarray, where: jax.sharding.Sharding) -> jax.Array:
  """A host array on the devices in `where`'s layout; each process puts its own shards."""
  return jax.make_array_from_callback(value.shape, where, lambda index: value[index])


def create_state(
  model_fn: ModelFn,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  mesh: Mesh,
  rules: sharding.Rules | sharding.LogicalRules = sharding.DEFAULT_RULES,
  policy: precision.Policy = precision.POLICIES["f32"],
) -> tuple[nnx.GraphDef, TrainState]:
  """`abstract_state` (same arguments), then `init_state`: the state, born sharded.

  Returns:
    The model's graph definition and the sharded state.
  """
  graphdef, abstract = abstract_state(
    model_fn, tx, seed=seed, mesh=mesh, rules=rules, policy=policy
  )
  return graphdef, init_state(model_fn, tx, seed=seed, abstract=abstract, policy=policy)


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """Rebuilds the NNX model from its graph definition and a state."""
  return nnx.merge(graphdef, state.params, state.model_state)
