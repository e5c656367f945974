"""The language-model path: BPE tokens, sampling, and the experiment on the real corpus."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import data, losses, models
from jaxtrain.data import bpe
from tests import helpers

TINY = [
  "--config.model.d_model=32",
  "--config.model.layers=2",
  "--config.model.heads=2",
  "--config.model.kv_heads=1",
  "--config.model.mlp=64",
  "--config.model.seq_len=64",
  "--config.train.batch_size=16",
  "--config.train.steps=60",
  "--config.train.log_every=20",
  "--config.optim.warmup_steps=10",
  "--config.eval.every_steps=60",
  "--config.eval.batch_size=64",
]


@pytest.fixture(scope="module")
def corpus():
  return data.python_stdlib(64, eval_fraction=0.05, limit_bytes=400_000)


def test_bpe_round_trips_the_eval_text_and_counts_its_bytes(corpus):
  tokenized, tokenizer = bpe.tokenize(corpus, vocab_size=600, length=64)
  eval_text = corpus.eval.data.tobytes().decode("utf-8", errors="replace")
  ids = tokenized.eval.data
  assert tokenizer.decode(ids.tolist()) == eval_text
  assert len(ids) < 0.6 * len(eval_text.encode())  # it does compress
  record = tokenized.eval[3]
  predicted = tokenizer.decode(record["tokens"][1:].tolist())
  assert record["bytes"] == len(predicted.encode())
  assert tokenized.info["vocab_size"] == 600 and len(tokenized.info["tokenizer_sha256"]) == 64


def test_a_saved_tokenizer_is_read_back_not_retrained(corpus, tmp_path):
  first, _ = bpe.tokenize(corpus, vocab_size=600, length=64)
  (tmp_path / bpe.FILE).write_text(first.files[bpe.FILE])
  again, _ = bpe.tokenize(corpus, vocab_size=600, length=64, saved=tmp_path / bpe.FILE)
  assert again.info == first.info
  np.testing.assert_array_equal(again.train.data, first.train.data)
  with pytest.raises(
    data.DataError, match=r"holds a tokenizer of 600 tokens, not data\.vocab_size"
  ):
    bpe.tokenize(corpus, vocab_size=700, length=64, saved=tmp_path / bpe.FILE)


def test_bits_per_byte_divides_the_total_by_the_bytes():
  model = models.Transformer(16, 8, 16, 1, 2, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.arange(18).reshape(2, 9) % 16, jnp.int32)
  plain = losses.next_token(model, {"tokens": tokens}, None)
  counted = losses.next_token(model, {"tokens": tokens, "bytes": jnp.array([16, 24])}, None)
  nats = plain["loss"] * 8  # the mean over 8 predicted tokens, summed
  np.testing.assert_allclose(counted["bits_per_byte"], nats / np.log(2) / np.array([16, 24]),
                             rtol=1e-6)  # fmt: skip
  np.testing.assert_allclose(plain["bits_per_byte"], plain["loss"] / np.log(2), rtol=1e-6)


def test_generate_is_greedy_at_temperature_zero_and_slides_past_the_context():
  model = models.Transformer(32, 8, 16, 1, 2, rngs=nnx.Rngs(0))
  greedy = models.generate(model, [1, 2, 3], 20, temperature=0)
  assert greedy.shape == (20,) and greedy.max() < 32
  np.testing.assert_array_equal(models.generate(model, [1, 2, 3], 20, top_k=1, seed=5), greedy)
  sampled = [models.generate(model, [1, 2, 3], 20, temperature=2.0, seed=s) for s in (0, 1)]
  assert not np.array_equal(*sampled)
  # The first step sees only the prompt: the model's own argmax after it.
  first = int(jnp.argmax(model(jnp.asarray([[1, 2, 3]]))[0, -1]))
  assert greedy[0] == first


def _lm(args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "experiments.lm", *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=cwd,
    # One device: 8 simulated ones on 2 loaded cores can miss XLA's 40 s collective deadline.
    env=dict(os.environ, PYTHONPATH=helpers.ROOT, XLA_FLAGS=""),
    check=False,
  )


def test_the_experiment_learns_the_corpus_and_samples(tmp_path):
  run = _lm(["--workdir", "runs/lm", *TINY, "--prompt=import ", "--sample_tokens=40"], tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith("import ") and len(run.stdout.encode()) >= 40
  workdir = tmp_path / "runs" / "lm"
  record = json.loads((workdir / "run.json").read_text())
  assert record["status"] == "completed" and record["train_chunk_compilations"] == 1
  assert record["eval"]["bits_per_byte"] < 5.0  # from 8 bits at the start
  assert record["throughput"]["tokens_per_step"] == 16 * 64 and record["first_chunk_seconds"] > 0
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [line for line in lines if line["split"] == "train"]
  assert all(line["tokens_per_sec"] > 0 and 0 < line["mfu"] < 1 for line in train)
  assert train[-1]["loss"] < 0.7 * train[0]["loss"]


def test_a_bad_preset_is_one_line(tmp_path):
  run = _lm(["--preset=tpu", "--workdir", "runs/lm"], tmp_path)
  assert run.returncode == 2
  assert run.stderr.strip() == "error: --preset='tpu' must be one of cpu, gpu"
  assert not (tmp_path / "runs").exists()


def test_the_help_lists_the_presets_and_the_sampling_flags(tmp_path):
  shown = _lm(["--help"], tmp_path)
  assert shown.returncode == 0
  flag_lines = [x.split(":")[0].strip() for x in shown.stdout.splitlines() if x.startswith("  --")]
  assert flag_lines == ["--preset", "--workdir", "--resume", "--coordinator_address",
                        "--num_processes", "--process_id", "--init_timeout", "--peer_timeout",
                        "--prompt", "--sample_tokens", "--temperature", "--top_k",
                        "--verbosity"]  # fmt: skip
  assert "  model.kv_heads=2 " in shown.stdout and "grouped-query attention" in shown.stdout
