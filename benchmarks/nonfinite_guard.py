"""The cost of the train step's non-finite guard, against the same step without one.

Three scanned chunks of `K` steps of the Fashion-MNIST MLP (784-512-512-10,
Adam 1e-3, batch 128) on one device, on the first `K` training batches:

- `none`: the update applied unconditionally (what a hand-written step does);
- `cond`: jaxtrain's `step.train_step`, whose update sits in a `lax.cond` on
  the finiteness of the loss and of one sum over the gradients;
- `where`: the unconditional update, then `jnp.where(finite, new, old)` over
  every leaf of the params and optimizer state.

The chunks run in alternation, so the machine's noise hits all three alike; the
script prints the median time per step and each variant's ratio to `none`.

    python benchmarks/nonfinite_guard.py
    python benchmarks/nonfinite_guard.py --chunks 400 --steps_per_loop 20
"""

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from jaxtrain import data, losses, models, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib

_CHUNKS = flags.DEFINE_integer("chunks", 200, "Timed chunks per variant.")
_K = flags.DEFINE_integer("steps_per_loop", 10, "Steps per chunk.")
_BATCH = 128


def unguarded_step(state: Any, batch: Any, *, graphdef: Any, tx: Any, where: bool) -> Any:
  """The plain step; with `where`, the result is selected leaf by leaf on finiteness."""
  from flax import nnx  # noqa: PLC0415 (only this variant needs it)

  def objective(params: Any) -> jax.Array:
    model = nnx.merge(graphdef, params, state.model_state)
    return losses.classification(model, batch, None)["loss"].mean()

  loss, grads = jax.value_and_grad(objective)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if where:
    finite = jnp.isfinite(loss) & jnp.isfinite(sum(jnp.sum(g) for g in jax.tree.leaves(grads)))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}


def main(argv: list[str]) -> None:
  """Times the three chunks in alternation and prints the ratios."""
  del argv
  if jax.device_count() != 1:
    raise app.UsageError("compares one-device steps: expose one device")
  k = _K.value
  mesh = sharding.make_mesh((1, 1, 1))
  tx = optax.adam(1e-3)
  model = functools.partial(models.MLP, 784, (512, 512), 10)
  graphdef, state = state_lib.create_state(model, tx, seed=0, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  train = data.fashion_mnist().train.arrays
  batches = {name: v[: k * _BATCH].reshape(k, _BATCH, *v.shape[1:]) for name, v in train.items()}
  batches = sharding.put_batch(batches, mesh, _BATCH, leading_dims=1)
  variants = {
    "none": functools.partial(unguarded_step, graphdef=graphdef, tx=tx, where=False),
    "cond": functools.partial(
      step_lib.train_step,
      graphdef=graphdef,
      tx=tx,
      loss_fn=losses.classification,
      schedule=optax.constant_schedule(1e-3),
    ),
    "where": functools.partial(unguarded_step, graphdef=graphdef, tx=tx, where=True),
  }
  chunks, states, times = {}, {}, {name: [] for name in variants}
  votes = sharding.votes(mesh, 0)
  for name, fn in variants.items():
    chunks[name] = step_lib.make_train_chunk(fn, shardings, mesh)
    states[name] = jax.tree.map(jnp.copy, state)
    states[name], m = chunks[name](states[name], batches, votes)  # compile and warm up
    jax.block_until_ready(m)
  for _ in range(_CHUNKS.value):
    for name, chunk in chunks.items():
      start = time.perf_counter()
      states[name], m = chunk(states[name], batches, votes)
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - start) / k)
  base = statistics.median(times["none"])
  print(f"device: {jax.devices()[0].device_kind}, {_CHUNKS.value} chunks of {k} steps each")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"{name:>5}: {median * 1e3:.3f} ms per step, ratio to none {median / base:.3f}")


if __name__ == "__main__":
  app.run(main)
