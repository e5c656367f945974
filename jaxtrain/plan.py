r"""A run's memory per device, before it runs: state bytes, the compiled chunk, what fits.

    python -m jaxtrain.plan experiments.lm --device_memory=64MB
    python -m jaxtrain.plan experiments.lm --config=experiments/lm.py:gpu \
      --config.mesh.rules=fsdp

It takes an experiment's flags (`--config=FILE.py:PRESET`, `--config.KEY=VALUE`),
builds the run's abstract state on the mesh those describe (`jax.eval_shape`:
nothing is allocated), and compiles its train chunk ahead of time for that mesh, batch,
precision policy and remat, on the devices of this machine. It prints each
device's bytes of parameters, optimizer state and the rest of the state, and
the compiled chunk's arguments, temporaries (activations and gradients) and
peak from XLA's `memory_analysis()`, and with `loss.chunk` set, the peak the
whole logits would need instead. With `--device_memory`, it also searches,
for each remat policy the model offers (`model.remat`), the largest batch
(doubling from the data-parallel device count) whose compiled peak fits.
Nothing is trained or written.

An experiment module takes part by defining `get_config()` (or
`get_config(preset)`) and `task(config, workdir)`, which returns
the model, the dataset and the loss (and may return more after them).

From Python:
  >>> spec = jaxtrain.parts.prepare(config, model, dataset, loss)
  >>> plan.state_bytes(spec.abstract)     # {'params': ..., 'opt_state': ..., 'other': ...}
  >>> plan.chunk_memory(spec)["peak"]
"""

import copy
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from jaxtrain import cli, logs, step
from jaxtrain import config as config_lib
from jaxtrain import parts as parts_lib
from jaxtrain import sharding as sharding_lib
from jaxtrain.data import pipeline

REMAT = ("none", "dots-saveable", "full")
MOST_BATCH = 2**20
MOST_DEVICE_MEMORY = 2**50  # 1 PiB: far above any one accelerator's
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
  """`80GB` (10**9), `80GiB` (2**30), `512MB`, or a number of bytes, from 1 byte to 1 PiB."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise config_lib.ConfigError(f"--device_memory={text!r} must be a size such as 80GB or 16GiB")
  size = float(match.group(1)) * _UNITS[match.group(2).upper()]
  if not 1 <= size <= MOST_DEVICE_MEMORY:
    raise config_lib.ConfigError(
      f"--device_memory={text!r} must be from 1 byte to 1 PiB: one device's memory"
    )
  return int(size)


def human(n: float) -> str:
  """Bytes in binary units, such as `1.50 GiB`."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


def state_bytes(abstract: Any) -> dict[str, int]:
  """One device's bytes of the state's parameters, optimizer state and the rest.

  From the abstract state's shardings: each leaf's shard shape times its item
  size (the shards of a leaf are equal: the rules refuse uneven ones).
  """

  def held(tree: Any) -> int:
    return sum(
      int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
    )

  total = held(abstract)
  params, opt = held(abstract.params), held(abstract.opt_state)
  return {"params": params, "opt_state": opt, "other": total - params - opt}


def abstract_chunk(spec: parts_lib.Spec) -> Any:
  """The shapes of one `[K, B, ...]` train chunk as the stream puts it on the mesh.

  Read from the first records of the train source, after the image transform,
  so dtypes are the ones the chunk sees; nothing goes to the devices.
  """
  chunks = pipeline.train_chunks(
    spec.data.train,
    batch_size=spec.batch_size,
    seed=spec.data_seed,
    steps_per_loop=spec.steps_per_loop,
    rows=(0, spec.batch_size),
    transform=spec.augment[0],
  )
  host = next(iter(chunks))
  placed = sharding_lib.batch_sharding(spec.mesh, 1)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), host)


def chunk_memory(spec: parts_lib.Spec) -> dict[str, int]:
  """One device's memory of the compiled train chunk (`step.compiled_memory`), in bytes."""
  shardings = jax.tree.map(lambda x: x.sharding, spec.abstract)
  jitted = step.make_train_chunk(spec.step_fn, shardings, spec.mesh, spec.unroll)
  votes = jax.ShapeDtypeStruct(
    (spec.mesh.size,), np.int32, sharding=sharding_lib.vote_sharding(spec.mesh)
  )
  with jax.set_mesh(spec.mesh):
    return step.compiled_memory(jitted, spec.abstract, abstract_chunk(spec), votes)


def search(
  config: ml_collections.ConfigDict, task: Any, workdir: str | None, device_memory: int
) -> list[tuple[str, int, int | None, str]]:
  """For each remat policy, the largest batch (doubling from the dp devices) that fits.

  Batches start at the data-parallel device count and double, each compiled
  ahead of time, until one does not fit or the train records run out; the
  eval batch is left as configured.

  Returns:
    `(remat, batch or 0 when none fits, its peak bytes or None, what ended the
    search)` per policy.
  """
  remats = REMAT if "remat" in config.model else (None,)
  shape = sharding_lib.mesh_shape(config.mesh, jax.device_count())
  rows = []
  for remat in remats:
    trial = copy.deepcopy(config)
    if remat is not None:
      trial.model.remat = remat
    model, dataset, loss = task(trial, workdir)[:3]
    best, peak, batch, end = 0, None, shape[0] * shape[1], "memory"
    while True:
      if batch > min(MOST_BATCH, len(dataset.train)):
        end = f"the {len(dataset.train)} train records"
        break
      trial.train.batch_size = batch
      try:
        memory = chunk_memory(parts_lib.prepare(trial, model, dataset, loss))["peak"]
      except config_lib.ConfigError as e:  # e.g. the host-memory check of a CPU plan
        end = f"batch {batch} refused: {logs.brief(e, 120)}"
        break
      if memory > device_memory:
        break
      best, peak, batch = batch, memory, batch * 2
    rows.append((remat or "-", best, peak, end))
  return rows


