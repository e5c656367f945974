"""Memory of the compiled train step under each precision policy, as ratios to f32.

For the Fashion-MNIST MLP (784-512-512-10, batch 128) and a small decoder
Transformer (vocabulary 256, context 256, width 256, 4 blocks, batch 32), the
script compiles jaxtrain's train step (Adam) under every policy and prints:
- `saved`: the activations the backward pass keeps (the residuals of
  `jax.vjp` of the loss, shapes and dtypes only), which do not depend on the
  backend; the policy's target is measured on them;
- `temp`: the compiled step's temporary buffers (`memory_analysis()`) on this
  backend; XLA:CPU's do not shrink under bfloat16, so on CPU this column does
  not show what an accelerator would;
- `params` and `opt`: the bytes of the parameters and of the optimizer state;
each with its ratio to the `f32` policy. With `--time`, it also times the steps
(median of `--steps` after a warm-up) and prints the ratio to f32: meaningful
on an accelerator; on CPU bfloat16 is not faster.

    python benchmarks/precision_memory.py
    python benchmarks/precision_memory.py --time --steps 50
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from jaxtrain import losses, models, precision, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib

_TIME = flags.DEFINE_bool("time", False, "Also time the steps.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per policy.")

MODELS = {
  "mlp": (
    functools.partial(models.MLP, 784, (512, 512), 10),
    losses.classification,
    {"image": ((128, 28, 28), jnp.float32), "label": ((128,), jnp.int32)},
  ),
  "transformer": (
    functools.partial(models.Transformer, 256, 256, 256, 4, 4),
    losses.next_token,
    {"tokens": ((32, 257), jnp.int32)},
  ),
}


def measure(model_fn, loss_fn, batch_shapes, policy_name):
  """Compiles the step under one policy; returns its byte counts and the compiled step."""
  policy = precision.get_policy(policy_name)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = optax.adam(1e-3)
  graphdef, abstract = state_lib.abstract_state(model_fn, tx, seed=0, mesh=mesh, policy=policy)
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=loss_fn,
    schedule=optax.constant_schedule(1e-3),
    policy=policy,
  )
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_shapes.items()}
  compiled = jax.jit(step_fn, donate_argnums=0).lower(abstract, batch).compile()
  sizes = {
    "saved": saved_bytes(graphdef, loss_fn, policy, abstract, batch),
    "temp": compiled.memory_analysis().temp_size_in_bytes,
    "params": precision.dtype_bytes(abstract.params),
    "opt": precision.dtype_bytes(abstract.opt_state),
  }
  return sizes, compiled, (model_fn, tx, abstract, policy, batch_shapes)


def saved_bytes(graphdef, loss_fn, policy, abstract, batch):
  """Bytes of what `jax.vjp` of the training loss keeps for the backward pass."""

  def loss(params, batch):
    model = nnx.merge(graphdef, policy.compute_params(params), abstract.model_state)
    policy.apply_to_model(model)
    model.train()
    return loss_fn(model, policy.cast_to_compute(batch), None)["loss"].astype(jnp.float32).mean()

  residuals = jax.eval_shape(
    lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], abstract.params, batch
  )
  return precision.dtype_bytes(residuals)


def time_steps(compiled, setup, steps):
  """The median seconds per step of the compiled step on a fresh state."""
  model_fn, tx, abstract, policy, batch_shapes = setup
  state = state_lib.init_state(model_fn, tx, seed=0, abstract=abstract, policy=policy)
  rng = np.random.default_rng(0)
  batch = {
    k: (rng.integers(0, 10, shape) if dtype == jnp.int32 else rng.normal(size=shape)).astype(dtype)
    for k, (shape, dtype) in batch_shapes.items()
  }
  times = []
  for i in range(steps + 3):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= 3:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}")
  for name, (model_fn, loss_fn, batch_shapes) in MODELS.items():
    base, base_time = None, None
    for policy_name in precision.POLICIES:
      sizes, compiled, setup = measure(model_fn, loss_fn, batch_shapes, policy_name)
      base = base or sizes
      line = ", ".join(f"{k} {v / 2**20:.2f} MiB ({v / base[k]:.2f}x)" for k, v in sizes.items())
      if _TIME.value:
        seconds = time_steps(compiled, setup, _STEPS.value)
        base_time = base_time or seconds
        line += f", step {seconds * 1e3:.2f} ms ({seconds / base_time:.2f}x)"
      print(f"{name:>11} {policy_name:>10}: {line}")


if __name__ == "__main__":
  app.run(main)
