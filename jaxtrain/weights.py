"""Initial weights from elsewhere: a safetensors file, another run's checkpoint, a pretrained LLM.

The `init` config section names a source (`init.source`), how its tensor names
become parameter paths (`init.convert`, `init.map`; `init.convert=llama` reads
a GGUF file or a Hugging Face folder of a Llama-family decoder), which of its tensors to
leave out (`init.skip`), and which parameters may keep the model's own
initialisation (`init.fresh`; LoRA adapters always do). `plan` checks all of it
against the abstract parameters before anything is read or compiled: a source
tensor that names no parameter, a parameter the source lacks, or a shape that
differs is one line. `Initial.arrays` then reads the tensors, and
`jaxtrain.state.init_state` puts them into the new state before the optimizer
state is made for them.

Example:
  >>> initial = plan(config.init, abstract.params)       # ConfigError for any mismatch
  >>> initial.describe()["sha256"]
  '53aa5117...'
  >>> state = init_state(model_fn, tx, seed=0, abstract=abstract, loaded=initial.arrays())
"""

import hashlib
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxtrain import sharding
from jaxtrain.config import ConfigError, default
from jaxtrain.data.sources import DataError
from jaxtrain.models import bert, pretrained

CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
  "": lambda tensors: {name.replace(".", "/"): v for name, v in tensors.items()},
  "bert": bert.from_hf,
  "llama": None,  # a GGUF file or a Hugging Face folder of a Llama-family decoder (_pretrained)
}
ALWAYS_FRESH = (r"(^|/)lora_[ab]$",)  # new adapters: never in a source


class InitConfig(NamedTuple):
  """The `init` keys: the source, how its names convert and map, what is skipped or fresh."""

  source: str = default("init.source")
  convert: str = default("init.convert")
  map: tuple[str, ...] = default("init.map")
  skip: tuple[str, ...] = default("init.skip")
  fresh: tuple[str, ...] = default("init.fresh")


class Initial(NamedTuple):
  """What a run loads, planned and checked; nothing is read until `arrays`.

  Attributes:
    source: the file or checkpoint step read.
    kind: `safetensors`, `checkpoint`, `gguf` or `hf` (a Hugging Face folder).
    sha256: the file's sha256 (a folder's: of its files' sha256s), or for a
      checkpoint the sha256 of its parameters' bytes.
    names: `{parameter path: source path}` for each loaded parameter.
    fresh: the parameter paths that keep the model's own initialisation.
    read: returns `{source path: array}` for the given source paths.
  """

  source: str
  kind: str
  sha256: str
  names: dict[str, str]
  fresh: tuple[str, ...]
  read: Callable[[Sequence[str]], dict[str, np.ndarray]]

  def arrays(self) -> dict[str, np.ndarray]:
    """The loaded parameters' values, by parameter path."""
    values = self.read(sorted(set(self.names.values())))
    return {path: values[name] for path, name in self.names.items()}

  def describe(self) -> dict[str, Any]:
    """The run record's `initial_weights` entry."""
    adapters = [p for p in self.fresh if any(re.search(a, p) for a in ALWAYS_FRESH)]
    return {"source": "loaded", "path": self.source, "kind": self.kind, "sha256": self.sha256,
            "loaded": len(self.names), "fresh": [p for p in self.fresh if p not in adapters],
            "fresh_adapters": len(adapters)}  # fmt: skip


