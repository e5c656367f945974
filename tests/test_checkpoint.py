"""Checkpoints in one process: corruption fallback, resharding, retention, failures."""

import json
import logging
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxtrain
from jaxtrain import checkpoint, losses
from jaxtrain import state as state_lib
from tests import helpers


def _state(mesh, seed=0):
  """A small trained-looking state: init, then every leaf nudged by a seeded amount."""
  _, state = state_lib.create_state(helpers.mlp(), helpers.adam(), seed=seed, mesh=mesh)
  return jax.tree.map(lambda x: x + seed if x.dtype == np.float32 else x, state)


def _abstract(mesh):
  return state_lib.abstract_state(helpers.mlp(), helpers.adam(), seed=0, mesh=mesh)[1]


def _equal(a, b):
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in leaves)


def _save_steps(directory, mesh, steps, **kwargs):
  ckpt = checkpoint.Checkpointer(directory, keep=5, async_save=True, **kwargs)
  states = {}
  for step in steps:
    states[step] = _state(mesh, seed=step)
    ckpt.save(checkpoint.bundle(step, states[step], {"next_index": step}, {"note": step}))
  ckpt.close()
  return states


def _largest_data_file(step_dir):
  """The largest file of array data in a step's state (Orbax keeps them in `d/` folders)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _largest_data_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero(step_dir):
  f = _largest_data_file(step_dir)
  raw = bytearray(f.read_bytes())
  n = min(4096, len(raw) // 2)
  raw[len(raw) // 4 : len(raw) // 4 + n] = bytes(n)
  f.write_bytes(bytes(raw))


def _delete(step_dir):
  _largest_data_file(step_dir).unlink()


def _torn_meta(step_dir):
  f = next(p for p in (step_dir / "meta").iterdir() if p.name != "commit_success.txt")
  f.write_text("{")


@pytest.mark.parametrize(
  "damage",
  [_truncate, _zero, _delete, _torn_meta],
  ids=["truncated", "zeroed", "deleted-file", "torn-metadata"],
)
def test_damaged_newest_step_falls_back_to_the_previous(tmp_path, caplog, damage):
  mesh = helpers.mesh((1, 1, 1), n=1)
  states = _save_steps(tmp_path, mesh, [10, 20, 30])
  damage(tmp_path / "30")

  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True).restore(_abstract(mesh))

  assert restored.step == 20
  assert _equal(restored.state, states[20])
  assert restored.data_state == {"next_index": 20}
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "checkpoint step 30 is unreadable" in warnings[0].getMessage()
  assert "\n" not in warnings[0].getMessage()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == [
    "10",
    "20",
    "30.corrupt",
  ]


class _GrainItem:
  """The data item of steps written before the data position moved into the record."""

  def __init__(self, state):
    self.state = state

  def get_state(self):
    return json.dumps(self.state).encode()

  def set_state(self, raw):
    self.state = json.loads(raw)


def test_a_step_with_the_older_per_process_data_item_restores(tmp_path):
  mesh = helpers.mesh((1, 1, 1), n=1)
  state = _state(mesh, seed=7)
  manager = ocp.CheckpointManager(tmp_path)
  meta = {"checksums": checkpoint.checksums(state), "structure": checkpoint.structure(state)}
  manager.save(7, args=ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(_GrainItem({"next_batch": 7})),
    meta=ocp.args.JsonSave(meta),
  ))  # fmt: skip
  manager.wait_until_finished()
  manager.close()
  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False).restore(_abstract(mesh))
  assert (restored.step, restored.data_state) == (7, {"next_batch": 7})
  assert _equal(restored.state, state)


def test_empty_newer_folder_is_set_aside(tmp_path, caplog):
  mesh = helpers.mesh((1, 1, 1), n=1)
  _save_steps(tmp_path, mesh, [10, 20])
  (tmp_path / "30").mkdir()
  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True).restore(_abstract(mesh))
  assert restored.step == 20
  assert "checkpoint step 30 is unreadable" in caplog.text
  assert (tmp_path / "30.corrupt").is_dir() and (tmp_path / "10").is_dir()


def test_leftover_temporary_folder_is_reported_and_removed(tmp_path, caplog):
  mesh = helpers.mesh((1, 1, 1), n=1)
  _save_steps(tmp_path, mesh, [10, 20])
  shutil.copytree(tmp_path / "20", tmp_path / "30.orbax-checkpoint-tmp-1234")
  _truncate(tmp_path / "30.orbax-checkpoint-tmp-1234")
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True)
  assert ckpt.restore(_abstract(mesh)).step == 20
  ckpt.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [
    "checkpoint step 30 was never finished; removing 30.orbax-checkpoint-tmp-1234"
  ]
  assert not list(tmp_path.glob("*tmp*"))  # an unfinished save is never a valid step


def test_every_step_unreadable_raises_instead_of_starting_afresh(tmp_path):
  mesh = helpers.mesh((1, 1, 1), n=1)
  _save_steps(tmp_path, mesh, [10, 20])
  _delete(tmp_path / "10")
  _torn_meta(tmp_path / "20")
  refusal = r"every step is set aside as unreadable \(10.corrupt, 20.corrupt\).*move those"
  for _ in range(2):  # and a later attempt, which finds only set-aside steps, refuses too
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True)
    with pytest.raises(checkpoint.CheckpointError, match=refusal):
      ckpt.restore(_abstract(mesh))
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == [
      "10.corrupt",
      "20.corrupt",
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
  """A finished run of `tiny_config` saving steps 20 and 40; tests change only copies of it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = helpers.tiny_config(**{"ckpt.every_steps": 20})
  jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=workdir)
  return workdir


