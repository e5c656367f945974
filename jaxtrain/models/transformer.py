"""A decoder-only Transformer for next-token prediction (Flax NNX).

Pre-norm blocks (RMSNorm) of causal self-attention and an MLP, with:
- rotary positions (`positions="rope"`) or a learned position table (`"learned"`);
- grouped-query attention: `kv_heads` key/value heads shared by `heads` query heads;
- causal attention (`jaxtrain.models.attention`, `attention=`): `auto`, `cudnn`,
  `xla`, `pallas` or `reference`; with `segment_ids` (documents packed into one
  window) a token attends only within its document, and `positions` restart the
  rotary or learned positions at each document;
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

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain import sharding
from jaxtrain.config import ConfigError
from jaxtrain.models import args
from jaxtrain.models import attention as attention_lib
from jaxtrain.models import lora as lora_lib

REMAT = ("none", "full", "dots-saveable")
ATTENTIONS = attention_lib.IMPLEMENTATIONS
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "gelu")
LORA_TARGETS = ("attention/query", "attention/value")  # the projections the LoRA paper adapts
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


def _linear(
  din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs, bias: bool = False, *,
  path: str = "", lora: tuple[int, tuple[str, ...]] = (0, ()),
) -> nnx.Linear:  # fmt: skip
  """A linear layer, or a `LoRALinear` where a LoRA target matches its `path`."""
  init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  kw = dict(use_bias=bias, kernel_init=_named(init, *names),
            bias_init=_named(nnx.initializers.zeros, names[1]), rngs=rngs)  # fmt: skip
  rank, targets = lora
  if rank and any(re.search(t, path) for t in targets):
    return lora_lib.LoRALinear(din, dout, lora_rank=rank,
                               a_metadata={"logical_axes": (names[0], None)},
                               b_metadata={"logical_axes": (None, names[1])}, **kw)  # fmt: skip
  return nnx.Linear(din, dout, **kw)


def _norm(width: int, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.RMSNorm:
  return nnx.RMSNorm(width, epsilon=eps, scale_init=_named(nnx.initializers.ones, "embed"),
                     rngs=rngs)  # fmt: skip


def rope_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """The rotary cosines and sines, float32 `[length, head_dim // 2]` each."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TxF = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles_TxF), jnp.sin(angles_TxF)


def apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates each pair `(x[i], x[i + H/2])` by its position's angle, in float32.

  `cos` and `sin` are `[T, H/2]` (every sequence at positions `0..T-1`) or
  `[B, T, H/2]` (each token at its own position).
  """
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[..., None, :], sin[..., None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention."""

  def __init__(
    self,
    d_model: int,
    heads: int,
    kv_heads: int,
    *,
    attention: str = "auto",
    head_dim: int = 0,
    qkv_bias: bool = False,
    lora: tuple[int, tuple[str, ...]] = (0, ()),
    rngs: nnx.Rngs,
  ):
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim or d_model // heads
    self.implementation = attention
    h = self.head_dim

    def linear(name, din, dout, axes, bias=False):
      return _linear(din, dout, axes, rngs, bias, path=f"attention/{name}", lora=lora)

    self.query = linear("query", d_model, heads * h, ("embed", "heads"), qkv_bias)
    self.key = linear("key", d_model, kv_heads * h, ("embed", "kv_heads"), qkv_bias)
    self.value = linear("value", d_model, kv_heads * h, ("embed", "kv_heads"), qkv_bias)
    self.out = linear("out", heads * h, d_model, ("heads", "embed"))

  def __call__(
    self,
    x_NxD: jax.Array,
    t: int,
    rope: tuple[jax.Array, jax.Array] | None,
    segment_ids_BxT: jax.Array | None = None,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  ) -> Any:
    """Attends over `[B * T, D]` rows, `t` a sequence.

    `rope` holds the rotary cosines and sines, or None; `segment_ids_BxT` each
    token's document, or None for one document a row. With `cache`, `(keys,
    values, positions)`: `[B, S, K, H]` slots and the rows' `[B, T]` positions,
    the new keys and values are written at their positions and the queries
    attend over the slots; it returns the output and the new `(keys, values)`.
    """
    b = x_NxD.shape[0] // t
    q = self.query(x_NxD).reshape(b, t, self.heads, self.head_dim)
    k = self.key(x_NxD).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.value(x_NxD).reshape(b, t, self.kv_heads, self.head_dim)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, "batch", "sequence", "heads", None)
    k, v = (constrain(a, "batch", "sequence", "kv_heads", None) for a in (k, v))
    if cache is not None:
      keys, values, positions = cache
      rows = jnp.arange(b)[:, None]
      keys = keys.at[rows, positions].set(k.astype(keys.dtype))
      values = values.at[rows, positions].set(v.astype(values.dtype))
      out = attention_lib.cached_attention(q, keys, values, positions)
      return self.out(out.reshape(b * t, self.heads * self.head_dim)), (keys, values)
    out = attention_lib.causal_attention(
      q, k, v, segment_ids_BxT=segment_ids_BxT, implementation=self.implementation
    )
    return self.out(out.reshape(b * t, self.heads * self.head_dim))


