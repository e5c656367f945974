"""Tokens per second and model FLOPs utilisation (MFU) for the train lines.

MFU is the model's training FLOPs per second over the devices' peak. The
FLOPs come from the model: a model with `flops_per_token(seq_len)` (the
reference Transformer: 6 per weight plus attention) is counted per token of
the batch's `tokens` field; other models report no MFU (XLA's cost analysis
counts a `lax.scan` body once, so it cannot count a scanned step). The peak
comes from a table of accelerators' dense bf16 FLOP/s, or, on CPU, from a
float32 matmul timed once at start-up (all of the host's cores: simulated CPU
devices share them).

Example:
  >>> peak, source = peak_flops()
  >>> described = describe(model_fn, dataset.train[0], batch_size=32)
"""

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Dense bf16 peak FLOP/s per chip, by a substring of `device_kind` (first match wins).
PEAKS = (
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L4", 121e12),
  ("A10G", 70e12),
  ("TPU v6 lite", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
)


@functools.cache
def peak_flops() -> tuple[float, str]:
  """The devices' summed peak FLOP/s, and where the number comes from."""
  devices = jax.devices()
  kind = devices[0].device_kind
  for name, peak in PEAKS:
    if name in kind:
      return peak * len(devices), f"table: {name} bf16 dense x {len(devices)}"
  if devices[0].platform == "cpu":
    return measured_matmul(), "measured: float32 matmul 1024^3 on the host"
  return 0.0, f"unknown device {kind!r}"


def measured_matmul(n: int = 1024, repeats: int = 5) -> float:
  """The best FLOP/s of an `n x n` float32 matmul on the first device (about 0.1 s)."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32) / n, jax.devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def per_step(model_fn: Any, record: dict[str, Any], batch_size: int) -> tuple[int, float]:
  """Tokens a train step consumes and the model's training FLOPs for them (0 if unknown)."""
  tokens = record.get("tokens")
  if tokens is None or getattr(tokens, "ndim", 0) != 1:
    return 0, 0.0
  seq_len = tokens.shape[0] - 1  # a window of T + 1: T predicted
  abstract = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0)))
  per_token = getattr(abstract, "flops_per_token", None)
  flops = per_token(seq_len) * seq_len * batch_size if per_token else 0.0
  return seq_len * batch_size, flops


def describe(model_fn: Any, record: dict[str, Any], batch_size: int) -> dict[str, Any] | None:
  """`tokens_per_step`, `flops_per_step`, `peak_flops` and `peak_source`, or None if no FLOPs."""
  tokens, flops = per_step(model_fn, record, batch_size)
  if not flops:
    return None
  peak, source = peak_flops()
  return {"tokens_per_step": tokens, "flops_per_step": flops, "peak_flops": peak,
          "peak_source": source}  # fmt: skip
