"""Sampling from a language model: temperature, top-k, one compiled loop.

`generate` keeps the prompt and the sampled tokens in one buffer and runs the
model over the last `seq_len` of them at each step, inside `lax.fori_loop`, so
a continuation of any length compiles once (no KV cache: each step costs a
full forward pass over the window).

Example:
  >>> model = merge_model(result.graphdef, result.state)
  >>> ids = generate(model, list(b"def "), 200, temperature=0.8, top_k=40)
  >>> bytes(ids).decode(errors="replace")
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.config import ConfigError

MOST_TOKENS = 2**31 - 1  # the prompt and the sample, indexed by int32 positions


def generate(
  model: nnx.Module,
  prompt: Sequence[int],
  steps: int,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  seed: int = 0,
) -> np.ndarray:
  """Samples `steps` tokens after `prompt` from `model` (`[B, T]` ids to `[B, T, V]` logits).

  Args:
    model: a language model with a `seq_len` attribute, the longest window it takes.
    prompt: the prompt's token ids, at least one.
    steps: how many tokens to sample.
    temperature: the logits' divisor; 0 takes the most likely token.
    top_k: sample among the `top_k` most likely tokens; 0 for all.
    seed: the sampling key's seed.

  Returns:
    The sampled ids, `[steps]` int32, without the prompt.
  """
  if (
    not len(prompt)
    or not 1 <= steps <= MOST_TOKENS - len(prompt)
    or not 0 <= temperature < float("inf")
    or top_k < 0
  ):
    raise ConfigError(
      f"generate: needs a prompt, 1 <= steps <= {MOST_TOKENS:,} less the prompt, a finite "
      f"temperature >= 0 and top_k >= 0 (got {len(prompt)} prompt tokens, steps={steps}, "
      f"temperature={temperature}, top_k={top_k})"
    )
  window, n = model.seq_len, len(prompt)
  size = max(window, n + steps)
  buffer = jnp.zeros((size,), jnp.int32).at[:n].set(jnp.asarray(prompt, jnp.int32))
  graphdef, state = nnx.split(model)
  settings = (n, steps, window, float(temperature), int(top_k))
  out = _sample(graphdef, state, buffer, jax.random.key(seed), settings)
  return np.asarray(out[n : n + steps])


@jax.jit(static_argnums=(0, 4))
def _sample(graphdef, state, buffer, key, settings):
  n, steps, window, temperature, top_k = settings
  model = nnx.merge(graphdef, state)
  model.eval()

  def body(i, carry):
    buffer, key = carry
    filled = n + i  # tokens in the buffer so far
    start = jnp.maximum(filled - window, 0)
    ids = jax.lax.dynamic_slice(buffer, (start,), (window,))
    logits = model(ids[None])[0, jnp.minimum(filled, window) - 1].astype(jnp.float32)
    key, draw = jax.random.split(key)
    if temperature == 0:
      token = jnp.argmax(logits)
    else:
      logits = logits / temperature
      if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
      token = jax.random.categorical(draw, logits)
    return buffer.at[filled].set(token.astype(jnp.int32)), key

  return jax.lax.fori_loop(0, steps, body, (buffer, key))[0]


BUCKET = 64  # prompt widths and cache lengths round up to this: one compilation a bucket


def generate_batch(
  model: nnx.Module,
  prompts: Sequence[Sequence[int]],
  steps: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  stop: Sequence[int] = (),
  seed: int = 0,
) -> list[np.ndarray]:
  """Samples up to `steps` tokens after each prompt, with a key/value cache.

  The prompts (of any lengths) are prefilled together, right-padded to a
  multiple of `BUCKET`, then one token a row is decoded at a time, each row at
  its own position, in one compiled loop that ends when every row has met a
  `stop` token. Each (batch, prompt width, cache length) bucket compiles once.

  Args:
    model: a model with `init_cache` and `decode` (`jaxtrain.models.Transformer`).
    prompts: token ids, at least one each.
    steps: the most tokens sampled a row; prompt and sample must fit `model.seq_len`.
    temperature: the logits' divisor; 0 takes the most likely token.
    top_k: sample among the `top_k` most likely tokens; 0 for all.
    top_p: sample among the fewest most likely tokens holding this probability.
    stop: token ids that end a row's sample (kept as its last token).
    seed: the sampling key's seed.

  Returns:
    Per prompt, the sampled ids (int32), up to and including the first stop token.
  """
  lengths = [len(p) for p in prompts]
  longest = max(lengths, default=0)
  if not prompts or min(lengths) < 1 or steps < 1 or longest + steps > model.seq_len:
    raise ConfigError(
      f"generate_batch: needs prompts of at least one token and 1 <= steps, the longest prompt "
      f"and the sample within the model's {model.seq_len} positions (got {len(prompts)} "
      f"prompts of up to {longest} tokens, steps={steps})"
    )
  if not (0 <= temperature < float("inf") and top_k >= 0 and 0 < top_p <= 1):
    raise ConfigError(f"generate_batch: temperature={temperature} must be finite and >= 0, "
                      f"top_k={top_k} >= 0 and top_p={top_p} in (0, 1]")  # fmt: skip
  width = min(-(-longest // BUCKET) * BUCKET, model.seq_len)
  slots = min(-(-(longest + steps) // BUCKET) * BUCKET, model.seq_len)
  padded = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, : len(prompt)] = prompt
  graphdef, state = nnx.split(model)
  settings = (steps, slots, float(temperature), int(top_k), float(top_p), tuple(stop))
  rows = (jnp.asarray(padded), jnp.asarray(lengths, jnp.int32))
  out = np.asarray(_decode_loop(graphdef, state, rows, jax.random.key(seed), settings))
  return [_until_stop(row, stop) for row in out]


def _until_stop(row: np.ndarray, stop: Sequence[int]) -> np.ndarray:
  ends = np.flatnonzero(np.isin(row, stop)) if stop else []
  return row[: ends[0] + 1] if len(ends) else row


@jax.jit(static_argnums=(0, 4))
def _decode_loop(graphdef, state, prompts, key, settings):
  (padded, lengths), (steps, slots, temperature, top_k, top_p, stop) = prompts, settings
  model = nnx.merge(graphdef, state)
  model.eval()
  b, width = padded.shape
  cache = model.init_cache(b, slots, model.embed.embedding.dtype)
  logits, cache = model.decode(padded, jnp.broadcast_to(jnp.arange(width), (b, width)), cache)
  last = logits[jnp.arange(b), lengths - 1]
  stops = jnp.asarray(stop or (-1,), jnp.int32)

  def more(carry):
    i, *_, done = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, cache, last, key, out, done = carry
    key, draw = jax.random.split(key)
    token = pick(last.astype(jnp.float32), draw, temperature, top_k, top_p)
    out = out.at[:, i].set(jnp.where(done, stops[0], token))
    done = done | jnp.isin(token, stops)
    logits, cache = model.decode(token[:, None], (lengths + i)[:, None], cache)
    return i + 1, cache, logits[:, 0], key, out, done

  out = jnp.full((b, steps), stops[0], jnp.int32)
  start = (0, cache, last, key, out, jnp.zeros((b,), bool))
  return jax.lax.while_loop(more, body, start)[4]


def pick(logits_BxV, key, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """One token a row: the likeliest at temperature 0, else drawn after top-k and top-p."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    mass = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    cut = jnp.take_along_axis(ordered, jnp.sum(mass < top_p, -1, keepdims=True), axis=-1)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
