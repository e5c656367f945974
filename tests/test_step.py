"""The compiled step: scan equivalence, sharded equivalence, compile-once."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtrain import losses, models, monitor, optim, sharding
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from tests import helpers

K = 5
B = 32


@pytest.mark.parametrize("unroll", [1, 2, K])
def test_scanned_chunk_equals_single_steps(digits, unroll):
  mesh = helpers.mesh((1, 1, 1), n=1)
  batches = helpers.global_batches(digits.train, B, K)
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh, unroll)
  scanned, scanned_metrics = chunk_fn(
    state, sharding.put_batch(batches, mesh, B, 1), helpers.no_votes(mesh)
  )

  state, step_fn, _ = helpers.setup(mesh)
  single = jax.jit(step_fn)
  losses_ = []
  for k in range(K):
    state, m = single(state, jax.tree.map(lambda x, k=k: x[k], batches))
    losses_.append(float(m["loss"]))

  assert int(scanned.step) == int(state.step) == K
  assert helpers.max_abs_diff(scanned.params, state.params) < 1e-6
  assert helpers.max_abs_diff(scanned.opt_state, state.opt_state) < 1e-6
  np.testing.assert_allclose(scanned_metrics["loss"], losses_, atol=1e-6)
  assert losses_[-1] < losses_[0]  # the steps really train


def _run(mesh, batches, steps, rules=sharding.DEFAULT_RULES):
  state, step_fn, shardings = helpers.setup(mesh, rules=rules)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  chunk = sharding.put_batch(helpers.take(batches, slice(0, steps)), mesh, B, 1)
  state, m = chunk_fn(state, chunk, helpers.no_votes(mesh))
  return state, np.asarray(m["loss"])


@pytest.mark.parametrize(
  "shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1)], ids=["dp8", "fsdp8", "dp2xfsdp4"]
)
def test_sharded_run_matches_one_device(digits, shape):
  batches = helpers.global_batches(digits.train, B, 5)
  ref_state, ref_loss = _run(helpers.mesh((1, 1, 1), n=1), batches, 5)
  state, loss = _run(helpers.mesh(shape), batches, 5)

  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5
  kernel = state.params["hidden"][0]["kernel"]
  fsdp = shape[1]
  if fsdp > 1:  # the 64x32 kernel is sharded by its largest divisible dimension
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (64 // fsdp, 32)
    mu = state.opt_state[0].mu["hidden"][0]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
  else:
    assert kernel.sharding.is_fully_replicated


def _tensor_last_dim(shape, mesh):
  n = mesh.shape["tensor"]
  return P(*(None,) * (len(shape) - 1), "tensor") if shape[-1] % n == 0 else P()


def test_tensor_axis_rule_matches_one_device(digits):
  """A rules table that shards kernels' output dimension over the tensor axis."""
  batches = helpers.global_batches(digits.train, B, 5)
  rules = ((r"kernel", _tensor_last_dim), (r".*", sharding.replicate()))
  ref_state, ref_loss = _run(helpers.mesh((1, 1, 1), n=1), batches, 5)
  state, loss = _run(helpers.mesh((2, 2, 2)), batches, 5, rules)

  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  assert helpers.max_abs_diff(state.params, ref_state.params) < 1e-5
  assert state.params["head"]["kernel"].sharding.spec == P(None, "tensor")
  assert state.params["head"]["bias"].sharding.is_fully_replicated


def test_chunk_compiles_once_and_reports_a_recompile(digits):
  mesh = helpers.mesh((8, 1, 1))
  batches = helpers.global_batches(digits.train, B, 3 * K)
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  put = lambda start, stop: sharding.put_batch(  # noqa: E731
    helpers.take(batches, slice(start, stop)), mesh, B, 1
  )
  for i in range(3):
    state, _ = chunk_fn(state, put(i * K, (i + 1) * K), helpers.no_votes(mesh))
  assert step_lib.compilations(chunk_fn) == 1
  state, _ = chunk_fn(state, put(0, 2), helpers.no_votes(mesh))  # K=2 is another shape
  assert step_lib.compilations(chunk_fn) == 2


def test_step_rng_is_fold_in_of_step():
  """Two steps of the same state and batch differ only through fold_in(rng, step)."""

  def loss_fn(model, batch, rngs):
    noise = jax.random.uniform(rngs(), (batch["image"].shape[0],))
    out = losses.classification(model, batch, rngs)
    out["noise"] = noise
    return out

  state, step_fn, _ = helpers.setup(helpers.mesh((1, 1, 1), n=1), loss_fn=loss_fn)
  step_fn = jax.jit(step_fn)
  batch = {"image": np.zeros((4, 8, 8), np.float32), "label": np.zeros(4, np.int32)}
  s1, m1 = step_fn(state, batch)
  _, m2 = step_fn(s1, batch)
  _, m1_again = step_fn(state, batch)
  assert float(m1["noise"]) == float(m1_again["noise"])  # same step, same draw
  assert float(m1["noise"]) != float(m2["noise"])
  stream = nnx.Rngs(jax.random.fold_in(state.rng, 1))
  expected = jax.random.uniform(stream(), (4,))
  assert abs(float(m2["noise"]) - float(expected.mean())) < 1e-6


def test_auto_unroll_unrolls_convolutions_on_cpu():
  mesh = helpers.mesh((1, 1, 1), n=1)
  batch = {
    "image": jax.ShapeDtypeStruct((B, 8, 8), np.float32),
    "label": jax.ShapeDtypeStruct((B,), np.int32),
  }
  for model_fn, expected in [
    (helpers.mlp(), 1),
    (functools.partial(models.CNN, 8, 10, channels=(4,), dense=8), K),
  ]:
    state, step_fn, _ = helpers.setup(mesh, model_fn=model_fn)
    assert step_lib.auto_unroll(jax.make_jaxpr(step_fn)(state, batch), K) == expected


