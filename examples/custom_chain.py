# %% [markdown]
# # A custom Optax chain with `jaxtrain.train`
#
# `jaxtrain.optim` builds the optimizer that a config's `optim` section describes, but
# every piece of it is also public and returns a plain Optax object. This notebook composes
# its own chain from those pieces:
#
# 1. `optax.clip_by_global_norm` to clip the gradients,
# 2. `jaxtrain.optim.base("adamw", ...)` with a warm-up and cosine schedule from
#    `jaxtrain.optim.schedule`, and weight decay that skips biases,
# 3. `jaxtrain.optim.scale_by_path` to give the classifier head twice the learning rate,
#
# then trains a small MLP on scikit-learn's bundled 8x8 digits (no download) with
# `jaxtrain.train(..., tx=tx, schedule=sched)` and plots the curves from `metrics.jsonl`.
#
# Two environment variables make it quick to run as a script:
# `JAXTRAIN_EXAMPLE_WORKDIR` (default: a fresh temporary folder) and
# `JAXTRAIN_EXAMPLE_STEPS` (default: 600).

# %%
import functools
import json
import os
import pathlib
import tempfile

import matplotlib
import optax

import jaxtrain

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# %% [markdown]
# ## The run
#
# The steps must be a multiple of `train.steps_per_loop` (10 here), and so must the logging
# and evaluation intervals: we log and evaluate ten times over the run.

# %%
workdir = pathlib.Path(os.environ.get("JAXTRAIN_EXAMPLE_WORKDIR") or tempfile.mkdtemp())
steps = int(os.environ.get("JAXTRAIN_EXAMPLE_STEPS", "600"))
every = max(steps // 100 * 10, 10)

config = jaxtrain.config.get_config()
config.data.name = "digits"
config.train.steps = steps
config.train.batch_size = 64
config.train.steps_per_loop = 10
config.train.log_every = every
config.eval.every_steps = every
config.eval.batch_size = 128
config.ckpt.every_steps = 0  # only the final checkpoint

model = functools.partial(jaxtrain.models.MLP, 64, (128,), 10, dropout=0.1)
dataset = jaxtrain.data.digits()
loss_fn = functools.partial(jaxtrain.losses.classification, label_smoothing=0.05)
print(f"workdir: {workdir}, steps: {steps}, log and eval every {every} steps")

# %% [markdown]
# ## The optimizer
#
# The schedule counts optimizer updates: a linear warm-up over the first 10% of the steps,
# then a cosine decay to 0. Passing it to `train` as `schedule=` makes the `lr` column of
# `metrics.jsonl` report it. Since `train` is given `tx`, the config's `optim` section is
# not used. (To fine-tune only part of a model, wrap the chain in
# `jaxtrain.optim.freeze(tx, ["^hidden/"])`: matching parameters then get no updates.)

# %%
sched = jaxtrain.optim.schedule("cosine", lr=3e-3, total_steps=steps, warmup_steps=steps // 10)
tx = optax.chain(
  optax.clip_by_global_norm(1.0),
  jaxtrain.optim.base("adamw", sched, weight_decay=1e-4),
  jaxtrain.optim.scale_by_path({"^head/": 2.0}),
)

# %% [markdown]
# ## Training

# %%
result = jaxtrain.train(config, model, dataset, loss_fn, workdir=workdir, tx=tx, schedule=sched)
print(f"status: {result.status}")
print(f"eval metrics: {result.eval_metrics}")

# %% [markdown]
# ## The curves
#
# Each line of `metrics.jsonl` is one JSON object with the `step`, the `split` (`train` or
# `eval`) and that split's metrics.

# %%
lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
train_lines = [m for m in lines if m["split"] == "train"]
eval_lines = [m for m in lines if m["split"] == "eval"]

fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
ax_loss.plot([m["step"] for m in train_lines], [m["loss"] for m in train_lines], marker=".")
ax_loss.set(title="train loss", xlabel="step")
ax_acc.plot([m["step"] for m in eval_lines], [m["accuracy"] for m in eval_lines], marker=".")
ax_acc.set(title="eval accuracy", xlabel="step")
ax_lr.plot([m["step"] for m in train_lines], [m["lr"] for m in train_lines], marker=".")
ax_lr.set(title="learning rate", xlabel="step")
fig.tight_layout()
curves = workdir / "curves.png"
fig.savefig(curves)
print(f"curves: {curves}")
