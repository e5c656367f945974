"""Pretrained Llama-family decoders from GGUF files: the model, its weights, its tokenizer.

`load_gguf(path)` reads a GGUF file (llama.cpp's format; the `gguf` package
reads and dequantizes it: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...),
builds the `Transformer` its metadata describes (layers, width, heads over
key/value heads, MLP, RMSNorm epsilon, rotary base, vocabulary, tied or untied
head) and sets its weights. llama.cpp's converter permutes the rows of the query
and key projections for its interleaved rotary layout; they are permuted back
to the rotate-half layout the `Transformer` uses, as Hugging Face's loader does.
`gguf_tokenizer(reader)` rebuilds the byte-level BPE tokenizer from the file's
tokens and merges (`tokenizers`), its special tokens from their token types,
and `chat_prompt` renders the file's Jinja chat template as Hugging Face does.

Example:
  >>> model, tokenizer, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", seq_len=256)
  >>> ids = tokenizer.encode(chat_prompt(info, "What is the capital of France?")).ids
"""

import pathlib
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.models.transformer import Transformer

ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm")
CONTROL = 3  # a GGUF token type: a special token, never split or merged


class Info(NamedTuple):
  """What a GGUF file says besides its weights."""

  architecture: str
  sizes: dict[str, Any]
  chat_template: str | None
  bos: int | None
  eos: int | None


def _gguf():
  try:
    import gguf  # noqa: PLC0415
  except ImportError as e:
    raise ConfigError("reading GGUF files needs the gguf package: pip install gguf") from e
  return gguf


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_info(reader) -> Info:
  """The architecture and sizes a GGUF file's metadata records.

  Raises:
    DataError: an architecture this loader does not know, or missing sizes.
  """
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise DataError(f"GGUF architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
  heads = get("attention.head_count")
  width = get("embedding_length")
  if not (heads and width and get("block_count") and get("feed_forward_length")):
    raise DataError(f"GGUF file of {arch}: its metadata lacks the model's sizes")
  tokens = _field(reader, "tokenizer.ggml.tokens") or []
  sizes = {
    "vocab": int(get("vocab_size") or len(tokens)),
    "d_model": int(width),
    "layers": int(get("block_count")),
    "heads": int(heads),
    "kv_heads": int(get("attention.head_count_kv", heads)),
    "mlp": int(get("feed_forward_length")),
    "head_dim": int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or 0),
    "rope_base": float(get("rope.freq_base", 10000.0)),
    "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    "context": int(get("context_length", 2048)),
  }
  return Info(
    arch,
    sizes,
    _field(reader, "tokenizer.chat_template"),
    _field(reader, "tokenizer.ggml.bos_token_id"),
    _field(reader, "tokenizer.ggml.eos_token_id"),
  )


def _tensors(reader) -> dict[str, np.ndarray]:
  """Every tensor of the file, dequantized to float32, in its `[out, in]` (row-major) shape."""
  gguf = _gguf()
  out = {}
  for tensor in reader.tensors:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    out[tensor.name] = np.asarray(array, np.float32).reshape(
      [int(n) for n in reversed(tensor.shape)]
    )
  return out