def test_another_model_is_refused_and_nothing_is_set_aside(tmp_path, digits, finished):
  config = helpers.tiny_config(**{"ckpt.every_steps": 20})
  shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
  lines = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(jaxtrain.ConfigError, match=r"another model .*head/kernel', \[32, 10\]"):
    jaxtrain.train(config, helpers.mlp((48,)), digits, losses.classification, workdir=tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["20", "40"]
  assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_checksums_catch_a_changed_value(tmp_path, caplog):
  """A step that reads without error but holds other numbers is rejected too."""
  mesh = helpers.mesh((1, 1, 1), n=1)
  _save_steps(tmp_path, mesh, [10])
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True)
  state = _state(mesh, seed=20)
  ckpt.save(checkpoint.bundle(20, state, None, {}))
  ckpt.wait()
  original = checkpoint.checksums(state)
  changed = state.replace(step=state.step + 1)
  assert checkpoint.checksums(changed) != original
  # Save the changed state under step 30 with the checksums of the original.
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(changed),
    meta=ocp.args.JsonSave(
      {"checksums": original, "structure": checkpoint.structure(changed), "data": None}
    ),
  )
  ckpt._manager.save(30, args=args, force=True)
  ckpt.close()
  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True).restore(_abstract(mesh))
  assert restored.step == 20
  assert "state checksums do not match" in caplog.text


@pytest.mark.parametrize(
  "saved_on,restored_on",
  [((1, 8, 1), (1, 1, 1)), ((1, 8, 1), (2, 4, 1)), ((1, 1, 1), (1, 8, 1)), ((8, 1, 1), (1, 8, 1))],
  ids=["fsdp8-to-1", "fsdp8-to-2x4", "1-to-fsdp8", "dp8-to-fsdp8"],
)
def test_restore_onto_another_layout(tmp_path, saved_on, restored_on):
  save_mesh = helpers.mesh(saved_on, n=int(np.prod(saved_on)))
  states = _save_steps(tmp_path, save_mesh, [10])
  restore_mesh = helpers.mesh(restored_on, n=int(np.prod(restored_on)))
  abstract = _abstract(restore_mesh)
  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True).restore(abstract)
  assert _equal(restored.state, states[10])
  kernel = restored.state.params["hidden"][0]["kernel"]
  assert kernel.sharding == abstract.params["hidden"][0]["kernel"].sharding
  assert checkpoint.checksums(restored.state) == checkpoint.checksums(states[10])


def test_newest_and_best_steps_are_kept(tmp_path):
  mesh = helpers.mesh((1, 1, 1), n=1)
  ckpt = checkpoint.Checkpointer(
    tmp_path, keep=2, async_save=True, best_metric="eval/accuracy", best_mode="max"
  )
  accuracy = {10: 0.5, 20: 0.9, 30: 0.7, 40: 0.6, 50: 0.8}
  for step, acc in accuracy.items():
    ckpt.save(checkpoint.bundle(step, _state(mesh), None, {}, {"eval/accuracy": acc}))
  ckpt.save(checkpoint.bundle(60, _state(mesh), None, {}))  # a periodic save without an evaluation
  ckpt.close()
  kept = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert kept == [20, 50, 60]  # the best (0.9) and the two newest


