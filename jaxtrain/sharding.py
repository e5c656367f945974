"""Meshes, sharding rules and batch placement.

Sharding is data: a mesh over the devices with the axes `("data", "fsdp",
"tensor")`, and rules that place each state leaf on it. Rules come in two kinds:

- Logical-axis rules (`LogicalRules`, the presets in `PRESETS`, chosen by
  `mesh.rules`): models name their parameters' axes (`embed`, `mlp`, `heads`,
  `kv_heads`, `vocab`, `layers`) and activations' (`batch`, `sequence`, ...),
  and a table maps each name onto mesh axes. An optimizer-state leaf shaped like
  a parameter, whose path ends with the parameter's, is placed like it. Leaves
  without names go to the fallback rules (FSDP by the largest dimension).
- Path rules: a table of `(regex, rule)` pairs; the first regex found in a leaf's
  path (such as `params/layers/0/kernel`) places it with `rule(shape, mesh)`.

Batches are split over the data-parallel axes `("data", "fsdp")`.

Example:
  >>> mesh = make_mesh((2, 4, 1))
  >>> shardings = tree_shardings(abstract_state, mesh, logical("fsdp"), names)
  >>> rules = ((r"embed", replicate()), (r".*", fsdp()))       # path rules
  >>> shardings = tree_shardings(jax.eval_shape(init), mesh, rules)
"""

import contextvars
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from flax.linen import spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rule = Callable[[tuple[int, ...], Mesh], P]
Rules = Sequence[tuple[str, Rule]]


