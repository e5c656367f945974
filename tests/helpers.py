"""Small builders shared by the tests."""

import functools
import os
import time

import jax
import numpy as np
import optax

from jaxtrain import config as config_lib
from jaxtrain import losses, models, optim, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain.data import pipeline
from tests import commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """A small digits config; `overrides` maps dotted keys to values."""
  config = config_lib.get_config()
  config.data.name = "digits"
  config.train.steps = 40
  config.train.batch_size = 32
  config.train.steps_per_loop = 5
  config.train.log_every = 10
  config.eval.every_steps = 20
  config.eval.batch_size = 64
  for key, value in overrides.items():
    set_key(config, key, value)
  return config


def set_key(config, key, value):
  """Sets a dotted `key` of a config."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def mlp(hidden=(32,)):
  return functools.partial(models.MLP, 64, hidden, 10)


def adam():
  return optax.adam(1e-2)


def setup(mesh, model_fn=None, loss_fn=None, rules=sharding.DEFAULT_RULES):
  """A fresh state on `mesh`, its train step (Adam 1e-2) and its shardings."""
  tx = adam()
  graphdef, state = state_lib.create_state(model_fn or mlp(), tx, seed=0, mesh=mesh, rules=rules)
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=loss_fn or losses.classification,
    schedule=optim.schedule("constant", lr=1e-2, total_steps=100),
  )
  return state, step_fn, jax.tree.map(lambda x: x.sharding, state)


def no_votes(mesh):
  """The chunk's preemption votes when no process votes to stop."""
  return sharding.votes(mesh, 0)


def global_batches(source, batch_size, num, seed=0):
  """The first `num` global training batches, as numpy `[num, B, ...]`."""
  it = iter(
    pipeline.train_chunks(
      source, batch_size=batch_size, seed=seed, steps_per_loop=num, rows=(0, batch_size)
    )
  )
  return next(it)


def take(batches, index):
  """Indexes the leading axis of every array of a batch dict."""
  return {k: v[index] for k, v in batches.items()}


def max_abs_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def mesh(shape, n=None):
  return sharding.make_mesh(shape, jax.devices()[:n] if n else None)


def subprocess_env():
  """A user's environment for a child process: this checkout importable, one CPU device."""
  return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=commands.xla_flags())


def digits_cli(workdir, *overrides, timeout=180):
  """Runs `python -m experiments.digits --workdir=workdir *overrides` and returns the result."""
  return commands.run(["experiments.digits", f"--workdir={workdir}", *overrides], cwd=ROOT,
                      env=dict(os.environ, PYTHONPATH=ROOT), timeout=timeout)  # fmt: skip


class SlowSource:
  """A source that reads records one by one, each after `latency` seconds, like a remote disk.

  It has no vectorised `read`, so the pipeline takes the record-by-record path.
  """

  def __init__(self, source, latency):
    self.source, self.latency, self.name = source, latency, f"slow {source.name}"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    time.sleep(self.latency)
    return self.source[index]


def snapshot(folder):
  """Every file and folder under `folder`: a file's bytes and mtime, None for a folder.

  A folder's own mtime is left out: a writability probe made and removed in it
  changes it, and leaves nothing behind.
  """
  return {
    str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
    for p in sorted(folder.rglob("*"))
  }


def refused(result, expected):
  """Asserts exit status 2 and one line on stderr, `error: ...`, holding `expected`."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert expected in lines[0], lines[0]


def bytes_per_device(tree):
  """The most bytes of `tree`'s arrays that any one device holds."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def wait_for(predicate, proc, timeout=120):
  """Polls `predicate` until it holds; fails if `proc` ends first or `timeout` passes."""
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.002)
