"""Metric sinks beyond the workdir: Weights & Biases and MLflow (`metrics.Writer`s).

`from_flags` makes the ones the `logging.wandb` and `logging.mlflow` keys ask
for; the training loop calls it in process 0 only and hands them to
`metrics.Writers`, so each gets every line `metrics.jsonl` gets. The libraries
are optional (`pip install 'jaxtrain[wandb]'`, `'jaxtrain[mlflow]'`) and are
imported only when a sink is made.

Both sinks:
  * name a line's value `name` of split `split` as the metric `split/name`, as
    TensorBoard does, logged at the line's `step`;
  * leave out values that are not finite numbers: `metrics.jsonl` holds null
    for them and TensorBoard leaves them out too, so a chart shows a gap;
  * keep their run's id in the workdir (`wandb_run.json`, `mlflow_run.json`).
    `resumed=True` continues that run; `resumed=False` (a fresh start, whose
    `metrics.jsonl` starts over too) starts a new one and records its id.
  * keep the first value of each step. A run resumed from the checkpoint of
    step S writes the lines of the steps after S again, and the killed
    attempt may have sent some of them already: those are not sent twice.
    W&B refuses a step lower than its current one anyway (with a warning),
    and MLflow would keep both values. The two attempts log the same numbers
    for those steps (randomness is `fold_in(key, step)`); only timings differ.

Example:
  >>> writers = sinks.from_flags(workdir, config.to_dict(), wandb=True, mlflow=False,
  ...                            resumed=False)
  >>> out = metrics.Writers(workdir, enabled=True, extra=writers)
"""

import importlib
import json
import logging
import math
import pathlib
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from jaxtrain import logs
from jaxtrain.config import ConfigError, flatten_dict
from jaxtrain.metrics import Writer

WANDB_RECORD = "wandb_run.json"  # {"id": run id, "step": the newest step the run holds}
MLFLOW_RECORD = "mlflow_run.json"  # {"id": run id}
PARAM_LIMIT = 6000  # MLflow's longest param value (MAX_PARAM_VAL_LENGTH)
PARAMS_PER_BATCH = 100  # MLflow's most params in one log_batch call


def from_flags(workdir: pathlib.Path, config: Mapping[str, Any], *, wandb: bool, mlflow: bool,
               resumed: bool) -> list[Writer]:  # fmt: skip
  """The sinks the `logging` keys turn on, each logging `config` and every line.

  Args:
    workdir: the run's folder, which keeps each sink's run id.
    config: the run's config as a plain nested dict (`config.to_dict()`).
    wandb: `logging.wandb`: log to Weights & Biases (`WandbWriter`).
    mlflow: `logging.mlflow`: log to MLflow (`MlflowWriter`).
    resumed: the run resumes from a checkpoint: continue the sinks' runs.

  Returns:
    The writers, W&B's first; empty when both flags are off.

  Raises:
    ConfigError: a sink's library is not installed (checked before any run
      starts), or its service refused to start or reopen the run.

  Example:
    >>> sinks.from_flags(workdir, {"optim": {"lr": 1e-3}}, wandb=False, mlflow=True,
    ...                  resumed=False)
    [MlflowWriter(run_id='...')]
  """
  makers = {"wandb": wandb_writer, "mlflow": mlflow_writer}
  wanted = [name for name, on in (("wandb", wandb), ("mlflow", mlflow)) if on]
  for name in wanted:
    _require(name)
  writers: list[Writer] = []
  try:
    for name in wanted:
      writers.append(makers[name](workdir, config, resumed=resumed))
  except BaseException:
    for writer in writers:  # the runs already started end here
      writer.close()
    raise
  return writers


class WandbWriter:
  """Logs each line to a W&B run as `{split/name: value}` at `step`.

  A line's step is skipped when the run holds it from an earlier attempt
  (`held`). The newest step whose row W&B has committed is kept in the
  workdir's `wandb_run.json`: W&B commits a step's row when a line of a later
  step comes (train and eval lines of one step share a row) or at `close`.
  """

  def __init__(self, run: Any, record: pathlib.Path, held: int):
    self.run, self._record, self._held = run, record, held
    self._open: int | None = None  # the step of the row W&B has not committed yet

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Logs the line's finite numbers, unless the run has its step already."""
    scalars = _scalars(split, values)
    if step <= self._held or not scalars:
      return
    if self._open is not None and step != self._open:
      self._keep(self._open)
    self._open = step
    self.run.log(scalars, step=step)

  def close(self) -> None:
    """Finishes the run; W&B uploads (or, offline, keeps) what it has."""
    if self.run is None:
      return
    if self._open is not None:
      self._keep(self._open)
    self.run.finish()
    self.run = None

  def _keep(self, step: int) -> None:
    _write_record(self._record, {"id": self.run.id, "step": step})

  def __repr__(self) -> str:
    return f"WandbWriter(run_id={self.run.id if self.run else None!r})"


