"""Exact evaluation: every example once, padding masked, sums on the devices.

Example:
  >>> evaluator = Evaluator(graphdef, losses.classification, ds.eval, batch_size=512,
  ...                       shardings=shardings, mesh=mesh)
  >>> evaluator(state)
  {'accuracy': 0.97, 'loss': 0.11}
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import precision, sharding
from jaxtrain import step as step_lib
from jaxtrain.data import pipeline
from jaxtrain.state import TrainState


class Evaluator:
  """One exact pass over an eval source: `evaluator(state) -> metric means`.

  Padded examples are masked out and every metric is summed on the devices,
  then divided by the number of real examples once, at the end. A given
  `eval_fn(state, batch) -> sums` (with `count`) replaces `step.eval_step`: a
  population's vmapped one gives `[P]` sums, which `sums()` returns as they are.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    loss_fn: step_lib.LossFn,
    source: Any,
    *,
    batch_size: int,
    shardings: TrainState,
    mesh: Mesh,
    policy: precision.Policy = precision.POLICIES["f32"],
    transform: Any = None,
    eval_fn: Any = None,
  ):
    if eval_fn is None:
      eval_fn = functools.partial(
        step_lib.eval_step, graphdef=graphdef, loss_fn=loss_fn, policy=policy
      )
    self._accumulate = step_lib.make_eval_accumulate(eval_fn, shardings, mesh)
    # Zero sums made on the devices (XLA drops the unused eval computation).
    self._zeros = jax.jit(
      lambda state, batch: jax.tree.map(jnp.zeros_like, eval_fn(state, batch)),
      out_shardings=NamedSharding(mesh, P()),
    )
    self._batches = pipeline.eval_batches(
      source,
      batch_size=batch_size,
      rows=sharding.process_rows(mesh, batch_size),
      transform=transform,
    )
    self._put = functools.partial(sharding.put_batch, mesh=mesh, batch_size=batch_size)
    # XLA's CPU backend can deadlock in a cross-device all-reduce when many
    # multi-device executions queue up (seen on 8 devices): there, one batch in flight.
    self._one_in_flight = mesh.devices.flat[0].platform == "cpu" and mesh.size > 1

  def __call__(self, state: TrainState) -> dict[str, float]:
    """Returns the mean of every metric over the eval source."""
    sums = self.sums(state)
    count = sums.pop("count")
    return {name: float(value / count) for name, value in sums.items()}

  def sums(self, state: TrainState) -> dict[str, np.ndarray]:
    """Returns the masked sums of every metric and `count`, on the host."""
    n = len(self._batches)
    batch = self._put(self._batches[0]) if n else None
    sums = self._zeros(state, batch) if n else None
    for j in range(n):  # read in order, in this thread
      sums = self._accumulate(sums, state, batch)
      if j + 1 < n:  # the next batch is read while this one runs
        batch = self._put(self._batches[j + 1])
      if self._one_in_flight:
        jax.block_until_ready(sums)
    return jax.device_get(sums)
