"""Checks of the user's model, loss, optimizer and data before anything is compiled or written.

`train` (through `jaxtrain.build`) traces the model, the loss and the train
step with abstract shapes only (`jax.eval_shape`, `jax.make_jaxpr`), on one
train and one eval batch, so a mistake in the user's code or data stops the run
with one line naming the argument, field or key and what was expected,
instead of a traceback from inside `jit` or a failure after hours of training.
Every check raises `ConfigError` (code and config) or `DataError` (records).

Example:
  >>> check_model_fn(functools.partial(models.MLP, 64, (128,), 10))
  >>> names = check_loss(graphdef, abstract, losses.classification, batch, split="train")
"""

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxtrain import logs, losses, precision, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError, Dataset, check_labels

Batch = dict[str, jax.ShapeDtypeStruct]
_USER_ERRORS = (ConfigError, DataError)


def check_model_fn(model: Any) -> None:
  """Raises `ConfigError` unless `model` builds a model from `rngs=` (a class or a partial)."""
  if isinstance(model, nnx.Module):
    raise ConfigError(
      f"model is an already built {type(model).__name__}; pass what builds it from rngs=, "
      f"such as functools.partial({type(model).__name__}, ...), so train can create it sharded"
    )
  if not callable(model):
    raise ConfigError(f"model is a {type(model).__name__}; pass a function of rngs= that builds it")


def graphdef(model: state_lib.ModelFn) -> nnx.GraphDef:
  """The model's graph definition, built abstractly; a failure is one line."""
  try:
    return state_lib.graphdef_of(model)
  except _USER_ERRORS:
    raise
  except Exception as e:
    raise _user_error(f"model: building it with rngs= failed: {logs.brief(e)}", e) from e


def abstract_batch(source: Any, batch_size: int, mask: bool = False) -> Batch:
  """The shapes of one global batch, from the source's first record (with `mask` for eval)."""
  batch = {
    k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype)
    for k, v in source[0].items()
  }
  if mask:
    batch["mask"] = jax.ShapeDtypeStruct((batch_size,), np.int32)
  return batch


def check_loss(
  graph: nnx.GraphDef,
  abstract: state_lib.TrainState,
  loss_fn: step_lib.LossFn,
  batch: Batch,
  *,
  split: str,
  policy: precision.Policy = precision.POLICIES["f32"],
) -> list[str]:
  """Traces `loss_fn` on one abstract batch and checks what it returns.

  Args:
    graph: the model's graph definition.
    abstract: the abstract state.
    loss_fn: the user's loss.
    batch: the abstract batch (`abstract_batch`).
    split: `train` (training mode, with rngs) or `eval` (eval mode, rngs None).
    policy: the precision policy the step applies.

  Returns:
    The names of the per-example values the loss returns.

  Raises:
    ConfigError: the loss fails, or does not return a dict of `[B]` arrays
      with `loss`.
    DataError: it reads a field the records lack.
  """

  def run(params: Any, model_state: Any, batch: Batch) -> Any:
    model = step_lib.compute_model(graph, params, model_state, policy)
    model.train() if split == "train" else model.eval()
    rngs = step_lib.step_rngs(jax.random.PRNGKey(0)) if split == "train" else None
    return loss_fn(model, policy.cast_to_compute(batch), rngs)

  out = _trace(
    f"loss_fn on a {split} batch ({_describe(batch)})",
    lambda: jax.eval_shape(run, abstract.params, abstract.model_state, batch),
    fields=batch,
  )
  return _check_outputs(out, len_of(batch), split)


def _check_outputs(out: Any, size: int, split: str) -> list[str]:
  if not isinstance(out, Mapping):
    raise ConfigError(
      f"loss_fn must return a dict of per-example arrays with 'loss'; it returned "
      f"{type(out).__name__}"
    )
  if "loss" not in out:
    raise ConfigError(f"loss_fn returned no 'loss' on a {split} batch (it returned {sorted(out)})")
  for name, value in out.items():
    shape = getattr(value, "shape", None)
    if shape != (size,):
      raise ConfigError(
        f"loss_fn's {name!r} has shape {shape} on a {split} batch of {size}; it must be one "
        f"value per example, shape ({size},): return it before averaging over the batch"
      )
    real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    if not (real or value.dtype == jnp.bool_):
      raise ConfigError(f"loss_fn's {name!r} has dtype {value.dtype}; it must be real numbers")
  if not jnp.issubdtype(out["loss"].dtype, jnp.floating):
    raise ConfigError(
      f"loss_fn's 'loss' has dtype {out['loss'].dtype}; it must be floating point (an "
      "integer loss passes no gradient back)"
    )
  return sorted(out)


