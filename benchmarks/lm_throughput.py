"""Language-model training throughput: jaxtrain against hand-written loops, side by side.

One byte-level decoder (width 256, 4 blocks, 4 heads, SwiGLU MLP 1024, rotary
positions, RMSNorm, tied head; context 256, batch 16, AdamW with clipping),
trained on CPython's sources by:
- jaxtrain: `experiments.lm`'s model through `jaxtrain.train` (scanned chunks of
  `train.steps_per_loop` steps), its `tokens_per_sec` read from `metrics.jsonl`;
- a hand-written loop: the same `models.Transformer` and Optax chain, one
  jitted, donating step per dispatch;
- PyTorch eager and `torch.compile` (the `bench` extra), the same architecture
  written in `torch.nn` with `scaled_dot_product_attention`.
Runs alternate (`--repeats`), each timed after a warm-up with compilation
excluded; the script prints each one's median tokens/s, the ratios, and
jaxtrain's model FLOP/s as a share of a float32 matmul peak measured in the
same process.

    python benchmarks/lm_throughput.py
    python benchmarks/lm_throughput.py --steps 60 --repeats 2 --no_torch
"""

import functools
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

import jaxtrain
from jaxtrain import data, logs, losses, models, throughput

_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating runs of each loop.")
_K = flags.DEFINE_integer("steps_per_loop", 10, "jaxtrain's steps per dispatch.")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time PyTorch eager and torch.compile.")
D, LAYERS, HEADS, MLP, T, B, VOCAB = 256, 4, 4, 1024, 256, 16, 256
WARMUP = 10
LR = 1e-3


def model_fn():
  return functools.partial(
    models.Transformer, VOCAB, T, D, LAYERS, HEADS, mlp=MLP, scan_layers=False
  )


def corpus() -> np.ndarray:
  return data.python_stdlib(T, limit_bytes=4_000_000).train


def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.1))


def with_jaxtrain(steps: int) -> float:
  config = jaxtrain.config.get_config()
  config.train.steps = WARMUP + steps
  config.train.batch_size, config.train.steps_per_loop = B, _K.value
  config.train.log_every, config.eval.every_steps = _K.value, 0
  config.eval.batch_size, config.ckpt.every_steps = 64, 0
  text = data.python_stdlib(T, eval_fraction=0.0005, limit_bytes=4_000_000)
  with tempfile.TemporaryDirectory() as workdir:
    jaxtrain.train(config, model_fn(), text, losses.next_token, workdir=workdir, tx=tx())
    lines = [json.loads(x) for x in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  rates = [x["tokens_per_sec"] for x in lines if x["split"] == "train" and x["step"] > WARMUP]
  return statistics.median(rates)


def hand_written(source, steps: int) -> float:
  model = model_fn()(rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  optimizer = tx()
  opt_state = optimizer.init(params)

  def loss_fn(params, tokens):
    return losses.next_token(nnx.merge(graphdef, params), {"tokens": tokens}, None)["loss"].mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for i in range(WARMUP + steps):
    if i == WARMUP:
      jax.block_until_ready(params)
      start = time.perf_counter()
    batch = source.read(rng.integers(0, len(source), B))["tokens"]
    params, opt_state, loss = step(params, opt_state, batch)
  float(loss)
  return steps * B * T / (time.perf_counter() - start)


def torch_loop(source, steps: int, compiled: bool) -> float:
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  head_dim = D // HEADS
  inv = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
  angles = torch.arange(T).float()[:, None] * inv[None]
  cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [T, 1, H/2]

  def rope(x):  # [B, T, N, H]
    x1, x2 = x.chunk(2, dim=-1)
    t = x.shape[1]
    c, s = cos[:t], sin[:t]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.n1, self.n2 = nn.RMSNorm(D), nn.RMSNorm(D)
      self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
      self.gate, self.up = nn.Linear(D, MLP, bias=False), nn.Linear(D, MLP, bias=False)
      self.down = nn.Linear(MLP, D, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      h = self.n1(x)
      q, k, v = (f(h).view(b, t, HEADS, head_dim) for f in (self.q, self.k, self.v))
      q, k = rope(q), rope(k)
      att = nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
      )
      x = x + self.o(att.transpose(1, 2).reshape(b, t, D))
      h = self.n2(x)
      return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))

  class Decoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, D)
      self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
      self.norm = nn.RMSNorm(D)

    def forward(self, tokens):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x)
      return self.norm(x) @ self.embed.weight.T

  torch.manual_seed(0)
  model = Decoder()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)

  def step(tokens):
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  run = torch.compile(step) if compiled else step
  rng = np.random.default_rng(0)
  for i in range(WARMUP + steps):
    if i == WARMUP:
      start = time.perf_counter()
    batch = torch.from_numpy(source.read(rng.integers(0, len(source), B))["tokens"]).long()
    loss = run(batch)
  loss.item()
  return steps * B * T / (time.perf_counter() - start)


def main(argv):
  del argv
  logs.quiet_orbax_logs()
  if jax.device_count() != 1:
    raise SystemExit("run with one device (no --xla_force_host_platform_device_count)")
  source, steps = corpus(), _STEPS.value
  loops = {
    "jaxtrain": lambda: with_jaxtrain(steps),
    "jax.jit loop": lambda: hand_written(source, steps),
  }
  if _TORCH.value:
    loops["PyTorch eager"] = lambda: torch_loop(source, steps, compiled=False)
    loops["torch.compile"] = lambda: torch_loop(source, steps, compiled=True)
  rates = {name: [] for name in loops}
  peaks = []
  for _ in range(_REPEATS.value):
    peaks.append(throughput.measured_matmul())
    for name, loop in loops.items():
      rates[name].append(loop())
  median = {name: statistics.median(r) for name, r in rates.items()}
  flops_per_token = model_fn()(rngs=nnx.Rngs(0)).flops_per_token(T)
  peak = statistics.median(peaks)
  print(f"devices: {jax.devices()}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  print("| loop | tokens/s (median) | runs | jaxtrain / this |")
  print("| --- | --- | --- | --- |")
  for name, rate in median.items():
    runs = ", ".join(f"{r:,.0f}" for r in rates[name])
    print(f"| {name} | {rate:,.0f} | {runs} | {median['jaxtrain'] / rate:.2f}x |")
  share = median["jaxtrain"] * flops_per_token / peak
  print(f"jaxtrain model FLOP/s: {median['jaxtrain'] * flops_per_token / 1e9:.0f} G, "
        f"{share:.0%} of the matmul peak")  # fmt: skip


if __name__ == "__main__":
  app.run(main)
