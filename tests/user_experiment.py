"""A user's own experiment module with one of a user's mistakes in it, chosen by `--case`.

    python -m tests.user_experiment --workdir runs/x --case=scalar_loss

Each case is a model, loss or dataset that a user writes; the framework must
refuse it with one line and exit status 2 before anything is compiled or written.
"""

import functools
import time

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import jaxtrain
from jaxtrain import cli, data, losses, models


def get_config():
  config = jaxtrain.config.get_config()
  config.train.steps, config.train.batch_size, config.train.steps_per_loop = 20, 16, 10
  config.train.log_every, config.eval.every_steps, config.eval.batch_size = 10, 0, 32
  return config


def _mlp():
  return functools.partial(models.MLP, 64, (16,), 10)


def _digits(**changes):
  """200 train and 100 eval digits; `changes` maps a field to a function of its array."""
  ds = data.digits()

  def split(source, n):
    arrays = {k: v[:n] for k, v in source.arrays.items()}
    return data.ArraySource(
      source.name, **{k: changes.get(k, np.asarray)(v) for k, v in arrays.items()}
    )

  return data.Dataset("user", split(ds.train, 200), split(ds.eval, 100))


def _tokens(high, length):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, high, (64, length + 1)).astype(np.int32)
  return data.Dataset("tok", data.ArraySource("tok/train", tokens=tokens),
                      data.ArraySource("tok/eval", tokens=tokens[:16]))  # fmt: skip


def _lm(vocab, length):
  return functools.partial(models.Transformer, vocab, length, 16, 1, 2)


class _Wrapped:
  """Another source's records under a name of its own."""

  name = "wrapped"

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


class _SlowSource(_Wrapped):
  """The digits, read at a tenth of a second a batch: chunks take a while to come."""

  name = "slow digits"

  def read(self, indices):
    time.sleep(0.1)
    return self.source.read(indices)


def _no_loss_key(model, batch, rngs):
  return {"nll": losses.classification(model, batch, rngs)["loss"]}


def _scalar_loss(model, batch, rngs):
  return {"loss": losses.classification(model, batch, rngs)["loss"].mean()}


def _per_class_loss(model, batch, rngs):
  return {"loss": model(batch["image"], rngs=rngs)}


def _missing_field(model, batch, rngs):
  return {"loss": model(batch["pixels"], rngs=rngs).sum(-1)}


def _loss_bug(model, batch, rngs):
  return {"loss": jnp.dot(model(batch["image"], rngs=rngs), batch["label"])}


class _Raises(_Wrapped):
  """A source of the user's own that fails on record 42."""

  name = "mine"

  def __getitem__(self, i):
    if i == 42:
      raise IndexError("record 42 went missing")
    return self.source[i]


class _IntOutput(nnx.Module):
  def __init__(self, *, rngs):
    self.mlp = models.MLP(64, (16,), 10, rngs=rngs)

  def __call__(self, x, *, rngs=None):
    return self.mlp(x, rngs=rngs).astype(jnp.int32)


class _NoParams(nnx.Module):
  def __init__(self, *, rngs):
    del rngs

  def __call__(self, x, *, rngs=None):
    return jnp.zeros((x.shape[0], 10))


def _int_loss(model, batch, rngs):
  return {"loss": losses.classification(model, batch, rngs)["loss"].astype(jnp.int32)}


def _case(name):
  """Returns `(model, dataset, loss_fn)` with the mistake `name` in it."""
  mlp, digits, classify = _mlp(), _digits(), losses.classification
  built = models.MLP(64, (16,), 10, rngs=nnx.Rngs(0))
  slow = data.Dataset("slow", _SlowSource(data.digits().train), data.digits().eval)
  cases = {
    "ok": (mlp, digits, classify),
    "slow": (mlp, slow, classify),
    "no_loss_key": (mlp, digits, _no_loss_key),
    "scalar_loss": (mlp, digits, _scalar_loss),
    "per_class_loss": (mlp, digits, _per_class_loss),
    "model_instance": (built, digits, classify),
    "missing_field": (mlp, digits, _missing_field),
    "float_labels": (mlp, _digits(label=lambda y: y.astype(np.float32)), classify),
    "labels_outside": (mlp, _digits(label=lambda y: y + 2), classify),
    "tokens_beyond_vocab": (_lm(128, 32), _tokens(256, 32), losses.next_token),
    "too_long": (_lm(256, 32), _tokens(256, 64), losses.next_token),
    "loss_bug": (mlp, digits, _loss_bug),
    "model_without_rngs": (lambda: built, digits, classify),
    "int_logits": (_IntOutput, digits, classify),
    "int_loss": (mlp, digits, _int_loss),
    "no_params": (_NoParams, digits, classify),
    "string_field": (mlp, _digits(label=lambda y: y.astype(str)), classify),
    "source_raises": (mlp, data.Dataset("r", _Raises(data.digits().train), digits.eval), classify),
    "not_a_dataset": (mlp, (digits.train, digits.eval), classify),
  }
  return cases[name]


def main(argv):
  del argv
  config = _FLAGS.config.value
  model, dataset, loss_fn = _case(_CASE.value)
  return jaxtrain.train(
    config, model, dataset, loss_fn, workdir=_FLAGS.workdir.value, resume=_FLAGS.resume.value
  )


if __name__ == "__main__":  # flags only when run: --config loads this file
  _FLAGS = cli.define_flags(__file__)
  _CASE = flags.DEFINE_string("case", "ok", "Which mistake to make.")
  cli.run(main)
