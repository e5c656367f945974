"""Causal grouped-query attention that can keep packed documents apart.

`causal_attention(q, k, v, segment_ids_BxT=..., implementation=...)` attends each of
`N` query heads over `K` key/value heads (`N % K == 0`; query head `n` reads key/value
head `n // (N / K)`), causally, scaled by `1 / sqrt(H)`. With `segment_ids_BxT` (an
integer per token: its document in a packed window; any value, 0 for padding
included) a token attends only to earlier-or-same positions carrying the same id, so
nothing crosses a document boundary. Every token attends at least to itself, so no
row is empty: padding gives finite values and gradients.

The implementations (`IMPLEMENTATIONS`), each taking segment ids:
- `reference`: the computation written out (`[B, K, N/K, T, H]` head-major einsums,
  the softmax in float32 and rematerialised), the segment mask built inside the
  softmax from the ids;
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, segments as its
  boolean `mask` (`[B, 1, T, T]`); it materialises the `[B, N, T, T]` logits;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused
  flash attention (CUDA GPU, bfloat16/float16, head size a multiple of 8 up to 128,
  or 256 from Hopper on); segments as the same boolean `mask`, which JAX hands to
  cuDNN as an additive `[B, 1, T, T]` bias (an even `T` is then needed);
- `pallas`: a Pallas flash-attention kernel that JAX ships, taking segment ids
  natively: on GPU the Triton kernel `jax.experimental.pallas.ops.gpu.attention.mha`
  (forward and backward kernels; key/value heads repeated to the query heads; `T` a
  multiple of 16, head size 16 to 128), on TPU the Splash attention kernel
  (`splash_attention`, a causal mask with `SegmentIds`, grouped-query natively; `T`
  a multiple of 128). On CPU only with `interpret=True` (Pallas' interpreter, for
  tests), which runs the GPU kernel.

`implementation(dtype, chosen, segments=..., seq_len=..., head_dim=...)` resolves
`auto` and refuses, with a `ConfigError` of one line naming what to use instead, a
combination that cannot run; `causal_attention` calls it at trace time, before
anything compiles. `auto` runs: on GPU `cudnn` for 16-bit inputs it takes (segments
included), else `pallas` for 16-bit inputs, else `xla`; on TPU `pallas` (Splash)
when `T` is a multiple of 128, else `xla`; on CPU `reference` (1.3x to 1.7x faster
than `xla` there, forward and backward, with and without segments:
`benchmarks/attention.py`). The GPU and TPU choices are not yet measured here.

cuDNN also has a packed-sequence layout (`q_offsets`/`kv_offsets`, each document its
own sequence: no mask, and blocks across documents skipped), reachable only through
JAX's private API and from Hopper on: `_cudnn_packed` wraps it for
`benchmarks/attention.py` to time; it is not one of the implementations.
"""

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtrain.config import ConfigError

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "pallas", "reference")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The Triton kernel's tiles: forward (query and key blocks) and backward (all four).
TRITON_BLOCKS = (128, 32)
# The Splash kernel's tiles (query and key blocks, forward and backward), at most.
SPLASH_BLOCK = 512


def _gpu_info() -> tuple[bool, tuple[int, int] | None]:
  """(whether the default GPU is CUDA, its compute capability), or (False, None)."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return False, None
  try:
    cuda = "rocm" not in str(device.client.platform_version).lower()
  except AttributeError:
    cuda = True
  try:
    major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
  except (AttributeError, ValueError):
    return cuda, None
  return cuda, (major, minor)


def _largest_block(length: int, most: int, least: int) -> int | None:
  """The largest power of two from `least` to `most` that divides `length`, or None."""
  block = most
  while block >= least:
    if length % block == 0:
      return block
    block //= 2
  return None


class _Case(NamedTuple):
  """What decides which implementation can run: see `implementation`'s arguments."""

  dtype: Any
  backend: str
  segments: bool
  seq_len: int | None
  head_dim: int | None
  interpret: bool


