"""What a rerun on a workdir resumes: the newest readable checkpoint, if the config allows.

`open_checkpoints` restores the newest readable step. `check_resume` decides
whether a rerun whose config differs from its checkpoint's may resume: the keys
in `RESUMABLE` may change, any other change is refused unless `resume="force"`,
and `resume="never"` refuses a workdir that holds checkpoints at all. A
checkpoint of other data, another tokenizer or other initial weights is refused
too. `resumed_state`, `start_batch` and `restore_best` turn what was restored
into the state and the batch the loop goes on from.

Example:
  >>> ckpt, restored = open_checkpoints(spec, path, "auto")
  >>> check_resume("auto", saved_config, spec.run.config, step=600)
"""

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from jaxtrain import checkpoint, logs, record
from jaxtrain import config as config_lib
from jaxtrain import parts as parts_lib
from jaxtrain.config import ConfigError

RESUME_MODES = ("auto", "never", "force")
# Keys a resumed run may change: none changes which batch a step sees or what a step computes.
RESUMABLE = (
  "train.steps",  # continue a finished run, or end sooner
  "train.steps_per_loop",  # when it divides the checkpoint's step
  "train.log_every",
  "train.log_norms",
  "train.unroll",
  "train.compile_cache",
  "eval.every_steps",
  "ckpt.every_steps",
  "ckpt.keep",
  "ckpt.async",
  "data.workers",
  "data.max_workers",
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "mesh.rules",
  "profile.start_step",
  "profile.steps",
  "logging.wandb",
  "logging.mlflow",
)


def changed_keys(
  saved: Mapping[str, Any], config: config_lib.Snapshot
) -> dict[str, tuple[Any, Any]]:
  """The keys whose values differ between a checkpoint's config and `config`.

  Args:
    saved: the checkpoint's config, as a nested dict (from JSON).
    config: this run's config.

  Returns:
    `{key: (old, new)}`, sorted by key; keys only one of them has are left out
    (a newer jaxtrain may add keys with defaults).
  """
  old, new = config_lib.flatten_dict(dict(saved)), config.flat()
  return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def check_resume(
  mode: str, saved: Mapping[str, Any], config: config_lib.Snapshot, step: int
) -> dict[str, tuple[Any, Any]]:
  """Refuses a resume that changes keys outside `RESUMABLE`, unless `mode` is force.

  Args:
    mode: one of `RESUME_MODES` (never is handled before any checkpoint is read).
    saved: the checkpoint's config.
    config: this run's config.
    step: the checkpoint's step, for the message.

  Returns:
    The changed keys outside `RESUMABLE` that `force` lets through, `{key: (old, new)}`.

  Raises:
    ConfigError: naming every such key with its old and new value.
  """
  changes = changed_keys(saved, config)
  refused = {k: v for k, v in changes.items() if k not in RESUMABLE}
  if refused and mode != "force":
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
    raise ConfigError(
      f"the config differs from the checkpoint at step {step}: {listed}; to resume, keep the "
      "checkpoint's values (or change only what a resume allows), use another workdir to "
      "start afresh, or pass --resume=force"
    )
  return refused


def _show(value: Any) -> str:
  return json.dumps(value)


def check_mode(mode: str) -> None:
  """Raises `ConfigError` for an unknown resume mode."""
  if mode not in RESUME_MODES:
    raise ConfigError(f"resume={mode!r} must be one of {', '.join(RESUME_MODES)}")


def open_checkpoints(
  spec: parts_lib.Spec,
  path: pathlib.Path,
  resume: str,
  *,
  prints: Mapping[str, Any] | None = None,
) -> tuple[checkpoint.Checkpointer, checkpoint.Restored | None]:
  """Opens `path/checkpoints` and restores the newest readable step, if `resume` allows.

  Args:
    spec: the prepared run: its config is compared with the checkpoint's, its
      abstract state is restored into; a checkpoint of a run that loaded
      initial weights resumes only from the same source (by sha256).
    path: the workdir.
    resume: one of `RESUME_MODES`.
    prints: the data's `record.fingerprints`: a checkpoint trained on other
      data, or with another tokenizer, is not resumed.

  Returns:
    The checkpointer, and the restored bundle or None for a fresh start.

  Raises:
    ConfigError: `never` and checkpoints exist, or the config may not resume
      the newest readable step; nothing is written.
    CheckpointError: no step is readable; `run.json` records the failure.
  """
  best_metric, best_mode = spec.watch.best
  ckpt = checkpoint.Checkpointer(
    path / "checkpoints",
    keep=spec.run.keep,
    async_save=spec.run.async_save,
    best_metric=best_metric,
    best_mode=best_mode,
  )
  try:
    held = ckpt.steps() or ckpt.corrupt_folders()
    if resume == "never" and held:
      raise ConfigError(
        f"workdir {path} holds checkpoints ({', '.join(map(str, held))}) and resume is never: "
        "use another workdir, or --resume=auto to resume"
      )
    accept = lambda meta, step: _check_resumable(spec, resume, meta, step, prints)  # noqa: E731
    restored = ckpt.restore(parts_lib.checkpointed(spec, spec.abstract), accept=accept)
  except checkpoint.CheckpointError as e:
    if jax.process_index() == 0:
      record.mark_failed(path, f"CheckpointError: {e}")
    ckpt.close()
    raise
  except BaseException:
    ckpt.close()
    raise
  if restored:
    logs.note(f"resuming from the checkpoint at step {restored.step} in {path}")
  return ckpt, restored


