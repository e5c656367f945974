"""Many configurations in one compiled program: a vmapped population of training states.

Members differ only in float hyperparameters (`KEYS`): the learning rate and
weight decay live in each member's optimizer state (`optim.tunable`, through
`optax.inject_hyperparams`), the seed in its parameters and random key, label
smoothing in a per-member argument of the loss. `jax.vmap` over the stacked
`TrainState` then makes one chunk that advances every member on the same
batches; each member gets its own evaluations, monitor (early stopping) and
`metrics.jsonl` lines (`"member": i`). A member that stops (its monitor, or
`prune`) keeps its state while the others go on (its updates are masked). The
population runs on `jaxtrain.run.Run`'s loop: it checkpoints the stacked states
with each member's status and best value every `ckpt.every_steps`, and a rerun on
its workdir, after a kill too, resumes exactly. At the end the best member is
saved in `DIR/best` as an ordinary run whose checkpoint `train` resumes:
`best/config.json` is that member's config, and the same command trains the same
parameters alone.

Example:
  >>> members = [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}, {"optim.lr": 1e-2}]
  >>> result = population.train(config, model, dataset, loss, members, workdir="runs/pop")
  >>> result.best, result.eval_metrics[result.best]
"""

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import (
  checkpoint,
  distributed,
  interrupt,
  metrics,
  optim,
  record,
  sharding,
  space,
  throughput,
)
from jaxtrain import config as config_lib
from jaxtrain import monitor as monitor_lib
from jaxtrain import parts as parts_lib
from jaxtrain import resume as resume_lib
from jaxtrain import run as run_lib
from jaxtrain import state as state_lib
from jaxtrain import step as step_lib
from jaxtrain import workdir as workdir_lib
from jaxtrain.config import ConfigError
from jaxtrain.evaluate import Evaluator

KEYS = ("optim.lr", "optim.weight_decay", "loss.label_smoothing", "train.seed")
Prune = Callable[[int, int, dict[str, float]], bool]  # (member, step, eval metrics) -> stop


class PopulationResult(NamedTuple):
  """What `train` returns: the stacked states and, per member, how it ended.

  Attributes:
    states: the members' `TrainState`s, stacked on a leading axis.
    configs: each member's config.
    eval_metrics: each member's last evaluation.
    best_values: each member's best evaluation of the metric.
    status: each member's `completed`, `stopped_early` or `pruned`.
    best: the index of the best member.
    workdir: the population's folder; `workdir / "best"` is the best member's run.
    stopped: `(status, reason)` when SIGTERM (`preempted`) or Ctrl-C
      (`interrupted`) stopped the population before its end; then no best
      member is saved yet: the population saved a checkpoint as it stopped,
      and `train` on the same workdir resumes it.
  """

  states: state_lib.TrainState
  configs: list[ml_collections.ConfigDict]
  eval_metrics: list[dict[str, float]]
  best_values: list[float | None]
  status: list[str]
  best: int
  workdir: pathlib.Path
  stopped: tuple[str, str] | None = None


def member_configs(
  config: ml_collections.ConfigDict, members: Sequence[Mapping[str, Any]]
) -> list[ml_collections.ConfigDict]:
  """Each member's config: `config` with its values, the data order fixed to `config`'s.

  Raises:
    ConfigError: a key outside `KEYS`, weight decay the optimizer cannot hold
      in its state, or a value the config refuses.
  """
  if not members:
    raise ConfigError("a population needs at least one member")
  out = []
  for i, values in enumerate(members):
    for key in values:
      if key not in KEYS:
        raise ConfigError(f"population member {i}: {key} cannot vary within one compiled "
                          f"program (it can: {', '.join(KEYS)})")  # fmt: skip
    out.append(space.apply(config, {**values, "data.seed": config_lib.data_seed(config)}))
    space.check(out[-1], {}, f"population member {i}")
  name = config.optim.name
  holders = [n for n, b in optim.BASES.items() if "weight_decay" in b.tunable]
  if any(c.optim.weight_decay != out[0].optim.weight_decay for c in out) and name not in holders:
    raise ConfigError(f"optim.weight_decay varies, but optim.name={name} cannot hold it "
                      f"in its state ({', '.join(holders)} can)")  # fmt: skip
  return out


