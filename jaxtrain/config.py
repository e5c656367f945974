"""The base config: every default, validation with one-line errors, hashing.

Experiments start from `get_config()` and override what they need in their own
`get_config()`; the command line overrides any key with `--config.KEY=VALUE`.
`validate` runs before anything is compiled or written, and raises `ConfigError`
whose message names the key and the problem in one line.

Example:
  >>> config = get_config()
  >>> config.train.steps = 200
  >>> validate(config, num_devices=1)
"""

import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import ml_collections
from ml_collections import config_dict

OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear", "rsqrt", "exponential", "piecewise", "wsd")
POLICIES = ("f32", "bf16-mixed", "bf16", "fp16-mixed")
MODES = ("min", "max")
DECAY_OPTIMIZERS = ("adamw", "lion", "adafactor")  # decoupled weight decay with a mask
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")
# Parameter paths that weight decay leaves alone by default: biases, norm scales, embeddings.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embedding$")


class ConfigError(ValueError):
  """A config value is invalid; the message names the key in one line."""


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config with every default of the framework."""
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(
    {
      "steps": 1000,  # optimizer steps in the whole run
      "batch_size": 128,  # global batch, split over the data-parallel devices
      "steps_per_loop": 10,  # steps per compiled dispatch (lax.scan length)
      "seed": 0,  # parameters, dropout and the data order derive from it
      "log_every": 100,  # steps between train lines in metrics.jsonl
      "unroll": 0,  # steps unrolled in the scanned chunk; 0: step.auto_unroll decides
      "max_skipped": 20,  # non-finite updates skipped in a row before the run fails; 0: never
    }
  )
  c.eval = ml_collections.ConfigDict(
    {
      "every_steps": 500,  # 0: evaluate only at the end
      "batch_size": 512,  # global; the last partial batch is padded and masked
    }
  )
  c.optim = ml_collections.ConfigDict(
    {
      "name": "adam",  # one of OPTIMIZERS
      "lr": 1e-3,  # peak learning rate
      "schedule": "constant",  # one of SCHEDULES
      "warmup_steps": 0,  # linear warm-up from 0 to optim.lr
      "decay_fraction": 0.2,  # wsd: the share of steps spent decaying
      "decay_rate": 0.01,  # exponential: the factor reached at the last step
      "boundaries": (),  # piecewise: steps where optim.scales take over
      "scales": (),  # piecewise: multiples of optim.lr from each boundary on
      "momentum": 0.0,  # sgd and rmsprop; 0 turns it off
      "nesterov": False,  # sgd and rmsprop, with momentum
      "centered": False,  # rmsprop
      "weight_decay": 0.0,  # decoupled; only for DECAY_OPTIMIZERS
      "no_decay": NO_DECAY,  # regexes of parameter paths weight decay skips
      "clip_norm": 0.0,  # global-norm clipping; 0 turns it off
      "accum_steps": 1,  # micro-batches accumulated per update
      "freeze": (),  # regexes of parameter paths that are not trained
      "lr_groups": (),  # "REGEX=MULTIPLIER" learning-rate multipliers by parameter path
    }
  )
  c.loss = ml_collections.ConfigDict(
    {
      "label_smoothing": 0.0,  # classification: weight spread evenly over the classes
    }
  )
  c.precision = ml_collections.ConfigDict(
    {
      "policy": "f32",  # one of POLICIES; see jaxtrain.precision
      "f32_modules": (),  # regexes of module paths kept in float32 under any policy
      "loss_scale_period": 2000,  # fp16-mixed: finite steps before the loss scale doubles
    }
  )
  c.mesh = ml_collections.ConfigDict(
    {
      "data": -1,  # -1 takes the devices the other axes leave
      "fsdp": 1,
      "tensor": 1,
    }
  )
  c.data = ml_collections.ConfigDict(
    {
      "name": "",  # set by the experiment; recorded in run.json
      "dir": "",  # where to look for dataset files first
      "workers": 0,  # Grain worker processes; 0 reads in the training process; -1: auto
      "max_workers": 0,  # the most workers=-1 starts; 0: this process's CPUs less one, at most 8
      "crop_padding": 0,  # train images: random crop after this much zero padding; 0: off
      "flip": False,  # train images: random horizontal flip
      "normalize": False,  # images: (x - mean) / std of the train images, train and eval
    }
  )
  c.ckpt = ml_collections.ConfigDict(
    {
      "every_steps": 1000,  # 0: only at the end and on preemption
      "keep": 3,  # newest steps kept
      "async": True,  # write in the background
      "best_metric": "",  # also keep the best step by it, e.g. "eval/accuracy"
      "best_mode": "min",  # one of MODES
    }
  )
  c.early_stop = ml_collections.ConfigDict(
    {  # see jaxtrain.monitor for the exact rules
      "metric": "",  # monitored eval metric, e.g. "eval/loss"; empty turns it off
      "mode": "min",  # one of MODES
      "patience": 5,  # evaluations without improvement tolerated
      "min_delta": 0.0,  # the least change that counts as an improvement
      "relative": False,  # min_delta is a fraction of the best value
      "baseline": config_dict.placeholder(float),  # a value to beat; None: none
      "warmup_steps": 0,  # evaluations before this step are not counted
      "divergence": config_dict.placeholder(float),  # stop when worse than this
      "restore_best": False,  # end with the best checkpoint's state
    }
  )
  c.plateau = ml_collections.ConfigDict(
    {  # reduce-on-plateau, on early_stop.metric
      "factor": 1.0,  # lr multiplier per plateau; 1 turns it off
      "patience": 2,  # evaluations without improvement tolerated
      "cooldown": 0,  # evaluations ignored after a reduction
      "min_scale": 0.0,  # the multiplier's floor
    }
  )
  c.model = ml_collections.ConfigDict()  # per experiment
  return c


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields `(dotted_key, value)` for every leaf of a config."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def unknown_key_message(key: str, known: list[str]) -> str:
  """Returns the one-line error for an unknown key, with the closest known key."""
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return f"unknown config key {key}{hint}"


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks every framework key of `config`.

  Args:
    config: the resolved config of a run.
    num_devices: the number of devices the mesh will span.

  Raises:
    ConfigError: naming the first bad key and the problem.
  """
  _check_keys_and_types(config)
  t, o = config.train, config.optim
  for key in (
    "train.steps",
    "train.batch_size",
    "train.steps_per_loop",
    "train.log_every",
    "eval.batch_size",
    "optim.accum_steps",
    "ckpt.keep",
  ):
    _require(get(config, key) > 0, key, config, "must be positive")
  for key in (
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
  ):
    _require(get(config, key) >= 0, key, config, "must not be negative")
  _require(config.data.workers >= -1, "data.workers", config, "must be a count, or -1 for auto")
  _require(o.lr > 0, "optim.lr", config, "must be positive")
  _require(0 <= o.decay_fraction <= 1, "optim.decay_fraction", config, "must be in [0, 1]")
  _check_choice(config, "optim.name", OPTIMIZERS)
  _check_choice(config, "optim.schedule", SCHEDULES)
  _check_choice(config, "precision.policy", POLICIES)
  _check_choice(config, "early_stop.mode", MODES)
  _check_choice(config, "ckpt.best_mode", MODES)
  _require(
    not config.ckpt.best_metric or config.ckpt.best_metric.startswith("eval/"),
    "ckpt.best_metric",
    config,
    "must name an eval metric, like eval/accuracy",
  )
  _require(
    config.precision.loss_scale_period > 0,
    "precision.loss_scale_period",
    config,
    "must be positive",
  )
  for pattern in config.precision.f32_modules:
    _require(_compiles(pattern), "precision.f32_modules", config, f"has a bad regex {pattern!r}")
  _check_monitor(config)
  _check_optim(config)
  _require(
    o.weight_decay == 0 or o.name in DECAY_OPTIMIZERS,
    "optim.weight_decay",
    config,
    f"needs optim.name in ({', '.join(DECAY_OPTIMIZERS)})",
  )
  for key in ("train.log_every", "eval.every_steps", "ckpt.every_steps", "train.steps"):
    _require(
      get(config, key) % t.steps_per_loop == 0,
      key,
      config,
      f"must be a multiple of train.steps_per_loop={t.steps_per_loop}",
    )
  _require(
    t.steps % o.accum_steps == 0,
    "train.steps",
    config,
    f"must be a multiple of optim.accum_steps={o.accum_steps}",
  )
  data, fsdp, _ = mesh_shape(config.mesh, num_devices)
  for key in ("train.batch_size", "eval.batch_size"):
    _require(
      get(config, key) % (data * fsdp) == 0,
      key,
      config,
      f"is not divisible by the {data * fsdp} data-parallel devices "
      f"(mesh.data x mesh.fsdp = {data} x {fsdp})",
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
    ("optim.momentum", not o.momentum or o.name in MOMENTUM_OPTIMIZERS, "needs sgd or rmsprop"),
    ("optim.nesterov", not o.nesterov or o.momentum > 0, "needs optim.momentum > 0"),
    ("optim.centered", not o.centered or o.name == "rmsprop", "needs optim.name='rmsprop'"),
    ("optim.decay_rate", o.decay_rate > 0, "must be positive"),
    ("optim.scales", len(o.scales) == len(o.boundaries), "needs one value per optim.boundaries"),
    ("loss.label_smoothing", 0 <= config.loss.label_smoothing < 1, "must be in [0, 1)"),
  ):
    _require(ok, key, config, problem)
  for key in ("optim.no_decay", "optim.freeze"):
    for pattern in get(config, key):
      _require(_compiles(pattern), key, config, f"has a bad regular expression {pattern!r}")
  try:
    parse_lr_groups(o.lr_groups)
  except ValueError as e:
    raise ConfigError(f"optim.lr_groups={o.lr_groups!r}: {e}") from None


