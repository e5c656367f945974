"""A decoder-only Transformer for next-token prediction (Flax NNX).

Pre-norm blocks (RMSNorm) of causal self-attention and an MLP, with:
- rotary positions (`positions="rope"`) or a learned position table (`"learned"`);
- grouped-query attention: `kv_heads` key/value heads shared by `heads` query heads;
- causal attention (`causal_attention`, `attention=`): `auto` takes
  `jax.nn.dot_product_attention` with cuDNN's fused kernel on GPU for 16-bit inputs
  and XLA's on TPU, and on CPU the `reference` formulation (the same computation in a
  head-major layout, which XLA runs faster there); `cudnn`, `xla` and `reference`
  choose one; the softmax in float32;
- a SwiGLU (`activation="swiglu"`) or GELU MLP of width `mlp`;
- an output head tied to the token embedding (`tie=True`) or its own;
- the blocks stored stacked, `[layers, ...]`, and run by `lax.scan`
  (`scan_layers=True`: one compiled block) or unrolled at trace time, the same
  parameters either way;
- rematerialisation per block (`remat`): `none`, `full` (keep only the block's
  input) or `dots-saveable` (keep the matmul outputs, recompute the rest).

Every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `mlp`, `layers`; `logical_axes` reads them), and the
activations are named too (`batch`, `sequence`, `embed`, ...): `constrain`
applies them under `sharding.with_rules` and does nothing without.

Example:
  >>> model = Transformer(vocab=256, seq_len=128, d_model=128, layers=2, heads=4,
  ...                     rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((8, 128), jnp.int32)).shape
  (8, 128, 256)
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain import sharding
from jaxtrain.config import ConfigError
from jaxtrain.models import args

REMAT = ("none", "full", "dots-saveable")
ATTENTIONS = ("auto", "cudnn", "xla", "reference")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "gelu")
_REMAT_POLICIES = {"full": None, "dots-saveable": jax.checkpoint_policies.dots_saveable}


def _named(init: Callable, *names: str | None) -> Callable:
  """`init` whose parameter carries logical axis names (`logical_axes` metadata).

  Inert metadata, not Flax's sharding annotations: the model builds under any
  mesh, and the names stay for sharding rules to map onto one.
  """
  return nnx.with_metadata(init, logical_axes=names)


def logical_axes(model: nnx.Module) -> Any:
  """The logical axis names of each parameter of `model`, as a nested dict like its params."""
  params = nnx.state(model, nnx.Param)
  names = jax.tree.map(
    lambda v: v.get_metadata()["logical_axes"],
    params,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  return nnx.to_pure_dict(names) if isinstance(names, nnx.State) else names


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Names `x`'s axes; under logical axis rules (and a mesh), constrains its sharding."""
  return sharding.constrain(x, names)


