"""Reference Flax NNX models, and sampling from a language model."""

from jaxtrain.models.generate import generate
from jaxtrain.models.transformer import Transformer
from jaxtrain.models.vision import CNN, MLP

__all__ = ["CNN", "MLP", "Transformer", "generate"]
