"""Loss functions with the signature `loss_fn(model, batch, rngs) -> per-example dict`.

Each returns arrays of shape `[B]`, including `"loss"`, so the train step can
average them and the eval step can mask padding and sum them exactly.

A loss can declare the values an integer field must hold with `expect_range`
(`classification` does for `label`, `next_token` for `tokens`, from the width of
the logits). `train` traces the loss once before compiling, collects these
declarations, and checks every record against them, so a label or token id the
model has no logit or embedding for stops the run in one line.

Example:
  >>> out = classification(model, {"image": x_BxHxW, "label": y_B}, None)
  >>> out["loss"].shape, out["accuracy"].shape
  ((B,), (B,))
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError

Range = tuple[str, int, int, str]
_expected: contextvars.ContextVar[list[Range] | None] = contextvars.ContextVar(
  "expected_ranges", default=None
)


def expect_range(field: str, high: int, low: int = 0, why: str = "") -> None:
  """Declares that the integer batch field `field` holds values in `[low, high)`.

  Call it inside a loss function with static numbers (shapes are static under
  `jit`); it does nothing except while `expected_ranges` collects.

  Args:
    field: the batch field.
    high: the end of the range, exclusive.
    low: its start.
    why: what the range is, for the message, such as "the model's 10 logits".

  Example:
    >>> expect_range("label", logits_BxC.shape[-1], why="the model's logits")
  """
  found = _expected.get()
  if found is not None:
    found.append((field, int(low), int(high), why))


@contextlib.contextmanager
def expected_ranges() -> Iterator[list[Range]]:
  """Collects the `(field, low, high, why)` that `expect_range` declares while it is open."""
  token = _expected.set([])
  try:
    yield _expected.get()
  finally:
    _expected.reset(token)


def _float_logits(logits: jax.Array) -> jax.Array:
  """The model's output in float32; an integer output would pass no gradient back."""
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ConfigError(
      f"the model returned {logits.dtype} logits; they must be floating point to train"
    )
  return logits.astype(jnp.float32)


def _integer_labels(labels: jax.Array, field: str) -> None:
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise DataError(
      f"batch field {field} has dtype {labels.dtype}; class labels must be integers "
      "(cast them, e.g. with .astype(np.int32))"
    )


def classification(
  model: nnx.Module,
  batch: dict[str, jax.Array],
  rngs: nnx.Rngs | None,
  *,
  label_smoothing: float = 0.0,
  inputs: Sequence[str] = ("image",),
) -> dict[str, jax.Array]:
  """Softmax cross-entropy and accuracy of `model(batch["image"])` against `batch["label"]`.

  Args:
    model: returns logits `[B, C]`; called with `rngs=` for dropout.
    batch: the `inputs` and integer `label` `[B]` arrays.
    rngs: the step's random streams, or None in evaluation.
    label_smoothing: the target puts `1 - label_smoothing` on the label and
      spreads `label_smoothing` evenly over all `C` classes; `loss` is the
      cross-entropy against it, in training and evaluation alike.
    inputs: the batch fields passed to the model, in order; a text classifier
      takes `("ids", "attention_mask")`.

  Returns:
    `loss` and `accuracy` per example, in float32.

  Example:
    >>> loss_fn = functools.partial(classification, label_smoothing=0.1)
  """
  logits_BxC = _float_logits(model(*(batch[k] for k in inputs), rngs=rngs))
  labels_B = batch["label"]
  _integer_labels(labels_B, "label")
  expect_range("label", logits_BxC.shape[-1], why=f"the model's {logits_BxC.shape[-1]} logits")
  if not isinstance(label_smoothing, int | float) or label_smoothing:  # an array: per member
    targets_BxC = optax.smooth_labels(
      jax.nn.one_hot(labels_B, logits_BxC.shape[-1]), label_smoothing
    )
    loss_B = optax.softmax_cross_entropy(logits_BxC, targets_BxC)
  else:
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  return {
    "loss": loss_B,
    "accuracy": (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32),
  }


