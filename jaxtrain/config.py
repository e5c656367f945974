"""The base config: every default with its meaning, validation with one-line errors, hashing.

Experiments start from `get_config()` and override what they need in their own
`get_config()`; the command line overrides any key with `--config.KEY=VALUE`.
`validate` runs before anything is compiled or written, and raises `ConfigError`
whose message names the key and the problem in one line. `DEFAULTS` holds each
key's default and a one-line meaning (what `--help` prints).

Example:
  >>> config = get_config()
  >>> config.train.steps = 200
  >>> validate(config)
"""

import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections
from ml_collections import config_dict

SCHEDULES = ("constant", "cosine", "linear", "rsqrt", "exponential", "piecewise", "wsd")
POLICIES = ("f32", "bf16-mixed", "bf16", "fp16-mixed")
MODES = ("min", "max")
RULES = ("auto", "dp", "fsdp", "fsdp_tp", "tp")
# The optimizers of optim.name, and which take which optim.* option, are the table
# jaxtrain.optim.BASES, which also checks them (`optim.settings`).
# Parameter paths that weight decay leaves alone by default: biases, norm scales, embeddings.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embedding$")
# Parameters that Muon leaves to its Adam branch, besides those under 2 dimensions:
# embeddings and the head, and norm scales and biases (2-D when layers are stacked).
MUON_ADAM = (r"(^|/)(embed|position|head)/", r"(^|/)(scale|bias)$")
LAYER_PATTERN = r"(^|/)layers/(\d+)/"  # the last group is a parameter's layer index
INT32_LIMIT = 2**31  # steps, counts and sizes live in int32 arrays
SEED_LIMIT = 2**32  # jax.random.PRNGKey keeps 32 bits of a seed: 2**32 is seed 0 again

