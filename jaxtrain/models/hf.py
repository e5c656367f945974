"""Hugging Face folders of Llama-family decoders: `config.json` and safetensors, in and out.

A folder holds `config.json` (`model_type` llama, mistral or qwen2), the
weights as `model.safetensors` or shards listed in
`model.safetensors.index.json`, and usually `tokenizer.json` and
`tokenizer_config.json` (whose `chat_template` is the chat template). `sizes`
reads the config into the `Transformer`'s sizes, `params` reads the tensors
into its parameter paths (blocks stacked, kernels `[in, out]`), and `write`
goes the other way, so a folder read and written again holds the same values.
Hugging Face keeps the rotary pairs as halves (`rotate_half`), as the
`Transformer` does: no row permutation either way.

Example:
  >>> kind, sizes = read_sizes("SmolLM2-135M-Instruct/")
  >>> values = params("SmolLM2-135M-Instruct/", sizes)   # {"blocks/mlp/up/kernel": ...}
"""

import json
import pathlib
from typing import Any

import numpy as np

from jaxtrain.data.sources import DataError

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}  # fmt: skip
_PROJECTIONS = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
                "value": "self_attn.v_proj", "out": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
_NORMS = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """A JSON object from a checkpoint's file, or `DataError` naming the file."""
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: not a JSON object")
  return value


