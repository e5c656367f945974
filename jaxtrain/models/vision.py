"""An MLP and a small CNN for image classification (Flax NNX).

Both take `[B, H, W]` or `[B, H, W, C]` float images and return logits
`[B, num_classes]`. With `dropout > 0`, dropout follows every hidden activation;
it draws from the `dropout` stream of the `rngs=` passed to the call, and is off
after `model.eval()`. The MLP's parameters and hidden activations carry logical
axis names (`embed`, `mlp`, `batch`) for `mesh.rules`.

Example:
  >>> model = MLP(in_features=784, hidden=(512, 512), num_classes=10, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((4, 28, 28))).shape
  (4, 10)
"""

import itertools
from collections.abc import Sequence

import jax
from flax import nnx

from jaxtrain import sharding
from jaxtrain.config import ConfigError
from jaxtrain.models import args

# Logical axes of the MLP's kernels, alternating so that under tensor parallelism a
# layer split on its outputs feeds one split on its inputs (Megatron's pairing).
_LAYER_AXES = (("embed", "mlp"), ("mlp", "embed"))


def _linear(din: int, dout: int, names: tuple[str | None, str | None], rngs: nnx.Rngs):
  """A dense layer whose kernel and bias carry logical axis names (`sharding.named_axes`)."""
  return nnx.Linear(din, dout, kernel_metadata={"logical_axes": names},
                    bias_metadata={"logical_axes": names[1:]}, rngs=rngs)  # fmt: skip


class MLP(nnx.Module):
  """Flatten, then `Linear -> ReLU` per hidden width, then a linear head."""

  def __init__(
    self,
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
  ):
    args.positive("MLP", in_features=in_features, num_classes=num_classes)
    if hidden:
      args.positive("MLP", hidden=hidden)
    args.dropout_rate("MLP", dropout)
    widths = [in_features, *hidden]
    self.hidden = nnx.List(
      [
        _linear(a, b, _LAYER_AXES[i % 2], rngs)
        for i, (a, b) in enumerate(itertools.pairwise(widths))
      ]
    )
    self.head = _linear(widths[-1], num_classes, (_LAYER_AXES[len(hidden) % 2][0], None), rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Returns the logits `[B, num_classes]` of images `x`."""
    x_BxD = x.reshape(x.shape[0], -1)
    for i, layer in enumerate(self.hidden):
      x_BxD = sharding.constrain(nnx.relu(layer(x_BxD)), ("batch", _LAYER_AXES[i % 2][1]))
      x_BxD = self.dropout(x_BxD, rngs=rngs)
    return self.head(x_BxD)


class CNN(nnx.Module):
  """Two `conv 3x3 -> ReLU -> 2x2 average pool` blocks, then a 2-layer MLP head."""

  def __init__(
    self,
    image_size: int,
    num_classes: int,
    *,
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64),
    dense: int = 256,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
  ):
    args.positive(
      "CNN", image_size=image_size, num_classes=num_classes, in_channels=in_channels, dense=dense
    )
    args.positive("CNN", channels=channels)
    args.dropout_rate("CNN", dropout)
    if image_size < 2 ** len(channels):
      raise ConfigError(
        f"CNN: image_size={image_size} is too small for {len(channels)} pooling blocks "
        f"(at least {2 ** len(channels)})"
      )
    widths = [in_channels, *channels]
    self.convs = nnx.List(
      [nnx.Conv(a, b, kernel_size=(3, 3), rngs=rngs) for a, b in itertools.pairwise(widths)]
    )
    side = image_size // 2 ** len(channels)
    self.dense = nnx.Linear(side * side * widths[-1], dense, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Returns the logits `[B, num_classes]` of images `x`."""
    x_BxHxWxC = x[..., None] if x.ndim == 3 else x
    for conv in self.convs:
      x_BxHxWxC = nnx.avg_pool(nnx.relu(conv(x_BxHxWxC)), window_shape=(2, 2), strides=(2, 2))
    x_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    return self.head(self.dropout(nnx.relu(self.dense(x_BxD)), rngs=rngs))