def _cudnn_problem(case: _Case) -> str | None:
  """Why cuDNN's fused attention cannot run `case`, or None."""
  if case.backend != "gpu":
    return f"needs a CUDA GPU (here {case.backend})"
  if jnp.dtype(case.dtype) not in _HALF:
    return f"needs bfloat16 or float16 inputs (here {jnp.dtype(case.dtype).name})"
  on_this_gpu = case.backend == jax.default_backend()
  cuda, capability = _gpu_info() if on_this_gpu else (True, None)
  if not cuda:
    return "needs a CUDA GPU (here a ROCm one)"
  most = 256 if capability is not None and capability >= (9, 0) else 128
  h = case.head_dim
  if h is not None and (h % 8 or h > most):
    return f"needs a head size that is a multiple of 8 up to {most} (here {h})"
  if case.segments and case.seq_len is not None and case.seq_len % 2:
    return f"with segment ids needs an even sequence length (here {case.seq_len})"
  return None


def _pallas_problem(case: _Case) -> str | None:
  """Why JAX's Pallas kernel for this backend (Splash, Triton) cannot run `case`, or None."""
  t, h = case.seq_len, case.head_dim
  problem = None
  if case.backend == "tpu":
    if t is not None and t % 128:
      problem = f"(Splash) needs a sequence length that is a multiple of 128 (here {t})"
  elif case.backend == "cpu" and not case.interpret:
    problem = "runs on CPU only in Pallas' interpreter (interpret=True, for tests)"
  elif case.backend not in ("gpu", "cpu"):
    problem = f"has no kernel for {case.backend}"
  elif t is not None and t % 16:
    problem = f"(Triton) needs a sequence length that is a multiple of 16 (here {t})"
  elif h is not None and not 16 <= h <= 128:
    problem = f"(Triton) needs a head size from 16 to 128 (here {h})"
  return problem


_PROBLEMS = {"cudnn": _cudnn_problem, "pallas": _pallas_problem}


def _problem(name: str, case: _Case) -> str | None:
  """Why implementation `name` cannot run `case`, or None when it can."""
  return _PROBLEMS[name](case) if name in _PROBLEMS else None


def _auto(case: _Case) -> str:
  """What `auto` runs: the fastest implementation that can run `case`."""
  if case.backend == "gpu":
    if jnp.dtype(case.dtype) in _HALF:
      for name in ("cudnn", "pallas"):
        if _problem(name, case) is None:
          return name
    return "xla"
  if case.backend == "tpu":
    return "pallas" if _problem("pallas", case) is None else "xla"
  # CPU (measured by benchmarks/attention.py): the head-major reference beats XLA's.
  return "reference"


def implementation(
  dtype: Any,
  chosen: str = "auto",
  *,
  segments: bool = False,
  backend: str | None = None,
  seq_len: int | None = None,
  head_dim: int | None = None,
  interpret: bool = False,
) -> str:
  """The attention implementation to run for `chosen` (one of `IMPLEMENTATIONS`).

  Args:
    dtype: the inputs' dtype.
    chosen: `auto` (the fastest that can run this combination) or a name.
    segments: whether segment ids are given.
    backend: `cpu`, `gpu` or `tpu`; `jax.default_backend()` when None.
    seq_len: the sequence length `T`, when known (kernels need multiples of a block).
    head_dim: the head size `H`, when known.
    interpret: whether Pallas kernels run in Pallas' interpreter (`pallas` on CPU).

  Raises:
    ConfigError: one line, naming the implementation to use instead, when `chosen`
      is unknown or cannot run this backend, dtype, segments or shape.
  """
  backend = backend or jax.default_backend()
  case = _Case(dtype, backend, segments, seq_len, head_dim, interpret)
  alternative = _auto(case)
  if chosen not in IMPLEMENTATIONS:
    raise ConfigError(
      f"attention={chosen!r} is not one of {', '.join(IMPLEMENTATIONS)}; "
      f"use attention='{alternative}'"
    )
  if chosen == "auto":
    return alternative
  problem = _problem(chosen, case)
  if problem:
    raise ConfigError(
      f"attention='{chosen}' {problem}; use attention='{alternative}' "
      f"(what auto runs on {backend} for {jnp.dtype(dtype).name}"
      f"{' with segment ids' if segments else ''})"
    )
  return chosen


_resolve = implementation  # `causal_attention`'s argument of that name hides the function


def _segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """`[B, T, T]`: whether query `i` and key `j` are in the same segment."""
  return segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]


