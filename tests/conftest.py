"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The runs' persistent compilation cache, shared by this session's processes only (the xdist
# workers and every command a test starts inherit it). The tests' programs compile in well
# under JAX's 1 s threshold, and the same few are compiled by many processes: cache them all.
os.environ.setdefault("JAXTRAIN_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxtrain-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

assert jax.device_count() == 8, jax.devices()


@pytest.fixture(scope="session")
def digits():
  from jaxtrain import data  # noqa: PLC0415

  return data.digits()
