"""`jaxtrain.build`: the pieces `train` runs, driven by hand, give what `train` gives."""

import asyncio
import json
import logging
import os
import signal
import threading
import types

import numpy as np
import optax
import pytest

import jaxtrain
from jaxtrain import interrupt, logs, losses
from tests import helpers


def test_chunks_by_hand_equal_train(tmp_path, digits):
  """Four chunks and an evaluation by hand are bit-identical to `train` for the same steps."""
  config = helpers.tiny_config(**{"train.steps": 20, "eval.every_steps": 20})
  parts = jaxtrain.build(config, helpers.mlp(), digits, losses.classification)
  state = parts.state
  with parts.batches() as batches:
    for _ in range(4):
      state, metrics = parts.chunk(state, next(batches))
  assert metrics["loss"].shape == (5,) and int(metrics["stop"]) == 0
  assert parts.chunk.compilations() == 1
  by_hand = parts.evaluate(state)
  trained = jaxtrain.train(config, helpers.mlp(), digits, losses.classification, workdir=tmp_path)
  assert helpers.max_abs_diff(state.params, trained.state.params) == 0
  assert by_hand == trained.eval_metrics
  model = jaxtrain.merge_model(parts.graphdef, state)
  logits = model(digits.eval[0]["image"][None])
  assert logits.shape == (1, 10)


def test_batches_resume_at_any_global_batch(digits):
  config = helpers.tiny_config()
  parts = jaxtrain.build(config, helpers.mlp(), digits, losses.classification)
  with parts.batches() as stream:
    next(stream)
    second = np.asarray(next(stream)["label"])
  with parts.batches(start=5, workers=0) as later:
    np.testing.assert_array_equal(np.asarray(next(later)["label"]), second)


def test_build_checks_like_train(digits):
  config = helpers.tiny_config()

  def no_loss(model, batch, rngs):
    return {"error": losses.classification(model, batch, rngs)["loss"]}

  with pytest.raises(jaxtrain.ConfigError, match="loss_fn returned no 'loss'"):
    jaxtrain.build(config, helpers.mlp(), digits, no_loss)


def test_optax_reduce_on_plateau_in_a_custom_chain_gets_the_loss(tmp_path, digits):
  """Optax's own reduce_on_plateau sees each step's loss; the `lr` metric carries its scale."""
  plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=0.0, atol=1e9)
  tx = optax.chain(optax.adam(1e-2), plateau)  # atol 1e9: no step ever improves enough
  config = helpers.tiny_config(**{"train.log_every": 5})
  result = jaxtrain.train(
    config,
    helpers.mlp(),
    digits,
    losses.classification,
    workdir=tmp_path,
    tx=tx,
    schedule=optax.constant_schedule(1e-2),
  )
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  lr = [x["lr"] for x in lines if x["split"] == "train"]
  # The first step sets the best; each later one fails to improve and halves the scale.
  assert lr == pytest.approx([1e-2 * 0.5 ** (s - 2) for s in range(5, 41, 5)])
  scale = optax.tree_utils.tree_get(result.state.opt_state, "scale")
  assert float(scale) == pytest.approx(0.5**39)
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["train_chunk_compilations"] == 1


def test_stop_signals_vote_then_stop_at_once():
  mesh = helpers.mesh((8, 1, 1))
  signals = interrupt.StopSignals(mesh)
  try:
    assert int(signals.votes().max()) == interrupt.RUNNING
    os.kill(os.getpid(), signal.SIGTERM)
    assert int(signals.votes().max()) == interrupt.PREEMPTED
    os.kill(os.getpid(), signal.SIGINT)
    assert int(signals.votes().max()) == interrupt.INTERRUPTED
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    signals.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_logged_tracebacks_of_a_ctrl_c_are_dropped():
  """Orbax logs a Ctrl-C that lands while it waits for a save; the run reports the stop."""

  def record(error, path="/x/orbax/checkpoint/checkpoint_manager.py", level=logging.ERROR):
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord("absl", level, path, 1, "failed", None, exc_info)

  assert not logs._not_orbax_noise(record(KeyboardInterrupt()))
  assert not logs._not_orbax_noise(record(KeyboardInterrupt(), path="/x/jaxtrain/loop.py"))
  assert not logs._not_orbax_noise(record(OSError("disk")))  # in log.txt; the run says it
  assert logs._not_orbax_noise(record(OSError("disk"), level=logging.CRITICAL))
  assert not logs._not_orbax_noise(record(None, level=logging.INFO))  # Orbax's INFO lines
  assert logs._not_orbax_noise(record(None, path="/x/jaxtrain/loop.py", level=logging.INFO))
  assert logs._not_orbax_noise(record(OSError("disk"), path="/x/jaxtrain/loop.py"))


def test_a_failed_library_thread_is_one_line_and_its_traceback_goes_to_the_log_file(
  tmp_path, capsys
):
  def fail():
    raise RuntimeError("the storage went away")

  previous = threading.excepthook
  threading.excepthook = logs._thread_failed
  try:
    with logs.to_file(tmp_path):
      thread = threading.Thread(target=fail, name="heartbeat")
      thread.start()
      thread.join()
  finally:
    threading.excepthook = previous
  err = capsys.readouterr().err
  assert err == "warning: background thread heartbeat failed: RuntimeError: the storage went away\n"
  logged = (tmp_path / logs.FILE).read_text()
  assert "background thread heartbeat failed" in logged and "Traceback" in logged
  assert 'raise RuntimeError("the storage went away")' in logged


def test_what_a_library_raises_into_a_closed_event_loop_goes_to_the_log_file(tmp_path):
  """TensorStore's callbacks after Orbax closed its loop (a failed save) reach no terminal."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    raised = types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                   object=None, err_msg=None)  # fmt: skip
  printed = []
  with logs.to_file(tmp_path):
    logs._unraisable(printed.append, raised)
    ours = ValueError("ours")
    logs._unraisable(printed.append, types.SimpleNamespace(
      exc_type=ValueError, exc_value=ours, exc_traceback=None, object=None))  # fmt: skip
  assert [str(u.exc_value) for u in printed] == ["ours"]  # the project's own still print
  assert "Event loop is closed" in (tmp_path / logs.FILE).read_text()
