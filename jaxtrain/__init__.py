"""jaxtrain: compiled, sharded JAX/Flax training with everything a run needs.

The public surface:
  train                       run a training job into a workdir
  TrainState, TrainResult     the state pytree and what `train` returns
  ConfigError, DataError      bad input, reported in one line (exit status 2)
  config, data, losses, models, optim, sharding, step   the modules
"""

from jaxtrain import config, data, losses, models, optim, sharding, step
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.loop import TrainResult, train
from jaxtrain.state import TrainState, create_state, merge_model

__all__ = [
  "ConfigError",
  "DataError",
  "TrainResult",
  "TrainState",
  "config",
  "create_state",
  "data",
  "losses",
  "merge_model",
  "models",
  "optim",
  "sharding",
  "step",
  "train",
]