def _safetensors(path: pathlib.Path, convert: str) -> tuple[dict[str, tuple], Callable, dict]:
  """A safetensors file's shapes and a reader, by converted name, and each one's file name."""
  from safetensors import SafetensorError, safe_open  # noqa: PLC0415 (only when loading)

  try:
    with safe_open(str(path), framework="numpy") as f:
      shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
  except (SafetensorError, OSError) as e:
    raise ConfigError(f"init.source={str(path)!r} is not a readable safetensors file ({e})") from e
  converter = CONVERTERS[convert]
  fake = {k: np.lib.stride_tricks.as_strided(np.zeros((), np.float32), s, (0,) * len(s))
          for k, s in shapes.items()}  # fmt: skip
  converted = {k: tuple(v.shape) for k, v in converter(fake).items()}
  origin = {new: k for k, v in fake.items() for new in converter({k: v})}

  def read(names: Sequence[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # noqa: PLC0415

    values = converter(load_file(str(path)))
    return {n: values[n] for n in names}

  return converted, read, origin


def _checkpoint_step(path: pathlib.Path) -> pathlib.Path:
  """The step folder a source path names: a step, a `checkpoints/` folder or a workdir."""
  if (path / "state").is_dir():
    return path
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted((int(p.name), p) for p in folder.glob("*") if p.name.isdigit() and p.is_dir())
  if not steps:
    raise ConfigError(
      f"init.source={str(path)!r} holds no checkpoint step (give a .safetensors file, a "
      "workdir, its checkpoints/ folder or one step folder)"
    )
  return steps[-1][1]


def checkpoint_params(path: pathlib.Path) -> tuple[dict[str, tuple], Callable, pathlib.Path]:
  """A jaxtrain checkpoint's parameter shapes, a reader by `/` path, and its step folder.

  `path` is a workdir (its last step), its `checkpoints/` folder or one step.
  """
  path = pathlib.Path(path).absolute()  # Orbax needs absolute paths
  import orbax.checkpoint as ocp  # noqa: PLC0415

  step = _checkpoint_step(path)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    tree = checkpointer.metadata(step / "state").item_metadata.tree["params"]
  except Exception as e:  # an unreadable step: one line
    raise ConfigError(f"init.source: checkpoint {step} is unreadable ({type(e).__name__})") from e
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shapes = {sharding.path_str(p): tuple(m.shape) for p, m in flat}

  def read(names: Sequence[str]) -> dict[str, np.ndarray]:
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), {"params": tree})
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = checkpointer.restore(step / "state", args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore, partial_restore=True))  # fmt: skip
    values = {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      out["params"])[0]}  # fmt: skip
    return {n: values[n] for n in names}

  return shapes, read, step


def _renamed(name: str, mapping: Sequence[tuple[str, str]]) -> str:
  for pattern, replacement in mapping:
    if re.search(pattern, name):
      return re.sub(pattern, replacement, name, count=1)
  return name


def _pairs(entries: Sequence[str]) -> list[tuple[str, str]]:
  out = []
  for entry in entries:
    pattern, sep, replacement = str(entry).partition("=")
    try:
      re.compile(pattern)
      re.sub(pattern, replacement, "")
    except (re.error, IndexError) as e:
      raise ConfigError(f"init.map entry {entry!r} is not REGEX=REPLACEMENT ({e})") from None
    if not sep or not pattern:
      raise ConfigError(f"init.map entry {entry!r} is not REGEX=REPLACEMENT")
    out.append((pattern, replacement))
  return out


def check_config(init: InitConfig) -> None:
  """The `init` keys, without reading the source."""
  if init.convert not in CONVERTERS:
    known = ", ".join(map(repr, CONVERTERS))
    raise ConfigError(f"init.convert={init.convert!r} must be one of {known}")
  for key in ("skip", "fresh"):
    for pattern in getattr(init, key):
      try:
        re.compile(pattern)
      except (re.error, TypeError):
        raise ConfigError(f"init.{key} has a bad regular expression {pattern!r}") from None
  _pairs(init.map)
  if (init.map or init.skip or init.fresh) and not init.source:
    raise ConfigError("init.map, init.skip and init.fresh need init.source")


def _pretrained(path: pathlib.Path) -> tuple[str, dict[str, tuple], Callable, str]:
  """A pretrained decoder's kind, shapes, reader and sha256 (`models.pretrained.read`)."""
  from jaxtrain.models import hf, tuned  # noqa: PLC0415

  try:
    info, values, _ = pretrained.read(path)
  except DataError as e:
    raise ConfigError(f"init.source: {e}") from None
  loaded = {}

  def read(names: Sequence[str]) -> dict[str, np.ndarray]:
    if not loaded:
      loaded.update(values())
    return {n: loaded[n] for n in names}

  kind = "workdir" if (path / tuned.INFO).is_file() else "hf" if path.is_dir() else "gguf"
  digest = _arrays_sha(read, {n: n for n in hf.param_shapes(info.sizes)}) if kind == "workdir" \
    else pretrained.digest(path)  # fmt: skip
  return kind, hf.param_shapes(info.sizes), read, digest


def _open(source: str, convert: str) -> tuple[str, str, dict[str, tuple], Callable, dict, str]:
  """The step or file read, its kind, shapes, reader, names in the file (if renamed), sha256.

  The sha256 is known here for pretrained decoders only; else it is "".
  """
  path = pathlib.Path(source).expanduser().absolute()
  if not path.exists():
    raise ConfigError(f"init.source={source!r} does not exist")
  if convert == "llama":  # a GGUF file, a Hugging Face folder, or a fine-tuned run's workdir
    kind, shapes, read, digest = _pretrained(path)
    return str(path), kind, shapes, read, {}, digest
  if path.suffix == ".gguf":
    raise ConfigError(f"init.source={source!r} is a GGUF file: set init.convert=llama")
  if path.is_file():
    shapes, read, origin = _safetensors(path, convert)
    return str(path), "safetensors", shapes, read, origin, ""
  if convert:
    raise ConfigError(f"init.convert={convert!r} is for safetensors files, not a checkpoint")
  shapes, read, step = checkpoint_params(path)
  return str(step), "checkpoint", shapes, read, {}, ""