# Every framework key: (default, meaning). A None default is an optional float.
# `model.*`, and top-level keys outside the sections (`finetune`, say), belong to each experiment.
DEFAULTS: dict[str, tuple[Any, str]] = {
  "train.steps": (1000, "optimizer steps in the whole run"),
  "train.batch_size": (128, "global batch, split over the data-parallel devices"),
  "train.steps_per_loop": (10, "steps per compiled dispatch (the lax.scan length)"),
  "train.seed": (0, "parameters, dropout and (without data.seed) the data order derive from it"),
  "train.log_every": (100, "steps between train lines in metrics.jsonl"),
  "train.unroll": (0, "steps unrolled in the scanned chunk; 0: chosen per backend and step"),
  "train.compile_cache": ("", "JAX's compilation cache folder; '': ~/.cache/jaxtrain/xla; off"),
  "train.log_norms": (False, "also log grad_norm, param_norm and update_norm (a pass more)"),
  "train.max_skipped": (20, "non-finite updates skipped in a row before the run fails; 0: never"),
  "eval.every_steps": (500, "steps between evaluations; 0: only at the end"),
  "eval.batch_size": (512, "global eval batch; the last partial batch is padded and masked"),
  "optim.name": ("adam", "the optimizer, a key of jaxtrain.optim.BASES (adam, adamw, sgd, ...)"),
  "optim.lr": (1e-3, "peak learning rate"),
  "optim.schedule": ("constant", f"learning-rate schedule: {', '.join(SCHEDULES)}"),
  "optim.warmup_steps": (0, "updates of linear warm-up from 0 to optim.lr"),
  "optim.decay_fraction": (0.2, "wsd: the share of updates spent decaying"),
  "optim.decay_rate": (0.01, "exponential: the factor reached at the last update"),
  "optim.boundaries": ((), "piecewise: updates where optim.scales take over"),
  "optim.scales": ((), "piecewise: multiples of optim.lr from each boundary on"),
  "optim.momentum": (0.0, "sgd and rmsprop momentum; 0 turns it off"),
  "optim.nesterov": (False, "sgd and rmsprop: Nesterov momentum"),
  "optim.centered": (False, "rmsprop: centred second moment"),
  "optim.weight_decay": (0.0, "decoupled weight decay, where optim.name takes it (adamw, ...)"),
  "optim.no_decay": (NO_DECAY, "regexes of parameter paths that weight decay skips"),
  "optim.muon_adam": (MUON_ADAM, "muon: regexes of parameter paths its Adam branch trains"),
  "optim.muon_adam_scale": (1.0, "muon: the Adam branch's learning rate as a multiple of optim.lr"),
  "optim.clip_norm": (0.0, "global-norm gradient clipping; 0 turns it off"),
  "optim.accum_steps": (1, "micro-batches whose gradients are averaged into one update"),
  "optim.freeze": ((), "regexes of parameter paths that are not trained"),
  "optim.lr_groups": ((), "'REGEX=MULTIPLIER' learning-rate factors by parameter path"),
  "optim.trainable": ((), "regexes: train only the parameters whose paths match one; (): all"),
  "optim.layer_decay": (1.0, "layer i of L trains at lr*decay**(L-i), embeddings one less; 1: off"),
  "optim.layer_pattern": (LAYER_PATTERN, "optim.layer_decay: regex whose last group is the layer"),
  "optim.unfreeze": ((), "'REGEX=STEP': the matching parameters train from STEP on (unfreezing)"),
  "init.source": ("", "initial weights: .safetensors, .gguf, an HF folder, a workdir or a step"),
  "init.convert": ("", "the source's names: '' (parameter paths), bert or llama (GGUF, HF folder)"),
  "init.map": ((), "'REGEX=REPLACEMENT' renames of source paths (the first that matches)"),
  "init.skip": ((), "regexes of source paths not loaded"),
  "init.fresh": ((), "regexes of parameters that keep their own init; all others must load"),
  "loss.label_smoothing": (0.0, "classification: weight spread evenly over the classes"),
  "loss.chunk": (0, "language models: positions whose logits are computed at once; 0: all"),
  "precision.policy": ("f32", f"precision policy: {', '.join(POLICIES)}"),
  "precision.f32_modules": ((), "regexes of module paths kept in float32 under any policy"),
  "precision.loss_scale_period": (2000, "fp16-mixed: finite steps before the loss scale doubles"),
  "mesh.data": (-1, "data-parallel devices; -1 takes the devices the other axes leave"),
  "mesh.fsdp": (1, "devices the parameters and optimizer state are sharded over"),
  "mesh.tensor": (1, "tensor-parallel devices (mesh.rules auto, tp or fsdp_tp shard over them)"),
  "mesh.rules": ("auto", f"logical-axis sharding: {', '.join(RULES)} (auto: fsdp_tp)"),
  "data.name": ("", "the dataset's name, set by the experiment; recorded in run.json"),
  "data.dir": ("", "a folder to read the dataset from; it must hold it when given"),
  "data.seed": (-1, "the data order's seed; -1: train.seed's"),
  "data.workers": (0, "Grain worker processes; 0 reads in a thread; -1: chosen from timings"),
  "data.max_workers": (0, "the most workers=-1 starts; 0: the CPUs less one, at most 8"),
  "data.crop_padding": (0, "train images: random crop after this much zero padding; 0: off"),
  "data.flip": (False, "train images: random horizontal flip"),
  "data.tokenizer": (
    "byte",
    "text: byte, or bpe (trained on the train split, kept in workdir)",
  ),
  "data.vocab_size": (4096, "bpe: the tokenizer's vocabulary size"),
  "data.limit_bytes": (0, "text: read only the first files holding this many bytes; 0: all"),
  "data.normalize": (False, "images: (x - mean) / std of the train images, train and eval"),
  "data.packing": ("concat", "token shards: concat (documents back to back) or pad (whole ones)"),
  "data.mixture": ("", "token shards: 'DIR_A=0.7,DIR_B=0.3' trains on several folders by weight"),
  "data.eval_dir": ("", "token shards: a folder to evaluate on; '': hold out data.eval_fraction"),
  "data.eval_fraction": (0.01, "text and token shards: the share held out for evaluation"),
  "ckpt.every_steps": (1000, "steps between checkpoints; 0: only at the end and on a stop"),
  "ckpt.keep": (3, "newest checkpoint steps kept"),
  "ckpt.async": (True, "write checkpoints in the background"),
  "ckpt.best_metric": ("", "also keep the best step by this eval metric, e.g. eval/accuracy"),
  "ckpt.best_mode": ("min", "min or max, for ckpt.best_metric"),
  "early_stop.metric": ("", "the monitored eval metric, e.g. eval/loss; empty: no monitor"),
  "early_stop.mode": ("min", "min or max: which way the metric improves"),
  "early_stop.patience": (5, "stop at this many evaluations in a row without improvement"),
  "early_stop.min_delta": (0.0, "the least change that counts as an improvement"),
  "early_stop.relative": (False, "min_delta is a fraction of the best value"),
  "early_stop.baseline": (None, "a value the metric must beat to improve; None: none"),
  "early_stop.warmup_steps": (0, "evaluations before this step are not counted"),
  "early_stop.divergence": (None, "stop at once when worse than this; None: never"),
  "early_stop.restore_best": (False, "end with the best evaluation's checkpointed state"),
  "profile.start_step": (0, "the first step of the profiler window (a chunk boundary at or after)"),
  "profile.steps": (0, "steps a jax.profiler trace covers, into workdir/tb; 0: no trace"),
  "plateau.factor": (1.0, "lr multiplier per plateau of early_stop.metric; 1 turns it off"),
  "plateau.patience": (2, "reduce at this many evaluations in a row without improvement"),
  "plateau.cooldown": (0, "evaluations ignored after a reduction"),
  "plateau.min_scale": (0.0, "the floor of the plateau's lr multiplier"),
  "logging.wandb": (False, "also log the config and metrics to Weights & Biases (wandb extra)"),
  "logging.mlflow": (False, "also log them to MLflow; MLFLOW_TRACKING_URI picks the store"),
}


