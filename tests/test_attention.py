"""Causal attention over packed documents: every CPU-runnable implementation against `reference`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import ConfigError
from jaxtrain.models import attention

B, T, N, K, H = 2, 48, 4, 2, 16  # grouped-query: 4 query heads over 2 key/value heads
# Row 0: documents 3, 1, 7 (lengths 13, 19, 9), then padding (id 0), one token of it alone;
# row 1: one document, then single-token segments at the end.
IDS = np.array(
  [[3] * 13 + [1] * 19 + [7] * 9 + [0] * 6 + [5], [2] * 44 + [4, 0, 6, 9]],
  np.int32,
)
# What runs on CPU: `pallas` in Pallas' interpreter (JAX's Triton flash-attention kernel).
ON_CPU = ("xla", "pallas")


def _qkv(seed=0, t=T, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, t, N, H), dtype)
  k, v = (jax.random.normal(key, (B, t, K, H), dtype) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (B, t, N, H), dtype)
  return q, k, v, cotangent


def _attend(name, q, k, v, ids):
  return attention.causal_attention(
    q, k, v, segment_ids_BxT=ids, implementation=name, interpret=True
  )


def _value_and_grads(name, qkv, ids, cotangent):
  q, k, v = qkv
  out, vjp = jax.vjp(lambda q, k, v: _attend(name, q, k, v, ids), q, k, v)
  return out, vjp(cotangent)


def _reference_by_hand(q, k, v, ids):
  """Each query head written out against its key/value head, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      kv = n // (N // K)
      scores = q[b, :, n] @ k[b, :, kv].T / np.sqrt(H)
      allowed = np.tril(np.ones((T, T), bool))
      if ids is not None:
        allowed &= ids[b][:, None] == ids[b][None, :]
      scores = np.where(allowed, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, :, n] = (weights / weights.sum(-1, keepdims=True)) @ v[b, :, kv]
  return out


@pytest.mark.parametrize("segments", [False, True], ids=["one-segment", "segments"])
def test_reference_is_attention_written_out(segments):
  q, k, v, _ = _qkv()
  ids = IDS if segments else None
  got = _attend("reference", q, k, v, None if ids is None else jnp.asarray(ids))
  np.testing.assert_allclose(got, _reference_by_hand(q, k, v, ids), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("segments", [False, True], ids=["one-segment", "segments"])
@pytest.mark.parametrize("name", ON_CPU)
def test_equals_reference_in_values_and_gradients(name, segments):
  q, k, v, cotangent = _qkv()
  ids = jnp.asarray(IDS) if segments else None
  want = _value_and_grads("reference", (q, k, v), ids, cotangent)
  got = _value_and_grads(name, (q, k, v), ids, cotangent)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == jnp.float32
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("segments", [False, True], ids=["one-segment", "segments"])
def test_splash_wiring_equals_reference(segments):
  """The TPU kernel (Splash) as `pallas` calls it, in Pallas' interpreter (T a multiple of 128)."""
  q, k, v, cotangent = _qkv(t=128)
  ids = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [0] * 18], B, 0)) if segments else None

  def splash(q, k, v):
    return attention._splash(q, k, v, ids, interpret=True)

  want = _value_and_grads("reference", (q, k, v), ids, cotangent)
  out, vjp = jax.vjp(splash, q, k, v)
  for a, b in zip(jax.tree.leaves((out, vjp(cotangent))), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["reference", *ON_CPU])
def test_no_token_attends_across_a_document_boundary(name):
  """Changing document 1's tokens in row 0 changes only document 1's outputs."""
  q, k, v, _ = _qkv()
  ids = jnp.asarray(IDS)
  doc = IDS[0] == 1
  changed = [a.at[0, doc].set(a[0, doc] * -2.0 + 1.0) for a in (q, k, v)]
  before, after = _attend(name, q, k, v, ids), _attend(name, *changed, ids)
  np.testing.assert_array_equal(before[0, ~doc], after[0, ~doc])
  np.testing.assert_array_equal(before[1], after[1])
  assert float(jnp.abs(before[0, doc] - after[0, doc]).min()) > 0


@pytest.mark.parametrize("name", ["reference", *ON_CPU])
def test_padding_and_lone_tokens_give_finite_values_and_gradients(name):
  """Padding and single-token segments (nothing to attend to but themselves) stay finite."""
  q, k, v, cotangent = _qkv(seed=1)
  ids = jnp.asarray(IDS)
  out, grads = _value_and_grads(name, (q, k, v), ids, cotangent)
  for a in (out, *grads):
    assert np.isfinite(np.asarray(a)).all()
  # A token alone in its segment reads its own value: row 0's last, row 1's last four.
  lone_v = np.repeat(np.asarray(v), N // K, axis=2)
  np.testing.assert_allclose(out[0, -1], lone_v[0, -1], atol=1e-6)
  np.testing.assert_allclose(out[1, -4:], lone_v[1, -4:], atol=1e-6)


@pytest.mark.parametrize("name", ["reference", "xla"])
def test_output_keeps_the_input_dtype(name):
  q, k, v, _ = _qkv(dtype=jnp.bfloat16)
  out = _attend(name, q, k, v, jnp.asarray(IDS))
  assert out.dtype == jnp.bfloat16
  want = _attend("reference", *(a.astype(jnp.float32) for a in (q, k, v)), jnp.asarray(IDS))
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)


