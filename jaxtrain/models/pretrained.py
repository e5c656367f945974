"""Pretrained Llama-family decoders: the model, its weights, its tokenizer, its chat template.

`load_pretrained(path)` reads a Hugging Face folder (`jaxtrain.models.hf`), a
fine-tuning run's workdir (`jaxtrain.models.tuned`) or a GGUF file (llama.cpp's
format; the `gguf` package
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
  >>> model, tokenizer, info = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", seq_len=256)
  >>> ids = tokenizer.encode(chat_prompt(info, "What is the capital of France?")).ids
"""

import json
import pathlib
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.models import hf
from jaxtrain.models.transformer import Transformer

ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm")
# The tensor types read (dequantized by `gguf`): the float ones, the legacy and the k-quants.
QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
          "Q5_K", "Q6_K")  # fmt: skip
CONTROL = 3  # a GGUF token type: a special token, never split or merged
USER_DEFINED = 4  # a GGUF token type: an added token, kept whole


class Info(NamedTuple):
  """What a checkpoint says besides its weights: architecture, sizes, chat template, BOS, EOS."""

  architecture: str
  sizes: dict[str, Any]
  chat_template: str | None
  bos: int | None
  eos: int | None


def gguf_package():
  """The `gguf` package, or a `ConfigError` saying how to install it."""
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
  for tensor in reader.tensors:
    if tensor.tensor_type.name not in QUANTS:
      raise DataError(f"GGUF tensor {tensor.name} is {tensor.tensor_type.name}, a type not read "
                      f"here (the types read: {', '.join(QUANTS)})")  # fmt: skip
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
    "tie": not any(t.name == "output.weight" for t in reader.tensors),
    "qkv_bias": any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
    "window": int(get("attention.sliding_window", 0) or 0),
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
  gguf = gguf_package()
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


def check_window(sizes: dict[str, Any], seq_len: int) -> None:
  """Raises `ConfigError` where the model's sliding window would cut attention short."""
  length, window = seq_len or sizes["context"], sizes.get("window", 0)
  if window and length > window:
    raise ConfigError(f"the checkpoint attends over a sliding window of {window} tokens, which "
                      f"this Transformer does not build: seq_len {length} must be at most "
                      f"{window}")  # fmt: skip


def model_options(sizes: dict[str, Any], seq_len: int = 0) -> dict[str, Any]:
  """The `Transformer`'s arguments for a checkpoint's `sizes` (`seq_len` 0: its context)."""
  return dict(
    vocab=sizes["vocab"], seq_len=seq_len or sizes["context"], d_model=sizes["d_model"],
    layers=sizes["layers"], heads=sizes["heads"], kv_heads=sizes["kv_heads"], mlp=sizes["mlp"],
    activation="swiglu", positions="rope", tie=sizes["tie"], rope_base=sizes["rope_base"],
    norm_eps=sizes["norm_eps"], qkv_bias=sizes["qkv_bias"],
    head_dim=sizes["head_dim"] if sizes["head_dim"] * sizes["heads"] != sizes["d_model"] else 0,
  )  # fmt: skip


def build(sizes: dict[str, Any], *, seq_len: int, **options):
  """The Transformer of `sizes` (`read_info`), its parameters not yet loaded."""
  check_window(sizes, seq_len)
  return Transformer(**model_options(sizes, seq_len), rngs=nnx.Rngs(0), **options)


def set_params(model: nnx.Module, params: dict[str, np.ndarray], *, place=None) -> nnx.Module:
  """`model` with `params` (`path: array`) in place of its own; every one must match.

  `place(path, array)`, if given, puts each value on the devices (in its
  sharded layout); else it goes where `jnp.asarray` puts it. A parameter the
  model has and `params` lacks must be a LoRA adapter, which keeps a fresh
  initialisation (`lora_a` random, `lora_b` zero).

  Raises:
    DataError: a parameter the model has and `params` lacks, or one of another shape.
  """
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    name = "/".join(map(str, path))
    own = variable.get_value()  # an array, or its shape (eval_shape)
    if name not in params:
      if not name.endswith(("lora/lora_a", "lora/lora_b")):
        raise DataError(f"the checkpoint has no weights for {name}")
      variable.set_value(_fresh_adapter(name, own))
      continue
    value = params[name]
    if tuple(value.shape) != tuple(own.shape):
      raise DataError(f"the checkpoint's {name} is {value.shape}, the model's {own.shape}")
    value = np.asarray(value).astype(own.dtype)
    variable.set_value(place(name, value) if place else jnp.asarray(value))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fresh_adapter(name: str, shape) -> jax.Array:
  """A new adapter: `lora_b` zero, so the model starts as the checkpoint; `lora_a` He-uniform."""
  if name.endswith("lora_b"):
    return jnp.zeros(shape.shape, shape.dtype)
  key = jax.random.key(zlib.crc32(name.encode()))
  stacked = (0,) if name.startswith("blocks/") else ()  # one adapter a layer, each its own fan-in
  return nnx.initializers.he_uniform(batch_axis=stacked)(key, shape.shape, shape.dtype)