def mesh_shape(mesh: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data`, `mesh.fsdp`, `mesh.tensor` (-1 takes the rest).

  Args:
    mesh: the `mesh` section of a config.
    num_devices: the number of devices to cover.

  Returns:
    The `(data, fsdp, tensor)` sizes, whose product is `num_devices`.

  Raises:
    ConfigError: when the sizes do not match the devices.
  """
  names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  for name, size in zip(names, sizes, strict=True):
    if size == 0 or size < -1:
      raise ConfigError(f"{name}={size} must be positive or -1")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"only one of {', '.join(names)} may be -1")
  fixed = 1
  for s in sizes:
    fixed *= s if s > 0 else 1
  desc = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
  if num_devices % fixed or (not free and fixed != num_devices):
    raise ConfigError(f"mesh {desc} does not match the {num_devices} devices")
  if free:
    sizes[free[0]] = num_devices // fixed
  return tuple(sizes)


def check_batches(shape: Sequence[int], batch_sizes: dict[str, int]) -> None:
  """Raises `ConfigError` for a batch that the data-parallel devices do not divide.

  Args:
    shape: the mesh's `(data, fsdp, tensor)` sizes.
    batch_sizes: global batch sizes by config key, such as `train.batch_size`.
  """
  data, fsdp, _ = shape
  for key, size in batch_sizes.items():
    if size % (data * fsdp):
      raise ConfigError(
        f"{key}={size} is not divisible by the {data * fsdp} data-parallel devices "
        f"(mesh.data x mesh.fsdp = {data} x {fsdp})"
      )


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `("data", "fsdp", "tensor")` mesh with Auto axes.

  Args:
    shape: the three axis sizes, as `mesh_shape` resolves them.
    devices: the devices to span; all devices by default.

  Returns:
    The mesh. Auto axes let XLA propagate shardings through the model, which an
    FSDP model needs (Explicit axes raise on sharded contractions).
  """
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicate() -> Rule:
  """Returns a rule that keeps a full copy of the leaf on every device."""
  return lambda shape, mesh: P()


def fsdp(axis: str = "fsdp", min_size: int = 1024) -> Rule:
  """Returns a rule that shards a leaf's largest divisible dimension over `axis`.

  Args:
    axis: the mesh axis to shard over.
    min_size: leaves with fewer elements stay replicated; sharding them saves
      little memory and costs a collective.

  Returns:
    The rule. A leaf with no dimension divisible by the axis size is replicated.
  """

  def rule(shape: tuple[int, ...], mesh: Mesh) -> P:
    n = mesh.shape[axis]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return P()
    dims = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not dims:
      return P()
    dim = max(dims, key=lambda d: shape[d])
    return P(*(axis if d == dim else None for d in range(len(shape))))

  return rule


DEFAULT_RULES: Rules = ((r".*", fsdp()),)


_TP = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_BATCH = (("batch", BATCH_AXES),)
# Logical axis name -> mesh axes, by `mesh.rules`. A name absent from a table, and
# one whose mesh axes an earlier name of the same array took, is not sharded.
PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
  "dp": _BATCH,  # every parameter replicated, the batch split
  "fsdp": (*_BATCH, ("embed", "fsdp")),  # parameters sharded on their model width
  "tp": (*_BATCH, *_TP),  # heads, MLP width and vocabulary split over `tensor`
  "fsdp_tp": (*_BATCH, ("embed", "fsdp"), *_TP),
}


class LogicalRules(NamedTuple):
  """Logical-axis rules.

  Attributes:
    table: `(logical name, mesh axis or axes or None)` pairs, in priority order.
    fallback: path rules for leaves without logical names.
    name: what `mesh.rules` called them, for messages.
  """

  table: tuple[tuple[str, Any], ...]
  fallback: "Rules" = DEFAULT_RULES
  name: str = "custom"


def logical(preset: str) -> LogicalRules:
  """The rules of `mesh.rules=preset`: `auto` is `fsdp_tp`, whose unused axes shard nothing."""
  table = PRESETS["fsdp_tp" if preset == "auto" else preset]
  fallback = ((r".*", replicate()),) if preset in ("dp", "tp") else DEFAULT_RULES
  return LogicalRules(table, fallback, preset)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: LogicalRules, what: str) -> P:  # fmt: skip
  """The `PartitionSpec` of an array whose axes have logical `names`.

  Raises:
    ConfigError: when a mesh axis does not divide the dimension it shards,
      naming `what` (a parameter path, say), the logical axis and the mesh axes.
  """
  spec = spmd.logical_to_mesh_axes(tuple(names), rules.table)
  for dim, (name, mapped) in enumerate(zip(names, spec, strict=True)):
    axes = () if mapped is None else (mapped,) if isinstance(mapped, str) else tuple(mapped)
    ways = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % ways:
      sizes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
      raise ConfigError(
        f"mesh.rules={rules.name}: {what} dimension {dim} ({name}, size {shape[dim]}) does not "
        f"divide over {sizes}; choose mesh sizes that divide it, or other mesh.rules"
      )
  return spec


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains `x`'s sharding by its axes' logical `names` under rules; else returns `x`.

  The rules and mesh are `with_rules`'s; else Flax's `logical_axis_rules` context
  with the context mesh (`jax.set_mesh`).
  """
  rules, mesh = _current.get() or (None, None)
  if rules is None and core_spmd.get_logical_axis_rules():
    rules = LogicalRules(tuple(core_spmd.get_logical_axis_rules()))
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return x
  if rules is None:
    return x
  spec = logical_spec(names, x.shape, mesh, rules, f"an activation of shape {tuple(x.shape)}")
  if isinstance(mesh, Mesh):  # traced outside jax.set_mesh, as jit does with Auto axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, spec)


_current: contextvars.ContextVar[tuple[LogicalRules, Mesh] | None] = contextvars.ContextVar(
  "jaxtrain_logical_rules", default=None
)


def with_rules(fn: Callable, rules: LogicalRules, mesh: Mesh) -> Callable:
  """`fn` run under the logical-axis `rules` on `mesh` (Flax's rules too): it may `constrain`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _current.set((rules, mesh))
    try:
      with core_spmd.logical_axis_rules(rules.table):
        return fn(*args, **kwargs)
    finally:
      _current.reset(token)

  return wrapped


def path_str(path: tuple[Any, ...]) -> str:
  """Returns a pytree key path as `a/b/0/c`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
  """Returns the spec of the first rule whose pattern is found in `path`."""
  for pattern, rule in rules:
    if re.search(pattern, path):
      return rule(tuple(shape), mesh)
  return P()


def tree_shardings(
  tree: Any,
  mesh: Mesh,
  rules: "Rules | LogicalRules" = DEFAULT_RULES,
  names: dict[str, tuple[str | None, ...]] | None = None,
) -> Any:
  """Returns a `NamedSharding` for every leaf of a (possibly abstract) pytree.

  Args:
    tree: the pytree, such as an abstract `TrainState`.
    mesh: the device mesh.
    rules: path rules, or logical-axis rules.
    names: with logical rules, each parameter's axis names by its path (as
      `named_axes` reads them); a leaf whose path ends with a parameter's path
      and has its number of dimensions takes its names.

  Raises:
    ConfigError: a logical rule that does not divide a dimension.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  params = {path_str(p).removeprefix("params/"): tuple(x.shape) for p, x in leaves
            if path_str(p).startswith("params/")}  # fmt: skip

  def spec(path: tuple[Any, ...], x: Any) -> NamedSharding:
    where = path_str(path)
    if not isinstance(rules, LogicalRules):
      return NamedSharding(mesh, leaf_spec(where, x.shape, mesh, rules))
    axes = _names_of(where, tuple(x.shape), names or {}, params)
    if axes is None:
      return NamedSharding(mesh, leaf_spec(where, x.shape, mesh, rules.fallback))
    return NamedSharding(mesh, logical_spec(axes, x.shape, mesh, rules, where))

  return jax.tree_util.tree_map_with_path(spec, tree)


def _names_of(path: str, shape: tuple[int, ...], names: dict, shapes: dict) -> Any:
  """The names of the longest parameter path that ends `path`, if the leaf is shaped like it.

  `shapes` holds the parameters' shapes where known (a `TrainState`'s `params`):
  Adafactor's factored moments, say, end with a parameter's path but are not
  shaped like it.
  """
  parts = path.split("/")
  for i in range(len(parts)):
    key = "/".join(parts[i:])
    axes = names.get(key)
    if axes is not None:
      fits = len(axes) == len(shape) and shapes.get(key, shape) == shape
      return tuple(axes) if fits else None
  return None


def named_axes(model: Any) -> dict[str, tuple[str | None, ...]]:
  """Each parameter's logical axis names, by path (`blocks/mlp/up/kernel`), where it has them.

  Names come from a variable's `logical_axes` metadata (`nnx.with_metadata`), or
  from Flax's partitioning metadata (`nnx.with_partitioning`).
  """
  found = {}
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      meta = variable.get_metadata()
      keys = ("logical_axes", "out_sharding", "sharding_names", "sharding")
      axes = next((meta[k] for k in keys if meta.get(k)), None)
      if axes is not None:
        found["/".join(str(p) for p in path)] = tuple(axes)
  return found


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Returns the sharding of a batch whose batch dimension follows `leading_dims`."""
  return NamedSharding(mesh, P(*(None,) * leading_dims, BATCH_AXES))


def vote_sharding(mesh: Mesh) -> NamedSharding:
  """One element per device: each process fills its devices' elements."""
  return NamedSharding(mesh, P(AXES))


def votes(mesh: Mesh, vote: int) -> jax.Array:
  """The `[num_devices]` int32 array in which this process casts `vote`."""
  local = np.full(len(mesh.local_devices), vote, np.int32)
  return jax.make_array_from_process_local_data(vote_sharding(mesh), local)


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """Returns the rows `[lo, hi)` of a global batch that this process's devices hold."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  slices = [index[0] for index in index_map.values()]
  lo = min(s.start or 0 for s in slices)
  hi = max(batch_size if s.stop is None else s.stop for s in slices)
  return lo, hi


def put_batch(local: Any, mesh: Mesh, batch_size: int, leading_dims: int = 0) -> Any:
  """Assembles global arrays from this process's rows of a batch.

  Args:
    local: a pytree of numpy arrays holding rows `process_rows(mesh,
      batch_size)` of the global batch, along dimension `leading_dims`.
    mesh: the mesh to place the batch on.
    batch_size: the global batch size.
    leading_dims: dimensions before the batch dimension, such as the `K` of a
      `[K, B, ...]` chunk.

  Returns:
    The global batch, sharded over the data-parallel axes.
  """
  sharding = batch_sharding(mesh, leading_dims)
  lo, _ = process_rows(mesh, batch_size)

  def put(x: np.ndarray) -> jax.Array:
    shape = (*x.shape[:leading_dims], batch_size, *x.shape[leading_dims + 1 :])

    def shard(index: tuple[slice, ...]) -> np.ndarray:
      rows = index[leading_dims]
      start = (rows.start or 0) - lo
      stop = (batch_size if rows.stop is None else rows.stop) - lo
      return x[(*index[:leading_dims], slice(start, stop), *index[leading_dims + 1 :])]

    return jax.make_array_from_callback(shape, sharding, shard)

  return jax.tree.map(put, local)