def next_token(
  model: nnx.Module,
  batch: dict[str, jax.Array],
  rngs: nnx.Rngs | None,
  *,
  chunk: int = 0,
) -> dict[str, jax.Array]:
  """Next-token cross-entropy of a language model over `batch["tokens"]` `[B, T]`.

  The model sees tokens `0..T-2` and predicts `1..T-1`. Packed windows carry
  `segment_ids` and `positions` `[B, T]` (`jaxtrain.data.packing`): the model
  gets them, and a target counts only where it continues the document of the
  token before it (not padding, not the first token of a document), and where
  `batch["loss_mask"]` `[B, T]` is 1 if the batch has one (the answers of
  instruction-tuning exchanges, `jaxtrain.data.instructions`). Returns
  per example the mean `loss` over its counted targets (in nats) and
  `bits_per_byte`: the total in bits over the bytes the counted targets stand
  for, `batch["bytes"]` `[B]` where a tokenizer's records carry it, else one
  byte a token.

  Args:
    model: returns logits `[B, T, V]`; with `chunk`, it has `features(tokens, ...)`
      `[B, T, D]` and `logits(features)`, as `jaxtrain.models.Transformer` does.
    batch: `tokens`, and optionally `segment_ids`, `positions`, `loss_mask` and `bytes`.
    rngs: the step's random streams, or None in evaluation.
    chunk: 0, or the positions whose logits are computed at once (`loss.chunk`):
      the `[B, T, V]` float32 logits then never exist whole, forward or backward.
  """
  tokens_BxT = batch["tokens"]
  _integer_labels(tokens_BxT, "tokens")
  inputs, targets = tokens_BxT[:, :-1], tokens_BxT[:, 1:]
  packed = {}
  if "segment_ids" in batch:
    packed = {"segment_ids": batch["segment_ids"][:, :-1], "positions": batch["positions"][:, :-1]}
  if chunk:
    nll_BxT, vocab = _chunked_nll(model, inputs, targets, packed, rngs=rngs, chunk=chunk)
  else:
    logits_BxTxV = _float_logits(model(inputs, rngs=rngs, **packed))
    vocab = logits_BxTxV.shape[-1]
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets)
  expect_range("tokens", vocab, why=f"the model's vocabulary of {vocab} tokens")
  counted = None
  if packed:
    segments = batch["segment_ids"]
    counted = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
  if "loss_mask" in batch:  # instruction tuning: only the answers' tokens count
    answers = batch["loss_mask"][:, 1:].astype(jnp.float32)
    counted = answers if counted is None else counted * answers
  if counted is not None:
    nll_BxT = nll_BxT * counted
    loss_B = nll_BxT.sum(axis=-1) / jnp.maximum(counted.sum(axis=-1), 1.0)
  else:
    loss_B = nll_BxT.mean(axis=-1)
  if "bytes" not in batch:
    return {"loss": loss_B, "bits_per_byte": loss_B / jnp.log(2.0)}
  bytes_B = jnp.maximum(batch["bytes"], 1).astype(jnp.float32)  # padded eval records hold 0
  return {"loss": loss_B, "bits_per_byte": nll_BxT.sum(axis=-1) / (jnp.log(2.0) * bytes_B)}


def _chunked_nll(model, inputs, targets, packed, *, rngs, chunk: int) -> tuple[jax.Array, int]:
  """The per-token cross-entropy `[B, T]` from the model's features, `chunk` positions at a time."""
  if not (hasattr(model, "features") and hasattr(model, "logits")):
    raise ConfigError(
      f"loss.chunk={chunk} needs a model with features() and logits() (as "
      "jaxtrain.models.Transformer has); set loss.chunk=0"
    )
  features_BxTxD = model.features(inputs, rngs=rngs, **packed)
  vocab = jax.eval_shape(model.logits, features_BxTxD[:, :1]).shape[-1]
  return chunked_cross_entropy(features_BxTxD, targets, model.logits, chunk), vocab


def chunked_cross_entropy(
  features_BxTxD: jax.Array, targets_BxT: jax.Array, logits_fn, chunk: int
) -> jax.Array:
  """`softmax_cross_entropy(logits_fn(features), targets)` per token, `chunk` positions at once.

  Each piece's logits `[B, chunk, V]` are computed in float32, reduced to its
  cross-entropy and dropped; the piece is rematerialised (`jax.checkpoint`), so
  the backward pass recomputes its logits instead of keeping them. Peak memory
  for the logits falls from `B*T*V` floats to `B*chunk*V`.

  Args:
    features_BxTxD: what `logits_fn` maps to logits.
    targets_BxT: integer targets.
    logits_fn: `[B, c, D] -> [B, c, V]`.
    chunk: the most positions a piece holds; the pieces are evened out
      (`ceil(T / chunk)` of them), the last one padded.

  Returns:
    The cross-entropy `[B, T]`, in float32.
  """
  b, t, d = features_BxTxD.shape
  n = -(-t // min(chunk, t))
  chunk = -(-t // n)  # the same number of pieces, evened out: padding under one a piece
  pad = n * chunk - t
  if pad:
    features_BxTxD = jnp.pad(features_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  pieces = (
    features_BxTxD.reshape(b, n, chunk, d).swapaxes(0, 1),
    targets_BxT.reshape(b, n, chunk).swapaxes(0, 1),
  )

  @jax.checkpoint
  def piece(args):
    features, targets = args
    logits = _float_logits(logits_fn(features))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  return jax.lax.map(piece, pieces).swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
