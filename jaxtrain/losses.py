"""Loss functions with the signature `loss_fn(model, batch, rngs) -> per-example dict`.

Each returns arrays of shape `[B]`, including `"loss"`, so the train step can
average them and the eval step can mask padding and sum them exactly.

Example:
  >>> out = classification(model, {"image": x_BxHxW, "label": y_B}, None)
  >>> out["loss"].shape, out["accuracy"].shape
  ((B,), (B,))
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def classification(
  model: nnx.Module,
  batch: dict[str, jax.Array],
  rngs: nnx.Rngs | None,
  *,
  label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
  """Softmax cross-entropy and accuracy of `model(batch["image"])` against `batch["label"]`.

  Args:
    model: returns logits `[B, C]`; called with `rngs=` for dropout.
    batch: `image` and integer `label` `[B]` arrays.
    rngs: the step's random streams, or None in evaluation.
    label_smoothing: the target puts `1 - label_smoothing` on the label and
      spreads `label_smoothing` evenly over all `C` classes; `loss` is the
      cross-entropy against it, in training and evaluation alike.

  Returns:
    `loss` and `accuracy` per example, in float32.

  Example:
    >>> loss_fn = functools.partial(classification, label_smoothing=0.1)
  """
  logits_BxC = model(batch["image"], rngs=rngs).astype(jnp.float32)
  labels_B = batch["label"]
  if label_smoothing:
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
  model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None
) -> dict[str, jax.Array]:
  """Next-token cross-entropy of a language model over `batch["tokens"]` `[B, T]`.

  The model sees tokens `0..T-2` and predicts `1..T-1`. Returns per example the
  mean `loss` over its positions (in nats) and `bits_per_byte` (the same in
  bits, which for byte-level tokens is bits per byte).
  """
  tokens_BxT = batch["tokens"]
  logits_BxTxV = model(tokens_BxT[:, :-1], rngs=rngs).astype(jnp.float32)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT[:, 1:])
  loss_B = nll_BxT.mean(axis=-1)
  return {"loss": loss_B, "bits_per_byte": loss_B / jnp.log(2.0)}
