"""Reference Flax NNX models."""

from jaxtrain.models.transformer import Transformer
from jaxtrain.models.vision import CNN, MLP

__all__ = ["CNN", "MLP", "Transformer"]
