"""nanochat's batch-size rules, applied to a config before training (train.horizon_params,
train.auto_batch, train.lr_batch_scaling, train.weight_decay_scaling).

The horizon is train.tokens_per_param x the parameters it counts: all of them, or (nanochat 2026)
the "scaling" parameters, the block matrices and lm_head (lmtiny.plan.counts.scaling_params). The
reference is the same recipe at train.batch_reference_depth (nanochat: d12, where
train.batch_reference_size = 524,288 tokens was measured best), at the same width per layer:

  batch  = 2 ** round(log2(B_ref x (D / D_ref) ** 0.383))   (Power Lines: B_opt ~ D^0.383)
  LRs   x= sqrt(batch / B_ref)                               (AdamW's sqrt rule; nanochat uses it for Muon too)
  WD    x= sqrt(batch / B_ref) x D_ref / D                   (keeps B / (lr x wd x D) constant)

`resolve` writes the results into a copy of the config and switches the rules off there, so the
resolved config (what a run records) resolves to itself.
"""
from __future__ import annotations

import copy
import math

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.plan import counts

BATCH_EXPONENT = 0.383
SCALED_LRS = ("lr", "embed_lr", "unembed_lr", "scalar_lr")  # optim.smear_lr stays as given (nanochat)


def horizon_params(m, t) -> int:
  """The parameters train.tokens_per_param counts (train.horizon_params)."""
  return counts.scaling_params(m) if t.horizon_params == "scaling" else counts.count_params(m)


def horizon_tokens(m, t) -> float:
  return t.tokens_per_param * horizon_params(m, t)


def reference_model(m, depth: int):
  """The same model at `depth` with the same width per layer, rounded to whole heads (nanochat's d12)."""
  ref = copy.deepcopy(m)
  width, heads = config_lib.nanochat_width(depth, config_lib.head_dim(m), aspect=m.d_model // m.num_layers)
  kv_group = m.num_heads // config_lib.num_kv_heads(m)
  ref.update(num_layers=depth, d_model=width, num_heads=heads, head_dim=config_lib.head_dim(m),
             num_kv_heads=0 if kv_group == 1 else max(1, heads // kv_group))
  return ref


def _check_auto_batch_fields(t) -> None:
  """The fields auto_batch_tokens divides by or takes the log of (resolve runs before config.validate)."""
  if not t.tokens_per_param > 0:
    raise ConfigError("config.train.auto_batch=True: needs train.tokens_per_param > 0 (the horizon it sizes for)")
  for name in ("batch_reference_depth", "batch_reference_size"):
    if not (isinstance(t[name], int) and t[name] >= 1):
      raise ConfigError(f"config.train.{name}={t[name]!r}: must be an integer >= 1")


def auto_batch_tokens(m, t) -> int:
  """nanochat's batch size for this horizon, in tokens: a power of two, and a whole number of
  train.seq_len rows (else a ConfigError naming the field to change)."""
  _check_auto_batch_fields(t)
  ratio = horizon_tokens(m, t) / horizon_tokens(reference_model(m, t.batch_reference_depth), t)
  growth = ratio ** BATCH_EXPONENT
  batch = 2 ** round(math.log2(t.batch_reference_size * growth))
  if batch < t.seq_len:
    # the exponent rounds up to log2(seq_len) or more once B_ref x growth > seq_len / sqrt(2)
    minimum = math.floor(t.seq_len / (math.sqrt(2) * growth)) + 1
    raise ConfigError(f"config.train.batch_reference_size={t.batch_reference_size!r}: train.auto_batch gives a batch "
                      f"of {batch:g} tokens for this horizon, less than one row of train.seq_len={t.seq_len}; "
                      f"needs >= {minimum} here")
  if batch % t.seq_len:
    raise ConfigError(f"config.train.seq_len={t.seq_len}: train.auto_batch gives a batch of {batch} tokens (a power "
                      "of two), not a whole number of rows; use a power-of-two seq_len")
  return batch


def resolve(cfg):
  """A copy of cfg with nanochat's batch-size rules applied (cfg itself when none is on)."""
  t = cfg.train
  if not any(t.get(rule, False) for rule in ("auto_batch", "lr_batch_scaling", "weight_decay_scaling")):
    return cfg
  cfg = copy.deepcopy(cfg)
  t, o, m = cfg.train, cfg.optim, cfg.model
  if t.auto_batch:
    t.batch_tokens = auto_batch_tokens(m, t)
  batch_ratio = t.batch_tokens / t.batch_reference_size
  if t.lr_batch_scaling:
    for name in SCALED_LRS:
      if o.get(name, 0.0):
        o[name] = o[name] * math.sqrt(batch_ratio)
  if t.weight_decay_scaling and t.tokens_per_param > 0:
    reference = horizon_tokens(reference_model(m, t.batch_reference_depth), t)
    o.weight_decay = o.weight_decay * math.sqrt(batch_ratio) * reference / horizon_tokens(m, t)
  t.auto_batch = t.lr_batch_scaling = t.weight_decay_scaling = False
  return cfg
