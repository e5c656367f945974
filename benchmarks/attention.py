"""Causal attention, forward and backward, of each implementation this backend runs.

For the `experiments.lm` presets' attention shapes (`cpu`: 4 heads over 2 key/value
heads of 32, context 128, batch 32; `gpu`: 16 heads over 8 of 64, context 1,024,
batch 64), without and with segment ids (documents of random lengths packed into
each window), times `jax.grad` of the attention through `causal_attention` (jitted,
`block_until_ready`, the median of `--repeats` runs after `--warmup`), and prints
each implementation's milliseconds, its time as a ratio to `reference`'s, and its
largest error against `reference` run in float32 (values and the three gradients,
relative to each one's largest magnitude). Inputs are bfloat16 on an accelerator and
float32 on CPU (`--dtype`). What a backend cannot run is skipped with the reason
(`implementation`'s `ConfigError`). On CPU the `gpu` shapes run at batch 2 unless
`--batch` says otherwise; `pallas` runs there only in Pallas' interpreter
(`--interpret`, slow). On a GPU it also times the Triton kernel at other tiles
(`--triton_blocks`) and, with segment ids on Hopper or later, cuDNN's packed-sequence
layout (`cudnn-packed`: JAX's private API, not one of the implementations).

    python benchmarks/attention.py
    python benchmarks/attention.py --presets=gpu --batch=4 --repeats=5
    python benchmarks/attention.py --segments=with --impls=cudnn,pallas   # on a GPU
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import lm
from jaxtrain import ConfigError
from jaxtrain.models import attention

_PRESETS = flags.DEFINE_list("presets", ["cpu", "gpu"], "experiments.lm presets whose shapes run.")
_IMPLS = flags.DEFINE_list(
  "impls", ["reference", "xla", "cudnn", "pallas", "auto"], "Implementations to time."
)
_SEGMENTS = flags.DEFINE_enum("segments", "both", ["both", "without", "with"], "Segment ids.")
_BATCH = flags.DEFINE_integer(
  "batch", 0, "Batch for every preset; 0: the preset's (2 for gpu on CPU)."
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 0, "Timed runs of each; 0: 20 on an accelerator, 5 on CPU."
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compiling.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "auto: bf16 off CPU.")
_INTERPRET = flags.DEFINE_boolean("interpret", False, "Run pallas in Pallas' interpreter.")
_DOC_MEAN = flags.DEFINE_float("doc_mean", 0.25, "Mean document length, as a share of the window.")
_TRITON_BLOCKS = flags.DEFINE_list(
  "triton_blocks", [], "More pallas (Triton) tiles to time, FORWARD:BACKWARD each, e.g. 128:64."
)
_CUDNN_PACKED = flags.DEFINE_boolean(
  "cudnn_packed", True, "With segment ids on a Hopper GPU, also time cuDNN's packed layout."
)


def shapes(preset: str) -> tuple[int, int, int, int, int]:
  """`(batch, seq_len, heads, kv_heads, head_dim)` of the `experiments.lm` preset."""
  m, batch = lm.get_config(preset).model, lm.get_config(preset).train.batch_size
  if _BATCH.value:
    batch = _BATCH.value
  elif preset == "gpu" and jax.default_backend() == "cpu":
    batch = 2
  return batch, m.seq_len, m.heads, m.kv_heads or m.heads, m.d_model // m.heads


def packed_segments(rng: np.random.Generator, batch: int, t: int) -> np.ndarray:
  """Ids `1, 2, ...` of documents of random (exponential) lengths packed into each window."""
  ids = np.zeros((batch, t), np.int32)
  for row in ids:
    start, doc = 0, 1
    while start < t:
      length = max(1, round(rng.exponential(_DOC_MEAN.value * t)))
      row[start : start + length] = doc
      start, doc = start + length, doc + 1
  return ids


def step(name: str, segments: bool, fn=None):
  """The jitted `(q, k, v, ids, cotangent) -> (out, (dq, dk, dv))` of implementation `name`.

  `fn(q, k, v, ids)`, when given, runs instead of `causal_attention`.
  """

  def run(q, k, v, ids, cotangent):
    def f(q, k, v):
      if fn is not None:
        return fn(q, k, v, ids)
      return attention.causal_attention(
        q,
        k,
        v,
        segment_ids_BxT=ids if segments else None,
        implementation=name,
        interpret=_INTERPRET.value,
      )

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cotangent)

  return jax.jit(run)


def median_ms(fn, args, repeats: int) -> float:
  """The median wall time of `fn(*args)` in milliseconds, after `--warmup` runs."""
  for _ in range(_WARMUP.value):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def relative_error(got, want) -> float:
  """The largest `|got - want|` over the largest `|want|`, across the output and gradients."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(x, np.float32), np.asarray(y, np.float32)
    worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
  return worst