def _check_resumable(
  spec: parts_lib.Spec,
  resume: str,
  meta: Mapping[str, Any],
  step: int,
  prints: Mapping[str, Any] | None,
) -> None:
  """Raises `ConfigError` when `spec`'s run may not resume the checkpoint at `step`."""
  initial, config = spec.initial, spec.run.config
  saved_sha = meta.get("initial_sha256")
  if saved_sha and (initial is None or initial.sha256 != saved_sha):
    now = f"{initial.source} holds {initial.sha256[:12]}..." if initial else "is empty"
    raise ConfigError(
      f"the checkpoint at step {step} was trained from the initial weights {saved_sha[:12]}..., "
      f"and init.source {now}; give the same source to resume, or use another workdir"
    )
  changed = data_change(meta.get("fingerprints"), prints, step)
  if changed and resume != "force":
    raise ConfigError(f"{changed}; put the old one back to resume, use another workdir, or "
                      "pass --resume=force")  # fmt: skip
  if changed:
    logging.warning("resuming anyway (--resume=force): %s", changed)
  if "config" in meta:
    check_resume(resume, meta["config"], config, step)
  else:  # saved before checkpoints held their config: only the data order is known
    now = config.flat()
    for key, saved in meta["data_order"].items():
      if now[key] != saved and resume != "force":
        raise ConfigError(
          f"{key}={now[key]!r} differs from {saved!r} in the checkpoint at "
          f"step {step}; keep it to resume, or use another workdir"
        )
  k = spec.steps_per_loop
  if step % k:
    raise ConfigError(
      f"train.steps_per_loop={k} does not divide the checkpoint's step {step}; "
      "pick one that does to resume"
    )


def data_change(
  saved: Mapping[str, Any] | None, prints: Mapping[str, Any] | None, step: int
) -> str | None:
  """How the data or its files differ from the checkpoint's record (`record.fingerprints`)."""
  if not saved or not prints:  # a checkpoint from before data was recorded
    return None
  for name, sha in saved.get("files", {}).items():
    now = prints["files"].get(name)
    if now != sha:
      state = f"now {now[:12]}..." if now else "now absent"
      return (f"{name} in the workdir differs from the one the checkpoint at step {step} "
              f"trained with (sha256 {sha[:12]}..., {state})")  # fmt: skip
  for split in ("train", "eval"):
    if saved.get(split) != prints.get(split):
      return (f"the {split} data differs from the data the checkpoint at step {step} trained "
              f"on (fingerprint {saved.get(split)}, now {prints.get(split)})")  # fmt: skip
  return None


def forced_changes(
  config: config_lib.Snapshot, restored: checkpoint.Restored | None
) -> dict[str, tuple[Any, Any]] | None:
  """The changed keys that `resume="force"` let through, if any."""
  if not restored or "config" not in restored.meta:
    return None
  return check_resume("force", restored.meta["config"], config, restored.step)


def resumed_state(spec: parts_lib.Spec, restored: checkpoint.Restored | None) -> Any:
  """The restored state, with a fresh monitor if what it watches changed; None to start afresh."""
  if not restored:
    return None
  state = restored.state
  if spec.omit:
    state = parts_lib.completed(spec, state)  # the frozen parameters it left out
  if restored.meta.get("monitor") == spec.watch.key:
    return state
  if spec.watch.metric:
    logging.warning("early_stop.metric, mode or baseline changed: the monitor starts afresh")
  scale = state.monitor.lr_scale  # the learning rate carries on
  return state.replace(monitor=parts_lib.fresh_monitor(spec, scale))


def start_batch(restored: checkpoint.Restored | None) -> int:
  """The first global batch to read: the restored step's, as its data state records."""
  if not restored:
    return 0
  if isinstance(restored.data_state, dict) and "next_batch" in restored.data_state:
    return int(restored.data_state["next_batch"])
  return restored.step  # a state saved by Grain itself: batch g is trained at step g


def restore_best(
  ckpt: checkpoint.Checkpointer,
  spec: parts_lib.Spec,
  best_step: int | None,
  state: Any,
  eval_metrics: dict[str, float],
) -> tuple[Any, dict[str, float]]:
  """The best step's state and eval metrics (`early_stop.restore_best`); else the given ones."""
  if best_step is None:
    logging.warning("early_stop.restore_best: no evaluation improved; keeping the final state")
    return state, eval_metrics
  if best_step == int(jax.device_get(state.step)):
    return state, eval_metrics
  try:
    best = ckpt.restore_step(best_step, parts_lib.checkpointed(spec, spec.abstract))
  except checkpoint.CheckpointError as error:  # not saved, say restore_best was off until now
    logging.warning("early_stop.restore_best: keeping the final state: %s", error)
    return state, eval_metrics
  logs.note(f"early_stop.restore_best: the best state, step {best_step}, restored")
  return parts_lib.completed(spec, best.state), best.meta["eval"]