POSITIVE = (
  "train.steps",
  "train.batch_size",
  "train.steps_per_loop",
  "train.log_every",
  "eval.batch_size",
  "optim.lr",
  "optim.accum_steps",
  "optim.muon_adam_scale",
  "data.vocab_size",
  "ckpt.keep",
  "precision.loss_scale_period",
)
NON_NEGATIVE = (
  "profile.start_step",
  "profile.steps",
  "eval.every_steps",
  "ckpt.every_steps",
  "train.unroll",
  "train.seed",
  "optim.warmup_steps",
  "optim.weight_decay",
  "optim.clip_norm",
  "early_stop.patience",
  "early_stop.min_delta",
  "early_stop.warmup_steps",
  "plateau.patience",
  "plateau.cooldown",
  "plateau.min_scale",
  "train.max_skipped",
  "data.max_workers",
  "data.crop_padding",
  "data.limit_bytes",
  "loss.chunk",
)
CHOICES = {
  "data.tokenizer": ("byte", "bpe"),
  "data.packing": ("concat", "pad"),
  "optim.schedule": SCHEDULES,
  "precision.policy": POLICIES,
  "early_stop.mode": MODES,
  "mesh.rules": RULES,
  "ckpt.best_mode": MODES,
}


class ConfigError(ValueError):
  """A config value is invalid; the message names the key in one line."""


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config with every default of the framework (see `DEFAULTS`)."""
  c = ml_collections.ConfigDict()
  for key, (default, _) in DEFAULTS.items():
    section, leaf = key.split(".")
    if section not in c:
      c[section] = ml_collections.ConfigDict()
    c[section][leaf] = config_dict.placeholder(float) if default is None else default
  c.model = ml_collections.ConfigDict()  # per experiment
  return c


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields `(dotted_key, value)` for every leaf of a config."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested dict (a `config.json`, say) as `{dotted_key: value}`."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_dict(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def unknown_key_message(key: str, known: list[str]) -> str:
  """Returns the one-line error for an unknown key, with the closest known key."""
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return f"unknown config key {key}{hint}"


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every framework key of `config` (the mesh against the devices: `sharding.mesh_shape`).

  The optimizer's name and its options are `jaxtrain.optim.settings`'s to check,
  since its table `BASES` holds them and this module does not import it.

  Args:
    config: the resolved config of a run.

  Raises:
    ConfigError: naming the first bad key and the problem.
  """
  _check_keys_and_types(config)
  _check_ranges(config)
  for key, choices in CHOICES.items():
    _require(get(config, key) in choices, key, config, f"must be one of {', '.join(choices)}")
  for key, example in (("ckpt.best_metric", "eval/accuracy"), ("early_stop.metric", "eval/loss")):
    value = get(config, key)
    _require(not value or value.startswith("eval/"), key, config,
             f"must name an eval metric, like {example}")  # fmt: skip
  for pattern in config.precision.f32_modules:
    _require(_compiles(pattern), "precision.f32_modules", config, f"has a bad regex {pattern!r}")
  _check_monitor(config)
  _check_optim(config)
  _check_cadences(config)


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  for key in POSITIVE:
    _require(get(config, key) > 0, key, config, "must be positive")
  for key in NON_NEGATIVE:
    _require(get(config, key) >= 0, key, config, "must not be negative")
  _require(config.data.workers >= -1, "data.workers", config, "must be a count, or -1 for auto")
  _require(config.data.seed >= -1, "data.seed", config, "must be a seed, or -1 for train.seed's")
  o = config.optim
  _require(0 <= o.decay_fraction <= 1, "optim.decay_fraction", config, "must be in [0, 1]")


