"""JAX's persistent compilation cache, on by default for every run.

A rerun of the same model, batch and mesh loads its compiled chunk from disk
instead of compiling it again (what it saves: BUILD_NOTES.md). The folder is
`train.compile_cache`, else `$JAXTRAIN_COMPILE_CACHE`, else
`~/.cache/jaxtrain/xla`; `off` turns it off. A cache folder the user already
gave JAX (`jax_compilation_cache_dir`) is left as it is. JAX caches only
compilations that took at least `jax_persistent_cache_min_compile_time_secs`
(1 s by default).

Example:
  >>> enable("")          # the default folder
  PosixPath('/home/me/.cache/jaxtrain/xla')
"""

import os
import pathlib

import jax

DEFAULT = pathlib.Path("~/.cache/jaxtrain/xla")
_OFF = "off"


def enable(folder: str = "") -> pathlib.Path | None:
  """Points JAX's persistent compilation cache at `folder` (see the module); returns it."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return pathlib.Path(current)
  chosen = folder or os.environ.get("JAXTRAIN_COMPILE_CACHE") or str(DEFAULT)
  if chosen == _OFF:
    return None
  path = pathlib.Path(chosen).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: compile every time, as without a cache
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  return path
