"""An MLP on scikit-learn's bundled 8x8 digits: the offline quick start.

    python -m experiments.digits --workdir /tmp/digits

Runs in well under a minute on a laptop CPU and reaches about 97% test accuracy.
A quicker variant:

    python -m experiments.digits --workdir /tmp/digits --config.train.steps=200
"""

import functools

import ml_collections
from absl import flags

import jaxtrain
from jaxtrain import cli, data, losses, models


def get_config() -> ml_collections.ConfigDict:
  """The digits run: 600 steps of batch 64, Adam 1e-3, a 64-128-10 MLP."""
  config = jaxtrain.config.get_config()
  config.data.name = "digits"
  config.train.steps = 600
  config.train.batch_size = 64
  config.train.log_every = 50
  config.eval.every_steps = 200
  config.eval.batch_size = 128
  config.optim.lr = 1e-3
  config.model.hidden = (128,)
  config.model.dropout = 0.0
  return config


_CONFIG = cli.define_config(get_config())
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the run's files.", required=True)


def main(argv: list[str]) -> jaxtrain.TrainResult:
  """Trains the digits MLP."""
  del argv
  config = _CONFIG.value
  model = functools.partial(models.MLP, 64, config.model.hidden, 10, dropout=config.model.dropout)
  loss = functools.partial(losses.classification, label_smoothing=config.loss.label_smoothing)
  return jaxtrain.train(config, model, data.digits(), loss, workdir=_WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
