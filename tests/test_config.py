"""Config validation: each bad value is named in one line, and the CLI exits 2."""

import pytest

from jaxtrain import config as config_lib
from jaxtrain import parts, sharding
from tests import helpers


def test_base_config_is_valid():
  parts.validate(config_lib.get_config(), 8)
  parts.validate(helpers.tiny_config(), 8)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("train.steps", 0, "train.steps=0 must be positive"),
    ("train.batch_size", -8, "train.batch_size=-8 must be positive"),
    ("train.steps_per_loop", 0, "train.steps_per_loop=0 must be positive"),
    ("train.batch_size", 12, "train.batch_size=12 is not divisible by the 8 data-parallel"),
    ("eval.batch_size", 20, "eval.batch_size=20 is not divisible"),
    ("train.steps", 42, "train.steps=42 must be a multiple of train.steps_per_loop=5"),
    ("eval.every_steps", 7, "eval.every_steps=7 must be a multiple"),
    ("optim.name", "adamx", "optim.name='adamx' must be one of"),
    ("optim.schedule", "step", "optim.schedule='step' must be one of"),
    ("optim.lr", -1.0, "optim.lr=-1.0 must be positive"),
    ("optim.weight_decay", 0.1, "optim.weight_decay=0.1 needs optim.name in"),
    ("mesh.data", 3, "mesh mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 does not match the 8"),
    ("mesh.fsdp", -1, "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    ("mesh.tensor", 0, "mesh.tensor=0 must be positive or -1"),
    ("train.seed", -1, "train.seed=-1 must not be negative"),
    ("train.unroll", -2, "train.unroll=-2 must not be negative"),
    ("precision.policy", "bf8", "precision.policy='bf8' must be one of"),
    ("precision.f32_modules", ("[",), "precision.f32_modules=('[',) has a bad regex"),
    ("train.steps", "100", "train.steps='100' must be of type int"),
    ("optim.name", 3, "optim.name=3 must be of type str"),
    ("early_stop.metric", "loss", "early_stop.metric='loss' must name an eval metric"),
    ("early_stop.mode", "up", "early_stop.mode='up' must be one of"),
    ("early_stop.baseline", "high", "early_stop.baseline='high' must be of type float"),
    ("plateau.factor", 0.5, "plateau.factor=0.5 needs early_stop.metric"),
    ("plateau.factor", 1.5, "plateau.factor=1.5 must be in (0, 1]"),
    ("early_stop.restore_best", True, "early_stop.restore_best=True needs early_stop.metric"),
    ("train.max_skipped", -1, "train.max_skipped=-1 must not be negative"),
    ("plateau.min_scale", 2.0, "plateau.min_scale=2.0 must be in [0, 1]"),
    ("optim.momentum", 0.9, "optim.momentum=0.9 needs optim.name in (rmsprop, sgd)"),
    ("optim.momentum", 1.0, "optim.momentum=1.0 must be in [0, 1)"),
    ("optim.nesterov", True, "optim.nesterov=True needs optim.momentum > 0"),
    ("optim.centered", True, "optim.centered=True needs optim.name='rmsprop'"),
    ("optim.boundaries", (20, 10), "optim.boundaries=(20, 10) must be increasing positive"),
    ("optim.scales", (0.1,), "optim.scales=(0.1,) needs one value per optim.boundaries"),
    ("optim.freeze", ("(",), "optim.freeze=('(',) has a bad regular expression '('"),
    ("optim.lr_groups", ("head",), "optim.lr_groups=('head',): 'head' is not REGEX=MULTIPLIER"),
    ("optim.lr_groups", ("head=x",), "'head=x' is not REGEX=MULTIPLIER"),
    ("optim.schedule", "step", "optim.schedule='step' must be one of"),
    ("loss.label_smoothing", 1.0, "loss.label_smoothing=1.0 must be in [0, 1)"),
    ("optim.warmup_steps", 40, "optim.warmup_steps=40 must be below the 40 updates"),
    ("optim.scales", ("x",), "optim.scales=('x',) must be non-negative numbers"),
    ("optim.lr_groups", ("head=inf",), "'head=inf' needs a finite, non-negative multiplier"),
    ("early_stop.divergence", float("nan"), "early_stop.divergence=nan must be finite"),
    ("early_stop.patience", 2**31, "early_stop.patience=2147483648 must be below 2**31"),
  ],
)
def test_validate_names_the_key(key, value, message):
  config = helpers.tiny_config()
  with config.ignore_type():
    helpers.set_key(config, key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    parts.validate(config, 8)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_restore_best_keeps_the_best_checkpoint_by_the_monitored_metric():
  config = helpers.tiny_config(
    **{
      "early_stop.metric": "eval/accuracy",
      "early_stop.mode": "max",
      "early_stop.restore_best": True,
      "early_stop.baseline": 0.5,
    }
  )
  parts.validate(config, 8)
  config.ckpt.best_metric = "eval/loss"
  with pytest.raises(config_lib.ConfigError, match=r"ckpt\.best_metric='eval/loss' with early"):
    parts.validate(config, 8)


def test_schedule_phases_must_fit_the_run():
  config = helpers.tiny_config(
    **{"optim.schedule": "wsd", "optim.warmup_steps": 35, "optim.decay_fraction": 0.2}
  )
  with pytest.raises(config_lib.ConfigError, match=r"warm-up 35 \+ decay 8 exceed the 40"):
    parts.validate(config, 8)
  config = helpers.tiny_config(
    **{"optim.schedule": "piecewise", "optim.warmup_steps": 10, "optim.boundaries": (5,)}
  )
  config.optim.scales = (0.1,)
  with pytest.raises(config_lib.ConfigError, match=r"must lie from optim.warmup_steps=10 to below"):
    parts.validate(config, 8)


def test_unknown_key_is_named():
  config = helpers.tiny_config()
  config.train.stepz = 3
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key train\.stepz"):
    parts.validate(config, 8)


def test_mesh_shape_resolves_minus_one():
  config = config_lib.get_config()
  assert sharding.mesh_shape(config.mesh, 8) == (8, 1, 1)
  config.mesh.data, config.mesh.fsdp = 2, -1
  assert sharding.mesh_shape(config.mesh, 8) == (2, 4, 1)
  config.mesh.fsdp, config.mesh.tensor = 2, 2
  assert sharding.mesh_shape(config.mesh, 8) == (2, 2, 2)


@pytest.mark.parametrize(
  "override,key",
  [
    ("--config.train.stepz=5", "train.stepz"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.train.batch_size=-4", "train.batch_size"),
    ("--config.train.batch_size=60", "train.batch_size"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.ckpt.async=maybe", "ckpt.async"),
    ("--config.early_stop.baseline=high", "early_stop.baseline"),
    ("--config.early_stop.metric=eval/bogus", "early_stop.metric"),
    ("--config.optim.freeze=('(',)", "optim.freeze"),
  ],
)
def test_cli_bad_value_exits_2_with_one_line(tmp_path, override, key):
  result = helpers.digits_cli(tmp_path / "w", override)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and key in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w" / "run.json").exists()


def test_a_config_that_is_not_whole_is_named():
  with pytest.raises(config_lib.ConfigError, match="config is a dict; start from"):
    config_lib.validate({"train": {}})
  config = helpers.tiny_config()
  del config.train["seed"]
  with pytest.raises(config_lib.ConfigError, match=r"config lacks train\.seed; start from"):
    config_lib.validate(config)
