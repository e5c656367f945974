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
