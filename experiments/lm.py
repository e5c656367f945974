r"""A decoder-only language model on CPython's standard library, then a sampled continuation.

    python -m experiments.lm --workdir runs/lm

The default preset (`cpu`) is a 0.8M-parameter byte-level model that learns
visibly in a few minutes on a laptop CPU: eval `bits_per_byte` falls from 8 to
about 2.4 by step 250 and 1.8 by step 1,000 (5.6 minutes on 2 cores). The last 1%
of the sources (sorted by path) is held out. At the end it
prints a continuation of a prompt (`--prompt`, sampled with `--temperature` and
`--top_k`). A BPE tokenizer instead of bytes, trained on the train split and
kept in the workdir:

    python -m experiments.lm --workdir runs/lm_bpe --config.data.tokenizer=bpe

Pretraining reads token shards instead: tokenize a corpus once (here the
standard library's top-level modules, as bytes), then train on the documents
packed into windows, attention kept within each document:

    python -m jaxtrain.data.tokenize --tokenizer=bytes --out=runs/stdlib_tokens \
      "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/*.py"
    python -m experiments.lm --workdir runs/lm_tokens --config.data.name=tokens \
      --config.data.dir=runs/stdlib_tokens

The `gpu` preset is a 220M-parameter model (context 1,024, bf16-mixed, the
chunked loss) for one accelerator, on shards of a BPE vocabulary of 32,768
trained by the tokenize command:

    python -m jaxtrain.data.tokenize --tokenizer=bpe:32768 --skip_binary --out=runs/stdlib_bpe \
      "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/**/*.py"
    python -m experiments.lm --config=experiments/lm.py:gpu --workdir runs/lm_gpu \
      --config.data.dir=runs/stdlib_bpe

A quick try on the first megabyte of the sources:

    python -m experiments.lm --workdir runs/lm_quick --config.data.limit_bytes=1000000 \
      --config.train.steps=200 --config.eval.every_steps=100

The sampling flags are checked before anything trains: a prompt that is empty or
not UTF-8, a temperature that is not a finite number, a `--top_k` beyond the
vocabulary, or more than 2^20 `--sample_tokens` is one line and exit 2.
"""

import functools
import math
import sys

import ml_collections
import tokenizers
from absl import flags

import jaxtrain
from jaxtrain import cli, data, losses, models
from jaxtrain.data import bpe

PRESETS = ("cpu", "gpu")
MOST_SAMPLED = 2**20  # tokens a sample may ask for: each is a forward pass over the window


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  """AdamW on a warmup-stable-decay schedule with clipping; `preset` sizes model and run.

  `--config=experiments/lm.py:gpu` passes `gpu` here; without a preset the
  config is `cpu`'s.
  """
  if preset not in PRESETS:
    raise jaxtrain.ConfigError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
  config = jaxtrain.config.get_config()
  config.data.name = "python_stdlib"
  config.optim.name = "adamw"
  config.optim.schedule = "wsd"
  config.optim.weight_decay = 0.1
  config.optim.clip_norm = 1.0
  m = config.model
  m.vocab = 0  # 0: the tokenizer's size (256 for bytes)
  m.remat, m.scan_layers, m.activation = "none", False, "swiglu"  # unrolled: faster on CPU
  m.positions, m.tie, m.dropout, m.attention = "rope", True, 0.0, "auto"
  if preset == "cpu":
    m.d_model, m.layers, m.heads, m.kv_heads, m.mlp, m.seq_len = 128, 4, 4, 2, 384, 128
    config.train.steps, config.train.batch_size, config.train.log_every = 1000, 32, 50
    config.optim.lr, config.optim.warmup_steps = 3e-3, 100
    config.eval.every_steps, config.eval.batch_size = 250, 64
  else:
    m.d_model, m.layers, m.heads, m.kv_heads, m.mlp, m.seq_len = 1024, 16, 16, 8, 2816, 1024
    m.remat, m.scan_layers = "dots-saveable", True  # one compiled block for 16 layers
    # Token shards (python -m jaxtrain.data.tokenize; data.dir names them), documents
    # packed back to back; the logits' cross-entropy 256 positions at a time.
    config.data.name, config.data.packing, config.loss.chunk = "tokens", "concat", 256
    # Batch 64: 42% MFU on an H200 against 40% at 32 (dots-saveable remat; 34 GiB peak).
    config.train.steps, config.train.batch_size, config.train.log_every = 2000, 64, 50
    config.optim.lr, config.optim.warmup_steps = 6e-4, 200
    config.eval.every_steps, config.eval.batch_size = 500, 32
    config.precision.policy = "bf16-mixed"
  config.ckpt.every_steps = config.eval.every_steps
  return config