def _check_schedule_length(config: ml_collections.ConfigDict) -> None:
  """The warm-up, and a schedule's own phases, must fit in the run's updates."""
  o = config.optim
  updates = config.train.steps // o.accum_steps
  _require(
    o.warmup_steps < updates, "optim.warmup_steps", config, f"must be below the {updates} updates"
  )
  if o.schedule == "wsd":
    decay = max(round(updates * o.decay_fraction), 1)
    _require(
      o.warmup_steps + decay <= updates,
      "optim.decay_fraction",
      config,
      f"leaves no room: warm-up {o.warmup_steps} + decay {decay} exceed the {updates} updates",
    )
  if o.schedule == "piecewise" and o.boundaries:
    _require(
      o.boundaries[0] >= o.warmup_steps,
      "optim.boundaries",
      config,
      f"must start at or after optim.warmup_steps={o.warmup_steps}",
    )


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


def _check_monitor(config: ml_collections.ConfigDict) -> None:
  e = config.early_stop
  _require(
    not e.metric or e.metric.startswith("eval/"),
    "early_stop.metric",
    config,
    "must name an eval metric, like eval/loss",
  )
  _require(0 < config.plateau.factor <= 1, "plateau.factor", config, "must be in (0, 1]")
  _require(config.plateau.min_scale <= 1, "plateau.min_scale", config, "must be in [0, 1]")
  _require(
    not e.relative or e.min_delta < 1, "early_stop.min_delta", config, "must be below 1 if relative"
  )
  for key in ("early_stop.baseline", "early_stop.divergence"):
    value = get(config, key)
    _require(value is None or math.isfinite(value), key, config, "must be finite or None")
  for key in ("early_stop.patience", "early_stop.warmup_steps", "plateau.patience"):
    _require(get(config, key) < 2**31, key, config, "must be below 2**31")
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


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data`, `mesh.fsdp`, `mesh.tensor` (-1 takes the rest).

  Args:
    mesh: the `mesh` section of a config.
    num_devices: the number of devices to cover.

  Returns:
    The `(data, fsdp, tensor)` sizes, whose product is `num_devices`.

  Raises:
    ConfigError: when the sizes do not match the devices.
  """
  names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  for name, size in zip(names, sizes, strict=True):
    if size == 0 or size < -1:
      raise ConfigError(f"{name}={size} must be positive or -1")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"only one of {', '.join(names)} may be -1")
  fixed = 1
  for s in sizes:
    fixed *= s if s > 0 else 1
  desc = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
  if num_devices % fixed or (not free and fixed != num_devices):
    raise ConfigError(f"mesh {desc} does not match the {num_devices} devices")
  if free:
    sizes[free[0]] = num_devices // fixed
  return tuple(sizes)


def to_json(config: ml_collections.ConfigDict) -> str:
  """Returns the config as canonical JSON (sorted keys)."""
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=str)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Returns a short sha256 of the canonical JSON of `config`."""
  return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """Returns the value of a dotted `key`."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _require(ok: bool, key: str, config: ml_collections.ConfigDict, problem: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={get(config, key)!r} {problem}")


def _check_choice(config: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> None:
  _require(get(config, key) in choices, key, config, f"must be one of {', '.join(choices)}")


def _check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  defaults = get_config()
  base = dict(flatten(defaults))
  for key, value in flatten(config):
    if key.startswith("model."):
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
