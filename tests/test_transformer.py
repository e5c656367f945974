"""The decoder-only Transformer: causality, attention, rotary positions, scan and remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import ConfigError, losses, models
from jaxtrain.models import transformer

SIZES = dict(vocab=48, seq_len=16, d_model=32, layers=3, heads=4)


def _model(**kw):
  return models.Transformer(**{**SIZES, **kw}, rngs=nnx.Rngs(0))


def _tokens(b=2, t=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, SIZES["vocab"], (b, t)), jnp.int32)


def test_logits_do_not_see_later_tokens():
  model, tokens = _model(), _tokens()
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % SIZES["vocab"])
  a, b = model(tokens), model(changed)
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3


def _loss_and_grads(model, tokens):
  def loss(m):
    return losses.next_token(m, {"tokens": tokens}, None)["loss"].mean()

  return nnx.value_and_grad(loss)(model)


@functools.cache
def _plain_loss_and_grads():
  """The plain model's loss and gradients on the variants' tokens, computed once for all."""
  return _loss_and_grads(_model(), _tokens(t=17))


@pytest.mark.parametrize(
  "variant",
  [
    dict(scan_layers=False),
    dict(remat="full"),
    dict(remat="dots-saveable"),
    dict(remat="full", scan_layers=False),
  ],
)
def test_scan_and_remat_equal_the_plain_model(variant):
  plain, other, tokens = _model(), _model(**variant), _tokens(t=17)
  nnx.update(other, nnx.state(plain, nnx.Param))  # the same parameters in either layout
  loss_a, grads_a = _plain_loss_and_grads()
  loss_b, grads_b = _loss_and_grads(other, tokens)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(ga, gb, atol=1e-5, rtol=1e-5)


def _reference_attention(layer: transformer.Attention, x_BxTxD, rope=None):
  """Multi-head attention written out: every query head has its own (repeated) key head."""
  b, t, _ = x_BxTxD.shape
  h, dh = layer.heads, layer.head_dim
  q = (x_BxTxD @ layer.query.kernel[...]).reshape(b, t, h, dh)
  k = (x_BxTxD @ layer.key.kernel[...]).reshape(b, t, layer.kv_heads, dh)
  v = (x_BxTxD @ layer.value.kernel[...]).reshape(b, t, layer.kv_heads, dh)
  if rope is not None:
    q, k = transformer.apply_rope(q, *rope), transformer.apply_rope(k, *rope)
  k, v = (jnp.repeat(a, h // layer.kv_heads, axis=2) for a in (k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
  return out.reshape(b, t, h * dh) @ layer.out.kernel[...]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_is_multi_head_with_shared_keys(kv_heads):
  layer = transformer.Attention(32, 4, kv_heads, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 16, 32))
  rope = transformer.rope_tables(16, 8)
  rows = x.reshape(32, 32)  # the model's [B * T, D] rows
  ours = layer(rows, 16, rope).reshape(2, 16, 32)
  np.testing.assert_allclose(ours, _reference_attention(layer, x, rope), atol=1e-5)
  ours = layer(rows, 16, None).reshape(2, 16, 32)
  np.testing.assert_allclose(ours, _reference_attention(layer, x), atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 8))
  cos, sin = transformer.rope_tables(64, 8)

  def score(m, n):
    qm = transformer.apply_rope(q, cos[m : m + 1], sin[m : m + 1])
    kn = transformer.apply_rope(k, cos[n : n + 1], sin[n : n + 1])
    return float(jnp.sum(qm * kn))

  for m, n, shift in ((5, 2, 30), (0, 7, 50), (11, 11, 3)):
    assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
  assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and the distance does matter


def test_every_parameter_has_logical_axis_names():
  def names_and_shapes(model):
    names = transformer.logical_axes(model)
    ndims = jax.tree.map(np.ndim, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(ndims)

  for kw in (dict(), dict(tie=False, positions="learned", activation="gelu")):
    names, ndims = names_and_shapes(_model(**kw))
    assert len(names) == len(ndims) > 10
    for n, ndim in zip(names, ndims, strict=True):
      assert len(n) == ndim and any(n), (n, ndim)
  names = transformer.logical_axes(_model())
  assert names["blocks"]["attention"]["key"]["kernel"] == ("layers", "embed", "kv_heads")
  assert names["embed"]["embedding"] == ("vocab", "embed")


def test_the_model_builds_under_a_mesh():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert _model()(_tokens()).shape == (2, 16, SIZES["vocab"])


def test_the_untied_head_and_the_learned_positions_are_used():
  model, tokens = _model(tie=False, positions="learned", activation="gelu", kv_heads=2), _tokens()
  before = model(tokens)
  model.position.embedding[...] = model.position.embedding[...] * 2
  assert float(jnp.abs(model(tokens) - before).max()) > 1e-3  # positions enter the logits
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
  np.testing.assert_array_equal(model(tokens), 0.0)  # the logits are the head's alone


def test_flops_per_token_counts_six_per_weight_and_the_attention():
  model = _model(mlp=64)
  d, layers, vocab, t = 32, 3, 48, 16
  block = 4 * d * d + 3 * d * 64 + 2 * d  # q, k, v, out; gate, up, down; two norms
  expected = 6 * (layers * block + vocab * d) + 12 * layers * t * d
  assert model.flops_per_token(t) == expected


@pytest.mark.parametrize(
  ("kw", "message"),
  [
    (dict(heads=3), "d_model=32 must divide by heads=3"),
    (dict(kv_heads=3), "heads=4 must be a multiple of kv_heads=3"),
    (dict(remat="dots"), "remat='dots' must be one of none, full, dots-saveable"),
    (dict(layers=0), "layers=0 must be a positive integer"),
  ],
)
def test_bad_sizes_are_one_line(kw, message):
  with pytest.raises(ConfigError, match=message):
    _model(**kw)


def test_a_sequence_longer_than_the_positions_is_refused():
  with pytest.raises(ConfigError, match="sequences of 17 tokens are longer than its 16 positions"):
    _model()(_tokens(t=17))


def test_dropout_inside_the_scan_draws_per_layer_and_is_off_in_eval():
  model, tokens = _model(dropout=0.5), _tokens()
  a = model(tokens, rngs=nnx.Rngs(dropout=1))
  b = model(tokens, rngs=nnx.Rngs(dropout=2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  model.eval()
  np.testing.assert_array_equal(model(tokens), model(tokens))


def test_builds_abstractly_for_the_framework():
  abstract = nnx.eval_shape(functools.partial(_model))
  assert abstract.flops_per_token(16) == _model().flops_per_token(16)


def test_every_attention_choice_gives_the_model_the_same_logits_and_gradients():
  tokens = _tokens()

  def loss(model):
    return jnp.mean(model(tokens) ** 2)

  results = {}
  for attention in ("auto", "xla", "reference"):
    model = _model(attention=attention)
    results[attention] = (model(tokens), nnx.grad(loss)(model))
  for attention in ("xla", "reference"):
    np.testing.assert_allclose(results[attention][0], results["auto"][0], atol=1e-5)
    for a, b in zip(jax.tree.leaves(results[attention][1]), jax.tree.leaves(results["auto"][1]),
                    strict=True):  # fmt: skip
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_an_attention_this_backend_cannot_run_is_one_line():
  with pytest.raises(ConfigError, match=r"^attention='cudnn' needs a CUDA GPU .*attention='ref"):
    _model(attention="cudnn")
  with pytest.raises(ConfigError, match=r"^attention='pallas' .*use attention='reference'"):
    _model(attention="pallas")
  with pytest.raises(ConfigError, match=r"^Transformer: attention='flash' must be one of auto, "):
    _model(attention="flash")


def _packed(tokens_a, tokens_b):
  """Two documents in one row: their tokens, segment ids 1 and 2, positions from 0 in each."""
  tokens = jnp.concatenate([tokens_a, tokens_b])[None]
  segments = jnp.repeat(jnp.array([1, 2]), jnp.array([len(tokens_a), len(tokens_b)]))[None]
  positions = jnp.concatenate([jnp.arange(len(tokens_a)), jnp.arange(len(tokens_b))])[None]
  return tokens, {"segment_ids": segments, "positions": positions}


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_a_packed_document_is_the_same_as_alone(positions):
  """Segments keep attention within a document and positions restart: as if each sat alone."""
  model = _model(positions=positions)
  a, b = (jax.random.randint(jax.random.key(i), (n,), 0, 64) for i, n in ((1, 5), (2, 11)))
  tokens, packed = _packed(a, b)
  logits = model(tokens, **packed)
  np.testing.assert_allclose(logits[0, :5], model(a[None])[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], model(b[None])[0], atol=1e-5)
  other, packed_other = _packed(jnp.roll(a, 1) % 64, b)  # the neighbour changes, b does not
  np.testing.assert_allclose(model(other, **packed_other)[0, 5:], logits[0, 5:], atol=1e-6)
  assert not np.allclose(model(tokens)[0, 5:], logits[0, 5:], atol=1e-3)  # unpacked, b sees a
  np.testing.assert_allclose(model.logits(model.features(tokens, **packed)), logits, atol=1e-6)


def test_logical_names_constrain_the_activations_under_rules():
  from flax.core import spmd  # noqa: PLC0415

  model, tokens = _model(), _tokens(b=8)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  plain = forward(state, tokens)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("batch", "data"), ("sequence", None), ("embed", None), ("heads", None),
           ("kv_heads", None), ("mlp", None), ("vocab", None))  # fmt: skip
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    text = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).as_text()
    constrained = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  # tokens, rows, q, k, v, the MLP hidden, the block output (one scanned body), logits
  assert text.count("sharding_constraint") == 8
  np.testing.assert_allclose(constrained, plain, atol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_decoding_with_the_cache_equals_the_full_forward(positions):
  """A prefill then one token at a time, over the key/value cache: the same logits."""
  model = _model(positions=positions)
  tokens = _tokens(b=2, t=12)
  cache = model.init_cache(2, 16)
  logits, cache = model.decode(tokens[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), cache)
  pieces = [logits]
  for i in range(7, 12):
    logits, cache = model.decode(tokens[:, i : i + 1], jnp.full((2, 1), i), cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(tokens), atol=1e-5)
