"""An MLP or a CNN on Fashion-MNIST (60,000 train, 10,000 test images).

    python -m experiments.fashion_mnist --workdir runs/fmnist_mlp
    python -m experiments.fashion_mnist --workdir runs/fmnist_cnn --config.model.name=cnn

The data comes from `--config.data.dir`, the Debian package
`dataset-fashion-mnist`, or a checked download. A quick variant:

    python -m experiments.fashion_mnist --workdir runs/fmnist_500 --config.train.steps=500

A deliberately long schedule (50 epochs) that the monitor stops early, ending with
the best evaluation's weights (BUILD_NOTES.md has the numbers):

    python -m experiments.fashion_mnist --workdir runs/fmnist_es \
      --config.train.steps=23400 --config.eval.every_steps=470 \
      --config.early_stop.metric=eval/accuracy --config.early_stop.mode=max \
      --config.early_stop.patience=5 --config.early_stop.min_delta=0.001 \
      --config.early_stop.restore_best=true
"""

import functools

import ml_collections
from absl import flags

import jaxtrain
from jaxtrain import cli, data, losses, models


def get_config() -> ml_collections.ConfigDict:
  """Ten epochs of batch 128, Adam 1e-3 on a cosine schedule; `model.name` picks mlp or cnn."""
  config = jaxtrain.config.get_config()
  config.data.name = "fashion_mnist"
  config.train.steps = 4680  # 10 epochs of 468 batches
  config.train.batch_size = 128
  config.train.log_every = 260
  config.eval.every_steps = 1170
  config.eval.batch_size = 1000
  config.optim.lr = 1e-3
  config.optim.schedule = "cosine"
  config.model.name = "mlp"  # mlp: 784-512-512-10; cnn: 2 conv blocks + dense 256
  config.model.hidden = (512, 512)
  config.model.channels = (32, 64)
  config.model.dense = 256
  config.model.dropout = 0.0  # after each hidden activation of the MLP, the CNN's dense layer
  return config


def make_model(model_config: ml_collections.ConfigDict) -> functools.partial:
  """Returns the model constructor that `model.name` names."""
  if model_config.name == "mlp":
    return functools.partial(
      models.MLP, 28 * 28, model_config.hidden, 10, dropout=model_config.dropout
    )
  if model_config.name == "cnn":
    return functools.partial(
      models.CNN,
      28,
      10,
      channels=model_config.channels,
      dense=model_config.dense,
      dropout=model_config.dropout,
    )
  raise jaxtrain.ConfigError(f"model.name={model_config.name!r} must be one of mlp, cnn")


MODEL_HELP = {
  "name": "mlp (784-512-512-10) or cnn (2 conv blocks + a dense layer)",
  "hidden": "mlp: widths of the hidden layers",
  "channels": "cnn: channels of the two conv blocks",
  "dense": "cnn: width of the dense layer",
  "dropout": "dropout after each hidden activation (mlp) or the dense layer (cnn)",
}


def task(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple:
  """The model, the dataset and the loss that `config` describes (`jaxtrain.plan` reads them)."""
  del workdir
  loss = functools.partial(losses.classification, label_smoothing=config.loss.label_smoothing)
  return make_model(config.model), data.fashion_mnist(config.data.dir), loss


def run(
  config: ml_collections.ConfigDict, workdir: str, resume: str = "auto"
) -> jaxtrain.TrainResult:
  """Trains the model that `config.model` names on Fashion-MNIST into `workdir`."""
  model, dataset, loss = task(config)
  return jaxtrain.train(config, model, dataset, loss, workdir=workdir, resume=resume)


def main(argv: list[str]) -> jaxtrain.TrainResult:
  """Trains with the `--config`, `--workdir` and `--resume` flags."""
  del argv
  return run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.resume)


if __name__ == "__main__":  # flags only when run: others import it, --config loads it
  cli.define_flags(__file__, MODEL_HELP)
  cli.run(main)
