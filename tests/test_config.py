"""Config schema: validation messages name the field and value; derived sizes; horizons."""
import glob
import math
import os

import jax
import pytest

from lm_fixtures import ROOT, load_config_module
from lmtiny import config as config_lib
from lmtiny.config import validate
from lmtiny.errors import ConfigError
from lmtiny.plan import counts
from lmtiny.training.resolved import resolve_run

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
  validate(load_config_module(name).get_config())


@pytest.mark.parametrize("section,override,message", [
    ("model", dict(num_heads=5), "config.model.num_heads=5: must divide model.d_model=192"),
    ("model", dict(num_kv_heads=2), "config.model.num_kv_heads=2: must divide model.num_heads=3"),
    ("model", dict(head_dim=63), "config.model.head_dim=63: must be even"),
    ("model", dict(activation="tanh"), "config.model.activation='tanh': must be one of swiglu, relu2, gelu, silu"),
    ("model", dict(dtype="float8"), "config.model.dtype='float8'"),
    ("model", dict(vocab_size=0), "config.model.vocab_size=0: must be a positive integer"),
    ("model", dict(matmul_dtype="fp8", loss_kernel="pallas"),
     "config.model.loss_kernel='pallas': runs the lm_head in the compute dtype: with model.matmul_dtype=fp8 set "
     "model.fp8_lm_head=False"),
    ("train", dict(seq_len=300), "config.train.seq_len=300: exceeds model.max_seq_len=256"),
    ("train", dict(batch_tokens=1000), "config.train.batch_tokens=1000: must be a multiple of train.seq_len=256"),
    ("train", dict(micro_batch_size=5), "config.train.micro_batch_size=5: must divide the global batch of 16"),
    ("train", dict(grad_reduce="never"), "config.train.grad_reduce='never': must be one of auto, step, micro_step"),
    ("optim", dict(min_lr_ratio=2.0), "config.optim.min_lr_ratio=2.0"),
    ("mesh", dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    ("mesh", dict(tensor=0), "config.mesh.tensor=0"),
])
def test_validation_names_field_and_value(section, override, message):
  cfg = load_config_module("tiny").get_config()
  cfg[section].update(**override)
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_one_gradient_reduction_per_step_refuses_a_tensor_axis():
  cfg = load_config_module("tiny").get_config()
  cfg.train.grad_reduce, cfg.mesh.tensor = "step", 2
  with pytest.raises(ConfigError, match=r"config.train.grad_reduce='step': needs mesh.tensor=1"):
    validate(cfg)
  cfg.mesh.tensor = 1
  validate(cfg)


def test_derived_sizes_and_horizon():
  cfg = load_config_module("d20").get_config()
  m, t = cfg.model, cfg.train
  assert (config_lib.head_dim(m), config_lib.num_kv_heads(m), config_lib.mlp_dim(m)) == (128, 10, 5120)
  assert config_lib.global_batch_size(t) == 256 and config_lib.accumulation_steps(t) == 1
  # Chinchilla: 20 tokens/param x 560,988,160 params / 524,288 tokens per step.
  assert config_lib.total_steps(cfg, 560_988_160) == 21_400
  t.update(micro_batch_size=32)
  assert config_lib.accumulation_steps(t) == 8 and config_lib.micro_batch_size(t) == 32
  t.update(tokens_per_param=0.0, steps=123)
  assert config_lib.total_steps(cfg, 560_988_160) == 123


def test_a_flops_budget_sets_the_horizon():
  """train.flops_budget / (training FLOPs per token x batch tokens) steps, to the nearest step,
  as resolve_run derives it; exclusive with tokens_per_param; negative is one line naming it."""
  cfg = load_config_module("tiny").get_config()
  cfg.mesh.data = 1
  per_step = counts.train_flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.batch_tokens  # 4096 tokens
  cfg.train.flops_budget = 37.4 * per_step
  assert config_lib.total_steps(cfg, 0, per_step / cfg.train.batch_tokens) == 37
  assert resolve_run(cfg, devices=jax.devices()[:1]).total_steps == 37  # train.steps=150 is overruled
  cfg.train.flops_budget = 0.2 * per_step
  assert config_lib.total_steps(cfg, 0, per_step / cfg.train.batch_tokens) == 1  # at least one step
  cfg.train.update(flops_budget=1e15, tokens_per_param=20.0)
  with pytest.raises(ConfigError, match=r"^config.train.flops_budget=1000000000000000.0: sets the horizon, as "
                                        r"train.tokens_per_param=20.0 does: set one of them$"):
    validate(cfg)
  cfg.train.update(flops_budget=-1.0, tokens_per_param=0.0)
  with pytest.raises(ConfigError, match=r"^config.train.flops_budget=-1.0: must be a finite number >= 0$"):
    validate(cfg)


# Every float field (a float in base_config) must be finite: NaN passes every `<`/`>` check, and a
# NaN or infinite LR, decay or scale is accepted and turns the first step's loss into NaN. Those
# for which 0 means nothing (an LR, a scale, a std, an epsilon) must be > 0; the rest (0 = off or
# "same as optim.lr") >= 0.
FLOAT_FIELDS = [(section, name) for section, fields in config_lib.base_config().items()
                for name, value in fields.items() if isinstance(value, float)]


def test_the_float_rule_names_these_fields():
  # the fields of the issue, by their real paths, are among those the rule covers
  for field in ("model.qk_scale", "model.init_std", "optim.weight_decay", "optim.unembed_lr", "optim.embed_lr",
                "train.tokens_per_param", "rl.lr", "sft.lr", "lora.alpha"):
    assert tuple(field.split(".")) in FLOAT_FIELDS


@pytest.mark.parametrize("section,name", FLOAT_FIELDS)
def test_every_float_field_must_be_finite_and_not_negative(section, name):
  positive = name in config_lib.POSITIVE_FLOATS.get(section, ())
  bound = ">" if positive else ">="
  for value in [math.nan, math.inf, -math.inf, -1.0] + ([0.0] if positive else []):
    cfg = load_config_module("tiny").get_config()
    cfg[section][name] = value
    with pytest.raises(ConfigError) as e:
      config_lib.check_float_fields(cfg[section], section)
    assert str(e.value) == f"config.{section}.{name}={value!r}: must be a finite number {bound} 0"
    with pytest.raises(ConfigError, match=rf"^config\.{section}\.{name}="):
      validate(cfg)
  validate(load_config_module("tiny").get_config())


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_sft_lr_must_be_finite_and_positive(value):
  s = config_lib.base_config().sft
  s.lr = float(value)
  with pytest.raises(ConfigError, match=rf"^config\.sft\.lr={value}(\.0)?: must be "):
    config_lib.validate_sft(s)
