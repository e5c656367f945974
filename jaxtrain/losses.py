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