def plan(init: InitConfig, params: Any) -> Initial | None:
  """Checks the `init` section's source against the (abstract) parameters; None without one.

  Raises:
    ConfigError: in one line, for an unreadable source, a source tensor that
      names no parameter, a parameter the source lacks (unless `init.fresh`
      lets it start fresh), or a shape that differs.
  """
  check_config(init)
  if not init.source:
    return None
  source, kind, shapes, read, origin, sha = _open(init.source, init.convert)
  mapping = _pairs(init.map)
  wanted = {sharding.path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
  names = {}
  for name, shape in shapes.items():
    if any(re.search(p, name) for p in init.skip):
      continue
    path = _renamed(name, mapping)
    label = origin.get(name, name)
    if path not in wanted:
      shown = f"{label!r}{f' (as {path})' if path != label else ''}"
      raise ConfigError(
        f"init.source tensor {shown} names no parameter of this model{_closest(path, wanted)}; "
        "rename it with init.map or leave it out with init.skip"
      )
    if shape != wanted[path]:
      raise ConfigError(
        f"init.source tensor {label!r} gives {path} the shape {shape}, the model's is "
        f"{wanted[path]}; leave it out with init.skip (and start it afresh with init.fresh)"
      )
    names[path] = name
  fresh_ok = (*ALWAYS_FRESH, *init.fresh)
  missing = [p for p in wanted if p not in names and not any(re.search(f, p) for f in fresh_ok)]
  if missing:
    raise ConfigError(
      f"init.source lacks {len(missing)} parameter(s) of this model: {', '.join(missing[:3])}"
      f"{' ...' if len(missing) > 3 else ''}; list them in init.fresh to start them afresh"
    )
  if not sha:
    sha = pretrained.digest(source) if kind == "safetensors" else _arrays_sha(read, names)
  fresh = tuple(p for p in wanted if p not in names)
  return Initial(source, kind, sha, names, fresh, read)


def _arrays_sha(read: Callable, names: dict[str, str]) -> str:
  digest = hashlib.sha256()
  for name, value in sorted(read(sorted(set(names.values()))).items()):
    digest.update(name.encode() + str(value.dtype).encode() + np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def _closest(path: str, wanted: dict[str, Any]) -> str:
  import difflib  # noqa: PLC0415

  close = difflib.get_close_matches(path, list(wanted), n=1, cutoff=0.5)
  return f" (closest: {close[0]})" if close else ""


def strip(params: Any, omit: frozenset[str]) -> Any:
  """`params` without the leaves whose paths are in `omit` (emptied dicts dropped)."""
  if not omit:
    return params

  def walk(node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
      return node
    kept = {}
    for key, value in node.items():
      path = f"{prefix}{key}"
      if path in omit:
        continue
      child = walk(value, path + "/")
      if not (isinstance(child, dict) and not child and isinstance(value, dict) and value):
        kept[key] = child
    return kept

  return walk(params, "")


def fill(params: Any, full: Any) -> Any:
  """`full` with the leaves that `params` (a `strip`ped tree) holds taken from `params`."""
  if not isinstance(full, dict):
    return params
  return {k: fill(params[k], v) if k in params else v for k, v in full.items()}


def load(
  model: nnx.Module,
  source: str,
  *,
  convert: str = "",
  rename: Sequence[str] = (),
  skip: Sequence[str] = (),
  fresh: Sequence[str] = (),
) -> Initial:
  """Loads a source into an NNX model's parameters in place, as `init.*` would at a run's start.

  The arguments are the `init` keys (`rename` is `init.map`); a notebook can
  load pretrained weights into a model it drives by hand.

  Example:
    >>> encoder = bert.BertEncoder(cfg, rngs=nnx.Rngs(0))
    >>> load(encoder, "model.safetensors", convert="bert", rename=["^encoder/="])

  Returns:
    The checked `Initial` it loaded.
  """
  init = InitConfig(str(source), convert, tuple(rename), tuple(skip), tuple(fresh))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  initial = plan(init, params)
  values = initial.arrays()
  nnx.update(model, jax.tree_util.tree_map_with_path(
    lambda p, x: values.get(sharding.path_str(p), x), params))  # fmt: skip
  return initial
