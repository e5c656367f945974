r"""Chat with a pretrained decoder: an interactive prompt, or one answer, streamed as it comes.

    python -m jaxtrain.chat MODEL.gguf --prompt="What is the capital of France?"
    python -m jaxtrain.chat MODEL.gguf --temperature=0.7 --top_p=0.9
    python -m jaxtrain.chat runs/sft --prompt="Define ziggurat (noun)."

MODEL is a Llama-family GGUF file, a Hugging Face folder, or the workdir of a
run that fine-tuned one (`jaxtrain.models.load_pretrained`). Each turn
goes through the file's own chat template with the conversation so far; the
answer is sampled with the key/value cache (`--temperature` 0 is greedy,
`--top_k`, `--top_p`) until the end-of-turn token or `--max_tokens`, and printed
token by token. Without `--prompt` it reads one question a line from standard
input until end of file. A missing or unreadable file, or a bad sampling flag,
is one line and exit status 2.
"""

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from jaxtrain import cli
from jaxtrain.config import ConfigError
from jaxtrain.models import pretrained
from jaxtrain.models.generate import pick


def stream(model, prompt: list[int], steps: int, *, stop: Iterable[int] = (), seed: int = 0,
           **sampling) -> Iterator[int]:  # fmt: skip
  """Yields sampled token ids one at a time (the stop token last), for printing as they come.

  One compiled prefill, then one compiled step a token, over a key/value cache
  as long as the prompt and `steps` need, in the model's parameter dtype.
  """
  if not prompt or len(prompt) + steps > model.seq_len:
    raise ConfigError(f"the prompt ({len(prompt)} tokens) and --max_tokens={steps} must fit "
                      f"the model's {model.seq_len} positions")  # fmt: skip
  graphdef, state = nnx.split(model)
  slots = len(prompt) + steps
  cache = model.init_cache(1, slots, model.embed.embedding.dtype)
  positions = jnp.arange(len(prompt))[None]
  logits, cache = _step(graphdef, state, jnp.asarray([prompt], jnp.int32), positions, cache)
  key, stops = jax.random.key(seed), set(stop)
  settings = (float(sampling.get("temperature", 0.0)), int(sampling.get("top_k", 0)),
              float(sampling.get("top_p", 1.0)))  # fmt: skip
  for i in range(steps):
    key, draw = jax.random.split(key)
    token = int(pick(logits[:, -1].astype(jnp.float32), draw, *settings)[0])
    yield token
    if token in stops:
      return
    at = jnp.asarray([[len(prompt) + i]])
    logits, cache = _step(graphdef, state, jnp.asarray([[token]], jnp.int32), at, cache)


@jax.jit(static_argnums=0)
def _step(graphdef, state, tokens, positions, cache):
  return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def answer(model, tokenizer, info, turns: list[str], out: TextIO, **settings) -> str:
  """Streams the answer to the conversation `turns` (user first) to `out`; returns its text."""
  ids = tokenizer.encode(pretrained.chat_prompt(info, *turns)).ids
  tokens, shown = [], ""
  for token in stream(model, ids, stop=(info.eos,), **settings):
    if token == info.eos:
      break
    tokens.append(token)
    text = tokenizer.decode(tokens)
    if not text.endswith("\ufffd"):  # a character still waiting for its other bytes
      out.write(text[len(shown) :])
      out.flush()
      shown = text
  out.write("\n")
  return tokenizer.decode(tokens)


def converse(model, tokenizer, info, lines: Iterable[str], out: TextIO, **settings) -> list[str]:
  """Answers each non-empty line of `lines` in turn, keeping the conversation; returns it."""
  turns = []
  for line in lines:
    if line.strip():
      turns.append(line.strip())
      turns.append(answer(model, tokenizer, info, turns, out, **settings))
  return turns


def define_flags() -> None:
  """The command's flags, defined only when it runs."""
  flags.DEFINE_string("prompt", None, "One question to answer; without it, read lines of stdin.")
  flags.DEFINE_integer("max_tokens", 256, "The most tokens of an answer.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.", lower_bound=0)
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0 for all.",
                       lower_bound=0)  # fmt: skip
  flags.DEFINE_float("top_p", 1.0, "Sample among the likeliest tokens holding this mass.",
                     lower_bound=0, upper_bound=1)  # fmt: skip
  flags.DEFINE_integer("seed", 0, "The sampling seed.")


def main(argv: list[str]) -> None:
  """Loads the model the first argument names, then answers."""
  f = flags.FLAGS
  if len(argv) != 2:
    raise ConfigError("give one model: python -m jaxtrain.chat MODEL.gguf|HF_FOLDER|WORKDIR")
  if f.top_p <= 0:
    raise ConfigError(f"--top_p={f.top_p} must be in (0, 1]")
  model, tokenizer, info = pretrained.load_pretrained(argv[1], seq_len=0)
  if tokenizer is None:
    raise ConfigError(f"{argv[1]}: the checkpoint has no tokenizer.json to chat with")
  settings = {"steps": f.max_tokens, "temperature": f.temperature, "top_k": f.top_k,
              "top_p": f.top_p, "seed": f.seed}  # fmt: skip
  lines = [f.prompt] if f.prompt is not None else sys.stdin
  converse(model, tokenizer, info, lines, sys.stdout, **settings)


if __name__ == "__main__":
  define_flags()
  cli.run_tool(main)
