"""Reference Flax NNX models, and sampling from a language model."""

from jaxtrain.models.bert import BertClassifier, BertConfig, BertEncoder
from jaxtrain.models.generate import generate
from jaxtrain.models.transformer import Transformer
from jaxtrain.models.vision import CNN, MLP

__all__ = ["CNN", "MLP", "BertClassifier", "BertConfig", "BertEncoder", "Transformer", "generate"]
