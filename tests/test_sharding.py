"""Sharding rules: the table places each state leaf."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtrain import sharding
from tests import helpers


def test_fsdp_rule_shards_largest_divisible_dimension():
  mesh = helpers.mesh((2, 4, 1))
  rule = sharding.fsdp(min_size=16)
  assert rule((64, 32), mesh) == P("fsdp", None)
  assert rule((30, 64), mesh) == P(None, "fsdp")  # 30 is not divisible by 4
  assert rule((6, 10), mesh) == P()  # nothing divisible
  assert rule((8,), mesh) == P()  # below min_size
  assert rule((), mesh) == P()


def test_rules_table_first_match_wins():
  mesh = helpers.mesh((1, 8, 1))
  tree = {"embed": np.zeros((128, 64)), "dense": {"kernel": np.zeros((64, 128))}}
  rules = ((r"embed", sharding.replicate()), (r".*", sharding.fsdp()))
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, rules))
  assert specs == {"embed": P(), "dense": {"kernel": P(None, "fsdp")}}


def test_fsdp_state_is_born_sharded():
  from jaxtrain import state as state_lib  # noqa: PLC0415

  mesh = helpers.mesh((1, 8, 1))
  _, state = state_lib.create_state(helpers.mlp((256,)), helpers.adam(), seed=0, mesh=mesh)
  kernel = state.params["hidden"][0]["kernel"]  # 64 x 256
  assert kernel.sharding.spec == P(None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 32)}
  assert state.step.sharding.is_fully_replicated
