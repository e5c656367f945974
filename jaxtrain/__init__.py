"""jaxtrain: compiled, sharded JAX/Flax training with everything a run needs.

The public surface:
  train                       run a training job into a workdir
  TrainState, TrainResult     the state pytree and what `train` returns
  ConfigError, DataError      bad input, reported in one line (exit status 2)
  NonFiniteError              too many non-finite updates in a row
  config, data, losses, models, monitor, optim, precision, sharding, step   the modules
"""

from jaxtrain import config, data, losses, models, monitor, optim, precision, sharding, step
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.loop import NonFiniteError, TrainResult, train
from jaxtrain.state import TrainState, create_state, merge_model

__all__ = [
  "ConfigError",
  "DataError",
  "NonFiniteError",
  "TrainResult",
  "TrainState",
  "config",
  "create_state",
  "data",
  "losses",
  "merge_model",
  "models",
  "monitor",
  "optim",
  "precision",
  "sharding",
  "step",
  "train",
]