def _prepare(config: ml_collections.ConfigDict, task: Any, workdir: str | None) -> parts_lib.Spec:
  model, dataset, loss = task(config, workdir)[:3]
  return parts_lib.prepare(config, model, dataset, loss)


def report(
  name: str, spec: parts_lib.Spec, config: ml_collections.ConfigDict, memory: dict[str, int]
) -> list[str]:
  """The plan's lines for one prepared run whose chunk takes `memory` (`chunk_memory`)."""
  mesh = spec.mesh
  device = jax.devices()[0]
  held = state_bytes(spec.abstract)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract.params))
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return [
    f"plan for {name} on {mesh.size} {device.platform} devices ({device.device_kind}), "
    f"mesh {axes}, mesh.rules={config.mesh.rules}",
    f"  {count:,} parameters; batch {spec.batch_size}, {spec.steps_per_loop} steps per chunk, "
    f"precision {config.precision.policy}" + _remat(config),
    "per device:",
    f"  parameters       {human(held['params']):>12}",
    f"  optimizer state  {human(held['opt_state']):>12}",
    f"  other state      {human(held['other']):>12}",
    f"  chunk arguments  {human(memory['argument']):>12}  (the state and a chunk of batches)",
    f"  temporaries      {human(memory['temp']):>12}  (activations, gradients, updates)",
    f"  new outputs      {human(memory['output'] - memory['alias']):>12}  "
    f"(of {human(memory['output'])}; the rest reuse the donated state)",
    f"  peak             {human(memory['peak']):>12}  (the compiled chunk's, XLA memory_analysis)",
  ]


def logits_saving(
  config: ml_collections.ConfigDict, task: Any, workdir: str | None, peak: int
) -> str:
  """The line comparing the chunked loss's peak with the whole logits' (`loss.chunk=0`)."""
  whole = copy.deepcopy(config)
  whole.loss.chunk = 0
  other = chunk_memory(_prepare(whole, task, workdir))["peak"]
  return (f"loss.chunk={config.loss.chunk}: peak {human(peak)}, against {human(other)} with "
          f"the whole [B, T, vocab] logits (loss.chunk=0): {human(other - peak)} less")  # fmt: skip


def _remat(config: ml_collections.ConfigDict) -> str:
  return f", remat {config.model.remat}" if "remat" in config.model else ""


def main(argv: list[str]) -> None:
  """Prints the plan of the experiment named on the command line."""
  del argv
  f = flags.FLAGS
  module = sys.modules["jaxtrain_plan_experiment"]
  config = f.config
  limit = parse_bytes(f.device_memory) if f.device_memory is not None else None
  spec = _prepare(config, module.task, f.workdir)
  memory = chunk_memory(spec)  # compiled once, for every line below
  lines = report(module.__name__, spec, config, memory)
  if config.loss.chunk:
    lines.append(logits_saving(config, module.task, f.workdir, memory["peak"]))
  if limit:
    peak = memory["peak"]
    verdict = "fits" if peak <= limit else "does NOT fit"
    lines.append(f"device memory {human(limit)}: this run {verdict} ({peak / limit:.0%} of it)")
    lines.append("largest batch that fits (doubling from the data-parallel devices), by remat:")
    for remat, batch, best, end in search(config, module.task, f.workdir, limit):
      shown = f"batch {batch:>8}  peak {human(best):>12}" if batch else "no batch fits"
      lines.append(f"  remat {remat:<14} {shown}  (limited by {end})")
  print("\n".join(lines))


def _load(argv: list[str]) -> Any:
  """Imports the experiment named by the first argument that is not a flag; removes it."""
  names = [a for a in argv[1:] if not a.startswith("-")]
  if not names and cli.asks_help():
    print(cli.usage())
    sys.exit(0)
  if not names:
    cli.fail("usage: python -m jaxtrain.plan EXPERIMENT [--config=FILE.py:PRESET] "
             "[--config.KEY=VALUE ...] [--device_memory=80GB]")  # fmt: skip
  argv.remove(names[0])
  try:
    module = cli.import_experiment(names[0])
  except config_lib.ConfigError as e:
    cli.fail(f"{e}; it cannot be planned" if "defines no" in str(e) else str(e))
  sys.modules["jaxtrain_plan_experiment"] = module
  return module


def define_flags() -> None:
  """The plan's own flags (the experiment's `--config` comes from its module)."""
  flags.DEFINE_string(
    "workdir", None, "Optional: a run's folder, whose saved tokenizer is read rather than trained."
  )
  flags.DEFINE_string(
    "device_memory", None,
    "One device's memory, e.g. 80GB (10^9 bytes) or 16GiB (2^30): also find the largest "
    "batch that fits.",
  )  # fmt: skip


if __name__ == "__main__":
  define_flags()
  experiment = _load(sys.argv)
  cli.define_experiment_config(experiment)
  cli.run(main)