def test_auto_on_cpu_is_the_reference():
  for segments in (False, True):
    assert attention.implementation(jnp.float32, segments=segments) == "reference"
    assert attention.implementation(jnp.bfloat16, "auto", segments=segments) == "reference"


def test_auto_elsewhere():
  gpu = dict(backend="gpu", seq_len=1024, head_dim=64)
  assert attention.implementation(jnp.bfloat16, **gpu) == "cudnn"
  assert attention.implementation(jnp.bfloat16, segments=True, **gpu) == "cudnn"
  assert attention.implementation(jnp.float32, segments=True, **gpu) == "xla"
  # cuDNN cannot take this head size; the Triton kernel can.
  assert attention.implementation(jnp.bfloat16, backend="gpu", seq_len=64, head_dim=20) == "pallas"
  assert attention.implementation(jnp.bfloat16, backend="gpu", seq_len=64, head_dim=12) == "xla"
  assert attention.implementation(jnp.bfloat16, backend="tpu", seq_len=1024) == "pallas"
  assert attention.implementation(jnp.bfloat16, backend="tpu", seq_len=1000) == "xla"


REFUSED = [
  # (chosen, dtype, keyword arguments, what the message must name)
  ("cudnn", jnp.float32, {}, "needs a CUDA GPU (here cpu)"),
  ("cudnn", jnp.bfloat16, {}, "needs a CUDA GPU (here cpu)"),
  ("cudnn", jnp.bfloat16, dict(backend="tpu"), "needs a CUDA GPU (here tpu)"),
  ("cudnn", jnp.float32, dict(backend="gpu"), "bfloat16 or float16"),
  ("cudnn", jnp.bfloat16, dict(backend="gpu", head_dim=12), "multiple of 8"),
  ("cudnn", jnp.bfloat16, dict(backend="gpu", segments=True, seq_len=99), "even sequence"),
  ("pallas", jnp.float32, {}, "interpret=True"),
  ("pallas", jnp.bfloat16, dict(backend="gpu", seq_len=100), "multiple of 16"),
  ("pallas", jnp.bfloat16, dict(backend="gpu", seq_len=128, head_dim=256), "from 16 to 128"),
  ("pallas", jnp.bfloat16, dict(backend="tpu", seq_len=200), "multiple of 128"),
  ("flash", jnp.float32, {}, "is not one of"),
]


@pytest.mark.parametrize(("chosen", "dtype", "kw", "problem"), REFUSED)
def test_refusals_name_one_alternative_in_one_line(chosen, dtype, kw, problem):
  with pytest.raises(ConfigError) as raised:
    attention.implementation(dtype, chosen, **kw)
  message = str(raised.value)
  assert "\n" not in message and problem in message, message
  alternative = message.split("use attention='")[1].split("'", maxsplit=1)[0]
  assert alternative in attention.IMPLEMENTATIONS and alternative != chosen
  # The alternative runs that very combination.
  assert attention.implementation(dtype, alternative, **kw) == alternative


def test_refused_before_compiling():
  """`causal_attention` refuses at trace time, from static shapes."""
  q, k, v, _ = _qkv()
  for name in ("cudnn", "pallas"):  # pallas: no `interpret` here
    with pytest.raises(ConfigError, match="use attention='reference'"):
      jax.eval_shape(
        lambda q, k, v, n=name: attention.causal_attention(q, k, v, implementation=n), q, k, v
      )
  with pytest.raises(ConfigError, match="multiple of 16"):
    _attend("pallas", *(a[:, :40] for a in (q, k, v)), None)
  with pytest.raises(ConfigError, match="heads must divide"):
    attention.causal_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ConfigError, match="one id per token"):
    attention.causal_attention(q, k, v, segment_ids_BxT=jnp.zeros((B, T + 1), jnp.int32))


def test_segment_runs_in_the_form_cudnn_packs():
  """The lengths and starts of each row's runs, -1 past the last (cuDNN's packed layout)."""
  lengths, starts = attention._segment_runs(jnp.asarray(IDS), max_segments=6)
  np.testing.assert_array_equal(lengths, [[13, 19, 9, 6, 1, -1], [44, 1, 1, 1, 1, -1]])
  np.testing.assert_array_equal(starts, [[0, 13, 32, 41, 47, -1, -1], [0, 44, 45, 46, 47, -1, -1]])