def trace_step(
  step_fn: Callable[..., Any], abstract: state_lib.TrainState, batch: Batch
) -> jax.extend.core.ClosedJaxpr:
  """The train step's jaxpr on abstract inputs; a failure (say, in the optimizer) is one line."""
  return _trace(
    f"the train step on a batch ({_describe(batch)})",
    lambda: jax.make_jaxpr(step_fn)(abstract, batch),
    fields=batch,
  )


def _trace(what: str, fn: Callable[[], Any], fields: Batch) -> Any:
  try:
    return fn()
  except _USER_ERRORS:
    raise
  except KeyError as e:
    key = e.args[0] if e.args else None
    if isinstance(key, str) and key not in fields:
      raise DataError(
        f"{what.split(' on ', maxsplit=1)[0]} reads batch field {key!r}, which the records lack "
        f"(they hold {', '.join(sorted(k for k in fields if k != 'mask'))})"
      ) from e
    raise _user_error(f"{what} failed: {logs.brief(e)}", e) from e
  except Exception as e:
    raise _user_error(f"{what} failed: {logs.brief(e)}", e) from e


def check_ranges(data: Dataset, ranges: Iterable[tuple[str, int, int, str]]) -> None:
  """Checks every record's integer fields against the ranges the loss declared."""
  for field, low, high, why in sorted(set(ranges)):
    for source in (data.train, data.eval):
      check_labels(source, high, field, low=low, why=why)


def check_sizes(*, train_size: int, batch_size: int, crop_padding: int, batch: Batch) -> None:
  """The train batch must fit the train set; a crop's padding must be below the image size."""
  if batch_size > train_size:
    raise ConfigError(
      f"train.batch_size={batch_size} is larger than the {train_size} train records; "
      "a batch would repeat records"
    )
  if crop_padding:
    image = batch.get("image")
    if image is None or len(image.shape) < 3:
      raise ConfigError(
        f"data.crop_padding={crop_padding} needs an image field of [H, W] or [H, W, C] records"
      )
    size = min(image.shape[1:3])
    if crop_padding >= size:
      raise ConfigError(
        f"data.crop_padding={crop_padding} must be below the images' size "
        f"{image.shape[1]}x{image.shape[2]}"
      )


def check_paths(params: Any, patterns: dict[str, Iterable[str]]) -> frozenset[str]:
  """Every pattern of each key (`optim.freeze`, ...) must match a parameter; not all frozen.

  Args:
    params: the (abstract) parameters.
    patterns: `{config key: regexes}`; `optim.freeze` and `optim.trainable` also
      decide which parameters never train.

  Returns:
    The paths of the parameters that never train.

  Raises:
    ConfigError: naming the key and the pattern (a typo in a regex otherwise freezes or
      scales nothing, silently), or when nothing would train.
  """
  paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if not paths:
    raise ConfigError("the model has no parameters (no nnx.Param) to train")
  shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
  for key, found in patterns.items():
    for pattern in found:
      if not any(re.search(pattern, path) for path in paths):
        raise ConfigError(f"{key}: {pattern!r} matches no parameter (the paths: {shown})")
  freeze = list(patterns.get("optim.freeze", ()))
  trainable = list(patterns.get("optim.trainable", ()))
  frozen = frozenset(
    path for path in paths
    if any(re.search(p, path) for p in freeze)
    or (trainable and not any(re.search(p, path) for p in trainable))
  )  # fmt: skip
  if len(frozen) == len(paths) and not trainable:
    raise ConfigError(
      f"optim.freeze={tuple(freeze)!r} matches every parameter ({shown}); nothing would train"
    )
  if len(frozen) == len(paths):
    raise ConfigError(f"optim.freeze and optim.trainable leave no parameter to train ({shown})")
  return frozen


def check_metric(key: str, metric: str, names: Iterable[str]) -> None:
  """Raises `ConfigError` when a configured `eval/NAME` is not a value the loss returns."""
  names = sorted(names)
  if metric and metric.removeprefix("eval/") not in names:
    raise ConfigError(
      f"{key}={metric!r} is not an eval metric of the loss (eval/{', eval/'.join(names)})"
    )


