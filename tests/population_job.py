"""A population of three digits members, run as a process of its own by tests/test_run.py.

Usage: python tests/population_job.py WORKDIR
"""

import sys

from absl import flags

from experiments import digits
from jaxtrain import population
from tests import helpers

MEMBERS = [{"optim.lr": 3e-3}, {"optim.lr": 1e-2, "train.seed": 7}, {"optim.lr": 5e-3}]


def config():
  """The population's base config: a checkpoint every 10 steps, and evaluations."""
  c = helpers.tiny_config(**{"train.steps": 60, "train.log_every": 10, "eval.every_steps": 20,
                             "ckpt.every_steps": 10, "ckpt.async": False})  # fmt: skip
  c.model = digits.get_config().model
  c.model.hidden = (16,)
  return c


def main(workdir: str) -> None:
  flags.FLAGS.mark_as_parsed()
  c = config()
  result = population.train(c, *digits.task(c), MEMBERS, workdir=workdir)
  print("best", result.best)


if __name__ == "__main__":
  main(sys.argv[1])