def _linear(din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  return nnx.Linear(din, dout, use_bias=False, kernel_init=_named(init, *names), rngs=rngs)


def _norm(width: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(width, scale_init=_named(nnx.initializers.ones, "embed"), rngs=rngs)


def rope_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """The rotary cosines and sines, float32 `[length, head_dim // 2]` each."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TxF = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles_TxF), jnp.sin(angles_TxF)


def apply_rope(x_BxTxNxH: jax.Array, cos_TxF: jax.Array, sin_TxF: jax.Array) -> jax.Array:
  """Rotates each pair `(x[i], x[i + H/2])` by its position's angle, in float32."""
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_TxF[:, None, :], sin_TxF[:, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)


def attention_implementation(dtype: Any, chosen: str = "auto") -> str:
  """The attention to run for `chosen` (see `causal_attention`) on this backend and dtype.

  Raises:
    ConfigError: `cudnn` off a GPU or on float32 inputs.
  """
  backend, half = jax.default_backend(), jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if chosen == "cudnn" and not (backend == "gpu" and half):
    raise ConfigError(
      f"Transformer: attention='cudnn' needs a GPU and bfloat16 or float16 inputs (here "
      f"{backend}, {jnp.dtype(dtype).name}); use auto, xla or reference"
    )
  if chosen != "auto":
    return chosen
  if backend == "gpu" and half:
    return "cudnn"
  return "reference" if backend == "cpu" else "xla"


@jax.checkpoint
def _causal_softmax(scores: jax.Array) -> jax.Array:
  """Causal softmax over the last axis, in float32, returned in the scores' dtype.

  Rematerialised: the backward pass recomputes the float32 probabilities from the
  saved scores, so a bfloat16 model keeps no float32 `[T, T]` activations.
  """
  t = scores.shape[-1]
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores.astype(jnp.float32), -1e30)
  return jax.nn.softmax(logits, axis=-1).astype(scores.dtype)


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, implementation: str = "auto") -> jax.Array:
  """Causal attention of `N` query heads over `K` key/value heads, `[B, T, N, H]` out.

  `cudnn` (fused, 16-bit inputs only; `auto` on GPU) and `xla` (`auto` on TPU, and
  on GPU for float32) are `jax.nn.dot_product_attention`'s. `reference` (`auto` on
  CPU) is the same computation with the heads before the positions
  (`[B, K, N/K, T, H]`), which XLA's CPU backend runs about 2x faster forward and
  1.4x faster backward (measured). The softmax is taken in float32 either way.
  """
  implementation = attention_implementation(q_BxTxNxH.dtype, implementation)
  if implementation != "reference":
    return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True, implementation=implementation
    )
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  k, v = (a.transpose(0, 2, 1, 3) for a in (k_BxTxKxH, v_BxTxKxH))
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q * (h**-0.5), k)
  out = jnp.einsum("bkgqs,bksd->bkgqd", _causal_softmax(scores), v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):
  """Causal grouped-query self-attention."""

  def __init__(
    self, d_model: int, heads: int, kv_heads: int, *, attention: str = "auto", rngs: nnx.Rngs
  ):
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
    self.implementation = attention
    self.query = _linear(d_model, heads * self.head_dim, ("embed", "heads"), rngs)
    self.key = _linear(d_model, kv_heads * self.head_dim, ("embed", "kv_heads"), rngs)
    self.value = _linear(d_model, kv_heads * self.head_dim, ("embed", "kv_heads"), rngs)
    self.out = _linear(heads * self.head_dim, d_model, ("heads", "embed"), rngs)

  def __call__(self, x_NxD: jax.Array, t: int, rope: tuple[jax.Array, jax.Array] | None):
    """Attends over `[B * T, D]` rows, `t` a sequence; `rope` holds the rotary tables, or None."""
    b = x_NxD.shape[0] // t
    q = self.query(x_NxD).reshape(b, t, self.heads, self.head_dim)
    k = self.key(x_NxD).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.value(x_NxD).reshape(b, t, self.kv_heads, self.head_dim)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, "batch", "sequence", "heads", None)
    k, v = (constrain(a, "batch", "sequence", "kv_heads", None) for a in (k, v))
    out = causal_attention(q, k, v, self.implementation)
    return self.out(out.reshape(b * t, self.heads * self.head_dim))


class Mlp(nnx.Module):
  """`down(silu(gate(x)) * up(x))` (SwiGLU) or `down(gelu(up(x)))`."""

  def __init__(self, d_model: int, width: int, activation: str, *, rngs: nnx.Rngs):
    self.activation = activation
    self.up = _linear(d_model, width, ("embed", "mlp"), rngs)
    if activation == "swiglu":
      self.gate = _linear(d_model, width, ("embed", "mlp"), rngs)
    self.down = _linear(width, d_model, ("mlp", "embed"), rngs)

  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    """The MLP over `[B * T, D]` rows."""
    if self.activation == "swiglu":
      h = nnx.silu(self.gate(x_NxD)) * self.up(x_NxD)
    else:
      h = nnx.gelu(self.up(x_NxD))
    return self.down(constrain(h, "batch", "mlp"))


