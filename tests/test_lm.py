"""The language-model path: BPE tokens, sampling, and the experiment on the real corpus."""

import json
import pathlib
import shlex
import subprocess
import sysconfig

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import ConfigError, data, losses, models
from jaxtrain.data import bpe, tokenize
from tests import commands, helpers

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
  # One device: 8 simulated ones on 2 loaded cores can miss XLA's 40 s collective deadline.
  return commands.run(["experiments.lm", *args], cwd=cwd, timeout=600,
                      env=helpers.subprocess_env())  # fmt: skip


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


# The gpu preset's sizes cut to a CPU's, on byte shards; every other key is the preset's.
GPU_CUT = [*TINY[:6], "--config.train.batch_size=8", "--config.train.steps=20",
           "--config.train.log_every=10", "--config.optim.warmup_steps=5",
           "--config.eval.every_steps=20", "--config.loss.chunk=16"]  # fmt: skip


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory):
  """Twenty of the standard library's top-level modules as byte shards."""
  out = tmp_path_factory.mktemp("shards") / "stdlib_tokens"
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  tokenize.tokenize([str(p) for p in sorted(stdlib.glob("*.py"))[:20]], "bytes", out, workers=0)
  return out


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, byte_shards):
  """The gpu preset, as the README writes it (from the repository root), cut to 20 tiny steps."""
  workdir = tmp_path_factory.mktemp("gpu") / "lm_gpu"
  run = _lm(["--config=experiments/lm.py:gpu", "--workdir", str(workdir), *GPU_CUT,
             f"--config.data.dir={byte_shards}", "--sample_tokens=5"], helpers.ROOT)  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def test_the_preset_is_in_config_json_and_the_overrides_after_it_win(gpu_run, byte_shards):
  from experiments import lm  # noqa: PLC0415
  from jaxtrain import config as config_lib  # noqa: PLC0415

  saved = config_lib.flatten_dict(json.loads((gpu_run / "config.json").read_text()))
  cut = [*GPU_CUT, f"--config.data.dir={byte_shards}"]
  overridden = dict(arg.removeprefix("--config.").split("=", 1) for arg in cut)
  gpu = dict(config_lib.flatten(lm.get_config("gpu")))
  cpu = dict(config_lib.flatten(lm.get_config()))
  assert saved.keys() == gpu.keys()
  for key, value in saved.items():
    wanted = type(gpu[key])(overridden[key]) if key in overridden else gpu[key]
    assert (tuple(value) if isinstance(value, list) else value) == wanted, key
  kept = {k for k in gpu if gpu[k] != cpu[k] and k not in overridden}  # the preset's own
  assert {"model.remat", "model.scan_layers", "precision.policy", "optim.lr",
          "data.name", "eval.batch_size"} <= kept  # fmt: skip
  assert saved["model.remat"] == "dots-saveable" and saved["precision.policy"] == "bf16-mixed"
  assert saved["model.d_model"] == 32 and saved["train.steps"] == 20  # the overrides won
  record = json.loads((gpu_run / "run.json").read_text())
  assert "--config=experiments/lm.py:gpu" in record["environment"]["argv"]


def test_a_replay_starts_from_the_runs_preset(gpu_run, tmp_path):
  replayed = commands.run(
    ["jaxtrain.replay", str(gpu_run), f"--out={tmp_path / 'again'}",
     "--force"],  # --force: others may change the checkout while the tests run
    timeout=600, cwd=helpers.ROOT, env=helpers.subprocess_env(),
  )  # fmt: skip
  assert replayed.returncode == 0, replayed.stderr[-3000:]
  shown = f"replaying experiments.lm --config=experiments/lm.py:gpu from {gpu_run}"
  assert shown in replayed.stderr
  assert replayed.stdout.startswith("replay matches the run")
  again = json.loads((tmp_path / "again" / "config.json").read_text())
  assert again == json.loads((gpu_run / "config.json").read_text())


PRESET_CASES = {  # --config, the folder it runs from (None: elsewhere), the error line
  "a preset the file does not have": (
    "--config=experiments/lm.py:tpu", helpers.ROOT,
    "error: --config=experiments/lm.py:tpu: preset 'tpu' is not one of cpu, gpu",
  ),
  "the file's path from another folder": (
    "--config=experiments/lm.py:gpu", None,
    "error: --config=experiments/lm.py:gpu: no file experiments/lm.py in {cwd} (the path is "
    "read from the current folder); run from the repository root or give the full path, "
    f"--config={helpers.ROOT}/experiments/lm.py:gpu",
  ),
  "a module name, not a file": (
    "--config=lm:gpu", helpers.ROOT,
    "error: --config=lm:gpu: --config takes a file, FILE.py or FILE.py:PRESET, such as "
    "experiments/lm.py:gpu",
  ),
  "another experiment's file": (
    "--config=experiments/digits.py", helpers.ROOT,
    "error: --config=experiments/digits.py: its keys are not those of experiments/lm.py's "
    "get_config(): it lacks model.activation, model.attention, model.d_model, ... and adds "
    "model.hidden",
  ),
  "the old --preset": (
    "--preset=gpu", helpers.ROOT,
    "error: --preset is gone: a preset follows the config file, --config=experiments/lm.py:gpu",
  ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PRESET_CASES))
def test_a_bad_preset_or_file_is_one_line_and_writes_nothing(case, tmp_path):
  flag, cwd, expected = PRESET_CASES[case]
  run = _lm([flag, "--workdir", str(tmp_path / "runs" / "lm"), *TINY], cwd or tmp_path)
  assert run.returncode == 2, run.stderr[-3000:]
  assert run.stderr.strip() == expected.format(cwd=tmp_path) and not run.stdout
  assert not list(tmp_path.iterdir())