def why_not(dims: Sequence[Any], config: ml_collections.ConfigDict) -> str | None:
  """Why a sweep's space cannot train as a population (None when it can)."""
  for dim in dims:
    if dim.key not in KEYS or (dim.kind == "choice" and dim.key != "train.seed"):
      return f"{dim.key} cannot vary within one compiled program (float keys of {', '.join(KEYS)})"
  corners = [{d.key: v for d in dims for v in (d.corners()[j],)} for j in (0, 1)]
  try:
    member_configs(config, corners)
  except ConfigError as e:
    return str(e)
  return None


def _member_loss(loss_fn: step_lib.LossFn, varies: bool) -> Callable[[Any], step_lib.LossFn]:
  """`smoothing -> loss`: the loss with that label smoothing when it varies, else as it is."""
  if not varies:
    return lambda _: loss_fn
  if not isinstance(loss_fn, functools.partial) or "label_smoothing" not in loss_fn.keywords:
    raise ConfigError(
      "loss.label_smoothing varies, but the loss is not a functools.partial with a "
      "label_smoothing keyword, such as losses.classification's"
    )
  return lambda smoothing: functools.partial(loss_fn, label_smoothing=smoothing)


def stacked(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for a leading member axis in front of each leaf's own (unsplit)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P(None, *x.sharding.spec)), tree)


class Program(NamedTuple):
  """The population's compiled parts, for a notebook or a benchmark to drive.

  `initial(configs)` is the stacked initial state; `chunk(states, batches,
  active)` runs `train.steps_per_loop` steps of every member (`active[i]` False
  keeps member `i` as it is); `evaluate.sums(states)` sums each member's eval
  metrics; `observe(states, values, active)` feeds the monitors.
  """

  init: Callable
  chunk: Callable
  observe: Callable
  evaluate: Evaluator
  spec: parts_lib.Spec
  watch: str  # the early-stopping metric's name, without eval/; "" for none
  abstract: state_lib.TrainState  # the stacked state's shapes, dtypes and shardings

  def initial(self, configs: list[ml_collections.ConfigDict]) -> state_lib.TrainState:
    """The members' initial states, stacked: each from its seed, with its hyperparameters."""
    seeds = jnp.asarray([c.train.seed for c in configs], jnp.uint32)
    return self.init(seeds, _hyper(configs, self.spec.abstract.opt_state))


def program(
  configs: list[ml_collections.ConfigDict],
  model: state_lib.ModelFn,
  data: Any,
  loss_fn: step_lib.LossFn,
) -> Program:
  """Prepares the base run with the tunable optimizer and compiles the population's functions."""
  base = configs[0]
  tx, unit = optim.tunable(parts_lib.optim_settings(base), multiplier=base.plateau.factor < 1)
  spec = parts_lib.prepare(base, model, data, loss_fn, tx=tx)
  mesh, accum = spec.mesh, base.optim.accum_steps
  shardings = stacked(spec.abstract, mesh)
  replicated = NamedSharding(mesh, P())
  smoothing = [c.loss.label_smoothing for c in configs]
  unwrapped = _member_loss(loss_fn, len(set(smoothing)) > 1)
  member_loss = unwrapped
  if isinstance(spec.rules, sharding.LogicalRules):  # as prepare wraps the run's loss
    member_loss = lambda ls: sharding.with_rules(unwrapped(ls), spec.rules, mesh)  # noqa: E731

  def init(seed: jax.Array, hyper: dict[str, jax.Array]) -> state_lib.TrainState:
    state = state_lib.init_fn(model, tx, seed, spec.policy)()
    opt_state = optax.tree_utils.tree_set(state.opt_state, **hyper)
    return state.replace(opt_state=opt_state, monitor=monitor_lib.init(spec.watch))

  def member_step(state, batch, ls):
    peak = optax.tree_utils.tree_get(state.opt_state, "learning_rate")
    return step_lib.train_step(
      state, batch, graphdef=spec.graphdef, tx=tx, loss_fn=member_loss(ls),
      schedule=lambda n: unit(n // accum) * peak, policy=spec.policy,
    )  # fmt: skip

  def chunk(states, batches, active, ls):
    def body(states, batch):
      return jax.vmap(member_step, in_axes=(0, None, 0))(states, batch, ls)

    new, out = jax.lax.scan(body, states, batches, unroll=spec.unroll)
    return _masked(active, new, states), out  # a stopped member keeps its state

  def observe(states, values, active):
    seen = jax.vmap(functools.partial(step_lib.observe, config=spec.watch))(states, values)
    return _masked(active, seen, states)

  def member_eval(state, batch, ls):
    return step_lib.eval_step(state, batch, graphdef=spec.graphdef, loss_fn=member_loss(ls),
                              policy=spec.policy)  # fmt: skip

  ls = jnp.asarray(smoothing, jnp.float32)
  evaluator = Evaluator(
    spec.graphdef, spec.loss_fn, data.eval, batch_size=spec.eval_batch_size,
    shardings=shardings, mesh=mesh, policy=spec.policy, transform=spec.augment[1],
    eval_fn=lambda states, batch: jax.vmap(member_eval, in_axes=(0, None, 0))(states, batch, ls),
  )  # fmt: skip
  with jax.set_mesh(mesh):
    return Program(
      init=jax.jit(jax.vmap(init), out_shardings=shardings),
      chunk=jax.jit(
        functools.partial(chunk, ls=ls),
        in_shardings=(shardings, sharding.batch_sharding(mesh, 1), replicated),
        out_shardings=(shardings, replicated), donate_argnums=0,
      ),
      observe=jax.jit(observe, out_shardings=shardings, donate_argnums=0),
      evaluate=evaluator,
      spec=spec,
      watch=base.early_stop.metric.removeprefix("eval/"),
      abstract=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct((len(configs), *x.shape), x.dtype,
                                                             sharding=s), spec.abstract, shardings),
    )  # fmt: skip


def _masked(active: jax.Array, new: Any, old: Any) -> Any:
  """`new` for the active members, `old` for the others (member axis first)."""
  keep = lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
  return jax.tree.map(keep, new, old)


def _hyper(configs: list[ml_collections.ConfigDict], opt_state: Any) -> dict[str, jax.Array]:
  """The members' `optim.tunable` values, `[P]` each, for those the state holds."""
  values = {"learning_rate": [c.optim.lr for c in configs],
            "weight_decay": [c.optim.weight_decay for c in configs]}  # fmt: skip
  held = {k for k in optim.TUNABLE if optax.tree_utils.tree_get_all_with_path(opt_state, k)}
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items() if k in held}