def test_best_step_survives_a_restart(tmp_path):
  mesh = helpers.mesh((1, 1, 1), n=1)
  options = {"keep": 2, "async_save": True, "best_metric": "eval/accuracy", "best_mode": "max"}
  ckpt = checkpoint.Checkpointer(tmp_path, **options)
  for step, acc in {10: 0.9, 20: 0.5}.items():
    ckpt.save(checkpoint.bundle(step, _state(mesh), None, {}, {"eval/accuracy": acc}))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, **options)  # a resumed run
  for step in (30, 40, 50):
    ckpt.save(checkpoint.bundle(step, _state(mesh), None, {}))
  ckpt.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [10, 40, 50]


def test_failed_save_raises_and_keeps_earlier_steps(tmp_path):
  mesh = helpers.mesh((1, 1, 1), n=1)
  directory = tmp_path / "ckpt"
  states = _save_steps(directory, mesh, [10])
  ckpt = checkpoint.Checkpointer(directory, keep=5, async_save=True)
  shutil.move(directory / "10", tmp_path / "10")
  shutil.rmtree(directory)
  directory.write_text("not a folder")  # every later write fails
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint save failed"):
    ckpt.save(checkpoint.bundle(20, _state(mesh), None, {}))
    ckpt.wait()
  ckpt.close()
  directory.unlink()
  directory.mkdir()
  shutil.move(tmp_path / "10", directory / "10")
  restored = checkpoint.Checkpointer(directory, keep=5, async_save=True).restore(_abstract(mesh))
  assert restored.step == 10 and _equal(restored.state, states[10])


def test_resume_refuses_a_changed_data_order(tmp_path, digits, finished):
  config = helpers.tiny_config(**{"ckpt.every_steps": 20})
  shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
  config.train.batch_size = 64
  with pytest.raises(jaxtrain.ConfigError, match=r"step 40: train\.batch_size 32 -> 64;"):
    jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)


def test_finished_run_rerun_changes_nothing(tmp_path, digits):
  config = helpers.tiny_config(**{"ckpt.every_steps": 20})
  first = jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)
  lines = (tmp_path / "metrics.jsonl").read_text()
  again = jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)
  assert _equal(first.state, again.state)
  assert again.eval_metrics == first.eval_metrics
  assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_longer_run_continues_a_finished_one(tmp_path, digits, finished):
  """Raising train.steps resumes the finished run: the same as running longer at once."""
  longer = helpers.tiny_config(**{"ckpt.every_steps": 20, "train.steps": 60})
  shutil.copytree(finished, tmp_path / "a")
  resumed = jaxtrain.train(
    longer, helpers.mlp(), digits, losses.classification, workdir=tmp_path / "a"
  )
  at_once = jaxtrain.train(
    longer, helpers.mlp(), digits, losses.classification, workdir=tmp_path / "b"
  )
  assert _equal(resumed.state.params, at_once.state.params)


def test_sharding_rules_of_the_state_are_kept_on_restore(tmp_path):
  """The restored state has the current run's shardings, ready for the compiled chunk."""
  mesh = helpers.mesh((2, 4, 1))
  _save_steps(tmp_path, mesh, [10])
  abstract = _abstract(mesh)
  restored = checkpoint.Checkpointer(tmp_path, keep=5, async_save=True).restore(abstract)
  for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(abstract), strict=True):
    assert leaf.sharding == want.sharding


def test_unusable_checkpoint_folder_is_reported_at_start(tmp_path, digits):
  (tmp_path / "checkpoints").write_text("a file where the folder should be")
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint folder .* is not usable"):
    jaxtrain.train(
      helpers.tiny_config(), helpers.mlp(), digits, losses.classification, workdir=tmp_path
    )
  assert not (tmp_path / "run.json").exists()  # nothing was started


def test_a_replicated_state_saves_without_compiling_a_program_per_slice(tmp_path):
  checkpoint.Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)  # registers the handler
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._min_slice_bytes_for_replica_parallel == checkpoint.MIN_REPLICA_SLICE_BYTES
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = {f"w{i}": jax.device_put(np.full((8, 40 + i), i, np.float32), replicated)
          for i in range(12)}  # fmt: skip
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if "compile" in event else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    manager = ocp.CheckpointManager(tmp_path / "plain")
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []  # by default, 12 shapes x 8 replicas of slicing programs
  restored = manager.restore(1, args=ocp.args.StandardRestore(tree))
  assert all(np.array_equal(restored[k], tree[k]) for k in tree)
