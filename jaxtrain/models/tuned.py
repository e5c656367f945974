"""A fine-tuning run's model, read back from its workdir: its base, overlaid with its checkpoint.

A run that fine-tunes a pretrained decoder keeps `pretrained.json` (the base's
`Info`, its path and sha256) and `tokenizer.json` in its workdir (`files`).
`read` loads the base, puts the checkpoint's parameters over it (a run whose
base is frozen checkpoints only what trains), and merges LoRA adapters into
their kernels, in float32. The checkpoint is the step the run ended with: the
best evaluation's where it restored that one, else the last.

Example:
  >>> info, values, tokenizer = read("runs/sft")
  >>> values()["blocks/mlp/up/kernel"].shape      # (layers, width, mlp), adapters merged
"""

import json
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.models import hf, lora, pretrained

INFO = "pretrained.json"


def files(info: pretrained.Info, tokenizer, base: str | pathlib.Path) -> dict[str, str]:
  """The files a fine-tuning run keeps in its workdir: `pretrained.json` and `tokenizer.json`."""
  path = pathlib.Path(base).expanduser().absolute()
  described = {**info._asdict(), "base": str(path), "base_sha256": pretrained.digest(path)}
  return {INFO: json.dumps(described, indent=2) + "\n", "tokenizer.json": tokenizer.to_str()}


def _step(workdir: pathlib.Path) -> pathlib.Path:
  """The checkpoint step the run ended with (its restored best, or the last)."""
  record = workdir / "run.json"
  restored = hf.read_json(record).get("restored_step") if record.is_file() else None
  step = workdir / "checkpoints" / str(restored)
  return step if restored is not None and step.is_dir() else workdir


def read(workdir: str | pathlib.Path) -> tuple[pretrained.Info, Any, Any]:
  """A fine-tuning workdir's `Info`, a function returning its parameters, and its tokenizer.

  Raises:
    DataError: an unreadable `pretrained.json`, tokenizer or checkpoint, or a
      base that is missing or no longer the file the run trained from.
  """
  from jaxtrain import weights  # noqa: PLC0415 (Orbax: only when a workdir is read)

  workdir = pathlib.Path(workdir).expanduser().absolute()
  described = hf.read_json(workdir / INFO)
  base, sha = described.pop("base", None), described.pop("base_sha256", None)
  try:
    info = pretrained.Info(**described)
  except TypeError:
    raise DataError(f"{workdir / INFO}: not a description of a model") from None
  if not isinstance(base, str) or not pathlib.Path(base).exists():
    raise DataError(f"{workdir}: its base model {base} is missing")
  if pretrained.digest(base) != sha:
    raise DataError(f"{workdir}: its base {base} has changed since the run trained from it")
  tokenizer = pretrained.read_tokenizer(workdir / "tokenizer.json")
  try:
    shapes, read_params, _ = weights.checkpoint_params(_step(workdir))
  except ConfigError as e:
    raise DataError(f"{workdir}: {e}") from None
  _, base_values, _ = pretrained.read(base)

  def values() -> dict[str, np.ndarray]:
    flat = {k: np.asarray(v, np.float32) for k, v in base_values().items()}
    flat.update(read_params(sorted(shapes)))
    merged = lora.merge(traverse_util.unflatten_dict(flat, sep="/"))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(merged, sep="/").items()}

  return info, values, tokenizer