def wandb_writer(workdir: pathlib.Path, config: Mapping[str, Any], *,
                 resumed: bool) -> WandbWriter:  # fmt: skip
  """Starts (or, resumed, continues) the W&B run of `workdir`, with `config` as its config.

  W&B's own settings come from its environment variables: `WANDB_PROJECT`,
  `WANDB_ENTITY`, `WANDB_MODE=offline`, `WANDB_API_KEY` and so on. Its local
  files go to `workdir/wandb/`; the run is named after the workdir.

  Args:
    workdir: the run's folder; `wandb_run.json` in it keeps the run's id.
    config: the run's config as a plain nested dict.
    resumed: continue the run `wandb_run.json` names (`resume="allow"`);
      without it, or without the file, a new run starts.

  Returns:
    The writer, whose `close` finishes the run.

  Raises:
    ConfigError: wandb is not installed, or `wandb.init` failed (no API key,
      no network, a bad setting), in one line.

  Example:
    >>> writer = sinks.wandb_writer(workdir, config.to_dict(), resumed=False)
    >>> writer.write(100, "train", {"loss": 0.31})  # logged as train/loss at step 100
  """
  wandb = _require("wandb")
  workdir = pathlib.Path(workdir)
  path = workdir / WANDB_RECORD
  record = _read_record(path) if resumed else None
  try:
    run = wandb.init(
      dir=workdir,
      name=workdir.name,
      config=dict(config),
      id=record["id"] if record else None,
      resume="allow" if record else None,
      reinit="create_new",  # each writer owns its run; others (a population's) stay open
    )
  except wandb.Error as e:
    raise ConfigError(f"logging.wandb=true: W&B could not start the run: {logs.brief(e)}") from e
  held = record.get("step", -1) if record else -1
  _write_record(path, {"id": run.id, "step": held})
  return WandbWriter(run, path, held)


class MlflowWriter:
  """Logs each line to an MLflow run as the metrics `split/name` at `step`.

  A metric is skipped at a step no later than the newest the run holds for
  it from an earlier attempt (`held`, read from MLflow when it opens). Each
  line is one synchronous `log_batch` call; `MLFLOW_HTTP_REQUEST_TIMEOUT` and
  `MLFLOW_HTTP_REQUEST_MAX_RETRIES` bound how long a slow server holds a step.
  """

  def __init__(self, client: Any, run_id: str, held: dict[str, int], metric: type):
    self.client, self.run_id, self._held, self._metric = client, run_id, held, metric
    self._open = True

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Logs the line's finite numbers the run lacks at `step`."""
    now = int(time.time() * 1000)
    batch = [self._metric(key, value, now, step) for key, value in _scalars(split, values).items()
             if step > self._held.get(key, -1)]  # fmt: skip
    if batch:
      self.client.log_batch(self.run_id, metrics=batch)

  def close(self) -> None:
    """Marks the run FINISHED."""
    if self._open:
      self.client.set_terminated(self.run_id)
      self._open = False

  def __repr__(self) -> str:
    return f"MlflowWriter(run_id={self.run_id!r})"


def mlflow_writer(workdir: pathlib.Path, config: Mapping[str, Any], *,
                  resumed: bool) -> MlflowWriter:  # fmt: skip
  """Starts (or, resumed, reopens) the MLflow run of `workdir` and logs `config` as params.

  `MLFLOW_TRACKING_URI` picks the tracking server or store (MLflow's default,
  `sqlite:///mlflow.db` in the current folder, otherwise);
  `MLFLOW_EXPERIMENT_NAME` or `MLFLOW_EXPERIMENT_ID` the experiment (created
  when missing; MLflow's default experiment otherwise). Params are the
  config's dotted keys, strings as they are and other values as JSON; a value
  longer than MLflow's limit is cut to it, ending in `...`. The whole config
  is also the run's artifact `config.json`. A reopened run keeps its params
  (MLflow cannot change one): new keys are added, and a changed value is
  named in a warning and shown in `config.json`, which is written again.

  Args:
    workdir: the run's folder; `mlflow_run.json` in it keeps the run's id.
    config: the run's config as a plain nested dict.
    resumed: reopen the run `mlflow_run.json` names; without it, or without
      the file, a new run starts.

  Returns:
    The writer, whose `close` marks the run FINISHED.

  Raises:
    ConfigError: mlflow is not installed, the store cannot be reached, or it
      does not hold the recorded run, in one line.

  Example:
    >>> writer = sinks.mlflow_writer(workdir, config.to_dict(), resumed=False)
    >>> writer.write(100, "eval", {"accuracy": 0.97})  # eval/accuracy at step 100
  """
  mlflow = _require("mlflow")
  from mlflow.entities import Metric  # noqa: PLC0415 (an optional library)
  from mlflow.exceptions import MlflowException  # noqa: PLC0415

  workdir = pathlib.Path(workdir)
  path = workdir / MLFLOW_RECORD
  record = _read_record(path) if resumed else None
  try:
    client = mlflow.MlflowClient()
    if record:
      run = _reopen(client, record["id"], path)
    else:
      run = client.create_run(_experiment_id(client), run_name=workdir.name,
                              tags={"jaxtrain.workdir": str(workdir)})  # fmt: skip
    _write_record(path, {"id": run.info.run_id})
    _log_params(client, run, config)
    held = {key: _newest_step(client, run.info.run_id, key) for key in run.data.metrics}
  except MlflowException as e:
    raise ConfigError(f"logging.mlflow=true: MLflow refused the run: {logs.brief(e)}") from e
  return MlflowWriter(client, run.info.run_id, held, Metric)