def train(
  config: ml_collections.ConfigDict,
  model: state_lib.ModelFn,
  data: Any,
  loss_fn: step_lib.LossFn,
  members: Sequence[Mapping[str, Any]],
  *,
  workdir: str | pathlib.Path | None = None,
  metric: str | None = None,
  mode: str | None = None,
  prune: Prune | None = None,
) -> PopulationResult:
  """Trains the members of `config` (each `{key: value}` of `KEYS`) together.

  Args:
    config: the base config; each member changes only its own keys.
    model: builds the model, as for `jaxtrain.train`.
    data: the dataset.
    loss_fn: the loss; a label smoothing that varies needs a
      `functools.partial` with a `label_smoothing` keyword.
    members: each member's values.
    workdir: the population's folder (`config.json`, `run.json`,
      `metrics.jsonl`, `best/`); None: a fresh temporary one.
    metric: the eval metric that ranks members (default: `early_stop.metric`,
      else `eval/loss`).
    mode: `max` or `min` (default: `early_stop.mode`, or from the name).
    prune: `prune(member, step, eval_metrics)` after each of an active
      member's evaluations; True stops that member (`pruned`).

  Returns:
    The stacked states and each member's outcome; the best is saved in `best/`.
  """
  configs = member_configs(config, members)
  metric = metric or config.early_stop.metric or "eval/loss"
  mode = mode or (config.early_stop.mode if metric == config.early_stop.metric
                  else "max" if "accuracy" in metric else "min")  # fmt: skip
  path = workdir_lib.resolve(workdir)
  compiled = program(configs, model, data, loss_fn)
  tally = _Tally(len(configs), metric.removeprefix("eval/"), mode, prune)
  with _PopulationRun(compiled, configs, path, tally) as run:
    for _ in run:
      pass
  return run.outcome