MODEL_HELP = {
  "d_model": "the residual width",
  "layers": "Transformer blocks",
  "heads": "query heads",
  "kv_heads": "key/value heads (grouped-query attention); 0: as many as heads",
  "mlp": "the MLP's hidden width",
  "seq_len": "the context: window length in tokens and the position table's size",
  "vocab": "the vocabulary; 0: the tokenizer's (256 bytes, or data.vocab_size)",
  "remat": "per-block rematerialisation: none, full or dots-saveable",
  "scan_layers": "run the blocks with lax.scan (one compiled block) or unrolled",
  "activation": "the MLP: swiglu or gelu",
  "positions": "rope (rotary) or learned",
  "tie": "the output head is the token embedding",
  "dropout": "after each attention and MLP",
  "attention": "auto (cuDNN's fused kernel on GPU, XLA's on TPU), cudnn, xla or reference",
}


def make_dataset(
  config: ml_collections.ConfigDict, workdir: str | None
) -> tuple[data.Dataset, object]:
  """The corpus as windows of bytes, BPE tokens or packed token shards, and the tokenizer.

  The tokenizer is None for bytes.
  """
  d, length = config.data, config.model.seq_len
  _refuse_the_other_paths_keys(d)
  if d.name == "tokens":
    dataset = data.tokens(d.dir, length, packing=d.packing, mixture=d.mixture,
                          eval_dir=d.eval_dir, eval_fraction=d.eval_fraction)  # fmt: skip
    serial = (dataset.files or {}).get(bpe.FILE)
    return dataset, tokenizers.Tokenizer.from_str(serial) if serial else None
  if d.name != "python_stdlib":
    raise jaxtrain.ConfigError(f"data.name={d.name!r} must be python_stdlib or tokens")
  if d.dir:
    raise jaxtrain.ConfigError(
      f"data.dir={d.dir!r}: python_stdlib is read from this Python; give data.name=tokens to "
      "train on token shards"
    )
  text = data.python_stdlib(length, d.eval_fraction, d.limit_bytes)
  if d.tokenizer == "byte":
    return text, None
  saved = jaxtrain.workdir.resolve(workdir) / bpe.FILE if workdir else None
  return bpe.tokenize(text, d.vocab_size, length, saved)


# The data keys each path reads, and their defaults: a key of the other path set is a mistake.
SHARD_KEYS = {"packing": "concat", "mixture": "", "eval_dir": ""}
TEXT_KEYS = {"tokenizer": "byte", "vocab_size": 4096, "limit_bytes": 0}


def _refuse_the_other_paths_keys(d: ml_collections.ConfigDict) -> None:
  unused = TEXT_KEYS if d.name == "tokens" else SHARD_KEYS
  for key, default in unused.items():
    if d[key] != default:
      wanted = "python_stdlib" if d.name == "tokens" else "tokens"
      raise jaxtrain.ConfigError(
        f"data.{key}={d[key]!r} has no effect with data.name={d.name}; it is for data.name={wanted}"
      )


def make_model(config: ml_collections.ConfigDict, vocab: int) -> functools.partial:
  """The Transformer that `config.model` describes."""
  m = config.model
  return functools.partial(
    models.Transformer, m.vocab or vocab, m.seq_len, m.d_model, m.layers, m.heads,
    kv_heads=m.kv_heads, mlp=m.mlp, activation=m.activation, positions=m.positions,
    tie=m.tie, remat=m.remat, scan_layers=m.scan_layers, dropout=m.dropout,
    attention=m.attention,
  )  # fmt: skip