def _reopen(client: Any, run_id: str, path: pathlib.Path) -> Any:
  """The recorded run, marked RUNNING again."""
  from mlflow.exceptions import MlflowException  # noqa: PLC0415

  try:
    run = client.get_run(run_id)
  except MlflowException as e:
    if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
      raise
    raise ConfigError(
      f"{path}: MLflow run {run_id} is not in the store MLFLOW_TRACKING_URI picks; point it at "
      f"the store that holds the run, or delete {path.name} to start a new MLflow run"
    ) from e
  client.update_run(run_id, status="RUNNING")
  return run


def _experiment_id(client: Any) -> str:
  """`MLFLOW_EXPERIMENT_ID`, else `MLFLOW_EXPERIMENT_NAME`'s (made if missing), else MLflow's."""
  from mlflow import environment_variables as env  # noqa: PLC0415
  from mlflow.exceptions import MlflowException  # noqa: PLC0415
  from mlflow.tracking.default_experiment import DEFAULT_EXPERIMENT_ID  # noqa: PLC0415

  if env.MLFLOW_EXPERIMENT_ID.get():
    return env.MLFLOW_EXPERIMENT_ID.get()
  name = env.MLFLOW_EXPERIMENT_NAME.get()
  if not name:
    return DEFAULT_EXPERIMENT_ID
  found = client.get_experiment_by_name(name)
  if found:
    return found.experiment_id
  try:
    return client.create_experiment(name)
  except MlflowException:  # another run made it meanwhile
    return client.get_experiment_by_name(name).experiment_id


def _log_params(client: Any, run: Any, config: Mapping[str, Any]) -> None:
  """Logs the config's keys the run lacks as params, and the config as `config.json`."""
  from mlflow.entities import Param  # noqa: PLC0415

  have = run.data.params
  params = {key: _param(value) for key, value in flatten_dict(dict(config)).items()}
  changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
  if changed:
    logging.warning("MLflow run %s keeps its params; changed since: %s (see config.json)",
                    run.info.run_id, ", ".join(changed))  # fmt: skip
  new = [Param(k, v) for k, v in params.items() if k not in have]
  for start in range(0, len(new), PARAMS_PER_BATCH):
    client.log_batch(run.info.run_id, params=new[start : start + PARAMS_PER_BATCH])
  client.log_dict(run.info.run_id, dict(config), "config.json")


def _param(value: Any) -> str:
  """A config value as an MLflow param: a string as it is, else JSON; cut to the limit."""
  text = value if isinstance(value, str) else json.dumps(value, default=str)
  return text if len(text) <= PARAM_LIMIT else text[: PARAM_LIMIT - 3] + "..."


def _newest_step(client: Any, run_id: str, key: str) -> int:
  return max((m.step for m in client.get_metric_history(run_id, key)), default=-1)


def _scalars(split: str, values: Mapping[str, Any]) -> dict[str, float]:
  """The line's finite numbers, keyed `split/name` (bools and other values left out)."""
  out = {}
  for name, raw in values.items():
    value = raw.item() if isinstance(raw, np.generic | np.ndarray) else raw
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
      out[f"{split}/{name}"] = float(value)
  return out


def _require(name: str) -> ModuleType:
  """Imports the sink's library, or says which extra installs it."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:  # the library is there but broken: its own error says more
      raise
    raise ConfigError(
      f"logging.{name}=true needs the {name} package: pip install 'jaxtrain[{name}]'"
    ) from e


def _read_record(path: pathlib.Path) -> dict[str, Any] | None:
  """A sink's record in the workdir; None when there is none."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from e
  try:
    record = json.loads(text)
  except json.JSONDecodeError:
    record = None
  if not (isinstance(record, dict) and isinstance(record.get("id"), str)):
    raise ConfigError(f"{path}: not a sink's run record ({logs.brief(text, 60)}); delete it "
                      "to start a new run")  # fmt: skip
  return record


def _write_record(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Replaces the record at once, so a kill leaves the old one or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  with logs.naming(path):
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