def test_one_vote_stops_every_process(digits):
  """A single device's vote reaches the replicated `stop` output (8 devices here)."""
  mesh = helpers.mesh((2, 4, 1))
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  batches = sharding.put_batch(helpers.global_batches(digits.train, B, 2), mesh, B, 1)
  votes = np.zeros(8, np.int32)
  state, m = chunk_fn(state, batches, jax.device_put(votes, sharding.vote_sharding(mesh)))
  assert int(m["stop"]) == 0
  votes[5] = 1
  state, m = chunk_fn(state, batches, jax.device_put(votes, sharding.vote_sharding(mesh)))
  assert int(m["stop"]) == 1 and m["stop"].sharding.is_fully_replicated
  assert step_lib.compilations(chunk_fn) == 1


def _with_nan(batches, index):
  images = np.array(batches["image"], dtype=np.float32)
  images[index, 0, 0] = np.nan
  return {**batches, "image": images}


def test_non_finite_batch_is_skipped_on_the_device(digits):
  """A NaN batch leaves params and optimizer state alone; the others train as if it were absent."""
  mesh = helpers.mesh((8, 1, 1))
  batches = helpers.global_batches(digits.train, B, 4)
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  poisoned = sharding.put_batch(_with_nan(batches, 1), mesh, B, 1)
  got, m = chunk_fn(state, poisoned, helpers.no_votes(mesh))
  assert list(np.asarray(m["skipped"])) == [0, 1, 0, 0]
  assert list(np.asarray(m["skipped_in_a_row"])) == [0, 1, 0, 0]
  assert int(got.step) == 4 and int(got.skipped) == 0

  state, _, _ = helpers.setup(mesh)
  single = jax.jit(step_fn)
  state, _ = single(state, helpers.take(batches, 0))
  before = jax.device_get(state)
  after, m = single(state, helpers.take(_with_nan(batches, 1), 1))
  assert float(m["skipped"]) == 1 and int(after.skipped) == 1
  assert helpers.max_abs_diff(after.params, before.params) == 0
  assert helpers.max_abs_diff(after.opt_state, before.opt_state) == 0  # Adam's count too
  for k in (2, 3):  # the chunk equals the three finite steps (the schedule is constant)
    after, _ = single(after, helpers.take(batches, k))
  assert helpers.max_abs_diff(got.params, after.params) < 1e-6


def test_skipped_in_a_row_counts_across_chunks(digits):
  mesh = helpers.mesh((8, 1, 1))
  batches = helpers.global_batches(digits.train, B, 3)
  state, step_fn, shardings = helpers.setup(mesh)
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  all_nan = {**batches, "image": np.full_like(batches["image"], np.nan, dtype=np.float32)}
  start = jax.device_get(state.params)
  for expected in ([1, 2, 3], [4, 5, 6]):
    state, m = chunk_fn(state, sharding.put_batch(all_nan, mesh, B, 1), helpers.no_votes(mesh))
    assert list(np.asarray(m["skipped_in_a_row"])) == expected
  assert helpers.max_abs_diff(state.params, start) == 0


def test_observe_sets_the_lr_multiplier_without_recompiling(digits):
  """Reduce-on-plateau changes one scalar of the state: the chunk keeps its executable."""
  mesh = helpers.mesh((8, 1, 1))
  watch = monitor.MonitorConfig(mode="min", patience=100, plateau_factor=0.5, plateau_patience=0)
  tx = optim.optimizer(optax.adam, 1e-2, multiplier=True)
  graphdef, state = state_lib.create_state(helpers.mlp(), tx, seed=0, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = functools.partial(
    step_lib.train_step,
    graphdef=graphdef,
    tx=tx,
    loss_fn=losses.classification,
    schedule=optax.constant_schedule(1e-2),
  )
  chunk_fn = step_lib.make_train_chunk(step_fn, shardings, mesh)
  observe = step_lib.make_observe(watch, shardings)
  chunk = sharding.put_batch(helpers.global_batches(digits.train, B, 2), mesh, B, 1)
  lrs = []
  for value in (1.0, 1.0, 1.0):  # improves, then two plateaus: x0.5 each
    state, m = chunk_fn(state, chunk, helpers.no_votes(mesh))
    lrs.append(float(m["lr"][-1]))
    state = observe(state, value)
  state, m = chunk_fn(state, chunk, helpers.no_votes(mesh))
  lrs.append(float(m["lr"][-1]))
  assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3])
  assert float(optax.tree_utils.tree_get(state.opt_state, "lr_multiplier")) == 0.25
  assert step_lib.compilations(chunk_fn) == 1
  assert step_lib.compilations(observe) == 1


def test_log_norms_are_the_gradient_parameter_and_update_norms(digits):
  mesh = helpers.mesh((1, 1, 1), n=1)
  tx = optax.sgd(0.1)
  graphdef, state = state_lib.create_state(helpers.mlp(), tx, seed=0, mesh=mesh)
  batch = helpers.take(helpers.global_batches(digits.train, 32, 1), 0)
  step = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                           loss_fn=losses.classification, log_norms=True)  # fmt: skip
  new, metrics = jax.jit(step)(state, batch)

  def loss(params):
    model = nnx.merge(graphdef, params, state.model_state)
    return losses.classification(model, batch, None)["loss"].mean()

  grad_norm = optax.global_norm(jax.grad(loss)(state.params))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["update_norm"], 0.1 * grad_norm, rtol=1e-4)
  np.testing.assert_allclose(metrics["param_norm"], optax.global_norm(new.params), rtol=1e-6)
  _, plain = jax.jit(functools.partial(step, log_norms=False))(state, batch)
  assert "grad_norm" not in plain
