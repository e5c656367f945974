"""Fine-tuning transforms: train only some parameters, layer-wise rates, gradual unfreezing.

Each is a plain `optax.GradientTransformation` over parameter paths (the
`/`-joined keys, such as `encoder/layers/3/query/kernel`), so a notebook can
chain them by hand; `jaxtrain.optim.optimizer` builds them from the `optim`
config keys (`optim.trainable`, `optim.layer_decay`, `optim.unfreeze`).

Example:
  >>> tx = train_only(optax.adam(1e-3), ["lora_", "^head/"])       # LoRA: adapters, head
  >>> tx = optax.chain(optax.adam(2e-5), layerwise_decay(0.8))     # lower layers learn slower
  >>> tx = unfreeze_schedule(optax.adam, 1e-4, {"layers/5/": 100, "layers/4/": 200})
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain import sharding
from jaxtrain.config import LAYER_PATTERN

EMBED_PATTERN = r"(^|/)embed(dings)?/"  # the input embeddings: below the first layer
STACKED_PATTERN = r"^blocks/(?!\d+/)"  # a scanned Transformer's blocks: layers along axis 0


def _labels(params: Any, label: Callable[[str], str]) -> Any:
  return jax.tree.map_with_path(lambda p, _: label(sharding.path_str(p)), params)


def train_only(
  tx: optax.GradientTransformation, patterns: Sequence[str]
) -> optax.GradientTransformation:
  """Applies `tx` only to the parameters whose paths match one of `patterns`.

  The others get zero updates and no optimizer state, as with `optim.freeze`:
  `train_only(tx, ["lora_", "^head/"])` trains a LoRA model's adapters and head.
  """
  compiled = [re.compile(p) for p in patterns]
  train = lambda path: "trained" if any(c.search(path) for c in compiled) else "frozen"  # noqa: E731
  return optax.multi_transform(
    {"trained": tx, "frozen": optax.set_to_zero()}, lambda params: _labels(params, train)
  )


def layer_depths(
  paths: Sequence[str], layer_pattern: str = LAYER_PATTERN, embed_pattern: str = EMBED_PATTERN
) -> dict[str, tuple[int, int]]:
  """Each path's depth and the deepest: embeddings 0, layer `i` is `i + 1`, the rest on top.

  Returns:
    `{path: (depth, top)}`, where `top` is the layer count plus 1 (the head).
  """
  layer, embed = re.compile(layer_pattern), re.compile(embed_pattern)
  found = {p: m for p in paths if (m := layer.search(p))}
  top = 1 + max((int(m.groups()[-1]) + 1 for m in found.values()), default=0)
  depths = {}
  for p in paths:
    if p in found:
      depths[p] = (int(found[p].groups()[-1]) + 1, top)
    else:
      depths[p] = (0 if embed.search(p) else top, top)
  return depths


def layerwise_decay(
  decay: float,
  layer_pattern: str = LAYER_PATTERN,
  embed_pattern: str = EMBED_PATTERN,
  stacked_pattern: str = STACKED_PATTERN,
) -> optax.GradientTransformation:
  """Scales each update by `decay ** (top - depth)`: the head by 1, each layer below by `decay`.

  With `L` layers (matched by `layer_pattern`, whose last group is the index),
  layer `i` gets `decay ** (L - i)`, the embeddings `decay ** (L + 1)`, and
  anything else (the head) 1. A parameter matching `stacked_pattern` holds
  every layer along its first axis (a scanned model's blocks, `[L, ...]`): row
  `i` gets layer `i`'s scale. Chained after an optimizer, it keeps no state.

  Example:
    >>> tx = optax.chain(optax.adamw(1e-4), layerwise_decay(0.75))
  """
  stacked = re.compile(stacked_pattern)

  def update(
    updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del params
    leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    paths = {sharding.path_str(p): u for p, u in leaves}
    rows = max((u.shape[0] for p, u in paths.items() if stacked.search(p)), default=0)
    depths = layer_depths([p for p in paths if not stacked.search(p)], layer_pattern,
                          embed_pattern)  # fmt: skip
    top = max([rows + 1, *(t for _, t in depths.values())])

    def scale(path: Any, u: jax.Array) -> jax.Array:
      name = sharding.path_str(path)
      if stacked.search(name):  # layer i of the stack is at depth i + 1
        per_row = decay ** (top - 1 - jnp.arange(u.shape[0], dtype=jnp.float32))
        return u * per_row.reshape(-1, *([1] * (u.ndim - 1))).astype(u.dtype)
      depth, own_top = depths[name]
      depth = top if depth == own_top else depth  # not a layer nor an embedding: on top
      return u if depth == top else u * jnp.asarray(decay ** (top - depth), u.dtype)

    return jax.tree.map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def stage_of(starts: Mapping[str, int]) -> Callable[[str], int]:
  """A path's first training update: the first pattern of `starts` it matches, else 0."""
  compiled = [(re.compile(p), s) for p, s in starts.items()]
  return lambda path: next((s for c, s in compiled if c.search(path)), 0)


def hold_until(starts: Mapping[str, int]) -> optax.GradientTransformation:
  """Zeroes the gradients of each group before its start update (its own update count).

  Chained before clipping, so that a group still held back adds nothing to the
  global norm.
  """
  stage = stage_of(starts)

  def update(
    updates: optax.Updates, state: optax.ScaleByScheduleState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
    del params

    def hold(path: Any, u: jax.Array) -> jax.Array:
      start = stage(sharding.path_str(path))
      return u if not start else jnp.where(state.count >= start, u, jnp.zeros_like(u))

    return jax.tree.map_with_path(hold, updates), optax.ScaleByScheduleState(
      optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(
    lambda _: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), update
  )


def unfreeze_schedule(
  make: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
  learning_rate: optax.ScalarOrSchedule,
  starts: Mapping[str, int],
) -> optax.GradientTransformation:
  """Gradual unfreezing: each parameter group starts training at its own update.

  `starts` maps path patterns to the update from which the matching parameters
  train (the first pattern a path matches counts; unmatched paths train from
  update 0). Each group gets its own `make(learning_rate)` inside
  `optax.conditionally_mask`: before its start its updates are zero and its
  optimizer state does not move, so Adam's moments and bias correction start
  with the group, while its schedule is shifted to follow the global update
  count. The start is a traced comparison, so the step is compiled once.

  Args:
    make: builds the optimizer from a learning rate (say `optax.adam`).
    learning_rate: a number or a schedule of the global update count.
    starts: `{path pattern: first update}`.

  Example:
    >>> tx = unfreeze_schedule(optax.adam, 1e-4, {"^encoder/": 300})  # head first
  """
  stage = stage_of(starts)
  groups = sorted({0, *starts.values()})

  def shifted(start: int) -> optax.ScalarOrSchedule:
    if not callable(learning_rate) or not start:
      return learning_rate
    return lambda count: learning_rate(count + start)

  transforms = {
    f"from_{s}": make(learning_rate) if not s
    else optax.conditionally_mask(make(shifted(s)), lambda count, s=s: count >= s)
    for s in groups
  }  # fmt: skip
  label = lambda path: f"from_{stage(path)}"  # noqa: E731
  return optax.multi_transform(transforms, lambda params: _labels(params, label))