def read_sizes(folder: str | pathlib.Path) -> tuple[str, dict[str, Any]]:
  """The architecture and the `Transformer`'s sizes that a folder's `config.json` gives.

  Raises:
    DataError: a model type or option the `Transformer` does not build (rotary
      scaling, biases on the MLP, another activation), or missing sizes.
  """
  folder = pathlib.Path(folder)
  c = read_json(folder / "config.json")
  kind = c.get("model_type")
  if kind not in MODEL_TYPES:
    raise DataError(f"{folder}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
  rope = c.get("rope_parameters") or {}  # transformers 5 names the rotary settings so
  scaled = c.get("rope_scaling") or rope.get("rope_type", "default") != "default"
  if scaled or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu":
    raise DataError(f"{folder}: rope_scaling, mlp_bias and hidden_act other than silu are not "
                    "built here")  # fmt: skip
  try:
    heads = int(c["num_attention_heads"])
    sizes = {
      "vocab": int(c["vocab_size"]), "d_model": int(c["hidden_size"]),
      "layers": int(c["num_hidden_layers"]), "heads": heads,
      "kv_heads": int(c.get("num_key_value_heads") or heads),
      "mlp": int(c["intermediate_size"]), "head_dim": int(c.get("head_dim") or 0),
      "rope_base": float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
      "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
      "context": int(c.get("max_position_embeddings", 2048)),
      "tie": bool(c.get("tie_word_embeddings", False)),
      "qkv_bias": kind == "qwen2" or bool(c.get("attention_bias", False)),
      "window": int(c.get("sliding_window") or 0) if c.get("use_sliding_window", True) else 0,
    }  # fmt: skip
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{folder}/config.json lacks or garbles the model's sizes ({e})") from None
  return kind, sizes


def files(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a folder's weights (the index's shards, or the one file)."""
  folder = pathlib.Path(folder)
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    try:
      names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
      raise DataError(f"{index}: not a safetensors index ({type(e).__name__})") from None
    return [folder / n for n in names]
  if (folder / "model.safetensors").is_file():
    return [folder / "model.safetensors"]
  raise DataError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def tensors(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a folder's safetensors files, by Hugging Face name, as stored."""
  from safetensors import SafetensorError, safe_open  # noqa: PLC0415

  out = {}
  for path in files(folder):
    try:
      with safe_open(str(path), framework="numpy") as f:
        out.update((name, f.get_tensor(name)) for name in f.keys())  # noqa: SIM118
    except (SafetensorError, OSError) as e:
      raise DataError(f"{path}: not a readable safetensors file ({e})") from None
  return out


def hf_name(path: str, layer: int | None = None) -> str:
  """The Hugging Face name of a parameter path (`blocks/...` needs its `layer`)."""
  parts = path.split("/")
  if parts[0] == "blocks":
    kind, *rest = parts[1:]
    if kind in _NORMS:
      return f"model.layers.{layer}.{_NORMS[kind]}.weight"
    module, leaf = rest
    return f"model.layers.{layer}.{_PROJECTIONS[module]}.{'weight' if leaf == 'kernel' else leaf}"
  return {"embed/embedding": "model.embed_tokens.weight", "norm/scale": "model.norm.weight",
          "head/kernel": "lm_head.weight"}[path]  # fmt: skip


def param_paths(sizes: dict[str, Any]) -> list[str]:
  """The `Transformer`'s parameter paths for `sizes` (no LoRA)."""
  blocks = [f"blocks/{n}/scale" for n in _NORMS]
  blocks += [f"blocks/{'attention' if k in ('query', 'key', 'value', 'out') else 'mlp'}/{k}/kernel"
             for k in _PROJECTIONS]  # fmt: skip
  if sizes.get("qkv_bias"):
    blocks += [f"blocks/attention/{k}/bias" for k in ("query", "key", "value")]
  top = ["embed/embedding", "norm/scale"] + ([] if sizes.get("tie", True) else ["head/kernel"])
  return top + blocks


def param_shapes(sizes: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """The shape of each of the `Transformer`'s parameters for `sizes` (no LoRA)."""
  v, d, n, m = sizes["vocab"], sizes["d_model"], sizes["layers"], sizes["mlp"]
  h = sizes["head_dim"] or d // sizes["heads"]
  q, kv = sizes["heads"] * h, sizes["kv_heads"] * h
  by_name = {"attention_norm": (d,), "mlp_norm": (d,), "query": (d, q), "key": (d, kv),
             "value": (d, kv), "out": (q, d), "gate": (d, m), "up": (d, m),
             "down": (m, d)}  # fmt: skip
  top = {"embed/embedding": (v, d), "norm/scale": (d,), "head/kernel": (d, v)}
  shapes = {}
  for path in param_paths(sizes):
    parts = path.split("/")
    if parts[0] != "blocks":
      shapes[path] = top[path]
    elif parts[-1] == "bias":
      shapes[path] = (n, by_name[parts[2]][1])
    else:
      shapes[path] = (n, *by_name[parts[1] if parts[1] in _NORMS else parts[2]])
  return shapes


def is_folder(path: str | pathlib.Path) -> bool:
  """Whether `path` is a Hugging Face model folder (`config.json` beside safetensors)."""
  path = pathlib.Path(path)
  return (path / "config.json").is_file() and (
    (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
  )


def _transposed(path: str) -> bool:
  return path.endswith("/kernel")


def params(folder: str | pathlib.Path, sizes: dict[str, Any]) -> dict[str, np.ndarray]:
  """The `Transformer`'s parameters (`path: array`, blocks stacked) from a folder's tensors.

  Raises:
    DataError: a tensor the model needs is missing, or one the model has no place for.
  """
  stored = tensors(folder)
  if sizes.get("tie"):
    stored.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
  out, used = {}, set()
  for path in param_paths(sizes):
    layers = range(sizes["layers"]) if path.startswith("blocks/") else [None]
    values = []
    for layer in layers:
      name = hf_name(path, layer)
      if name not in stored:
        raise DataError(f"{folder}: the checkpoint lacks tensor {name}")
      value = stored[name]
      values.append(value.T if _transposed(path) else value)
      used.add(name)
    out[path] = np.stack(values) if path.startswith("blocks/") else values[0]
  extra = sorted(n for n in set(stored) - used if not n.endswith("rotary_emb.inv_freq"))
  if extra:
    raise DataError(f"{folder}: tensor {extra[0]} has no place in the model "
                    f"({len(extra)} such)")  # fmt: skip
  return out


def config_json(architecture: str, sizes: dict[str, Any], *, bos: int | None,
                eos: int | None, dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
  """The `config.json` of a model of `sizes`, for `transformers`."""
  kind = architecture if architecture in MODEL_TYPES else "llama"
  config = {
    "architectures": [MODEL_TYPES[kind]], "model_type": kind,
    "vocab_size": sizes["vocab"], "hidden_size": sizes["d_model"],
    "num_hidden_layers": sizes["layers"], "num_attention_heads": sizes["heads"],
    "num_key_value_heads": sizes["kv_heads"], "intermediate_size": sizes["mlp"],
    "head_dim": sizes["head_dim"] or sizes["d_model"] // sizes["heads"],
    "rope_theta": sizes["rope_base"], "rms_norm_eps": sizes["norm_eps"],
    "max_position_embeddings": sizes["context"], "tie_word_embeddings": bool(sizes["tie"]),
    "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype,
  }  # fmt: skip
  if kind == "llama":
    config["attention_bias"] = bool(sizes["qkv_bias"])
  elif sizes.get("qkv_bias") != (kind == "qwen2"):
    raise DataError(f"a {kind} model with qkv_bias={sizes['qkv_bias']} has no config.json form")
  if kind == "mistral":
    config["sliding_window"] = sizes.get("window") or None
  return config


def write(folder: str | pathlib.Path, values: dict[str, Any], config: dict[str, Any]) -> None:
  """Writes `config.json` and `model.safetensors` (Hugging Face names) of `values`."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  out = {}
  for path, given in values.items():
    value = np.asarray(given)
    if path.startswith("blocks/"):
      for layer in range(value.shape[0]):
        layer_value = value[layer].T if _transposed(path) else value[layer]
        out[hf_name(path, layer)] = np.ascontiguousarray(layer_value)
    else:
      out[hf_name(path)] = np.ascontiguousarray(value.T if _transposed(path) else value)
  save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