def _check_cadences(config: ml_collections.ConfigDict) -> None:
  """Periodic actions fall on chunk boundaries; updates on whole accumulations."""
  t, o = config.train, config.optim
  for key in ("train.log_every", "eval.every_steps", "ckpt.every_steps", "train.steps"):
    multiple = get(config, key) % t.steps_per_loop == 0
    _require(
      multiple, key, config, f"must be a multiple of train.steps_per_loop={t.steps_per_loop}"
    )
  multiple = t.steps % o.accum_steps == 0
  _require(
    multiple, "train.steps", config, f"must be a multiple of optim.accum_steps={o.accum_steps}"
  )


def _check_optim(config: ml_collections.ConfigDict) -> None:
  o = config.optim
  bounds = list(o.boundaries)
  _require(
    all(isinstance(b, int) and b > 0 for b in bounds) and bounds == sorted(set(bounds)),
    "optim.boundaries",
    config,
    "must be increasing positive steps",
  )
  _require(
    all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in o.scales),
    "optim.scales",
    config,
    "must be non-negative numbers",
  )
  _check_schedule_length(config)
  _require(0 <= o.momentum < 1, "optim.momentum", config, "must be in [0, 1)")
  for key, ok, problem in (
    ("optim.nesterov", not o.nesterov or o.momentum > 0, "needs optim.momentum > 0"),
    ("optim.decay_rate", o.decay_rate > 0, "must be positive"),
    ("optim.scales", len(o.scales) == len(o.boundaries), "needs one value per optim.boundaries"),
    ("loss.label_smoothing", 0 <= config.loss.label_smoothing < 1, "must be in [0, 1)"),
    ("data.eval_fraction", 0 <= config.data.eval_fraction < 1, "must be in [0, 1)"),
  ):
    _require(ok, key, config, problem)
  _require(0 < o.layer_decay <= 1, "optim.layer_decay", config, "must be in (0, 1]")
  _require(
    _compiles(o.layer_pattern) and re.compile(o.layer_pattern).groups > 0,
    "optim.layer_pattern",
    config,
    "must be a regex with a group for the layer index",
  )
  for key in ("optim.no_decay", "optim.freeze", "optim.muon_adam", "optim.trainable"):
    for pattern in get(config, key):
      _require(_compiles(pattern), key, config, f"has a bad regular expression {pattern!r}")
  for key, parse in (("optim.lr_groups", parse_lr_groups), ("optim.unfreeze", parse_unfreeze)):
    try:
      parse(get(config, key))
    except ValueError as e:
      raise ConfigError(f"{key}={get(config, key)!r}: {e}") from None
  for pattern, step in parse_unfreeze(o.unfreeze).items():
    _require(step % o.accum_steps == 0 and step < config.train.steps, "optim.unfreeze", config,
             f"{pattern}={step}: the step must be below train.steps and a multiple of "
             f"optim.accum_steps={o.accum_steps}")  # fmt: skip


def _check_schedule_length(config: ml_collections.ConfigDict) -> None:
  """The warm-ups, and a schedule's own phases, must fit in the run."""
  o, steps = config.optim, config.train.steps
  updates = steps // o.accum_steps
  decay = max(round(updates * o.decay_fraction), 1)
  bounds = tuple(o.boundaries)
  for key, ok, problem in (
    ("optim.warmup_steps", o.warmup_steps < updates, f"must be below the {updates} updates"),
    ("optim.decay_fraction", o.schedule != "wsd" or o.warmup_steps + decay <= updates,
     f"leaves no room: warm-up {o.warmup_steps} + decay {decay} exceed the {updates} updates"),
    ("optim.boundaries", not bounds or o.schedule == "piecewise",
     f"needs optim.schedule='piecewise' (not {o.schedule!r})"),
    ("optim.boundaries", not bounds or (o.warmup_steps <= bounds[0] and bounds[-1] < updates),
     f"must lie from optim.warmup_steps={o.warmup_steps} to below the {updates} updates"),
    ("early_stop.warmup_steps", config.early_stop.warmup_steps < steps,
     f"must be below train.steps={steps}, or no evaluation would count"),
  ):  # fmt: skip
    _require(ok, key, config, problem)


def _compiles(pattern: Any) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return True


def parse_lr_groups(entries: Any) -> dict[str, float]:
  """`("^head/=10", ...)` to `{"^head/": 10.0}`; raises ValueError for a bad entry."""
  groups = {}
  for entry in entries:
    pattern, sep, value = str(entry).rpartition("=")
    if not sep or not pattern or not _compiles(pattern):
      raise ValueError(f"{entry!r} is not REGEX=MULTIPLIER")
    try:
      groups[pattern] = float(value)
    except ValueError:
      raise ValueError(f"{entry!r} is not REGEX=MULTIPLIER") from None
    if not 0 <= groups[pattern] < math.inf:
      raise ValueError(f"{entry!r} needs a finite, non-negative multiplier")
  return groups