def unpermute(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of a query or key projection (per head, pairs to halves)."""
  rows, cols = w_OxI.shape  # llama.cpp wrote reshape(heads, 2, H/2, cols).swapaxes(1, 2)
  return w_OxI.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_params(tensors: dict[str, np.ndarray], sizes: dict[str, Any]) -> dict[str, np.ndarray]:
  """The Transformer's parameters (`path: array`, blocks stacked) from GGUF tensors.

  Raises:
    DataError: a tensor the model needs is missing, or has another shape.
  """
  layers, heads, kv = sizes["layers"], sizes["heads"], sizes["kv_heads"]

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise DataError(f"GGUF file lacks tensor {name}")
    return tensors[name]

  def stacked(name: str, fn=lambda w: w) -> np.ndarray:
    return np.stack([fn(get(f"blk.{i}.{name}.weight")) for i in range(layers)])

  params = {
    "embed/embedding": get("token_embd.weight"),
    "norm/scale": get("output_norm.weight"),
    "blocks/attention_norm/scale": stacked("attn_norm"),
    "blocks/mlp_norm/scale": stacked("ffn_norm"),
    "blocks/attention/query/kernel": stacked("attn_q", lambda w: unpermute(w, heads).T),
    "blocks/attention/key/kernel": stacked("attn_k", lambda w: unpermute(w, kv).T),
    "blocks/attention/value/kernel": stacked("attn_v", lambda w: w.T),
    "blocks/attention/out/kernel": stacked("attn_output", lambda w: w.T),
    "blocks/mlp/gate/kernel": stacked("ffn_gate", lambda w: w.T),
    "blocks/mlp/up/kernel": stacked("ffn_up", lambda w: w.T),
    "blocks/mlp/down/kernel": stacked("ffn_down", lambda w: w.T),
  }
  if "output.weight" in tensors:
    params["head/kernel"] = tensors["output.weight"].T
  for name, part in (("attn_q", "query"), ("attn_k", "key"), ("attn_v", "value")):
    if f"blk.0.{name}.bias" in tensors:
      heads_of = {"attn_q": heads, "attn_k": kv}.get(name)
      fix = (lambda b, h=heads_of: unpermute(b[:, None], h)[:, 0]) if heads_of else (lambda b: b)
      params[f"blocks/attention/{part}/bias"] = np.stack(
        [fix(get(f"blk.{i}.{name}.bias")) for i in range(layers)]
      )
  return params


def build(sizes: dict[str, Any], *, seq_len: int, tie: bool, qkv_bias: bool, **options):
  """The Transformer of `sizes` (`read_info`), its parameters not yet loaded."""
  return Transformer(
    sizes["vocab"], seq_len, sizes["d_model"], sizes["layers"], sizes["heads"],
    kv_heads=sizes["kv_heads"], mlp=sizes["mlp"], activation="swiglu", positions="rope",
    tie=tie, rope_base=sizes["rope_base"], norm_eps=sizes["norm_eps"],
    head_dim=sizes["head_dim"] if sizes["head_dim"] * sizes["heads"] != sizes["d_model"] else 0,
    qkv_bias=qkv_bias, rngs=nnx.Rngs(0), **options,
  )  # fmt: skip


def set_params(model: nnx.Module, params: dict[str, np.ndarray]) -> nnx.Module:
  """`model` with `params` (`path: array`) in place of its own; every one must match.

  Raises:
    DataError: a parameter the model has and `params` lacks, or one of another shape.
  """
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    name = "/".join(map(str, path))
    if name not in params:
      raise DataError(f"the checkpoint has no weights for {name}")
    value, own = params[name], variable.get_value()  # an array, or its shape (eval_shape)
    if tuple(value.shape) != tuple(own.shape):
      raise DataError(f"the checkpoint's {name} is {value.shape}, the model's {own.shape}")
    variable.set_value(jnp.asarray(value, own.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def gguf_tokenizer(reader):
  """The file's byte-level BPE tokenizer (`tokenizers`), its special tokens kept whole."""
  import tokenizers  # noqa: PLC0415
  from tokenizers import decoders, models, pre_tokenizers  # noqa: PLC0415

  if _field(reader, "tokenizer.ggml.model") != "gpt2":
    raise DataError("only GGUF files of byte-level BPE (gpt2) tokenizers are read here")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  kinds = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
  tokenizer = tokenizers.Tokenizer(
    models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  special = [t for t, kind in zip(tokens, kinds, strict=True) if kind == CONTROL]
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in special])
  return tokenizer


def chat_prompt(info: Info, *turns: str, system: str | None = None) -> str:
  """The chat template rendered over user and assistant turns, ready for the assistant's answer.

  `turns` alternate user, assistant, user, ...; Jinja renders the file's own
  template with `add_generation_prompt=True`, as `transformers` does.
  """
  import jinja2.sandbox  # noqa: PLC0415

  if not info.chat_template:
    raise DataError("the checkpoint has no chat template")
  messages = [{"role": "system", "content": system}] if system else []
  roles = ("user", "assistant")
  messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(info.chat_template).render(messages=messages,
                                                    add_generation_prompt=True)  # fmt: skip


def load_gguf(path: str | pathlib.Path, *, seq_len: int = 0, **options):
  """The model, its tokenizer and its `Info`, from a GGUF file.

  Args:
    path: the file.
    seq_len: the longest sequence the model takes; 0 for the file's context.
    **options: more `Transformer` options (`attention`, `remat`, `scan_layers`, ...).

  Returns:
    `(model, tokenizer, info)`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such GGUF file")
  reader = _gguf().GGUFReader(str(path))
  info = read_info(reader)
  tensors = _tensors(reader)
  bias = "blk.0.attn_q.bias" in tensors
  # Shapes only: initialising the weights the file replaces would take as long as reading it.
  model = nnx.eval_shape(lambda: build(info.sizes, seq_len=seq_len or info.sizes["context"],
                                       tie="output.weight" not in tensors, qkv_bias=bias,
                                       **options))  # fmt: skip
  model = set_params(model, llama_params(tensors, info.sizes))
  return model, gguf_tokenizer(reader), info
