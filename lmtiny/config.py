"""The config schema: one shared base every `configs/<size>.py` starts from, and its checks.

Configs are data. A size file calls `base_config()`, overrides a few fields and returns the
ConfigDict; every field can be overridden from the command line (`--config.model.num_layers=4`).
`validate()` turns user mistakes into a `ConfigError` whose one-line message names the field
and the value; entry points print it and exit with status 2.
"""
from __future__ import annotations

import math

import ml_collections

ACTIVATIONS = ("swiglu", "relu2", "gelu", "silu")
INITS = ("gpt2", "xavier", "kaiming", "nanochat")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DTYPES = ("auto", "float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MESH_AXES = ("data", "fsdp", "tensor")


class UserError(ValueError):
  """Something the user can fix (a flag, a config field, a file): entry points print the one-line
  message as `error: ...` and exit with status 2."""


class ConfigError(UserError):
  """A problem in the config or flags; the message names the field and the value."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every size; size files override what differs."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32768,
      num_layers=4,
      d_model=512,
      num_heads=8,
      head_dim=0,            # 0: d_model // num_heads
      num_kv_heads=0,        # 0: num_heads (MHA); fewer gives GQA, 1 gives MQA
      mlp_ratio=4.0,
      mlp_dim=0,             # 0: round(mlp_ratio * d_model) (SwiGLU keeps the ratio as given)
      activation="relu2",    # swiglu | relu2 | gelu | silu
      tie_embeddings=False,
      qk_norm=False,
      norm_scale=True,       # RMSNorm with a learned scale; False = parameter-free (nanochat)
      rope_theta=10000.0,
      max_seq_len=2048,
      logit_softcap=0.0,     # 0: off; else cap * tanh(logits / cap)
      init="gpt2",           # gpt2 | xavier | kaiming | nanochat
      init_std=0.02,
      dtype="auto",          # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU
      remat="none",          # none | full | dots | dots_no_batch
      scan_layers=False,     # lax.scan over stacked layers (faster compiles for deep models)
      attention="auto",      # auto | xla | cudnn
  ))

  # Mesh axis sizes; -1 fills with the remaining devices. Product must equal the device count.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3,               # peak LR for matrices (and everything without a group LR)
      embed_lr=0.0,          # 0: same as lr
      unembed_lr=0.0,        # 0: same as lr
      scale_lr_by_width=False,  # nanochat: group LRs x (768 / d_model) ** 0.5
      warmup_steps=100,
      min_lr_ratio=0.1,      # cosine decays to lr * min_lr_ratio
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,      # masked off norms and embeddings
      grad_clip=1.0,         # global-norm clip; 0 disables
  ))

  c.train = ml_collections.ConfigDict(dict(
      seq_len=1024,
      batch_tokens=524288,   # global batch per optimizer step, in tokens
      micro_batch_size=0,    # global sequences per accumulation micro-step; 0 = no accumulation
      steps=1000,
      tokens_per_param=0.0,  # > 0 sets steps from a Chinchilla-style budget (20 is Chinchilla)
      seed=0,
      log_every=10,
      eval_every=200,
      eval_batches=8,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpointing=True,
      sample_every=0,        # 0: only at the end of training
      sample_tokens=48,
      sample_prompt="",
      plot=True,             # loss-curve PNG at the end
  ))

  c.data = ml_collections.ConfigDict(dict(
      shards="",             # directory with manifest.json from `lmtiny.data.prepare`; "" = embedded corpus
      tokenizer="",          # tokenizer directory; "" with the embedded corpus = build one
      cache_dir="",          # where the embedded corpus's tokenizer and shards are cached
      embedded_max_chars=0,  # cap on embedded corpus size (0 = all of it)
      num_workers=0,         # grain worker processes; 0 = in-process
      shuffle_seed=0,
  ))
  return c


# ---------------------------------------------------------------------------------------------
# Derived quantities (one place, so the model, calculator and trainer agree).


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.num_heads


def num_kv_heads(m) -> int:
  return m.num_kv_heads or m.num_heads


def mlp_dim(m) -> int:
  return m.mlp_dim or int(round(m.mlp_ratio * m.d_model))


def global_batch_size(t) -> int:
  """Sequences per optimizer step."""
  return t.batch_tokens // t.seq_len


def accumulation_steps(t) -> int:
  return 1 if not t.micro_batch_size else global_batch_size(t) // t.micro_batch_size


def micro_batch_size(t) -> int:
  return t.micro_batch_size or global_batch_size(t)


def total_steps(cfg, num_params: int) -> int:
  """Training horizon: explicit steps, or tokens_per_param * params / batch_tokens."""
  t = cfg.train
  if t.tokens_per_param > 0:
    return max(1, math.ceil(t.tokens_per_param * num_params / t.batch_tokens))
  return t.steps


# ---------------------------------------------------------------------------------------------
# Validation.


def _require(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _choice(section, name: str, prefix: str, choices):
  value = section[name]
  _require(value in choices, f"{prefix}.{name}", value, f"must be one of {', '.join(choices)}")


def validate_model(m) -> None:
  for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_seq_len"):
    _require(isinstance(m[name], int) and m[name] > 0, f"model.{name}", m[name], "must be a positive integer")
  if not m.head_dim:
    _require(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  _require(head_dim(m) % 2 == 0, "model.head_dim", head_dim(m), "must be even (RoPE rotates pairs)")
  _require(m.num_kv_heads >= 0, "model.num_kv_heads", m.num_kv_heads, "must be >= 0")
  _require(m.num_heads % num_kv_heads(m) == 0, "model.num_kv_heads", m.num_kv_heads,
           f"must divide model.num_heads={m.num_heads}")
  _require(mlp_dim(m) > 0, "model.mlp_ratio", m.mlp_ratio, "gives an empty MLP")
  _require(m.logit_softcap >= 0, "model.logit_softcap", m.logit_softcap, "must be >= 0")
  _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
  _choice(m, "activation", "model", ACTIVATIONS)
  _choice(m, "init", "model", INITS)
  _choice(m, "attention", "model", ATTENTION_IMPLS)
  _choice(m, "dtype", "model", DTYPES)
  _choice(m, "remat", "model", REMAT_POLICIES)


def validate(cfg) -> None:
  """Checks that need no devices and no data; mesh and data checks live with their modules."""
  validate_model(cfg.model)
  t, o = cfg.train, cfg.optim
  for name in ("seq_len", "batch_tokens", "log_every", "eval_every", "checkpoint_every"):
    _require(isinstance(t[name], int) and t[name] > 0, f"train.{name}", t[name], "must be a positive integer")
  _require(t.seq_len <= cfg.model.max_seq_len, "train.seq_len", t.seq_len,
           f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
  _require(t.batch_tokens % t.seq_len == 0, "train.batch_tokens", t.batch_tokens,
           f"must be a multiple of train.seq_len={t.seq_len}")
  _require(t.micro_batch_size >= 0 and (not t.micro_batch_size or global_batch_size(t) % t.micro_batch_size == 0),
           "train.micro_batch_size", t.micro_batch_size,
           f"must divide the global batch of {global_batch_size(t)} sequences")
  _require(t.steps > 0 or t.tokens_per_param > 0, "train.steps", t.steps,
           "must be > 0 (or set train.tokens_per_param)")
  _require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, "must be >= 0")
  _require(isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1, "train.keep_checkpoints",
           t.keep_checkpoints, "must be an integer >= 1 (the newest checkpoint is what a re-run resumes)")
  _require(isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0, "data.num_workers",
           cfg.data.num_workers, "must be an integer >= 0 (0 = in-process)")
  for name in ("b1", "b2"):
    _require(0 <= o[name] < 1, f"optim.{name}", o[name], "must be in [0, 1)")
  _require(o.eps > 0, "optim.eps", o.eps, "must be > 0")
  _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
  _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
  _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0")
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    _require(isinstance(size, int) and (size == -1 or size > 0), f"mesh.{axis}", size, "must be -1 or a positive integer")
  _require(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", dict(cfg.mesh), "at most one axis may be -1")


def nanochat_config(depth: int) -> ml_collections.ConfigDict:
  """nanochat's family (configs/d12 ... d32): width = 64 * depth, head dim 128, vocab 65,536.

  relu^2 4x MLP, untied embeddings, parameter-free RMSNorm, QK-norm, RoPE, logit softcap 15,
  20 tokens per parameter. Group LRs follow nanochat (embedding 0.2, unembedding 0.004, scaled by
  (768 / width) ** 0.5). nanochat trains matrices with Muon at 0.02; lmtiny's matrices use AdamW,
  where that diverges, so they get AdamW's usual 3e-3.
  """
  c = base_config()
  c.model.update(vocab_size=65536, num_layers=depth, d_model=64 * depth, num_heads=depth // 2,
                 head_dim=128, activation="relu2", mlp_ratio=4.0, tie_embeddings=False,
                 norm_scale=False, qk_norm=True, logit_softcap=15.0, init="nanochat",
                 max_seq_len=2048, remat="dots_no_batch")
  c.train.update(seq_len=2048, batch_tokens=524288, tokens_per_param=20.0, eval_every=250)
  c.optim.update(lr=3e-3, embed_lr=0.2, unembed_lr=0.004, scale_lr_by_width=True,
                 warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0)
  return c