def _smollm_pre_tokenizer():
  """Digits one by one, then byte-level BPE's splits: SmolLM's (`tokenizer.ggml.pre = smollm`)."""
  from tokenizers import pre_tokenizers  # noqa: PLC0415

  return pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])  # fmt: skip


def is_smollm_pre(described: dict[str, Any]) -> bool:
  """Whether a `tokenizer.json` (as a dict) splits its text as SmolLM's does."""
  import tokenizers  # noqa: PLC0415

  ours = json.loads(tokenizers.Tokenizer(tokenizers.models.BPE()).to_str())
  probe = tokenizers.Tokenizer.from_str(
    json.dumps({**ours, "pre_tokenizer": described["pre_tokenizer"]})
  )
  text = "Hello  world 12345, naïve\n  x"
  return probe.pre_tokenizer.pre_tokenize_str(text) == \
    _smollm_pre_tokenizer().pre_tokenize_str(text)  # fmt: skip


def gguf_tokenizer(reader):
  """The file's byte-level BPE tokenizer (`tokenizers`), its special tokens kept whole.

  Raises:
    DataError: a tokenizer other than byte-level BPE, or a pre-tokenizer other
      than SmolLM's (the only one rebuilt here).
  """
  import tokenizers  # noqa: PLC0415
  from tokenizers import decoders, models  # noqa: PLC0415

  if _field(reader, "tokenizer.ggml.model") != "gpt2":
    raise DataError("only GGUF files of byte-level BPE (gpt2) tokenizers are read here")
  pre = _field(reader, "tokenizer.ggml.pre", "smollm")
  if pre != "smollm":
    raise DataError(f"GGUF pre-tokenizer {pre!r}: only SmolLM's ('smollm') is rebuilt here; "
                    "load the model's Hugging Face folder instead")  # fmt: skip
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  kinds = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
  tokenizer = tokenizers.Tokenizer(
    models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  )
  tokenizer.pre_tokenizer = _smollm_pre_tokenizer()
  tokenizer.decoder = decoders.ByteLevel()
  special = [t for t, kind in zip(tokens, kinds, strict=True) if kind == CONTROL]
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in special])
  user = [t for t, kind in zip(tokens, kinds, strict=True) if kind == USER_DEFINED]
  tokenizer.add_tokens([tokenizers.AddedToken(t, special=False) for t in user])
  return tokenizer


