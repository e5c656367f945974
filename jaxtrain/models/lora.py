"""LoRA adapters (`nnx.LoRALinear`): which parameters they are, and merging them for export.

A `nnx.LoRALinear` computes `x @ kernel + bias + x @ lora_a @ lora_b`; its
parameters sit at `.../kernel`, `.../bias`, `.../lora/lora_a` and
`.../lora/lora_b`. `merge` folds each adapter into its kernel
(`kernel + lora_a @ lora_b`) and drops it, giving the parameters of the same
model built without LoRA, with the same outputs.

Example:
  >>> merged = merge(state.params)                      # a plain nested dict
  >>> plain = BertClassifier(cfg, 6, lora_rank=0, rngs=nnx.Rngs(0))
  >>> nnx.update(plain, merged)
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import sharding

ADAPTERS = (r"(^|/)lora/lora_[ab]$",)  # the adapter parameters' paths (`optim.trainable`)


def adapter_paths(params: Any) -> list[str]:
  """The paths of every LoRA adapter parameter."""
  paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [p for p in paths if p.endswith(("/lora/lora_a", "/lora/lora_b"))]


def merge(params: Any) -> Any:
  """The parameters with every adapter folded into its kernel, as host numpy arrays.

  The product is taken in float32 and cast to the kernel's dtype.
  """
  if not isinstance(params, dict):
    return np.asarray(jax.device_get(params))
  lora = params.get("lora")
  out = {k: merge(v) for k, v in params.items() if k != "lora"}
  if isinstance(lora, dict) and {"lora_a", "lora_b"} <= set(lora) and "kernel" in out:
    a, b = (jnp.asarray(lora[k], jnp.float32) for k in ("lora_a", "lora_b"))
    kernel = out["kernel"]
    out["kernel"] = np.asarray(jnp.asarray(kernel, jnp.float32) + a @ b).astype(kernel.dtype)
  return out


def count(params: Any, paths: Any = None) -> int:
  """The number of values in `params`, or in the leaves whose paths are in `paths`."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(x.shape)) for p, x in leaves
             if paths is None or sharding.path_str(p) in paths)  # fmt: skip


class LoRALinear(nnx.LoRALinear):
  """Flax's `nnx.LoRALinear` (same parameters), with the low-rank product kept apart.

  `x @ lora_a` goes through `lax.optimization_barrier`, so XLA cannot fuse the
  rank-`r` matmuls into their elementwise neighbours: on CPU that fusion ran them
  as naive loops, and one adapted `384 -> 1536` layer's gradient took 120 ms
  instead of 25 ms (`benchmarks/finetune.py` shows the whole step).
  """

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    """`x @ kernel + bias + x @ lora_a @ lora_b`."""
    y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
    x, a, b = self.lora.promote_dtype(
      (x, self.lora.lora_a[...], self.lora.lora_b[...]), dtype=self.lora.dtype
    )
    low = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]) @ a)
    # In the layer's dtype: float32 adapters on a bfloat16 base keep bfloat16 activations.
    return y + (low @ b).reshape(*x.shape[:-1], b.shape[-1]).astype(y.dtype)