def bench(preset: str, segments: bool, dtype, repeats: int) -> None:
  """Times and checks every implementation at `preset`'s shapes; prints one line each."""
  b, t, n, kv, h = shapes(preset)
  keys = jax.random.split(jax.random.key(0), 4)
  q32 = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
  k32, v32 = (jax.random.normal(key, (b, t, kv, h), jnp.float32) for key in keys[1:3])
  cot32 = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
  ids = jnp.asarray(packed_segments(np.random.default_rng(0), b, t))
  q, k, v, cot = (a.astype(dtype) for a in (q32, k32, v32, cot32))
  args = (q, k, v, ids, cot)
  docs = np.mean([len(np.unique(row)) for row in np.asarray(ids)])
  which = f"segment ids ({docs:.1f} documents a window)" if segments else "no segment ids"
  print(
    f"\n{preset} shapes: B={b} T={t} heads={n} kv_heads={kv} head_dim={h} "
    f"{jnp.dtype(dtype).name}, {which}"
  )
  want = jax.device_get(step("reference", segments)(q32, k32, v32, ids, cot32))
  reference_ms = None
  for name in _IMPLS.value:
    try:
      resolved = attention.implementation(
        dtype, name, segments=segments, seq_len=t, head_dim=h, interpret=_INTERPRET.value
      )
    except ConfigError as e:
      print(f"  {name:<18} skipped: {e}")
      continue
    label = f"{name}->{resolved}" if name == "auto" else name
    ms = report(label, step(name, segments), args, want, repeats=repeats, reference_ms=reference_ms)
    if name == "reference":
      reference_ms = ms
  for label, fn in extras(dtype, segments, t, h, ids):
    if isinstance(fn, str):
      print(f"  {label:<18} skipped: {fn}")
    else:
      report(
        label, step(label, segments, fn), args, want, repeats=repeats, reference_ms=reference_ms
      )


def report(label, fn, args, want, *, repeats, reference_ms) -> float | None:
  """Runs, checks and times `fn`; prints its line; its milliseconds, or None if it failed."""
  try:
    start = time.perf_counter()
    got = jax.block_until_ready(fn(*args))
    first_s = time.perf_counter() - start
    ms = median_ms(fn, args, repeats)
  except Exception as e:  # a kernel failing here is a result to report
    print(f"  {label:<18} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return None
  base = reference_ms or (ms if label == "reference" else None)
  ratio = f"{ms / base:6.2f}x reference" if base else " " * 17
  print(
    f"  {label:<18} {ms:10.2f} ms  {ratio}  max rel err {relative_error(got, want):.1e}"
    f"  (first call {first_s:.1f} s)"
  )
  return ms


def extras(dtype, segments: bool, t: int, h: int, ids):
  """`(label, fn or why not)` of the variants beyond the implementations, on a GPU.

  Also on CPU with `--interpret`, where only the Triton tiles run.

  `pallas[F:B]`: the Triton kernel with forward tiles F and backward tiles B
  (`--triton_blocks`); `cudnn-packed`: cuDNN's packed-sequence layout
  (`attention._cudnn_packed`, JAX's private API, Hopper or later), each row's runs of
  equal ids its sequences, as many as the batch's most.
  """
  if jax.default_backend() != "gpu" and not _INTERPRET.value:
    return
  for blocks in _TRITON_BLOCKS.value:
    forward, backward = (int(x) for x in blocks.split(":"))

    def triton(q, k, v, ids, tiles=(forward, backward)):
      saved, attention.TRITON_BLOCKS = attention.TRITON_BLOCKS, tiles
      try:
        return attention._triton(q, k, v, ids if segments else None, interpret=_INTERPRET.value)
      finally:
        attention.TRITON_BLOCKS = saved

    yield f"pallas[{blocks}]", triton
  if not (segments and _CUDNN_PACKED.value):
    return
  try:
    attention.implementation(dtype, "cudnn", segments=True, seq_len=t, head_dim=h)
  except ConfigError as e:
    yield "cudnn-packed", str(e)
    return
  capability = attention._gpu_info()[1]
  if capability is None or capability < (9, 0):
    yield "cudnn-packed", f"needs a Hopper or later GPU (compute capability {capability})"
    return
  runs = np.concatenate([np.ones((ids.shape[0], 1), bool), np.diff(np.asarray(ids)) != 0], 1)
  most = int(runs.sum(1).max())
  yield (
    "cudnn-packed",
    lambda q, k, v, ids: attention._cudnn_packed(q, k, v, ids, max_segments=most),
  )


def main(argv):
  del argv
  backend = jax.default_backend()
  if _DTYPE.value == "auto":
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  else:
    dtype = jnp.dtype(_DTYPE.value)
  repeats = _REPEATS.value or (5 if backend == "cpu" else 20)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({backend}); ms per fwd+bwd")
  for preset in _PRESETS.value:
    for segments in {"both": (False, True), "without": (False,), "with": (True,)}[_SEGMENTS.value]:
      bench(preset, segments, dtype, repeats)


if __name__ == "__main__":
  app.run(main)