def test_an_override_before_the_preset_is_refused(tmp_path):
  run = _lm(["--config.train.steps=5", "--config=experiments/lm.py:gpu", "--workdir",
             str(tmp_path / "lm")], helpers.ROOT)  # fmt: skip
  helpers.refused(run, "--config.train.steps=5 comes before --config=experiments/lm.py:gpu")
  assert not list(tmp_path.iterdir())


def test_the_help_lists_the_presets_and_the_sampling_flags(tmp_path):
  shown = _lm(["--help"], helpers.ROOT)
  assert shown.returncode == 0
  flag_lines = [x.split(":")[0].strip() for x in shown.stdout.splitlines() if x.startswith("  --")]
  assert flag_lines == ["--config", "--workdir", "--resume", "--coordinator_address",
                        "--num_processes", "--process_id", "--init_timeout", "--peer_timeout",
                        "--prompt", "--sample_tokens", "--temperature", "--top_k",
                        "--verbosity"]  # fmt: skip
  config_line = next(x for x in shown.stdout.splitlines() if x.startswith("  --config:"))
  assert "(presets: cpu, gpu)" in config_line
  assert config_line.endswith("(default: 'experiments/lm.py')")
  assert "  model.kv_heads=2 " in shown.stdout and "grouped-query attention" in shown.stdout
  gpu = _lm(["--config=experiments/lm.py:gpu", "--help"], helpers.ROOT)
  assert gpu.returncode == 0
  assert "config keys: --config.KEY=VALUE (the defaults of --config=experiments/lm.py:gpu):" in (
    gpu.stdout
  )
  assert "  model.kv_heads=8 " in gpu.stdout and "  model.d_model=1024 " in gpu.stdout
  assert not list(tmp_path.iterdir())


def _readme_lines(prefix):
  """The README's command lines that start with `prefix`."""
  readme = (pathlib.Path(helpers.ROOT) / "README.md").read_text()
  return [line for line in readme.splitlines() if line.startswith(prefix)]


def test_the_readme_tokenizes_then_trains_on_packed_shards(tmp_path):
  """The README's two pretraining commands as written; the training cut to 40 tiny steps."""
  (tokenize_line,) = _readme_lines("python -m jaxtrain.data.tokenize --tokenizer=bytes ")
  (train_line,) = _readme_lines("python -m experiments.lm --workdir runs/lm_tokens ")
  env = helpers.subprocess_env()
  done = subprocess.run(["bash", "-c", tokenize_line], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300, check=False)  # fmt: skip
  assert done.returncode == 0 and done.stdout.startswith("wrote "), done.stderr[-2000:]
  cut = [
    *TINY[:7],
    "--config.train.steps=40",
    "--config.train.log_every=20",
    "--config.eval.every_steps=40",
    "--config.optim.warmup_steps=5",
    "--sample_tokens=8",
  ]
  words = shlex.split(train_line)  # as a shell reads it: there is nothing for bash to expand
  assert words[:2] == ["python", "-m"] and not set("$`*?[~") & set(train_line), train_line
  run = commands.run([*words[2:], *cut], cwd=tmp_path, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  workdir = tmp_path / "runs" / "lm_tokens"
  record = json.loads((workdir / "run.json").read_text())
  assert record["status"] == "completed" and record["train_chunk_compilations"] == 1
  assert record["data"]["packing"] == "concat" and record["data"]["vocab_size"] == 256
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [line for line in lines if line["split"] == "train"]
  assert train[-1]["loss"] < 0.8 * train[0]["loss"]
  evals = [line for line in lines if line["split"] == "eval"]
  # Bytes: the bits of a byte are the nats of a token over ln 2.
  assert evals[-1]["bits_per_byte"] == pytest.approx(evals[-1]["loss"] / np.log(2), rel=1e-4)


def test_cached_sampling_equals_the_window_path_for_a_batch_of_prompts():
  """Greedy with the cache equals greedy over the window, token for token, at any prompt length."""
  model = models.Transformer(vocab=50, seq_len=128, d_model=32, layers=2, heads=4, kv_heads=2,
                             mlp=48, rngs=nnx.Rngs(0))  # fmt: skip
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 50, n).tolist() for n in (5, 70, 9)]  # two prompt buckets
  batch = models.generate_batch(model, prompts, 20)
  for prompt, sampled in zip(prompts, batch, strict=True):
    np.testing.assert_array_equal(sampled, models.generate(model, prompt, 20, temperature=0.0))
  stop = int(batch[0][5])
  first = int(np.flatnonzero(batch[0] == stop)[0])
  stopped = models.generate_batch(model, prompts, 20, stop=(stop,))
  np.testing.assert_array_equal(stopped[0], batch[0][: first + 1])  # ends at the stop token
  for kept in ({"top_k": 1}, {"top_p": 1e-6}):  # one candidate left: the greedy token
    drawn = models.generate_batch(model, prompts, 20, temperature=1.5, seed=7, **kept)
    for a, b in zip(drawn, batch, strict=True):
      np.testing.assert_array_equal(a, b)
  free = models.generate_batch(model, prompts, 20, temperature=1.5, seed=7)
  assert any(not np.array_equal(a, b) for a, b in zip(free, batch, strict=True))
  with pytest.raises(ConfigError, match=r"within the model's 128 positions"):
    models.generate_batch(model, [[1] * 120], 20)