@dataclasses.dataclass
class _Tally:
  """Each member's status, best and last evaluation; a checkpoint keeps them."""

  size: int
  name: str  # the ranking metric, without eval/
  mode: str
  prune: Prune | None
  status: list[str] = dataclasses.field(default_factory=list)
  best: list[float | None] = dataclasses.field(default_factory=list)
  last: list[dict[str, float]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.status, self.best = ["running"] * self.size, [None] * self.size
    self.last = [{} for _ in range(self.size)]

  def active(self) -> np.ndarray:
    return np.asarray([s == "running" for s in self.status])

  def pick(self) -> int:
    """The best member (the first when none has a value)."""
    scored = [i for i in range(self.size) if self.best[i] is not None]
    if not scored:
      return 0
    return (max if self.mode == "max" else min)(scored, key=lambda i: self.best[i])

  def state_dict(self) -> dict[str, Any]:
    return {"status": self.status, "best": self.best, "last": self.last}

  def load(self, saved: dict[str, Any]) -> None:
    self.status, self.best, self.last = saved["status"], saved["best"], saved["last"]


class _PopulationRun(run_lib.Run):
  """The population on the run's own loop: chunks, metrics one chunk late, checkpoints.

  The stacked states are checkpointed with each member's status, best and last
  evaluation, so a killed population resumes exactly; its lines carry `member`.
  """

  def __init__(self, program: Program, configs: list[Any], path: Any, tally: _Tally):
    self.program, self.configs, self.tally, self.prune = program, configs, tally, None
    self.outcome, self.seconds = None, 0.0
    watch = dataclasses.replace(program.spec.watch, restore_best=False, best_metric="")
    stacked_spec = program.spec._replace(abstract=program.abstract, watch=watch)
    self._start(stacked_spec, path, "auto", ())

  def _restore(self) -> None:
    super()._restore()
    if self.restored:
      self.tally.load(self.restored.meta["tally"])

  def _build(self) -> None:
    restored = self.restored
    self.state = restored.state if restored else self.program.initial(self.configs)
    self.parts = parts_lib.Parts(self.spec, self.state, None, None,
                                 functools.partial(parts_lib.stream, self.spec), None)  # fmt: skip

  def _done(self) -> bool:
    return "running" not in self.tally.status

  def _parameters(self) -> dict[str, int]:
    return parts_lib.parameter_counts(self.program.spec)  # one member's

  def _dispatch(self, tuner: Any, chunk: Any) -> Any:
    active = jax.device_put(self.tally.active(), NamedSharding(self.spec.mesh, P()))
    start = time.perf_counter()
    with jax.transfer_guard("disallow"):  # no implicit transfers
      self.state, out = self.program.chunk(self.state, chunk, active)
    self.carry.step += self.spec.steps_per_loop
    self.carry.stop = distributed.largest(self.signals.vote)  # all stop at the same chunk
    self.seconds += time.perf_counter() - start
    return out

  def _log(self, end_step: int, out: Any, wait: float) -> None:
    host = jax.device_get(out)  # already computed
    self.run_record.first_chunk(self.started)
    cad = self.spec.run.cadence
    if end_step % cad.log_every == 0:
      for i in range(self.tally.size):
        line = {"member": i, "loss": float(np.mean(host["loss"][:, i]))}
        if "lr" in host:
          line["lr"] = float(host["lr"][-1, i])
        self._write(end_step, "train", line)
    self.progress.update(cad.steps_per_loop, loss=float(np.mean(host["loss"])))

  def _evaluate(self) -> None:  # no checkpoint is ranked
    """Evaluates every member, feeds the active ones' monitors and the pruner."""
    tally, program, step = self.tally, self.program, self.carry.step
    sums = program.evaluate.sums(self.state)
    count = np.asarray(sums.pop("count"))
    active = tally.active()
    values = {k: np.asarray(v) / count for k, v in sums.items()}
    if tally.name not in values:
      raise ConfigError(f"metric eval/{tally.name}: the evaluations report "
                        f"{', '.join('eval/' + k for k in values)}")  # fmt: skip
    if program.watch:
      watched = jnp.asarray(values[program.watch], jnp.float32)
      self.state = program.observe(self.state, watched, jnp.asarray(active))
    stops = np.asarray(jax.device_get(self.state.monitor.stop))
    for i in np.flatnonzero(active):
      tally.last[i] = {k: float(v[i]) for k, v in values.items()}
      value, best = tally.last[i][tally.name], tally.best[i]
      if best is None or (value > best if tally.mode == "max" else value < best):
        tally.best[i] = value
      self._write(step, "eval", {"member": int(i), **tally.last[i]})
      if stops[i]:
        tally.status[i] = "stopped_early"
      elif tally.prune and tally.prune(int(i), step, tally.last[i]):
        tally.status[i] = "pruned"

  def _meta(self, step: int) -> dict[str, Any]:
    spec = self.spec
    return record.checkpoint_meta(
      spec.run.config, spec.mesh, meter=self.meter.state_dict(), eval_metrics={}, skipped=0,
      monitor=spec.watch.key, prints=self.prints, lines=self.writer.lines_at(step),
    ) | {"tally": self.tally.state_dict()}  # fmt: skip

  def _finish(self) -> run_lib.TrainResult:
    self.ckpt.wait()
    tally, configs, c = self.tally, self.configs, self.carry
    if c.stop and c.step < self.spec.run.cadence.steps and "running" in tally.status:
      stopped = _stopped(c.stop, c.step, self._kept())
      self.run_record.update(status=stopped[0], reason=stopped[1], final_step=c.step)
      self.outcome = PopulationResult(self.state, configs, tally.last, tally.best,
                                      list(tally.status), tally.pick(), self.path,
                                      stopped)  # fmt: skip
      return self._result(stopped[0], stopped[1])
    status = ["completed" if s == "running" else s for s in tally.status]
    pick = tally.pick()
    member = jax.tree.map(lambda x: x[pick], self.state)
    _save_member(self.program, configs[pick], member, self.path / "best",
                 eval_metrics=tally.last[pick], status=status[pick], index=pick)  # fmt: skip
    rate = len(configs) * c.step / self.seconds if self.seconds else None
    self.run_record.update(status="completed", final_step=c.step, eval=tally.last[pick],
                           population={
      "members": [{k: config_lib.get(m, k) for k in KEYS} for m in configs], "status": status,
      "best_values": tally.best, "best_member": pick, "metric": f"eval/{tally.name}",
      "mode": tally.mode, "member_steps_per_sec": rate,
    })  # fmt: skip
    self.outcome = PopulationResult(self.state, configs, tally.last, tally.best, status, pick,
                                    self.path)  # fmt: skip
    return self._result("completed", None)

  def _result(self, status: str, reason: str | None) -> run_lib.TrainResult:
    return run_lib.TrainResult(self.state, self.spec.graphdef, {}, status, reason, self.path)


def _stopped(vote: int, step: int, kept: str) -> tuple[str, str]:
  """The status and reason of a population that SIGTERM or Ctrl-C stopped at `step`."""
  signal = "SIGTERM" if vote == interrupt.PREEMPTED else "Ctrl-C"
  reason = f"{signal} at step {step}; {kept}: rerun the same command to resume"
  return interrupt.STATUS[vote], reason


def _save_member(
  program: Program,
  config: ml_collections.ConfigDict,
  state: state_lib.TrainState,
  path: pathlib.Path,
  *,
  eval_metrics: dict[str, float],
  status: str,
  index: int,
) -> None:
  """Writes one member as an ordinary run in `path`: config, run record, checkpoint."""
  spec = program.spec
  ordinary = parts_lib.prepare(config, spec.model_fn, spec.data, spec.loss_fn)
  state = state.replace(opt_state=state.opt_state.inner_state)  # optim.tunable's inner chain
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, ordinary.abstract))
  path.mkdir(parents=True, exist_ok=True)
  lock = workdir_lib.hold(path)
  ckpt = None
  try:
    ckpt, _ = resume_lib.open_checkpoints(ordinary, path, "never")
    rec = record.start(ordinary, path, resumed_from=None,
                       parameters=parts_lib.parameter_counts(ordinary))  # fmt: skip
    step = int(jax.device_get(state.step))
    described = throughput.describe(spec.model_fn, spec.data.train[0], spec.batch_size)
    meter = metrics.Meter(ordinary.batch_size, described)
    meta = record.checkpoint_meta(
      ordinary.run.config, ordinary.mesh, meter=meter.state_dict(), eval_metrics=eval_metrics,
      skipped=0, monitor=ordinary.watch.key, initial=None,
    )  # fmt: skip
    ckpt.save(checkpoint.bundle(step, state, {"next_batch": step}, meta))
    ckpt.wait()
    rec.update(status=status, final_step=step, eval=eval_metrics,
               reason=f"member {index} of the population in {path.parent}")  # fmt: skip
  finally:
    if ckpt:
      ckpt.close()
    lock.release()