@jax.checkpoint
def _causal_softmax(scores: jax.Array, segment_ids_BxT: jax.Array | None) -> jax.Array:
  """Causal (and same-segment) softmax of `[B, K, G, T, T]` scores, in float32.

  Returned in the scores' dtype. Rematerialised: the backward pass recomputes the
  float32 probabilities (and the mask) from the saved scores and ids, so a bfloat16
  model keeps no float32 `[T, T]` activations.
  """
  t = scores.shape[-1]
  allowed = jnp.tril(jnp.ones((t, t), bool))
  if segment_ids_BxT is not None:
    allowed = allowed & _segment_mask(segment_ids_BxT)[:, None, None]
  logits = jnp.where(allowed, scores.astype(jnp.float32), -1e30)
  return jax.nn.softmax(logits, axis=-1).astype(scores.dtype)


def _reference(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
  """The head-major formulation, which XLA's CPU backend runs fastest."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  k, v = (a.transpose(0, 2, 1, 3) for a in (k_BxTxKxH, v_BxTxKxH))
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q * (h**-0.5), k)
  out = jnp.einsum("bkgqs,bksd->bkgqd", _causal_softmax(scores, segment_ids_BxT), v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _dot_product(q, k, v, segment_ids_BxT, implementation):
  """`jax.nn.dot_product_attention`, segments as a boolean `[B, 1, T, T]` mask."""
  mask = None if segment_ids_BxT is None else _segment_mask(segment_ids_BxT)[:, None]
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=True, implementation=implementation
  )


def _triton(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret: bool):
  """JAX's Pallas Triton flash attention (`mha`): forward and backward kernels."""
  with warnings.catch_warnings():  # deprecated from JAX 0.11 in favour of tokamax
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention  # noqa: PLC0415

  _, t, n, h = q_BxTxNxH.shape
  groups = n // k_BxTxKxH.shape[2]
  k, v = (jnp.repeat(a, groups, axis=2) for a in (k_BxTxKxH, v_BxTxKxH))
  forward, backward = (_largest_block(t, most, 16) for most in TRITON_BLOCKS)
  sizes = attention.BlockSizes(
    block_q=forward,
    block_k=forward,
    block_q_dkv=backward,
    block_kv_dkv=backward,
    block_q_dq=backward,
    block_kv_dq=backward,
  )
  ids = None if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
  return attention.mha(
    q_BxTxNxH,
    k,
    v,
    ids,
    sm_scale=h**-0.5,
    causal=True,
    block_sizes=sizes,
    interpret=interpret,
  )


def _segment_runs(segment_ids_BxT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """The packed layout (for cuDNN) of each row's runs of equal ids: `(lengths, starts)`.

  `lengths` is `[B, max_segments]`, `starts` `[B, max_segments + 1]` (the form of
  `q_seqlen` and `q_offsets` that JAX's cuDNN attention takes), each padded with -1
  past a row's last run. Runs past `max_segments` are dropped: it must bound them.
  """
  t = segment_ids_BxT.shape[1]
  first = jnp.ones_like(segment_ids_BxT[:, :1], bool)
  starts_BxT = jnp.concatenate([first, segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], 1)

  def row(starts_T):
    start = jnp.nonzero(starts_T, size=max_segments + 1, fill_value=-1)[0].astype(jnp.int32)
    end = jnp.concatenate([start[1:], jnp.full((1,), -1, jnp.int32)])
    length = jnp.where(start >= 0, jnp.where(end >= 0, end, t) - start, -1)
    return length[:max_segments], start

  return jax.vmap(row)(starts_BxT)


def _cudnn_packed(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, max_segments: int):
  """Experimental, not an implementation: cuDNN's packed-sequence ("THD") attention.

  Each run of equal consecutive ids is one sequence to cuDNN (causal within it), so
  the result equals the others' when each id occupies one run. Through JAX's private
  `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (`q_offsets`,
  `kv_offsets`, `PADDING_CAUSAL`), on Hopper or later only; `max_segments` must bound
  each row's runs (a static shape). Before JAX 0.11.1 the key offsets were wrong for
  grouped-query attention (jax-ml/jax#39521), so key/value heads are repeated there.
  `benchmarks/attention.py` times it against the implementations.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415

  lengths, starts = _segment_runs(segment_ids_BxT, max_segments)
  k, v = k_BxTxKxH, v_BxTxKxH
  groups = q_BxTxNxH.shape[2] // k.shape[2]
  if groups > 1 and tuple(jax.__version_info__) < (0, 11, 1):
    k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
  return cudnn.dot_product_attention(
    q_BxTxNxH,
    k,
    v,
    None,
    None,
    lengths,
    lengths,
    starts,
    starts,
    scale=q_BxTxNxH.shape[-1] ** -0.5,
    mask_type=cudnn.MaskType.PADDING_CAUSAL,
    qkv_layout="BTNH",
  )


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, interpret: bool):
  """A Splash attention kernel for `heads` query heads over a causal `[t, t]` mask."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415

  block = _largest_block(t, SPLASH_BLOCK, 128)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * heads)
  return splash.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret: bool):
  """JAX's Splash attention (TPU), one batch row at a time, heads before positions."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415

  _, t, n, h = q_BxTxNxH.shape
  kernel = _splash_kernel(n, t, interpret)
  q = (q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
  k, v = (a.transpose(0, 2, 1, 3) for a in (k_BxTxKxH, v_BxTxKxH))
  if segment_ids_BxT is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = segment_ids_BxT.astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
      q, k, v, ids
    )
  return out.transpose(0, 2, 1, 3)


def causal_attention(
  q_BxTxNxH: jax.Array,
  k_BxTxKxH: jax.Array,
  v_BxTxKxH: jax.Array,
  *,
  segment_ids_BxT: jax.Array | None = None,
  implementation: str = "auto",
  interpret: bool = False,
) -> jax.Array:
  """Causal attention of `N` query heads over `K` key/value heads, `[B, T, N, H]` out.

  Args:
    q_BxTxNxH: queries.
    k_BxTxKxH: keys, `K` dividing `N`.
    v_BxTxKxH: values.
    segment_ids_BxT: integer segment (document) of each token, or None: one segment.
      A token attends only to earlier-or-same positions with its id.
    implementation: one of `IMPLEMENTATIONS` (see the module's docstring).
    interpret: run a `pallas` kernel in Pallas' interpreter (slow; on CPU, tests).

  Returns:
    The attention output, in the queries' dtype.

  Raises:
    ConfigError: at trace time, when `implementation` cannot run these inputs here.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  if n % kv or k_BxTxKxH.shape != (b, t, kv, h) or v_BxTxKxH.shape != k_BxTxKxH.shape:
    raise ConfigError(
      f"attention: keys {k_BxTxKxH.shape} and values {v_BxTxKxH.shape} do not fit queries "
      f"{q_BxTxNxH.shape} (heads must divide query heads); use matching [B, T, K, H] arrays"
    )
  if segment_ids_BxT is not None and segment_ids_BxT.shape != (b, t):
    raise ConfigError(
      f"attention: segment ids {segment_ids_BxT.shape} do not fit [B, T] = {(b, t)}; "
      f"use one id per token"
    )
  chosen = _resolve(
    q_BxTxNxH.dtype,
    implementation,
    segments=segment_ids_BxT is not None,
    seq_len=t,
    head_dim=h,
    interpret=interpret,
  )
  args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
  if chosen == "reference":
    return _reference(*args)
  if chosen in ("xla", "cudnn"):
    return _dot_product(*args, chosen)
  if jax.default_backend() == "tpu":
    return _splash(*args, interpret=interpret)
  return _triton(*args, interpret=interpret)


def cached_attention(
  q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, positions_BxT: jax.Array
) -> jax.Array:
  """Attention of `T` new queries over a key/value cache of `S` slots, `[B, T, N, H]` out.

  Slot `s` holds the key and value of position `s`; the query at position `p`
  attends to slots `0..p` (those its row has written), so a batch of prompts of
  different lengths shares one cache, each row at its own position.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  k, v = (a.transpose(0, 2, 1, 3) for a in (k_BxSxKxH, v_BxSxKxH))
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q * (h**-0.5), k).astype(jnp.float32)
  slots = jnp.arange(k_BxSxKxH.shape[1])
  allowed = slots[None, None, :] <= positions_BxT[:, :, None]  # [B, T, S]
  probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, -1e30), axis=-1)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
