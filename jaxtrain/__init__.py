"""jaxtrain: compiled, sharded JAX/Flax training with everything a run needs.

The public surface:
  train                       run a training job into a workdir
  Run                         the same job, stepped chunk by chunk (a notebook's)
  build, Parts                the pieces `train` runs (state, chunk, evaluator, batches)
  TrainState, TrainResult     the state pytree and what `train` returns
  ConfigError, DataError      bad input, reported in one line (exit status 2)
  CheckpointError             a checkpoint that cannot be written or read
  NonFiniteError              too many non-finite updates in a row
  config, data, finetune, losses, models, monitor, optim, precision, sharding, step,
  resume, weights, workdir    the modules
"""

__version__ = "0.2.0"

from jaxtrain import (
  config,
  data,
  finetune,
  losses,
  models,
  monitor,
  optim,
  precision,
  resume,
  sharding,
  step,
  weights,
  workdir,
)
from jaxtrain.checkpoint import CheckpointError
from jaxtrain.config import ConfigError
from jaxtrain.data.sources import DataError
from jaxtrain.loop import NonFiniteError, TrainResult, train
from jaxtrain.parts import Parts, build
from jaxtrain.run import Run, Tick
from jaxtrain.state import TrainState, create_state, merge_model

__all__ = [
  "CheckpointError",
  "ConfigError",
  "DataError",
  "NonFiniteError",
  "Parts",
  "Run",
  "Tick",
  "TrainResult",
  "TrainState",
  "__version__",
  "build",
  "config",
  "create_state",
  "data",
  "finetune",
  "losses",
  "merge_model",
  "models",
  "monitor",
  "optim",
  "precision",
  "resume",
  "sharding",
  "step",
  "train",
  "weights",
  "workdir",
]
