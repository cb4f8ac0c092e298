"""nanochat's batch-size rules (lmtiny.plan.recipe) against nanochat's base_train arithmetic, written
out here: the horizon counts the block matrices and lm_head; the batch grows as the horizon to the
0.383; LRs follow its square root; weight decay keeps B / (lr x wd x D) fixed."""
import math

import pytest

from lmtiny import config as config_lib
from lmtiny.plan import counts, recipe


def _nanochat_scaling_params(depth: int, vocab: int = 32768) -> int:
  """base_train's transformer matrices + lm_head for nanochat's GPT at `depth` (64 x depth wide,
  128-wide heads, MHA, 4x MLP, value-embedding gates [kv heads, 12] on alternate layers)."""
  width = math.ceil(depth * 64 / 128) * 128
  heads = width // 128
  block = 4 * width * width + 2 * width * 4 * width
  gates = sum(i % 2 == (depth - 1) % 2 for i in range(depth)) * 12 * heads
  return depth * block + gates + width * math.ceil(vocab / 64) * 64


def _nanochat_batch(depth: int, ratio: float) -> int:
  d, d_ref = ratio * _nanochat_scaling_params(depth), ratio * _nanochat_scaling_params(12)
  return 2 ** round(math.log2(2 ** 19 * (d / d_ref) ** 0.383))


@pytest.mark.parametrize("depth,ratio", [(12, 12.0), (24, 8.0), (24, 12.0), (26, 8.25), (8, 12.0)])
def test_auto_batch_and_horizon_are_nanochats(depth, ratio):
  cfg = config_lib.nanochat_leaderboard_config(depth, tokens_per_param=ratio)
  assert counts.scaling_params(cfg.model) == _nanochat_scaling_params(depth)
  resolved = recipe.resolve(cfg)
  batch = _nanochat_batch(depth, ratio)
  assert resolved.train.batch_tokens == batch
  # nanochat: num_iterations = target_tokens // total_batch_size
  steps = config_lib.total_steps(resolved, recipe.horizon_params(resolved.model, resolved.train))
  assert steps == int(ratio * _nanochat_scaling_params(depth)) // batch
  scale = math.sqrt(batch / 2 ** 19)
  o = resolved.optim
  assert (o.lr, o.embed_lr, o.unembed_lr, o.scalar_lr, o.smear_lr) == pytest.approx(
      (0.02 * scale, 0.3 * scale, 0.008 * scale, 0.5 * scale, 0.2))
  assert o.weight_decay == pytest.approx(0.28 * scale * _nanochat_scaling_params(12) / _nanochat_scaling_params(depth))


def test_d24_is_the_leaderboard_run():
  """runs/speedrun.sh: d24 at 8 tokens per scaling parameter; base_train doubles the batch."""
  cfg = recipe.resolve(config_lib.load_file("configs/d24_2026.py"))
  assert cfg.train.batch_tokens == 2 ** 20 and cfg.train.tokens_per_param == 8.0


def test_resolve_is_idempotent_and_leaves_other_configs_alone():
  cfg = config_lib.nanochat_leaderboard_config(12)
  once = recipe.resolve(cfg)
  assert recipe.resolve(once).to_dict() == once.to_dict()
  assert not (once.train.auto_batch or once.train.lr_batch_scaling or once.train.weight_decay_scaling)
  january = config_lib.nanochat_config(20)
  assert recipe.resolve(january) is january
  assert cfg.train.auto_batch  # the input is not modified


def test_lr_scaling_alone_keeps_the_batch():
  cfg = config_lib.nanochat_leaderboard_config(12)
  cfg.train.update(auto_batch=False, batch_tokens=131072, weight_decay_scaling=False)
  resolved = recipe.resolve(cfg)
  assert resolved.train.batch_tokens == 131072
  assert resolved.optim.lr == pytest.approx(0.01) and resolved.optim.weight_decay == 0.28


def test_auto_batch_needs_a_horizon():
  cfg = config_lib.nanochat_leaderboard_config(12)
  cfg.train.tokens_per_param = 0.0
  with pytest.raises(config_lib.ConfigError, match="config.train.auto_batch=True: needs train.tokens_per_param"):
    config_lib.validate(cfg)


def test_auto_batch_under_one_row_names_the_reference_size_and_its_minimum():
  # Before: a TypeError traceback (2 ** round(log2(...)) is a float below 1, written into an int field).
  cfg = config_lib.nanochat_leaderboard_config(12)
  cfg.train.batch_reference_size = 1
  with pytest.raises(config_lib.ConfigError) as e:
    recipe.resolve(cfg)
  message = str(e.value)
  assert message.startswith("config.train.batch_reference_size=1: train.auto_batch gives a batch of ")
  minimum = int(message.rsplit(">= ", 1)[1].split(" ")[0])
  cfg.train.batch_reference_size = minimum  # the minimum it names works; one less does not
  assert recipe.resolve(cfg).train.batch_tokens == cfg.train.seq_len
  cfg.train.batch_reference_size = minimum - 1
  with pytest.raises(config_lib.ConfigError):
    recipe.resolve(cfg)


def test_auto_batch_needs_rows_that_divide_a_power_of_two():
  cfg = config_lib.nanochat_leaderboard_config(12)
  cfg.update_from_flattened_dict({"train.seq_len": 1536})
  with pytest.raises(config_lib.ConfigError, match=r"^config.train.seq_len=1536: train.auto_batch gives a batch of "
                                                   r"524288 tokens \(a power of two\), not a whole number of rows"):
    recipe.resolve(cfg)


def test_auto_batch_without_a_horizon_is_one_line_before_validation():
  # resolve runs before config.validate (lmtiny.training.loop.Trainer): before, a ZeroDivisionError.
  cfg = config_lib.nanochat_leaderboard_config(12)
  cfg.train.tokens_per_param = 0.0
  with pytest.raises(config_lib.ConfigError, match="config.train.auto_batch=True: needs train.tokens_per_param"):
    recipe.resolve(cfg)
