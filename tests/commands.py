"""`python -m MODULE ARGS...` without paying for the imports each time: a fork server.

Most command tests start a command that refuses its input in a second, of which
the interpreter spends one importing jax, flax and jaxtrain. `run` sends the
command instead to a server process (one per test worker) that imported those
once and never touched a device: it forks, and the child runs the module as
`__main__` with the command's argv, folder and environment, its stdout and
stderr going to files, and exits with the command's status after running its
`atexit` handlers, as the interpreter would. What differs from a fresh
interpreter is only what happens before `__main__` runs (what the imports print,
a warning say, shows once in the server, not in each command's stderr). A command whose
environment sets `JAX_*` or `PYTHON*` variables other than the server's (JAX and
the interpreter read them as they start) runs in a fresh interpreter instead, and
so does any test that signals its process.

Example:
  >>> done = run(["experiments.digits", "--workdir=run", "--config.train.seed=-5"], cwd=tmp)
  >>> done.returncode, done.stderr
  (2, 'error: ...\\n')
"""

import atexit
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("jaxtrain", "jaxtrain.cli", "jaxtrain.plan", "jaxtrain.replay", "jaxtrain.report",
           "jaxtrain.sweep", "jaxtrain.chat", "jaxtrain.data.tokenize", "experiments.digits",
           "experiments.fashion_mnist", "experiments.lm", "tests.user_experiment")  # fmt: skip
# XLA CPU's LLVM at -O0: the same HLO, about 40% less CPU time compiling the small programs
# most tests are made of, slower machine code for the few that run a model long. Every
# process the suite starts uses it, except the README's commands (run in a user's shell).
COMPILE_FLAGS = "--xla_backend_optimization_level=0"
_servers: dict = {}  # this process's server once started, and the environment it starts with
_lock = threading.Lock()


def run(args, *, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
  """Runs `python -m *args` in `cwd` with `env` (default: a user's), as `subprocess.run` would."""
  env = dict(env if env is not None else _user_env())
  server_env = _servers.setdefault("env", _user_env())  # fixed by the first command
  if _start_settings(env) != _start_settings(server_env):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)  # fmt: skip
  request = pickle.dumps((list(args), str(cwd), env, timeout))
  with _lock:  # one command at a time through the server's pipe (tests may use threads)
    server = _start()
    server.stdin.write(struct.pack("<I", len(request)) + request)
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
  if reply.get("timeout"):
    raise subprocess.TimeoutExpired([sys.executable, "-m", *args], timeout)
  return subprocess.CompletedProcess([sys.executable, "-m", *args], reply["returncode"],
                                     reply["stdout"], reply["stderr"])  # fmt: skip


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a process of the suite: its compile setting and `devices` CPU devices."""
  return f"{COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"


def _user_env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())


def _start_settings(env) -> dict[str, str]:
  """What an interpreter and JAX read when they start: the server's must be the command's."""
  return {k: v for k, v in env.items() if k.startswith(("JAX_", "PYTHON"))}


def _start() -> subprocess.Popen:
  server = _servers.get("server")
  if server is None or server.poll() is not None:
    env = dict(_servers["env"])  # each command's own environment sets XLA_FLAGS before JAX
    server = subprocess.Popen([sys.executable, "-m", "tests.commands"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=ROOT, env=env)  # fmt: skip
    atexit.register(server.kill)
    _servers["server"] = server
  return server


def _serve() -> None:
  """The server's loop: a length-prefixed pickled request in, a JSON line out, per command."""
  import importlib  # noqa: PLC0415

  for name in PRELOAD:
    importlib.import_module(name)
  from jax._src import xla_bridge  # noqa: PLC0415

  if xla_bridge._backends:  # each command must start its own, with its own XLA_FLAGS
    raise SystemExit("tests.commands: a preloaded module started JAX's backend")
  requests, replies = sys.stdin.buffer, sys.stdout
  while header := requests.read(4):
    args, cwd, env, timeout = pickle.loads(requests.read(struct.unpack("<I", header)[0]))
    replies.write(json.dumps(_fork(args, cwd, env, timeout)) + "\n")
    replies.flush()


def _fork(args, cwd, env, timeout) -> dict:
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the command
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      _child(args, cwd, env)
    status = _wait(pid, timeout)
    if status is None:
      return {"timeout": True}
    out.seek(0)
    err.seek(0)
    return {"returncode": status, "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace")}  # fmt: skip


def _child(args, cwd, env) -> None:
  # Imported here, as locals: the server's module globals (this module's, run as __main__)
  # are cleared before the command runs in that namespace, as `python -m` runs it in a fresh one.
  import atexit  # noqa: PLC0415
  import os  # noqa: PLC0415
  import runpy  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import threading  # noqa: PLC0415
  import traceback  # noqa: PLC0415

  code = 0
  try:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDONLY)  # not the server's request pipe
    os.dup2(null, 0)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the command's, until it exits)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.path[0] = os.getcwd()  # as `python -m` puts the current folder first
    sys.argv = ["-m", *args[1:]]
    sys.modules.pop(args[0], None)  # preloaded as a module; it runs afresh as __main__
    namespace = sys.modules["__main__"].__dict__
    builtins = namespace["__builtins__"]
    namespace.clear()  # the same module object (multiprocessing holds it), emptied
    namespace["__builtins__"] = builtins
    runpy._run_module_as_main(args[0])  # what `python -m` calls: __main__ is the module
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
  except BaseException:  # what the interpreter prints for an uncaught exception
    traceback.print_exc()
    code = 1
  try:
    threading._shutdown()  # as the interpreter does at exit: join the non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
  """The child's exit status (negative for a signal), or None when it outlived `timeout`."""
  import time  # noqa: PLC0415

  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      os.waitpid(pid, 0)
      return None
    time.sleep(0.005)


if __name__ == "__main__":
  _serve()
