"""Reference Flax NNX models, pretrained decoders (GGUF, Hugging Face folders), and sampling."""

from jaxtrain.models.bert import BertClassifier, BertConfig, BertEncoder
from jaxtrain.models.generate import generate, generate_batch
from jaxtrain.models.pretrained import load_pretrained
from jaxtrain.models.transformer import Transformer
from jaxtrain.models.vision import CNN, MLP

__all__ = ["CNN", "MLP", "BertClassifier", "BertConfig", "BertEncoder", "Transformer", "generate",
           "generate_batch", "load_pretrained"]  # fmt: skip