def task(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple:
  """The model, the dataset and the loss that `config` describes, and the tokenizer (or None).

  A BPE tokenizer is read from `workdir` when it holds one, else trained (and
  kept there, with a `workdir`).
  """
  jaxtrain.config.validate(config)
  dataset, tokenizer = make_dataset(config, workdir)
  vocab = (dataset.info or {}).get("vocab_size") or data.text.VOCAB
  loss = losses.next_token
  if config.loss.chunk:
    loss = functools.partial(losses.next_token, chunk=config.loss.chunk)
  return make_model(config, vocab), dataset, loss, tokenizer


def prompt_ids(tokenizer, prompt: str) -> list[int]:
  """The prompt's token ids (its bytes without a tokenizer).

  Raises:
    ConfigError: the prompt is empty or not UTF-8 text.
  """
  try:
    raw = prompt.encode()
  except UnicodeEncodeError as e:  # bytes of no encoding reach Python as lone surrogates
    raise jaxtrain.ConfigError("--prompt is not UTF-8 text") from e
  ids = tokenizer.encode(prompt).ids if tokenizer else list(raw)
  if not ids:
    raise jaxtrain.ConfigError("--prompt is empty; give the text the sample continues")
  return ids


def check_temperature(temperature: float) -> None:
  """Refuses a sampling temperature that is not a finite number, 0 or more."""
  if not math.isfinite(temperature) or temperature < 0:
    raise jaxtrain.ConfigError(f"--temperature={temperature} must be a finite number, 0 or more")


def check_top_k(top_k: int, vocab: int) -> None:
  """Refuses a `top_k` beyond the vocabulary."""
  if top_k > vocab:
    raise jaxtrain.ConfigError(f"--top_k={top_k} is more than the vocabulary's {vocab} tokens")


def sample(result, tokenizer, ids: list[int], *, steps: int, temperature: float,
           top_k: int) -> str:  # fmt: skip
  """The prompt `ids` and a continuation from the trained model, as text."""
  model = jaxtrain.merge_model(result.graphdef, result.state)
  out = models.generate(model, ids, steps, temperature=temperature, top_k=top_k)
  if tokenizer:
    return tokenizer.decode([*ids, *out.tolist()])
  return bytes([*ids, *out.tolist()]).decode("utf-8", errors="replace")


def main(argv: list[str]) -> jaxtrain.TrainResult:
  """Checks the sampling flags, trains with the command line's flags, then samples."""
  del argv
  f = flags.FLAGS
  prompt_ids(None, f.prompt)  # the cheap checks before the data is read
  check_temperature(f.temperature)
  model, dataset, loss, tokenizer = task(f.config, f.workdir)
  ids = prompt_ids(tokenizer, f.prompt)
  vocab = f.config.model.vocab or (dataset.info or {}).get("vocab_size") or data.text.VOCAB
  check_top_k(f.top_k, vocab)
  settings = {"steps": f.sample_tokens, "temperature": f.temperature, "top_k": f.top_k}
  result = jaxtrain.train(f.config, model, dataset, loss, workdir=f.workdir, resume=f.resume)
  if result.status in ("completed", "stopped_early"):
    print(f"eval: {result!r}", file=sys.stderr)
    print(sample(result, tokenizer, ids, **settings))
  return result


if __name__ == "__main__":
  cli.define_flags(__file__, MODEL_HELP, presets=PRESETS)
  flags.DEFINE_string("prompt", "def ", "The text the sample continues.")
  flags.DEFINE_integer(
    "sample_tokens", 200, "Tokens sampled after the prompt, at most 2^20 (each runs the model "
    "over the whole window).", lower_bound=1, upper_bound=MOST_SAMPLED,
  )  # fmt: skip
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.", lower_bound=0)
  flags.DEFINE_integer(
    "top_k", 40, "Sample among the k likeliest tokens; 0 for all.", lower_bound=0
  )
  cli.run(main)
