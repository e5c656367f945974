r"""Export a fine-tuned (or any) Llama-family model for the tools people serve models with.

    python -m jaxtrain.export runs/sft --out runs/sft_hf --format hf
    python -m jaxtrain.export runs/sft --out runs/sft.gguf --format gguf

The source is a fine-tuning workdir (its last checkpoint over its base, LoRA
adapters merged), a Hugging Face folder or a GGUF file
(`jaxtrain.models.load_pretrained` reads all three). `hf` writes a folder that
`transformers` loads: `config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` (with the chat template) and `generation_config.json`.
`gguf` writes one GGUF file in float32 for llama.cpp, its query and key rows
permuted to llama.cpp's rotary layout, with the tokenizer and chat template in
its metadata. Values are written as they are held: loading the export again
gives the same parameters, bit for bit. An output that already exists is
refused, so nothing is overwritten; a bad source is one line and exit status 2.
"""

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from absl import flags

from jaxtrain import cli
from jaxtrain.config import ConfigError
from jaxtrain.models import hf, pretrained

FORMATS = ("hf", "gguf")


def export(source: str | pathlib.Path, out: str | pathlib.Path, fmt: str = "hf") -> pathlib.Path:
  """Writes the model at `source` to `out` in `fmt` (`hf` folder or `gguf` file); returns `out`.

  Raises:
    ConfigError: `out` exists, or `fmt` is unknown.
    DataError: `source` is not a checkpoint `load_pretrained` reads.
  """
  out = pathlib.Path(out)
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt} must be one of {', '.join(FORMATS)}")
  if out.exists():
    raise ConfigError(f"--out={out} exists; give a new path (nothing is overwritten)")
  info, values, tokenizer = pretrained.read(source)
  pretrained.check_tokenizer(tokenizer, info, source)
  if fmt == "gguf":
    pretrained.gguf_package()
    _gguf_tokenizer_kind(tokenizer)
  else:
    hf.config_json(info.architecture, info.sizes, bos=info.bos, eos=info.eos)  # a form exists
  params = {k: np.asarray(v, np.float32) for k, v in values().items()}
  # Written beside its final place, then renamed: an interrupted export leaves no half folder.
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    if fmt == "hf":
      write_hf(staging, info, params, tokenizer)
      umask = os.umask(0)
      os.umask(umask)
      staging.chmod(0o777 & ~umask)  # a temporary folder is private; the export is not
      staging.rename(out)
    else:
      _write_gguf(staging / out.name, info, params, tokenizer)
      (staging / out.name).rename(out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


def write_hf(folder: pathlib.Path, info, params: dict[str, np.ndarray], tokenizer) -> None:
  """Writes a Hugging Face folder of `params` (parameter paths), `info` and `tokenizer`."""
  config = hf.config_json(info.architecture, info.sizes, bos=info.bos, eos=info.eos)
  hf.write(folder, params, config)
  generation = {"bos_token_id": info.bos, "eos_token_id": info.eos}
  (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  if tokenizer is None:
    return
  (folder / "tokenizer.json").write_text(tokenizer.to_str())
  token = lambda i: tokenizer.id_to_token(i) if i is not None else None  # noqa: E731
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(info.bos),
              "eos_token": token(info.eos), "pad_token": token(info.eos),
              "add_bos_token": False, "model_max_length": info.sizes["context"],
              "clean_up_tokenization_spaces": False}  # fmt: skip
  if info.chat_template:
    settings["chat_template"] = info.chat_template
  (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def permute(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's row order of a query or key projection (`pretrained.unpermute` undoes it)."""
  rows, cols = w_OxI.shape
  return w_OxI.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_GGUF_NAMES = {"attention_norm": "attn_norm", "mlp_norm": "ffn_norm", "query": "attn_q",
               "key": "attn_k", "value": "attn_v", "out": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down"}  # fmt: skip


def gguf_tensors(params: dict[str, np.ndarray], sizes: dict) -> dict[str, np.ndarray]:
  """GGUF tensors (`[out, in]` rows, q/k permuted) of the `Transformer`'s parameters."""
  heads = {"query": sizes["heads"], "key": sizes["kv_heads"]}
  top = {"embed/embedding": "token_embd.weight", "norm/scale": "output_norm.weight",
         "head/kernel": "output.weight"}  # fmt: skip
  out = {}
  for path, value in params.items():
    if path in top:
      out[top[path]] = value.T if path == "head/kernel" else value
      continue
    parts = path.split("/")  # blocks/attention/query/kernel, blocks/mlp_norm/scale
    kind = parts[1] if parts[1] in _GGUF_NAMES else parts[2]
    leaf = "bias" if parts[-1] == "bias" else "weight"
    for layer in range(value.shape[0]):
      w = value[layer].T if parts[-1] == "kernel" else value[layer]
      if kind in heads:
        w = permute(w, heads[kind]) if w.ndim == 2 else permute(w[:, None], heads[kind])[:, 0]
      out[f"blk.{layer}.{_GGUF_NAMES[kind]}.{leaf}"] = w
  return out


def _write_gguf(path: pathlib.Path, info, params: dict[str, np.ndarray], tokenizer) -> None:
  gguf = pretrained.gguf_package()
  s = info.sizes
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(s["layers"])
  writer.add_context_length(s["context"])
  writer.add_embedding_length(s["d_model"])
  writer.add_feed_forward_length(s["mlp"])
  writer.add_head_count(s["heads"])
  writer.add_head_count_kv(s["kv_heads"])
  writer.add_rope_freq_base(s["rope_base"])
  writer.add_layer_norm_rms_eps(s["norm_eps"])
  writer.add_vocab_size(s["vocab"])
  head_dim = s["head_dim"] or s["d_model"] // s["heads"]
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_dimension_count(head_dim)
  if s.get("window"):
    writer.add_sliding_window(s["window"])
  _add_tokenizer(writer, tokenizer, info)
  for name, value in gguf_tensors(params, s).items():
    writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _gguf_tokenizer_kind(tokenizer) -> str:
  """The GGUF pre-tokenizer name of `tokenizer`, or `ConfigError` for one GGUF cannot name."""
  if tokenizer is None:
    raise ConfigError("a GGUF export needs the model's tokenizer; the source has none")
  described = json.loads(tokenizer.to_str())
  if described["model"].get("type") != "BPE" or not pretrained.is_smollm_pre(described):
    raise ConfigError("a GGUF export writes byte-level BPE tokenizers that split digits one by "
                      "one (SmolLM's) only; export this model with --format hf")  # fmt: skip
  return "smollm"


def _add_tokenizer(writer, tokenizer, info) -> None:
  """The byte-level BPE vocabulary, merges, token types and special ids of `tokenizer`."""
  model = json.loads(tokenizer.to_str())["model"]
  by_id = {i: t for t, i in model["vocab"].items()}
  added = tokenizer.get_added_tokens_decoder()
  by_id.update((i, t.content) for i, t in added.items())
  special = {i for i, t in added.items() if t.special}
  size = max(info.sizes["vocab"], max(by_id) + 1)  # rows past the tokenizer: unused tokens
  tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
  normal, user_defined, unused = 1, 4, 5  # GGUF token types
  kinds = [pretrained.CONTROL if i in special else user_defined if i in added
           else normal if i in by_id else unused for i in range(size)]  # fmt: skip
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_gguf_tokenizer_kind(tokenizer))
  writer.add_token_list(tokens)
  writer.add_token_merges(merges)
  writer.add_token_types(kinds)
  if info.bos is not None:
    writer.add_bos_token_id(info.bos)
  if info.eos is not None:
    writer.add_eos_token_id(info.eos)
  if info.chat_template:
    writer.add_chat_template(info.chat_template)


def define_flags() -> None:
  """The command's flags, defined only when it runs."""
  flags.DEFINE_string("out", None, "The folder (hf) or file (gguf) to write; it must not exist.")
  flags.DEFINE_enum("format", "hf", FORMATS, "hf: a Hugging Face folder; gguf: a GGUF file.")


def main(argv: list[str]) -> None:
  """Exports the model the first argument names."""
  f = flags.FLAGS
  if len(argv) != 2 or not f.out:
    raise ConfigError("give one model and --out: python -m jaxtrain.export WORKDIR --out DIR")
  out = export(argv[1], f.out, f.format)
  print(f"wrote {out}")


if __name__ == "__main__":
  define_flags()
  cli.run_tool(main)
