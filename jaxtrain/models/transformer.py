"""A decoder-only Transformer for next-token prediction (Flax NNX).

Pre-norm blocks of causal self-attention and a GELU MLP, learned position
embeddings, and an output head tied to nothing. The attention softmax is taken
in float32 whatever the compute dtype (and recomputed in the backward pass
rather than stored); the norms compute their statistics in float32 (Flax does).

Example:
  >>> model = Transformer(vocab=256, length=128, width=128, depth=2, heads=4, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((8, 128), jnp.int32)).shape
  (8, 128, 256)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ConfigError
from jaxtrain.models import args


@jax.checkpoint
def _causal_softmax(logits_BxHxTxT: jax.Array) -> jax.Array:
  """Causal softmax over the last axis, taken in float32, returned in the logits' dtype.

  Rematerialised: the backward pass recomputes the float32 probabilities from
  the saved logits, so a bfloat16 model keeps no float32 `[T, T]` activations.
  """
  t = logits_BxHxTxT.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(causal, logits_BxHxTxT.astype(jnp.float32), -1e30)
  return jax.nn.softmax(logits, axis=-1).astype(logits_BxHxTxT.dtype)


class Block(nnx.Module):
  """`x + attention(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, width: int, heads: int, *, dropout: float, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxTxD: jax.Array, *, rngs: nnx.Rngs | None) -> jax.Array:
    """One block over `[B, T, D]` activations."""
    b, t, d = x_BxTxD.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x_BxTxD)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
    logits_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d / self.heads).astype(q.dtype)
    weights = _causal_softmax(logits_BxHxTxT)
    att_BxTxD = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    x_BxTxD = x_BxTxD + self.dropout(self.out(att_BxTxD), rngs=rngs)
    h = self.down(nnx.gelu(self.up(self.norm2(x_BxTxD))))
    return x_BxTxD + self.dropout(h, rngs=rngs)


class Transformer(nnx.Module):
  """Token and position embeddings, `depth` blocks, a final norm and a vocabulary head."""

  def __init__(
    self,
    vocab: int,
    length: int,
    width: int,
    depth: int,
    heads: int,
    *,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
  ):
    args.positive("Transformer", vocab=vocab, length=length, width=width, depth=depth, heads=heads)
    args.dropout_rate("Transformer", dropout)
    if width % heads:
      raise ConfigError(f"Transformer: width={width} is not divisible by heads={heads}")
    self.length = length
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.position = nnx.Embed(length, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, dropout=dropout, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Returns the logits `[B, T, vocab]` of the next token at each position."""
    if tokens_BxT.shape[1] > self.length:
      raise ConfigError(
        f"Transformer: sequences of {tokens_BxT.shape[1]} tokens are longer than its "
        f"{self.length} positions (length={self.length}); shorten the windows or raise length"
      )
    x_BxTxD = self.embed(tokens_BxT) + self.position(jnp.arange(tokens_BxT.shape[1]))
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, rngs=rngs)
    return self.head(self.norm(x_BxTxD))
