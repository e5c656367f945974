"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The runs' persistent compilation cache, shared by this session's processes only.
os.environ.setdefault("JAXTRAIN_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxtrain-xla-"))

import jax
import pytest

assert jax.device_count() == 8, jax.devices()


@pytest.fixture(scope="session")
def digits():
  from jaxtrain import data  # noqa: PLC0415

  return data.digits()