def parse_unfreeze(entries: Any) -> dict[str, int]:
  """`("layers/5/=100", ...)` to `{"layers/5/": 100}`; raises ValueError for a bad entry."""
  starts = {}
  for entry in entries:
    pattern, sep, value = str(entry).rpartition("=")
    if not sep or not pattern or not _compiles(pattern) or not value.strip().isdigit():
      raise ValueError(f"{entry!r} is not REGEX=STEP")
    starts[pattern] = int(value)
  return starts


def _check_monitor(config: ml_collections.ConfigDict) -> None:
  e = config.early_stop
  _require(0 < config.plateau.factor <= 1, "plateau.factor", config, "must be in (0, 1]")
  _require(config.plateau.min_scale <= 1, "plateau.min_scale", config, "must be in [0, 1]")
  _require(
    not e.relative or e.min_delta < 1, "early_stop.min_delta", config, "must be below 1 if relative"
  )
  for key in ("early_stop.baseline", "early_stop.divergence"):
    value = get(config, key)
    _require(value is None or math.isfinite(value), key, config, "must be finite or None")
  for key, on in (
    ("plateau.factor", config.plateau.factor < 1),
    ("early_stop.restore_best", e.restore_best),
  ):
    _require(not on or bool(e.metric), key, config, "needs early_stop.metric")
  c = config.ckpt
  _require(
    not e.restore_best or not c.best_metric or (c.best_metric, c.best_mode) == (e.metric, e.mode),
    "ckpt.best_metric",
    config,
    "with early_stop.restore_best, leave it empty or equal to early_stop.metric and mode",
  )


def to_json(config: ml_collections.ConfigDict) -> str:
  """Returns the config as canonical JSON (sorted keys)."""
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=str)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Returns a short sha256 of the canonical JSON of `config`."""
  return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


class Snapshot(NamedTuple):
  """The config as run, in plain JSON values: what `config.json` and checkpoints record.

  The run's modules take this (or a smaller typed value) instead of the
  `ConfigDict`, which only `config` and `parts` read.
  """

  json: str  # canonical (sorted keys), as `to_json` writes it
  hash: str  # `config_hash`

  @property
  def tree(self) -> dict[str, Any]:
    """A fresh nested dict of the values."""
    return json.loads(self.json)

  def flat(self) -> dict[str, Any]:
    """`{dotted_key: value}`."""
    return flatten_dict(self.tree)


def snapshot(config: ml_collections.ConfigDict) -> Snapshot:
  """The config's `Snapshot`."""
  return Snapshot(to_json(config), config_hash(config))


def default(key: str) -> Any:
  """The framework's default for a dotted `key` (`DEFAULTS`), the one place it is written."""
  return DEFAULTS[key][0]


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The data order's seed: `data.seed`, or `train.seed` where it is -1."""
  return config.train.seed if config.data.seed < 0 else config.data.seed


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """Returns the value of a dotted `key`."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _require(ok: bool, key: str, config: ml_collections.ConfigDict, problem: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={get(config, key)!r} {problem}")


def _check_complete(config: ml_collections.ConfigDict, base: dict[str, Any]) -> None:
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"config is a {type(config).__name__}; start from jaxtrain.config.get_config()"
    )
  missing = sorted(set(base) - {key for key, _ in flatten(config)})
  if missing:
    raise ConfigError(
      f"config lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; start "
      "from jaxtrain.config.get_config() and change what differs"
    )


def _check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Unknown and missing keys, wrong types, non-finite floats, integers outside their range."""
  defaults = get_config()
  base = dict(flatten(defaults))
  _check_complete(config, base)
  for key, value in flatten(config):
    if key.startswith("model.") or "." not in key:  # the experiment's own keys
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be finite")
      continue
    if key not in base:
      raise ConfigError(unknown_key_message(key, list(base)))
    if base[key] is None:  # an optional value: None, or of the placeholder's type
      *parents, leaf = key.split(".")
      want = get(defaults, ".".join(parents)).get_ref(leaf).get_type()
      if value is None:
        continue
    else:
      want = type(base[key])
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float:
      ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
      raise ConfigError(f"{key}={value!r} must be of type {want.__name__}")
    if want is float and not math.isfinite(value):
      raise ConfigError(f"{key}={value!r} must be finite")
    limit, name = (SEED_LIMIT, "2**32") if key.endswith(".seed") else (INT32_LIMIT, "2**31")
    if want is int and abs(value) >= limit:
      raise ConfigError(f"{key}={value!r} must be below {name}")
