"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

assert jax.device_count() == 8, jax.devices()


@pytest.fixture(scope="session")
def digits():
  from jaxtrain import data  # noqa: PLC0415

  return data.digits()
