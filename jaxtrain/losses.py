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
  model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None
) -> dict[str, jax.Array]:
  """Softmax cross-entropy and accuracy of `model(batch["image"])` against `batch["label"]`.

  Args:
    model: returns logits `[B, C]`; called with `rngs=` for dropout.
    batch: `image` and integer `label` `[B]` arrays.
    rngs: the step's random streams, or None in evaluation.

  Returns:
    `loss` and `accuracy` per example, in float32.
  """
  logits_BxC = model(batch["image"], rngs=rngs).astype(jnp.float32)
  labels_B = batch["label"]
  return {
    "loss": optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B),
    "accuracy": (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32),
  }