class Block(nnx.Module):
  """`x + attention(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(
    self, d_model, heads, *, kv_heads, mlp, activation, dropout, attention, rngs: nnx.Rngs
  ):
    self.attention_norm = _norm(d_model, rngs)
    self.attention = Attention(d_model, heads, kv_heads, attention=attention, rngs=rngs)
    self.mlp_norm = _norm(d_model, rngs)
    self.mlp = Mlp(d_model, mlp, activation, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_NxD, t: int, rope, *, rngs: nnx.Rngs | None) -> jax.Array:
    """One block over `[B * T, D]` rows, sequences of `t`."""
    x_NxD = x_NxD + self.dropout(self.attention(self.attention_norm(x_NxD), t, rope), rngs=rngs)
    x_NxD = x_NxD + self.dropout(self.mlp(self.mlp_norm(x_NxD)), rngs=rngs)
    return constrain(x_NxD, "batch", "embed")


class Transformer(nnx.Module):
  """Token embedding, `layers` stacked blocks, a final RMSNorm and a vocabulary head."""

  def __init__(
    self,
    vocab: int,
    seq_len: int,
    d_model: int,
    layers: int,
    heads: int,
    *,
    kv_heads: int = 0,
    mlp: int = 0,
    activation: str = "swiglu",
    positions: str = "rope",
    tie: bool = True,
    remat: str = "none",
    scan_layers: bool = True,
    dropout: float = 0.0,
    attention: str = "auto",
    rngs: nnx.Rngs,
  ):
    """Builds the model.

    Args:
      vocab: the vocabulary size.
      seq_len: the longest sequence; the rotary or learned position table's length.
      d_model: the residual width.
      layers: the number of blocks.
      heads: the query heads; `d_model` must divide by it into an even head width.
      kv_heads: the key/value heads, dividing `heads`; 0 means `heads`.
      mlp: the MLP's width; 0 means `4 * d_model`.
      activation: `swiglu` or `gelu`.
      positions: `rope` or `learned`.
      tie: whether the output head is the token embedding, transposed.
      remat: `none`, `full` or `dots-saveable`, per block.
      scan_layers: run the blocks with `lax.scan` rather than unrolled.
      dropout: after each attention and MLP, in training.
      attention: `auto`, `cudnn`, `xla` or `reference` (see `causal_attention`).
      rngs: the parameters' random streams.
    """
    kv_heads, mlp = kv_heads or heads, mlp or 4 * d_model
    sizes = dict(vocab=vocab, seq_len=seq_len, d_model=d_model, layers=layers, heads=heads)
    args.positive("Transformer", **sizes, kv_heads=kv_heads, mlp=mlp)
    args.dropout_rate("Transformer", dropout)
    _check_choices(activation=(activation, ACTIVATIONS), positions=(positions, POSITIONS),
                   remat=(remat, REMAT), attention=(attention, ATTENTIONS))  # fmt: skip
    if attention == "cudnn" and jax.default_backend() != "gpu":
      raise ConfigError("Transformer: attention='cudnn' needs a GPU; use auto, xla or reference")
    if d_model % heads or (d_model // heads) % 2:
      raise ConfigError(
        f"Transformer: d_model={d_model} must divide by heads={heads} into an even head width"
      )
    if heads % kv_heads:
      raise ConfigError(f"Transformer: heads={heads} must be a multiple of kv_heads={kv_heads}")
    self.vocab, self.seq_len, self.d_model, self.layers = vocab, seq_len, d_model, layers
    self.head_dim, self.remat, self.scan_layers = d_model // heads, remat, scan_layers
    self.positions, self.tie, self.dropout_rate = positions, tie, dropout
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab, d_model, embedding_init=_named(init, "vocab", "embed"), rngs=rngs)
    if positions == "learned":
      self.position = nnx.Embed(seq_len, d_model, embedding_init=_named(init, None, "embed"),
                                rngs=rngs)  # fmt: skip
    sizes = dict(kv_heads=kv_heads, mlp=mlp, activation=activation, dropout=dropout,
                 attention=attention)  # fmt: skip
    self.blocks = _stacked_blocks(layers, d_model, heads, sizes, rngs)
    self.norm = _norm(d_model, rngs)
    if not tie:
      self.head = _linear(d_model, vocab, ("embed", "vocab"), rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Returns the logits `[B, T, vocab]` of the next token at each position."""
    t = tokens_BxT.shape[1]
    if t > self.seq_len:
      raise ConfigError(
        f"Transformer: sequences of {t} tokens are longer than its {self.seq_len} positions "
        f"(seq_len={self.seq_len}); shorten the windows or raise seq_len"
      )
    b = tokens_BxT.shape[0]
    x_BxTxD = self.embed(constrain(tokens_BxT, "batch", "sequence"))
    rope = None
    if self.positions == "learned":
      x_BxTxD = x_BxTxD + self.position(jnp.arange(t))
    else:
      rope = rope_tables(t, self.head_dim)
    # The residual stream runs as [B * T, D] rows: XLA's CPU backward of a dense layer
    # is over twice as fast on 2-D activations as on [B, T, D] ones (measured).
    x_NxD = constrain(x_BxTxD.reshape(b * t, self.d_model), "batch", "embed")
    x_NxD = self.norm(self._blocks(x_NxD, t, rope, rngs))
    logits = self.embed.attend(x_NxD) if self.tie else self.head(x_NxD)
    return constrain(logits.reshape(b, t, self.vocab), "batch", "sequence", "vocab")

  def _blocks(self, x_NxD, t: int, rope, rngs: nnx.Rngs | None) -> jax.Array:
    graphdef, stacked = nnx.split(self.blocks)
    keys = None
    if rngs is not None and self.dropout_rate > 0:
      keys = jax.random.split(rngs.dropout(), self.layers)

    def block(x, layer):
      params, key = layer
      layer_rngs = nnx.Rngs(dropout=key) if key is not None else None
      return nnx.merge(graphdef, params)(x, t, rope, rngs=layer_rngs), None

    if self.remat != "none":
      block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.remat])
    if self.scan_layers:
      return jax.lax.scan(block, x_NxD, (stacked, keys))[0]
    for i in range(self.layers):
      x_NxD, _ = block(x_NxD, jax.tree.map(lambda a, i=i: a[i], (stacked, keys)))
    return x_NxD

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight it multiplies (the head included), plus attention.

    The attention term is `12 * layers * seq_len * d_model`, counted over the full
    `[T, T]` score matrix as PaLM's appendix does; rematerialisation is not counted.
    """
    weights = sum(
      leaf.size for path, leaf in jax.tree.leaves_with_path(nnx.state(self.blocks, nnx.Param))
    )
    weights += self.vocab * self.d_model  # the head's matmul, tied or not
    return 6.0 * weights + 12.0 * self.layers * seq_len * self.d_model


def _check_choices(**values: tuple[str, tuple[str, ...]]) -> None:
  for name, (value, choices) in values.items():
    if value not in choices:
      raise ConfigError(f"Transformer: {name}={value!r} must be one of {', '.join(choices)}")


def _stacked_blocks(layers: int, d_model: int, heads: int, sizes: dict, rngs: nnx.Rngs) -> Block:
  """`layers` blocks as one `Block` whose parameters have a leading `layers` axis."""

  @nnx.split_rngs(splits=layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs: nnx.Rngs) -> Block:
    return Block(d_model, heads, **sizes, rngs=rngs)

  blocks = make(rngs)
  for _, variable in nnx.iter_graph(blocks):
    if isinstance(variable, nnx.Param):
      variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
  return blocks