def check_memory(key: str, value: int, records: int, largest: int, data_parallel: int) -> None:
  """Refuses a batch whose records and largest activation would not fit in memory.

  The estimate needs only shapes: the records' bytes (read on the host, then
  put on the devices) plus the largest single value the step makes. On CPU
  every device shares host memory; elsewhere each holds its share.

  Args:
    key: the config key that sets the batch, for the message.
    value: its value.
    records: the bytes of the records read at once (`batch_bytes`).
    largest: the bytes of the step's largest value (`largest_value`).
    data_parallel: the devices the batch is split over.
  """
  free, where = available_memory()
  if free is None:
    return
  on_host = jax.default_backend() == "cpu"
  need = 2 * records + largest if on_host else (records + largest) // data_parallel
  if need > free:
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    raise ConfigError(
      f"{key}={value} needs about {gib(need)}: the records read at once take {gib(records)} "
      f"and the step's largest value (an activation or parameter of the model) "
      f"{gib(largest)}, more than the {gib(free)} free {where}; lower {key} or the model's size"
    )


def batch_bytes(batch: Batch) -> int:
  """The bytes of an abstract batch."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in batch.values())


def largest_value(jaxpr: jax.extend.core.ClosedJaxpr) -> int:
  """The bytes of the largest value any equation of `jaxpr` (or its sub-jaxprs) makes."""
  return _largest(jaxpr.jaxpr)


def _largest(jaxpr: jax.extend.core.Jaxpr) -> int:
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if hasattr(aval, "shape") and not jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):
        largest = max(largest, math.prod(aval.shape) * np.dtype(aval.dtype).itemsize)
  for sub in jax.extend.core.subjaxprs(jaxpr):
    largest = max(largest, _largest(sub))
  return largest


def available_memory() -> tuple[int | None, str]:
  """Free bytes on the first local device (host memory on CPU), and where they are."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"on each {device.device_kind}"
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "in host memory"
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "in host memory"
  except (ValueError, OSError, AttributeError):
    return None, ""


def len_of(batch: Batch) -> int:
  """The batch size of an abstract batch."""
  return next(iter(batch.values())).shape[0]


def _describe(batch: Batch) -> str:
  return ", ".join(f"{k} {np.dtype(v.dtype).name}{list(v.shape)}" for k, v in batch.items())


def _user_error(message: str, error: BaseException) -> ConfigError:
  logging.info("%s", message, exc_info=error)  # the traceback, for --verbosity=0
  return ConfigError(message)


def check_steps(
  *,
  loss_fn: step_lib.LossFn,
  step_fn: step_lib.StepFn,
  graphdef: nnx.GraphDef,
  abstract: state_lib.TrainState,
  policy: precision.Policy,
  data: Dataset,
  batches: tuple[Batch, Batch],
  mesh: Mesh,
  metrics: Mapping[str, str],
  steps_per_loop: int,
) -> tuple[list[str], jax.extend.core.ClosedJaxpr]:
  """Traces the loss and both steps; checks outputs, ranges, metric names and memory.

  Args:
    loss_fn: the loss.
    step_fn: the train step.
    graphdef: the model's graph definition.
    abstract: the abstract state.
    policy: the precision policy.
    data: the dataset, whose records are checked against the loss's ranges.
    batches: the abstract train and eval batches.
    mesh: the mesh.
    metrics: config keys naming eval metrics (`early_stop.metric`), and their values.
    steps_per_loop: the batches read at once for a chunk.

  Returns:
    The eval metrics' names, and the train step's jaxpr.
  """
  train_batch, eval_batch = batches
  with losses.expected_ranges() as ranges:
    check_loss(graphdef, abstract, loss_fn, train_batch, split="train", policy=policy)
    names = check_loss(graphdef, abstract, loss_fn, eval_batch, split="eval", policy=policy)
  check_ranges(data, ranges)
  for key, metric in metrics.items():
    check_metric(key, metric, names)
  train_jaxpr = trace_step(step_fn, abstract, train_batch)
  eval_fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_fn=loss_fn, policy=policy)
  eval_jaxpr = trace_step(eval_fn, abstract, eval_batch)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  for key, batch, jaxpr, copies in (
    ("train.batch_size", train_batch, train_jaxpr, steps_per_loop),
    ("eval.batch_size", eval_batch, eval_jaxpr, 1),
  ):
    records = copies * batch_bytes(batch)
    check_memory(key, len_of(batch), records, largest_value(jaxpr), data_parallel)
  return names, train_jaxpr