class Mlp(nnx.Module):
  """`down(silu(gate(x)) * up(x))` (SwiGLU) or `down(gelu(up(x)))`."""

  def __init__(self, d_model: int, width: int, activation: str, *, lora=(0, ()), rngs: nnx.Rngs):
    self.activation = activation
    self.up = _linear(d_model, width, ("embed", "mlp"), rngs, path="mlp/up", lora=lora)
    if activation == "swiglu":
      self.gate = _linear(d_model, width, ("embed", "mlp"), rngs, path="mlp/gate", lora=lora)
    self.down = _linear(width, d_model, ("mlp", "embed"), rngs, path="mlp/down", lora=lora)

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
    self, d_model, heads, *, kv_heads, mlp, activation, dropout, attention, head_dim=0,
    qkv_bias=False, norm_eps=1e-6, lora=(0, ()), rngs: nnx.Rngs,
  ):  # fmt: skip
    self.attention_norm = _norm(d_model, rngs, norm_eps)
    self.attention = Attention(d_model, heads, kv_heads, attention=attention, head_dim=head_dim,
                               qkv_bias=qkv_bias, lora=lora, rngs=rngs)  # fmt: skip
    self.mlp_norm = _norm(d_model, rngs, norm_eps)
    self.mlp = Mlp(d_model, mlp, activation, lora=lora, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_NxD, t: int, rope, segments, *, rngs: nnx.Rngs | None, cache=None) -> Any:
    """One block over `[B * T, D]` rows, sequences of `t` (`segments`: their documents).

    With `cache` (see `Attention`), it returns the rows and the new keys and values.
    """
    attended = self.attention(self.attention_norm(x_NxD), t, rope, segments, cache)
    if cache is not None:
      attended, written = attended
    x_NxD = x_NxD + self.dropout(attended, rngs=rngs)
    x_NxD = x_NxD + self.dropout(self.mlp(self.mlp_norm(x_NxD)), rngs=rngs)
    x_NxD = constrain(x_NxD, "batch", "embed")
    return x_NxD if cache is None else (x_NxD, written)


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
    rope_base: float = 10000.0,
    norm_eps: float = 1e-6,
    head_dim: int = 0,
    qkv_bias: bool = False,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
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
      attention: one of `jaxtrain.models.attention.IMPLEMENTATIONS`.
      rope_base: the rotary frequencies' base (Llama 2: 10,000; Llama 3: 500,000).
      norm_eps: the RMSNorms' epsilon.
      head_dim: the query, key and value heads' width; 0 means `d_model // heads`.
      qkv_bias: biases on the query, key and value projections (Qwen2).
      lora_rank: the rank of LoRA adapters (`jaxtrain.models.lora`); 0: none.
      lora_targets: regexes of the block's linear layers that get adapters, matched
        against `attention/query|key|value|out` and `mlp/gate|up|down`; every
        layer's block gets the same ones (the blocks are stacked).
      rngs: the parameters' random streams.
    """
    kv_heads, mlp = kv_heads or heads, mlp or 4 * d_model
    sizes = dict(vocab=vocab, seq_len=seq_len, d_model=d_model, layers=layers, heads=heads)
    args.positive("Transformer", **sizes, kv_heads=kv_heads, mlp=mlp)
    args.dropout_rate("Transformer", dropout)
    _check_choices(activation=(activation, ACTIVATIONS), positions=(positions, POSITIONS),
                   remat=(remat, REMAT), attention=(attention, ATTENTIONS))  # fmt: skip
    if attention in ("cudnn", "pallas"):  # a kernel this backend lacks: refused before tracing
      attention_lib.implementation(jnp.bfloat16, attention, seq_len=seq_len,
                                   head_dim=head_dim or d_model // heads)  # fmt: skip
    if head_dim % 2 or (not head_dim and (d_model % heads or (d_model // heads) % 2)):
      raise ConfigError(
        f"Transformer: d_model={d_model} must divide by heads={heads} into an even head width, "
        f"or head_dim={head_dim} must be even"
      )
    if heads % kv_heads:
      raise ConfigError(f"Transformer: heads={heads} must be a multiple of kv_heads={kv_heads}")
    lora = _lora(lora_rank, tuple(lora_targets), activation)
    self.vocab, self.seq_len, self.d_model, self.layers = vocab, seq_len, d_model, layers
    self.head_dim, self.remat, self.scan_layers = head_dim or d_model // heads, remat, scan_layers
    self.rope_base, self.kv_heads = rope_base, kv_heads
    self.positions, self.tie, self.dropout_rate = positions, tie, dropout
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab, d_model, embedding_init=_named(init, "vocab", "embed"), rngs=rngs)
    if positions == "learned":
      self.position = nnx.Embed(seq_len, d_model, embedding_init=_named(init, None, "embed"),
                                rngs=rngs)  # fmt: skip
    sizes = dict(kv_heads=kv_heads, mlp=mlp, activation=activation, dropout=dropout,
                 attention=attention, head_dim=head_dim, qkv_bias=qkv_bias,
                 norm_eps=norm_eps, lora=lora)  # fmt: skip
    self.blocks = _stacked_blocks(layers, d_model, heads, sizes, rngs)
    self.norm = _norm(d_model, rngs, norm_eps)
    if not tie:
      self.head = _linear(d_model, vocab, ("embed", "vocab"), rngs)

  def __call__(
    self,
    tokens_BxT: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns the logits `[B, T, vocab]` of the next token at each position.

    Args:
      tokens_BxT: the token ids.
      segment_ids: `[B, T]`, each token's document in a packed window (attention
        stays within one), or None for one document a row.
      positions: `[B, T]`, each token's position in its document, or None for `0..T-1`.
      rngs: the dropout stream, in training.
    """
    x_BxTxD = self.features(tokens_BxT, segment_ids=segment_ids, positions=positions, rngs=rngs)
    return self.logits(x_BxTxD)

  def features(
    self,
    tokens_BxT: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """The final normalised residual stream `[B, T, D]`, what `logits` turns into logits.

    A loss that computes its logits a piece at a time (`losses.next_token` with
    `chunk`) calls the two halves itself. The arguments are `__call__`'s.
    """
    b, t = tokens_BxT.shape
    if t > self.seq_len:
      raise ConfigError(
        f"Transformer: sequences of {t} tokens are longer than its {self.seq_len} positions "
        f"(seq_len={self.seq_len}); shorten the windows or raise seq_len"
      )
    x_BxTxD = self.embed(constrain(tokens_BxT, "batch", "sequence"))
    at = jnp.arange(t) if positions is None else jnp.clip(positions, 0, self.seq_len - 1)
    rope = None
    if self.positions == "learned":
      x_BxTxD = x_BxTxD + self.position(at)
    else:
      length = self.seq_len if positions is not None else t
      cos, sin = rope_tables(length, self.head_dim, self.rope_base)
      rope = (cos, sin) if positions is None else (cos[at], sin[at])
    # The residual stream runs as [B * T, D] rows: XLA's CPU backward of a dense layer
    # is over twice as fast on 2-D activations as on [B, T, D] ones (measured).
    x_NxD = constrain(x_BxTxD.reshape(b * t, self.d_model), "batch", "embed")
    x_NxD = self.norm(self._blocks(x_NxD, t, rope, segment_ids, rngs))
    return x_NxD.reshape(b, t, self.d_model)

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """The vocabulary logits `[B, T, vocab]` of features `[B, T, D]` (any `T`)."""
    b, t, _ = x_BxTxD.shape
    x_NxD = x_BxTxD.reshape(b * t, self.d_model)
    logits = self.embed.attend(x_NxD) if self.tie else self.head(x_NxD)
    return constrain(logits.reshape(b, t, self.vocab), "batch", "sequence", "vocab")

  def init_cache(self, batch: int, slots: int, dtype: Any = jnp.float32) -> tuple:
    """An empty key/value cache of `slots` positions for `batch` rows: `[L, B, S, K, H]` twice."""
    shape = (self.layers, batch, slots, self.kv_heads, self.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

  def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, cache: tuple) -> tuple:
    """Logits `[B, T, vocab]` of new tokens at their positions, over and into the cache.

    A prompt's prefill and each sampled token alike: their keys and values are
    written into `cache` (`init_cache`) at `positions_BxT`, and each attends to
    the positions up to its own. Returns the logits and the new cache.
    """
    b, t = tokens_BxT.shape
    x_BxTxD = self.embed(tokens_BxT)
    rope = None
    if self.positions == "learned":
      x_BxTxD = x_BxTxD + self.position(positions_BxT)
    else:
      cos, sin = rope_tables(cache[0].shape[2], self.head_dim, self.rope_base)
      rope = (cos[positions_BxT], sin[positions_BxT])
    x_NxD = x_BxTxD.reshape(b * t, self.d_model)
    graphdef, stacked = nnx.split(self.blocks)

    def block(x, layer):
      params, keys, values = layer
      return nnx.merge(graphdef, params)(x, t, rope, None, rngs=None,
                                         cache=(keys, values, positions_BxT))  # fmt: skip

    x_NxD, cache = jax.lax.scan(block, x_NxD, (stacked, *cache))
    return self.logits(self.norm(x_NxD).reshape(b, t, self.d_model)), cache

  def _blocks(self, x_NxD, t: int, rope, segments, rngs: nnx.Rngs | None) -> jax.Array:
    graphdef, stacked = nnx.split(self.blocks)
    keys = None
    if rngs is not None and self.dropout_rate > 0:
      keys = jax.random.split(rngs.dropout(), self.layers)

    def block(x, layer):
      params, key = layer
      layer_rngs = nnx.Rngs(dropout=key) if key is not None else None
      return nnx.merge(graphdef, params)(x, t, rope, segments, rngs=layer_rngs), None

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


def _lora(rank: int, targets: tuple[str, ...], activation: str) -> tuple[int, tuple[str, ...]]:
  """The checked `(rank, targets)`: a count, and regexes that match some linear layer."""
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"Transformer: lora_rank={rank!r} must be a count (0: no LoRA)")
  layers = [*(f"attention/{n}" for n in ("query", "key", "value", "out")), "mlp/up", "mlp/down"]
  layers += ["mlp/gate"] if activation == "swiglu" else []
  for target in targets:
    try:
      re.compile(target)
    except (re.error, TypeError):
      raise ConfigError(
        f"Transformer: lora_targets has a bad regular expression {target!r}"
      ) from None
  if rank and not any(re.search(t, name) for t in targets for name in layers):
    raise ConfigError(f"Transformer: lora_targets={targets!r} match no linear layer of a block "
                      f"({', '.join(layers)})")  # fmt: skip
  return rank, targets


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
