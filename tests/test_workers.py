"""The stream's state is the next batch: worker counts and chunk sizes change freely.

`data.workers=-1` times training and reading and picks the workers from them.
"""

import json

import pytest

import jaxtrain
from jaxtrain import checkpoint, losses, resume
from jaxtrain.data import Dataset, pipeline
from tests import helpers


@pytest.mark.parametrize(
  ("read_s", "put_s", "train_s", "limit", "want"),
  [
    (0.010, 0.002, 0.030, 8, 0),  # 12 ms <= 30 / 1.5 ms: the thread keeps ahead
    (0.750, 0.250, 1.500, 8, 0),  # exactly at the budget
    (0.000, 0.030, 0.030, 8, 0),  # bound by the put alone, with nothing to read
    (0.050, 0.002, 0.030, 8, 3),  # 50 / (20 - 2) = 2.8
    (0.500, 0.000, 0.030, 8, 8),  # capped by the limit
    (0.500, 0.000, 0.030, 1, 0),  # one worker reads no faster than the thread
    (0.035, 0.001, 0.045, 1, 0),
    (0.035, 0.001, 0.045, 2, 2),
    (0.050, 0.025, 0.030, 8, 2),  # the put alone misses the budget: read as fast as it puts
    (0.300, 0.025, 0.030, 4, 4),
    (0.020, 0.025, 0.030, 8, 0),  # ... which one worker would do: no gain
  ],
)
def test_choose_workers(read_s, put_s, train_s, limit, want):
  assert pipeline.choose_workers(read_s, put_s, train_s, limit) == want


def test_auto_workers_skips_compilation_and_the_first_read():
  tuner = pipeline.AutoWorkers(limit=4, probes=2)
  reads = [(9.0, 0.0), (0.05, 0.002), (0.05, 0.002), (0.06, 0.002)]
  assert tuner.add(5.0, True, reads[:1]) is None and tuner.timing  # compiled: not counted
  assert tuner.add(0.030, False, reads[:3]) is None
  measured = tuner.add(0.030, False, reads)
  assert measured == {"workers": 3, "read_s": 0.05, "put_s": 0.002, "train_s": 0.030}
  assert not tuner.timing


def _run(data, workdir, **overrides):
  config = helpers.tiny_config(**{"eval.every_steps": 20, "ckpt.every_steps": 20, **overrides})
  return jaxtrain.train(config, helpers.mlp(), data, losses.classification, workdir=workdir)


def test_auto_workers_start_workers_for_a_slow_source_and_keep_the_batches(tmp_path, digits):
  """Record reads of 0.3 ms make a chunk read ~50x slower than it trains: workers start."""
  slow = Dataset(digits.name, helpers.SlowSource(digits.train, 3e-4), digits.eval)
  auto = _run(
    slow, tmp_path / "auto", **{"data.workers": -1, "data.max_workers": 2, "train.steps": 60}
  )
  plain = _run(digits, tmp_path / "plain", **{"train.steps": 60})
  run = json.loads((tmp_path / "auto" / "run.json").read_text())
  chosen = run["data_workers"]
  assert chosen["workers"] == 2  # data.max_workers
  assert chosen["at_step"] == 20  # the compiled chunk, then 3 timed ones of 5 steps
  assert chosen["read_s"] > chosen["train_s"]
  assert run["train_chunk_compilations"] == 1
  assert helpers.max_abs_diff(auto.state.params, plain.state.params) == 0


def test_auto_workers_keep_a_fast_source_in_process(tmp_path, digits):
  """A vectorised in-memory read keeps ahead of a 1024-wide MLP's training: no worker starts."""
  config = helpers.tiny_config(**{"data.workers": -1, "data.max_workers": 8})
  model = helpers.mlp((1024, 1024))
  jaxtrain.train(config, model, digits, losses.classification, workdir=tmp_path)
  chosen = json.loads((tmp_path / "run.json").read_text())["data_workers"]
  assert chosen["workers"] == 0 and chosen["read_s"] + chosen["put_s"] < chosen["train_s"]


def test_a_source_workers_cannot_take_is_refused_or_kept_in_process(tmp_path, digits):
  """Explicit workers: one DataError before training; auto: a warning, and no workers."""
  slow = helpers.SlowSource(digits.train, 3e-4)
  slow.hook = lambda: None  # a lambda cannot be pickled
  unpicklable = Dataset(digits.name, slow, digits.eval)
  with pytest.raises(jaxtrain.DataError, match=r"data\.workers=2: the source or transform cannot"):
    _run(unpicklable, tmp_path / "explicit", **{"data.workers": 2})
  _run(unpicklable, tmp_path / "auto", **{"data.workers": -1, "data.max_workers": 2})
  chosen = json.loads((tmp_path / "auto" / "run.json").read_text())["data_workers"]
  assert chosen["workers"] == 0 and chosen["read_s"] > chosen["train_s"]


def test_resume_with_other_workers_and_chunk_size_sees_the_same_batches(tmp_path, digits):
  """Stop at step 20 in process; resume with 2 workers and 10-step chunks; equal the whole run."""
  whole = _run(digits, tmp_path / "whole", **{"train.steps": 60})
  _run(digits, tmp_path / "resumed", **{"train.steps": 20})
  resumed = _run(
    digits,
    tmp_path / "resumed",
    **{"train.steps": 60, "data.workers": 2, "train.steps_per_loop": 10},
  )
  record = json.loads((tmp_path / "resumed" / "run.json").read_text())
  assert record["resumed_from"] == 20
  assert helpers.max_abs_diff(resumed.state.params, whole.state.params) == 0


def test_resume_refuses_a_chunk_size_that_misses_the_step(tmp_path, digits):
  _run(digits, tmp_path, **{"train.steps": 30, "ckpt.every_steps": 10, "eval.every_steps": 10})
  longer = {"train.steps": 60, "train.steps_per_loop": 20, "train.log_every": 20}
  with pytest.raises(jaxtrain.ConfigError, match=r"steps_per_loop=20 does not divide .* step 30"):
    _run(digits, tmp_path, **longer)


def test_start_batch_reads_the_saved_position_or_the_step():
  restored = lambda data_state: checkpoint.Restored(30, None, data_state, {})  # noqa: E731
  assert resume.start_batch(None) == 0
  assert resume.start_batch(restored({"next_batch": 30})) == 30
  assert resume.start_batch(restored({"next_index": 3, "workers": 2})) == 30  # Grain's own state