def renderer(info: Info):
  """`render(messages, add_generation_prompt)`: the checkpoint's chat template, as HF renders it.

  Jinja's sandbox renders the template with `trim_blocks` and `lstrip_blocks`,
  as `transformers`' `apply_chat_template` does, and `raise_exception` raises.

  Raises:
    DataError: no template, or one that Jinja cannot parse.
  """
  import jinja2.sandbox  # noqa: PLC0415

  if not info.chat_template:
    raise DataError("the checkpoint has no chat template")

  def fail(message: str):
    raise jinja2.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = fail
  try:
    template = env.from_string(info.chat_template)
  except jinja2.TemplateError as e:
    raise DataError(f"the chat template does not parse ({e})") from None

  def render(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    try:
      return template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
      raise DataError(f"the chat template fails to render ({e})") from None

  return render


def chat_prompt(info: Info, *turns: str, system: str | None = None) -> str:
  """The chat template rendered over user and assistant turns, ready for the assistant's answer.

  `turns` alternate user, assistant, user, ...; Jinja renders the file's own
  template with `add_generation_prompt=True`, as `transformers` does.
  """
  messages = [{"role": "system", "content": system}] if system else []
  roles = ("user", "assistant")
  messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
  return renderer(info)(messages, add_generation_prompt=True)


def _read_gguf(path: pathlib.Path):
  try:
    return gguf_package().GGUFReader(str(path))
  except (ValueError, OSError, KeyError, IndexError, EOFError) as e:  # not GGUF, or cut short
    raise DataError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read(path: str | pathlib.Path) -> tuple[Info, Any, Any]:
  """A checkpoint's `Info`, a function returning its parameters, and its tokenizer.

  `path` is a GGUF file, a Hugging Face folder (`config.json` and safetensors),
  or the workdir of a run that fine-tuned one (its `pretrained.json`, and its
  last checkpoint with any LoRA adapters merged). Only the metadata is read
  here; the parameters when the function is called.

  Raises:
    DataError: a path that is neither, or a checkpoint this loader cannot build.
  """
  from jaxtrain.models import tuned  # noqa: PLC0415 (it reads checkpoints through this module)

  path = pathlib.Path(path).expanduser()
  if (path / tuned.INFO).is_file():
    return tuned.read(path)
  if path.is_dir():
    return _read_folder(path)
  if not path.is_file():
    raise DataError(f"{path}: no such GGUF file or Hugging Face folder")
  reader = _read_gguf(path)
  info = read_info(reader)
  return info, lambda: llama_params(_tensors(reader), info.sizes), gguf_tokenizer(reader)


def read_tokenizer(path: pathlib.Path):
  """A `tokenizers.Tokenizer` from a `tokenizer.json`, or `DataError` naming the file."""
  import tokenizers  # noqa: PLC0415

  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises its own exception type
    raise DataError(f"{path}: not a tokenizer ({str(e).splitlines()[0][:200]})") from None


def digest(path: str | pathlib.Path) -> str:
  """The sha256 of a file (a GGUF file), or of a folder's safetensors files' sha256s."""
  import hashlib  # noqa: PLC0415

  path = pathlib.Path(path)
  files = hf.files(path) if path.is_dir() else [path]
  hashes = []
  for file in files:
    h = hashlib.sha256()
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    hashes.append(h.hexdigest())
  return hashes[0] if not path.is_dir() else hashlib.sha256("".join(hashes).encode()).hexdigest()


def _template(settings: dict[str, Any], folder: pathlib.Path) -> str | None:
  """The chat template of `tokenizer_config.json` (or its `default` of several)."""
  template = settings.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if (folder / "chat_template.jinja").is_file():
    template = (folder / "chat_template.jinja").read_text()
  if template is not None and not isinstance(template, str):
    raise DataError(f"{folder}/tokenizer_config.json: chat_template is not a template")
  return template


def _read_folder(folder: pathlib.Path) -> tuple[Info, Any, Any]:
  arch, sizes = hf.read_sizes(folder)
  settings = {}
  if (folder / "tokenizer_config.json").is_file():
    settings = hf.read_json(folder / "tokenizer_config.json")
  tokenizer = None  # weights alone are enough to train or export
  if (folder / "tokenizer.json").is_file():
    tokenizer = read_tokenizer(folder / "tokenizer.json")
  config = hf.read_json(folder / "config.json")
  bos, eos = (config.get(k) for k in ("bos_token_id", "eos_token_id"))
  eos = eos[0] if isinstance(eos, list) else eos  # the first of several end tokens
  info = Info(arch, sizes, _template(settings, folder), bos, eos)
  return info, lambda: hf.params(folder, sizes), tokenizer


def check_tokenizer(tokenizer, info: Info, path: Any = "") -> None:
  """Raises `DataError` if the tokenizer's ids run past the model's vocabulary."""
  if tokenizer is None:
    return
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > info.sizes["vocab"]:
    raise DataError(f"{path}: the tokenizer has {size} tokens, the model's vocabulary "
                    f"{info.sizes['vocab']}: they do not belong together")  # fmt: skip


def load_pretrained(path: str | pathlib.Path, *, seq_len: int = 0, place=None, **options):
  """The model, its tokenizer and its `Info`, from a GGUF file or a Hugging Face folder.

  Args:
    path: the GGUF file or the folder (`config.json`, `model.safetensors` or a
      sharded `model.safetensors.index.json`, `tokenizer.json`).
    seq_len: the longest sequence the model takes; 0 for the checkpoint's context.
    place: None, or `place(path, array)` putting each parameter on the devices
      as it is set (such as `jax.device_put` in its sharded layout), so the
      whole model never sits on one device.
    **options: more `Transformer` options (`attention`, `remat`, `lora_rank`, ...).

  Returns:
    `(model, tokenizer, info)`.
  """
  info, values, tokenizer = read(path)
  check_tokenizer(tokenizer, info, path)
  if not seq_len and info.sizes.get("window"):  # a sliding window: the longest it attends
    seq_len = min(info.sizes["context"], info.sizes["window"])
  # Shapes only: initialising the weights the file replaces would take as long as reading it.
  model = nnx.eval_shape(lambda: build(info.sizes, seq_len=seq_len, **options))
  return set_params(model, values(), place=place), tokenizer, info
