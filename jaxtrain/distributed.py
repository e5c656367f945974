"""Many processes: joining JAX's distributed runtime, and waiting on peers with a deadline.

Every host of a job runs the same command. `initialize` joins the processes
through `jax.distributed.initialize`, configured by, in order:

- the arguments (the experiments' `--coordinator_address`, `--num_processes`,
  `--process_id` flags);
- the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`;
- JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI), where it finds
  one; elsewhere the run is a single process.

Nothing waits forever on a peer: a process that cannot join within
`init_timeout` seconds prints one line and exits with status 1; a peer that dies
later stops sending heartbeats, and JAX ends the survivors within
`peer_timeout` seconds (status 134, its message naming the unhealthy task); and
`barrier`, the only barrier jaxtrain waits on itself, raises `PeerError` after
`peer_timeout` seconds.

Example:
  >>> distributed.initialize("10.0.0.2:1234", num_processes=4, process_id=1, init_timeout=120)
  >>> distributed.barrier("restored")
"""

import itertools
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxtrain.config import ConfigError

INIT_TIMEOUT = 300  # seconds; jax.distributed.initialize's default
PEER_TIMEOUT = 100  # seconds; JAX's heartbeat timeout by default
EXIT_PEER = 1
JAX_GRACE = 10  # seconds JAX waits past the watchdog, so a join that times out is one line
_settings = {"peer_timeout": PEER_TIMEOUT}
_barrier_ids = itertools.count()


class PeerError(RuntimeError):
  """A peer process did not reach a barrier in time."""


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  init_timeout: int = INIT_TIMEOUT,
  peer_timeout: int = PEER_TIMEOUT,
) -> None:
  """Joins a multi-process job, or does nothing for a single process (see the module doc).

  Args:
    coordinator_address: `host:port` of process 0's coordinator.
    num_processes: the processes of the job; 1 runs alone without joining.
    process_id: this process's index, from 0.
    init_timeout: seconds to wait for every process to join.
    peer_timeout: seconds without a peer's heartbeat (or at a barrier) before
      the others give up.

  Raises:
    ConfigError: for an incomplete or invalid setting (before anything joins),
      or JAX refusing the setting.
    PeerError: when JAX fails to join for another reason.
  """
  for name, value in (("init_timeout", init_timeout), ("peer_timeout", peer_timeout)):
    if value < 1:
      raise ConfigError(f"--{name}={value} must be at least 1 second")
  _settings["peer_timeout"] = peer_timeout
  address, count, index = _settings_from(coordinator_address, num_processes, process_id)
  if count == 1:
    return
  # jaxtrain agrees on preemption itself (interrupt.StopSignals); JAX's service
  # would take SIGTERM, and Orbax reports its own steps to that service's counter.
  jax.config.update("jax_enable_preemption_service", False)
  where = f"the coordinator at {address}" if address else "the job JAX detected"
  who = f"process {index} of {count}" if count else "this process"
  watchdog = threading.Timer(
    init_timeout,
    _give_up,
    (f"{who} could not join {where} within --init_timeout={init_timeout} s; "
     "is every process started, with the same address and --num_processes?",),
  )  # fmt: skip
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=index,
      initialization_timeout=init_timeout + JAX_GRACE,  # the watchdog's line comes first
      heartbeat_timeout_seconds=peer_timeout,
    )
  except ValueError as e:  # no arguments and no cluster JAX recognises: one process
    if address is None and "coordinator_address" in str(e):
      return
    raise ConfigError(f"jax.distributed.initialize: {e}") from e
  except RuntimeError as e:  # the coordinator's port taken, say
    raise PeerError(f"{who} could not join {where}: {str(e).splitlines()[0]}") from e
  finally:
    watchdog.cancel()


def _settings_from(
  address: str | None, count: int | None, index: int | None
) -> tuple[str | None, int | None, int | None]:
  """The address, count and index from the arguments, else the environment; checked."""
  if address is None and count is None and index is None:
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count, index = (_env_int(v) for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    source = "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
  else:
    source = "--coordinator_address, --num_processes and --process_id"
  if count == 1 and not index:
    return address, 1, 0
  given = [v is not None for v in (address, count, index)]
  if any(given) and not all(given):
    raise ConfigError(f"set all of {source}, or none (JAX then detects the cluster)")
  if count is not None and not 0 <= index < count:
    raise ConfigError(f"process id {index} must be in [0, {count}) for {count} processes")
  if address is not None and not address.rpartition(":")[2].isdigit():
    raise ConfigError(f"coordinator address {address!r} must be host:port")
  return address, count, index


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"{name}={text!r} must be an integer") from None


def _give_up(message: str) -> None:
  """Ends the process with one line: JAX would abort a few seconds later with a stack trace."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(EXIT_PEER)


def barrier(name: str) -> None:
  """Waits until every process reaches this barrier; raises `PeerError` after `peer_timeout` s."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # noqa: PLC0415 (one process never needs Orbax here)

  timeout = _settings["peer_timeout"]
  try:
    multihost.sync_global_processes(
      f"jaxtrain_{name}_{next(_barrier_ids)}",
      timeout=timeout,
      processes=set(range(jax.process_count())),
    )
  except Exception as e:  # DEADLINE_EXCEEDED from the coordination service
    raise PeerError(
      f"process {jax.process_index()} waited {timeout} s at barrier {name!r} for a peer that "
      f"never came (--peer_timeout={timeout}): {str(e).splitlines()[0]}"
    ) from e


def largest(value: int) -> int:
  """The largest of every process's `value`; a collective all processes must reach together."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.array(value, np.int32))))


def everywhere(ok: bool) -> bool:
  """True when `ok` holds in every process; a collective all processes must reach together."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))
