"""Precision policies and dynamic loss scaling, as pure functions.

A `Policy` names three dtypes: `param_dtype` for the stored parameters (and so
the optimizer state), `compute_dtype` for the forward and backward passes, and
`output_dtype` for what the loss reduces. Inside the train step the parameters
are cast to the compute dtype, the floating inputs too, and every NNX module
with a `dtype` attribute is set to it, so both the reference models and user
models compute in it. The gradients come back in the parameter dtype through
the casts. Kept in float32 whatever the policy:
- normalisation statistics (Flax's norms compute them in at least float32);
- the loss: `jaxtrain.losses` cast logits to float32 before any reduction,
  and the step casts the per-example outputs to `output_dtype`;
- the reference Transformer's attention softmax (a user model's softmax is its
  own business);
- modules whose path (such as `hidden/0` or `head`) matches `f32_modules`, a
  per-module override: their parameters are stored and used in float32 and
  their `dtype` is float32 (under `bf16`, `f32_modules=("lora",)` keeps a
  LoRA run's frozen base in bfloat16 and its adapters in float32).

The floating arrays of a batch are cast to the compute dtype too; keep targets
that need more precision integer, or recast them in the loss function (and
note float16's maximum, 65504).

| policy | params, optimizer state | compute | loss | loss scaling |
| --- | --- | --- | --- | --- |
| `f32` | float32 | float32 | float32 | no |
| `bf16-mixed` | float32 | bfloat16 | float32 | no |
| `bf16` | bfloat16 | bfloat16 | float32 | no |
| `fp16-mixed` | float32 | float16 | float32 | dynamic |

Dynamic loss scaling (float16's range is too narrow for small gradients) is a
`LossScale` pytree and four pure functions, usable around any
`jax.value_and_grad`:

  >>> ls = loss_scale_init()
  >>> loss, grads = jax.value_and_grad(lambda p: scale_loss(ls, loss_fn(p)))(params)
  >>> grads = unscale(ls, grads)
  >>> finite = all_finite(grads)            # skip the update when False
  >>> ls = adjust(ls, finite)               # halve on overflow, grow after a period
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import sharding


@dataclasses.dataclass(frozen=True)
class Policy:
  """The dtypes of a run; see the module docstring."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  loss_scaling: bool = False
  loss_scale_period: int = 2000  # finite steps before the loss scale doubles
  f32_modules: tuple[str, ...] = ()

  def cast_to_param(self, tree: Any) -> Any:
    """Casts the floating leaves of `tree` to `param_dtype`, but `f32_modules`' to float32.

    So under `bf16` a LoRA run can store its frozen base in bfloat16 and its
    adapters in float32 (`f32_modules=("lora",)`).
    """
    if self.param_dtype == jnp.float32 or not self.f32_modules:
      return _cast(tree, self.param_dtype)
    return self._by_module(tree, self.param_dtype)

  def _by_module(self, tree: Any, dtype: Any) -> Any:
    patterns = [re.compile(p) for p in self.f32_modules]

    def cast(path: tuple[Any, ...], x: Any) -> Any:
      module = sharding.path_str(path[:-1])
      return _cast(x, jnp.float32 if any(p.search(module) for p in patterns) else dtype)

    return jax.tree.map_with_path(cast, tree)

  def cast_to_compute(self, tree: Any) -> Any:
    """Casts the floating leaves of `tree` to `compute_dtype`."""
    return _cast(tree, self.compute_dtype)

  def cast_to_output(self, tree: Any) -> Any:
    """Casts the floating leaves of `tree` to `output_dtype`."""
    return _cast(tree, self.output_dtype)

  def compute_params(self, params: Any) -> Any:
    """The parameters for the forward pass: in `compute_dtype`, but `f32_modules` in float32.

    A parameter is kept in float32 when the path of its module (its own path
    without the last key, such as `hidden/0` for `hidden/0/kernel`) matches.
    """
    return self._by_module(params, self.compute_dtype)

  def apply_to_model(self, model: nnx.Module) -> None:
    """Sets `dtype` on every NNX module that has one: `compute_dtype`, or float32 for overrides."""
    if self.compute_dtype == jnp.float32 and not self.f32_modules:
      return
    patterns = [re.compile(p) for p in self.f32_modules]
    for path, module in nnx.iter_modules(model):
      if hasattr(module, "dtype"):
        name = "/".join(str(p) for p in path)
        keep = any(p.search(name) for p in patterns)
        module.dtype = jnp.float32 if keep else self.compute_dtype


POLICIES = {
  "f32": Policy(),
  "bf16-mixed": Policy(compute_dtype=jnp.bfloat16),
  "bf16": Policy(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16),
  "fp16-mixed": Policy(compute_dtype=jnp.float16, loss_scaling=True),
}


def get_policy(name: str, f32_modules: Sequence[str] = (), loss_scale_period: int = 2000) -> Policy:
  """The named policy (`POLICIES`), with `f32_modules` path patterns kept in float32."""
  if name not in POLICIES:
    raise ValueError(f"unknown precision policy {name!r} (known: {', '.join(POLICIES)})")
  return dataclasses.replace(
    POLICIES[name], f32_modules=tuple(f32_modules), loss_scale_period=loss_scale_period
  )


def _cast(tree: Any, dtype: Any) -> Any:
  def cast(x: Any) -> Any:
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


class LossScale(NamedTuple):
  """Dynamic loss-scaling state: the scale, and finite steps since it last changed."""

  scale: jax.Array  # f32
  good_steps: jax.Array  # i32


def loss_scale_init(initial: float = 2.0**15) -> LossScale:
  """A fresh loss scale."""
  return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))


def scale_loss(ls: LossScale, loss: jax.Array) -> jax.Array:
  """The loss times the scale, for `jax.grad`."""
  return loss * ls.scale.astype(loss.dtype)


def unscale(ls: LossScale, grads: Any) -> Any:
  """Gradients of a scaled loss divided by the scale, in float32 or wider."""
  inv = 1.0 / ls.scale

  def fix(g: jax.Array) -> jax.Array:
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    return g * inv.astype(g.dtype)

  return jax.tree.map(fix, grads)


def all_finite(tree: Any) -> jax.Array:
  """True when no leaf of `tree` holds an inf or NaN (one reduction over all leaves)."""
  return jnp.isfinite(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)))


def adjust(
  ls: LossScale,
  finite: jax.Array,
  *,
  period: int = 2000,
  factor: float = 2.0,
  min_scale: float = 1.0,
) -> LossScale:
  """The scale after one step: divided by `factor` on overflow, multiplied after `period`.

  Args:
    ls: the state before the step.
    finite: whether the step's gradients were finite (the step was applied).
    period: finite steps in a row after which the scale grows.
    factor: the growth and backoff factor.
    min_scale: the scale never goes below this.

  Returns:
    The new state.
  """
  grow = finite & (ls.good_steps + 1 >= period)
  scale = jnp.where(
    finite,
    jnp.where(grow, ls.scale * factor, ls.scale),
    jnp.maximum(ls.scale / factor, min_scale),
  )
  good = jnp.where(finite & ~grow, ls.good_steps + 1, 0)
  scale = jnp.where(jnp.isfinite(scale), scale, ls.scale)  # never grow to inf
  return LossScale(scale.astype(jnp.float32), good.astype(jnp.int32))


def dtype_bytes(tree: Any) -> int:
  """The bytes of the arrays of a pytree (of arrays or `ShapeDtypeStruct`s)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
