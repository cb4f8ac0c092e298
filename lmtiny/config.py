"""The config schema: one shared base every `configs/<size>.py` starts from, and its checks.

Configs are data. A size file calls `base_config()`, overrides a few fields and returns the
ConfigDict; every field can be overridden from the command line (`--config.model.num_layers=4`).
`validate()` turns user mistakes into a `ConfigError` whose one-line message names the field
and the value; entry points print it and exit with status 2.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
import sys

import ml_collections

from lmtiny.errors import ConfigError

ACTIVATIONS = ("swiglu", "relu2", "gelu", "silu")
INITS = ("gpt2", "xavier", "kaiming", "nanochat", "nanochat_2026")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon", "normuon")
SCHEDULES = ("cosine", "wsd", "constant", "warmdown")
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")
MATMUL_DTYPES = ("default", "fp8")
# Channels of a block's normed input that drive nanochat 2026's value-embedding gate, and of the
# normed embedding that drive its smear gate.
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24
REMAT_POLICIES = ("none", "full", "save_attn_out", "save_qkv", "minimal", "dots", "dots_no_batch")
GRAD_REDUCE = ("auto", "step", "micro_step")  # train.grad_reduce
MESH_AXES = ("data", "fsdp", "tensor")
RL_DATA = ("gsm8k", "toy")
PACKINGS = ("concat", "bestfit")  # data.packing (lmtiny.data.pipeline)
TRACKERS = ("tensorboard", "wandb")  # train.trackers (lmtiny.runs.tracking)
WANDB_MODES = ("", "online", "offline")


def load_file(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict a `configs/<size>.py` file's get_config() returns (scripts and notebooks;
  entry points parse --config with ml_collections' config_flags)."""
  spec = importlib.util.spec_from_file_location("lmtiny_config_" + path.rsplit("/", 1)[-1][:-3], path)
  module = importlib.util.module_from_spec(spec)
  with no_bytecode_beside_the_file():
    spec.loader.exec_module(module)
  return module.get_config()


@contextlib.contextmanager
def no_bytecode_beside_the_file():
  """Python caches an imported file's bytecode in a __pycache__ beside it. A config file is the
  user's, often in their own directory: loading one writes nothing there, and a bad one leaves
  nothing behind (seen where Python writes bytecode, as it does by default)."""
  before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
  try:
    yield
  finally:
    sys.dont_write_bytecode = before


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
      norm_eps=1e-6,         # every RMSNorm's eps (nanochat: torch's default, float32 machine eps)
      embed_norm=False,      # RMSNorm right after the embedding lookup (nanochat)
      rope_theta=10000.0,
      max_seq_len=2048,
      logit_softcap=0.0,     # 0: off; else cap * tanh(logits / cap)
      init="gpt2",           # gpt2 | xavier | kaiming | nanochat
      init_std=0.02,
      dtype="auto",          # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; float16
                             # (GPUs without bf16) trains with dynamic loss scaling (optim.loss_scale_*)
      remat="none",          # none | full | save_attn_out | save_qkv | minimal | dots | dots_no_batch (lmtiny.model)
      scan_layers=False,     # lax.scan over stacked layers (faster compiles for deep models)
      attention="auto",      # auto | xla | cudnn | splash (lmtiny.model.attention)
      loss_chunk_tokens=4096,  # tokens per device per cross-entropy chunk (peak loss memory: chunk x V fp32)
      loss_kernel="auto",    # auto (fused on GPU/TPU, chunked on CPU) | fused (3 GEMMs) | chunked (lmtiny.kernels)
                             # | pallas (fused, logits kept on chip: TPU)
      # nanochat's 2026 architecture (lmtiny.model.transformer; all off by default). The per-layer
      # ones (window_pattern, value_embeds, residual_scalars, backout) need scan_layers=False.
      window_pattern="",     # sliding windows by layer, tiled: "SSSL" (S short, L full; the last layer is full); "" = all full
      short_window=0,        # S layers' window in tokens; 0 = max_seq_len / 4 rounded up to a multiple of 128
      value_embeds=False,    # per-layer value embeddings on alternate layers (the last included), gated into v
      residual_scalars=False,  # per-layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before each block
      smear=False,           # mix the previous token's embedding into each position through a learned gate
      backout=False,         # subtract backout_lambda x the mid-depth residual before the final norm
      qk_scale=1.0,          # queries and keys x this after QK-norm (nanochat 2026: 1.2)
      vocab_multiple=1,      # embedding and lm_head rows padded to a multiple of this (logits cropped)
      matmul_dtype="default",  # default (the compute dtype) | fp8 (tensorwise-scaled e4m3/e5m2 GEMMs in the blocks)
      fp8_lm_head=True,      # with matmul_dtype=fp8, the loss's lm_head GEMMs in fp8 too (nanochat's --fp8 converts it)
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
      name="adamw",          # adamw | muon (Muon on block matrices, AdamW on the rest: lmtiny.training.muon)
                             # | normuon (nanochat's 2026 Muon variant and AdamW groups: lmtiny.training.normuon)
      schedule="cosine",     # cosine | wsd (warmup, stable, linear decay) | constant (after warmup)
                             # | warmdown (nanochat's: warmup (step + 1) / warmup_steps, stable, linear decay)
      decay_fraction=0.2,    # wsd: the last fraction of steps decays linearly to lr * min_lr_ratio
      muon_momentum=0.95,    # Muon's Nesterov momentum, reached after muon_momentum_warmup steps
      muon_momentum_start=0.85,
      muon_momentum_warmup=300,
      muon_ns_steps=5,       # Newton-Schulz iterations
      muon_ns_dtype="bfloat16",  # dtype of the Newton-Schulz iteration (nanochat: bfloat16)
      # normuon only (lmtiny.training.normuon):
      scalar_lr=0.5,         # x0_lambdas' LR; resid_lambdas get 1% of it
      smear_lr=0.2,          # smear gate, smear and backout scalars (and norm scales, if any)
      muon_beta2=0.9,        # NorMuon: decay of the factored second moment
      muon_momentum_warmdown=0.0,  # momentum reached at the end of the LR warmdown; 0 = stay at muon_momentum
      weight_decay_schedule="constant",  # constant | cosine (Muon's weight decay to 0 at the last step)
      cautious_weight_decay=True,  # decay a weight only where the update has its sign
      loss_scale_init=2.0 ** 16,  # float16 only: initial dynamic loss scale
      loss_scale_period=1000,     # float16 only: double the scale after this many finite steps
  ))

  c.train = ml_collections.ConfigDict(dict(
      seq_len=1024,
      batch_tokens=524288,   # global batch per optimizer step, in tokens
      micro_batch_size=0,    # global sequences per accumulation micro-step; 0 = no accumulation
      device_batch_size=0,   # sequences per device per micro-step (nanochat/MaxText); > 0 overrides micro_batch_size
      # When the data-parallel gradient sum happens under accumulation (lmtiny.parallel.sharding):
      # step = each device sums its micro-batches' gradients, then one reduction (reduce-scatter
      # under fsdp) per step, at the price of whole float32 weights and gradients on every device
      # for the step (ZeRO-2's memory, not ZeRO-3's); micro_step = XLA's partition, which sums the
      # gradients inside every micro-step; auto = step unless the mesh shards the weights.
      grad_reduce="auto",
      z_loss=0.0,            # weight of PaLM's z-loss, z * logsumexp(logits)^2 per token; 0 = off
      steps=1000,
      tokens_per_param=0.0,  # > 0 sets steps from a Chinchilla-style budget (20 is Chinchilla)
      flops_budget=0.0,      # > 0 sets steps from a training-FLOPs budget (FLOPs per token: lmtiny.plan.counts)
      horizon_params="all",  # what tokens_per_param counts: all | scaling (block matrices + lm_head, nanochat 2026)
      # > 0: pretraining stops at this many seconds of training (not compile, evals or saves), and the
      # LR schedule follows it (lmtiny.training.budget); the step horizon above stays an upper bound
      time_budget=0.0,
      # nanochat's automatic batch size (lmtiny.plan.recipe): batch_tokens = batch_reference_size x
      # (horizon / the reference depth's horizon) ** 0.383, rounded to a power of two
      auto_batch=False,
      batch_reference_depth=12,   # the depth whose horizon batch_reference_size is tuned for
      batch_reference_size=524288,
      lr_batch_scaling=False,     # optim LRs (not smear_lr) x sqrt(batch / batch_reference_size)
      weight_decay_scaling=False,  # optim.weight_decay x sqrt(batch / reference) x reference horizon / horizon
      seed=0,
      log_every=10,
      eval_every=200,
      eval_batches=8,        # held-out batches of train.batch_tokens each, scored a micro-batch at a time
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpointing=True,
      core_every=0,          # > 0: score core_tasks every this many steps and at the end
      core_tasks="core",     # "core" (DCLM CORE, lmtiny.tasks.dclm) and/or "hf6" or its task names
      core_items=500,        # items per task (nanochat's in-training CORE: 500); 0 = all
      core_data_dir="",      # holds eval_bundle/ (core) and <task>.jsonl|.parquet (hf6); "" = cache / HF hub
      sample_every=0,        # 0: only at the end of training
      sample_tokens=48,
      sample_prompt="",
      plot=True,             # loss-curve PNG at the end
      # Where metrics go besides metrics.jsonl (lmtiny.runs.tracking): a comma list of tensorboard
      # and wandb (Weights & Biases: pip install -e ".[track]"); "" = metrics.jsonl only
      trackers="tensorboard",
      tracker_group="",      # the W&B group of this run ("" = none): a sweep names one for all its runs
      wandb_project="lmtiny",
      wandb_mode="",         # online | offline (no network; `wandb sync` uploads later); "" = $WANDB_MODE, else online
      # A jax.profiler trace into RUN/profile and a summary of the device time (lmtiny.training.profiling)
      profile_steps=0,       # > 0: trace this many steps of each start of the run; 0 = off
      profile_skip=1,        # steps each start runs before the trace (the first compiles)
  ))

  c.data = ml_collections.ConfigDict(dict(
      shards="",             # directory with manifest.json from `lmtiny.data.prepare`; "" = embedded corpus;
                             # "dir:0.9,dir2:0.1" = a mixture by token share (lmtiny.data.mixture)
      tokenizer="",          # tokenizer directory; "" with the embedded corpus = build one
      cache_dir="",          # where the embedded corpus's tokenizer and shards are cached
      embedded_max_chars=0,  # cap on embedded corpus size (0 = all of it)
      num_workers=0,         # grain worker processes; 0 = in-process
      prefetch=2,            # batches a background thread keeps ready while the step runs; 0 = none
      max_docs_per_row=0,    # cap on documents per packed row (the rest of a full row is padding); 0 = none.
                             # Bounds the runs packed cuDNN attention sizes for (pipeline.max_runs_per_row)
      document_mask=True,    # False: documents attend across their boundaries (nanochat); plain causal attention
      packing="concat",      # concat: documents back to back, continued in the next row | bestfit: every row starts
                             # with BOS, documents placed best-fit, the overflow cropped (nanochat; lmtiny.data.bestfit)
      bestfit_buffer=1000,   # bestfit: documents the best-fit choice searches (nanochat: 1000)
      shuffle_seed=0,
  ))

  # Fine-tuning on conversations (python -m lmtiny.sft); train.* and optim.* apply otherwise.
  c.sft = ml_collections.ConfigDict(dict(
      init="",               # base run directory (--init); its checkpoint gives the starting weights
      init_step=-1,          # its checkpoint step; -1 = the newest
      merged_from="",        # set by `lmtiny.lora merge`: the LoRA run and step this full run was merged from
      sources="embedded_chat:1.0",  # weighted mixture "spec:weight,..." (lmtiny.chat.conversations)
      steps=150,             # 0: one epoch of the `nanochat` mixture, the LR over its progress (nanochat's default)
      lr=1e-3,               # peak matrix LR (replaces optim.lr; embed/unembed LRs stay), optim's schedule
      warmup_steps=10,
      init_lr_frac=1.0,      # every group's LR schedule x this (nanochat's SFT: 0.8 of the base's LRs)
      load_optimizer=False,  # start from the base run's optimizer state (Adam moments, Muon momentum), not a
                             # fresh one; its schedules' step counts restart (nanochat's --load-optimizer=1)
      # nanochat's chat evaluations (lmtiny.tasks.chat_suite) while fine-tuning, as train.core_every
      # does CORE: metrics.jsonl split "chat", per-task accuracy
      chat_eval_every=0,     # > 0: every this many steps and at the end; 0 = off
      chat_eval_tasks="arc_easy,mmlu",  # "all" or a comma list (nanochat's SFT watches these two)
      chat_eval_items=1024,  # items per task (nanochat's SFT: 1024); 0 = all
      chat_eval_data_dir="",  # local <task>.jsonl|.parquet (spelling: words_alpha.txt); "" = public sources
      chat_eval_max_new_tokens=256,  # reply length for the generative tasks
  ))
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                # 0: full fine-tuning; > 0: train rank-r adapters on a frozen base
      alpha=16.0,            # adapters scale by alpha / rank
      targets="q,k,v,o,up,gate,down",  # weights that get adapters (absent ones are skipped)
  ))
  # On-policy RL from a chat run (python -m lmtiny.rl; lmtiny.training.policy_gradient). It sets
  # train.* / optim.* from these; an RL run names its init run in rl.init (lmtiny.runs.kind).
  c.rl = ml_collections.ConfigDict(dict(
      init="",               # the run RL starts from (--init; its newest checkpoint)
      data="gsm8k",          # gsm8k | toy (self-generated arithmetic problems, no download)
      data_dir="",           # local gsm8k_train.jsonl|parquet and gsm8k.jsonl|parquet; "" = the hub
      steps=100,
      questions=8,           # problems per step
      samples=8,             # replies per problem (k)
      max_new_tokens=128,
      temperature=1.0,
      top_k=50,              # 0: no top-k
      lr=1e-4,
      warmup_steps=0,        # linear LR warmup (a fresh Adam state's first updates are ~sign(g) * lr)
      kl=0.0,                # weight of the KL penalty to the init model; 0 = off
      log_every=1,
      eval_every=20,         # 0: only at the end
      eval_questions=32,     # held-out problems per evaluation; 0 = no evaluation
      checkpoint_every=20,
      seed=0,
  ))
  return c


# ---------------------------------------------------------------------------------------------
# Derived quantities (one place, so the model, calculator and trainer agree).


def padded_vocab(m) -> int:
  """Rows of the embedding and columns of lm_head: vocab_size rounded up to model.vocab_multiple."""
  return -(-m.vocab_size // m.vocab_multiple) * m.vocab_multiple


def fp8_lm_head(m) -> bool:
  """Whether the loss's lm_head GEMMs run in fp8: model.matmul_dtype=fp8 with model.fp8_lm_head (the
  model also needs the [d_model, vocab] weight fp8-eligible, lmtiny.kernels.fp8.fp8_eligible)."""
  return m.matmul_dtype == "fp8" and m.fp8_lm_head


def short_window(m) -> int:
  """The S layers' window: model.short_window, or a quarter of max_seq_len rounded up to 128."""
  return m.short_window or -(-m.max_seq_len // 4 // 128) * 128


def layer_windows(m) -> tuple[int, ...]:
  """Each layer's attention window in tokens before the query (0 = the full causal context):
  model.window_pattern tiled over the layers, the last layer always full."""
  pattern = m.window_pattern
  if not pattern:
    return (0,) * m.num_layers
  windows = [short_window(m) if pattern[i % len(pattern)] == "S" else 0 for i in range(m.num_layers)]
  windows[-1] = 0
  return tuple(windows)


def has_value_embed(m, layer: int) -> bool:
  """Value embeddings sit on alternate layers, the last one included."""
  return bool(m.value_embeds) and layer % 2 == (m.num_layers - 1) % 2


def value_embed_layers(m) -> list[int]:
  """The layers with a value embedding (has_value_embed), in order."""
  return [layer for layer in range(m.num_layers) if has_value_embed(m, layer)]


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.num_heads


def cudnn_max_runs(seq_len: int, max_runs: int = 0) -> int:
  """Static bound on document runs per packed row for cuDNN's packed layout (lmtiny.model.attention):
  the packer's guarantee `max_runs` when it gives one (never more than T), else T // 64 (>= 1)."""
  return min(max_runs, seq_len) if max_runs > 0 else max(1, seq_len // 64)


def attention_query_blocks(seq_len: int) -> int:
  """Query blocks of the XLA self-attention (lmtiny.model.attention.xla_causal_attention): 4 when the
  sequence splits into 4 blocks of at least 32 rows, else 1. Block i attends only to keys up to
  its last row, so the scores hold (n + 1) / 2n of the [T, T] square."""
  return 4 if seq_len % 4 == 0 and seq_len >= 128 else 1


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


def resolve_batch(cfg, data_parallel: int):
  """A copy of cfg whose train.micro_batch_size comes from train.device_batch_size (sequences per
  device per micro-step) x the data-parallel size, so the accumulation count follows the device
  count: micro = device_batch_size x data_parallel (no accumulation when that covers the global
  batch). Returns cfg itself when device_batch_size is 0."""
  t = cfg.train
  if not t.device_batch_size:
    return cfg
  micro, total = t.device_batch_size * data_parallel, global_batch_size(t)
  if micro < total and total % micro:
    raise ConfigError(f"config.train.device_batch_size={t.device_batch_size!r}: {micro} sequences per micro-step "
                      f"({t.device_batch_size} x {data_parallel} data-parallel devices) do not divide the global "
                      f"batch of {total} sequences (train.batch_tokens / train.seq_len)")
  cfg = copy.deepcopy(cfg)
  cfg.train.micro_batch_size = 0 if micro >= total else micro
  cfg.train.device_batch_size = 0
  return cfg


def total_steps(cfg, num_params: int, flops_per_token: float = 0.0) -> int:
  """Training horizon: explicit steps, or tokens_per_param * params / batch_tokens (rounded up;
  down under nanochat's horizon_params="scaling", as nanochat rounds), or flops_budget /
  (flops_per_token * batch_tokens) rounded to the nearest step (flops_per_token: training FLOPs
  per token, lmtiny.plan.counts.train_flops_per_token)."""
  t = cfg.train
  if t.flops_budget > 0:
    if not flops_per_token > 0:
      raise ValueError("train.flops_budget needs the training FLOPs per token")
    return max(1, round(t.flops_budget / (flops_per_token * t.batch_tokens)))
  if t.tokens_per_param > 0:
    steps = t.tokens_per_param * num_params / t.batch_tokens
    return max(1, math.floor(steps) if t.horizon_params == "scaling" else math.ceil(steps))
  return t.steps


# ---------------------------------------------------------------------------------------------
# Validation.


def _require(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _choice(section, name: str, prefix: str, choices):
  value = section[name]
  _require(value in choices, f"{prefix}.{name}", value, f"must be one of {', '.join(choices)}")


# The float fields (a float in base_config(): LRs, scales, decays, stds, epsilons, ratios) for
# which 0 means nothing; every other float field may be 0 (off, or "same as optim.lr").
POSITIVE_FLOATS = {
    "model": ("init_std", "norm_eps", "qk_scale", "rope_theta"),  # mlp_ratio 0: mlp_dim decides
    "optim": ("lr", "eps", "loss_scale_init", "scalar_lr", "smear_lr"),
    "lora": ("alpha",),
    "rl": ("lr", "temperature"),
    "sft": ("lr",),
}


@functools.cache
def _float_fields(name: str) -> tuple[str, ...]:
  """The fields of base_config() section `name` whose default is a float (built once: a validation
  runs on every config a test or a sweep makes)."""
  return tuple(field for field, default in base_config()[name].items() if isinstance(default, float))


def check_float_fields(section, name: str) -> None:
  """Every float field of config section `name` is a finite number, > 0 where POSITIVE_FLOATS lists
  it, else >= 0 (none may be negative). NaN fails every comparison, so `x <= 0` checks pass it; a
  NaN or infinite LR, decay or scale would be accepted and make the first step's loss NaN."""
  positive = POSITIVE_FLOATS.get(name, ())
  for field in _float_fields(name):
    if field not in section:  # older runs' configs lack newer fields
      continue
    value, bound = section[field], ">" if field in positive else ">="
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if bound == ">" else value >= 0))
    _require(ok, f"{name}.{field}", value, f"must be a finite number {bound} 0")


def validate_model(m) -> None:
  check_float_fields(m, "model")
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
  _choice(m, "activation", "model", ACTIVATIONS)
  _choice(m, "init", "model", INITS)
  _choice(m, "attention", "model", ATTENTION_IMPLS)
  _choice(m, "dtype", "model", DTYPES)
  _choice(m, "remat", "model", REMAT_POLICIES)
  _validate_layer_features(m)


def _validate_layer_features(m) -> None:
  pattern = m.window_pattern
  _require(isinstance(pattern, str) and set(pattern) <= {"S", "L"}, "model.window_pattern", pattern,
           'must be a string of S (short window) and L (full context), e.g. "SSSL"; "" = all full')
  _require(isinstance(m.short_window, int) and m.short_window >= 0, "model.short_window",
           m.short_window, "must be an integer >= 0 (0 = max_seq_len / 4 rounded up to 128)")
  _require(isinstance(m.vocab_multiple, int) and m.vocab_multiple >= 1, "model.vocab_multiple",
           m.vocab_multiple, "must be an integer >= 1")
  _require(m.matmul_dtype in MATMUL_DTYPES, "model.matmul_dtype", m.matmul_dtype,
           f"must be one of {', '.join(MATMUL_DTYPES)}")
  _require(isinstance(m.fp8_lm_head, bool), "model.fp8_lm_head", m.fp8_lm_head, "must be True or False")
  if fp8_lm_head(m):
    _require(m.loss_kernel != "pallas", "model.loss_kernel", m.loss_kernel,
             "runs the lm_head in the compute dtype: with model.matmul_dtype=fp8 set model.fp8_lm_head=False "
             "or use loss_kernel=fused")
  if m.value_embeds or m.smear:
    _require(m.d_model >= 24, "model.d_model", m.d_model,
             "is too narrow for the smear gate (24 channels) and value-embedding gate (12 channels)")
  per_layer = [name for name in ("window_pattern", "value_embeds", "residual_scalars", "backout") if m[name]]
  if m.scan_layers and per_layer:
    raise ConfigError(f"config.model.scan_layers=True: model.{per_layer[0]} differs from layer to layer; "
                      "set model.scan_layers=False")


def validate_rl(r) -> None:
  """The rl section's fields on their own (the split of a step's rows over the devices is checked
  with the mesh, in lmtiny.training.policy_gradient)."""
  check_float_fields(r, "rl")  # temperature, lr, kl
  for name in ("steps", "questions", "samples", "max_new_tokens", "log_every", "checkpoint_every"):
    _require(isinstance(r[name], int) and r[name] >= 1, f"rl.{name}", r[name], "must be an integer >= 1")
  # 0: only at the end / no evaluation / no top-k / no warmup
  for name in ("eval_every", "eval_questions", "top_k", "warmup_steps"):
    _require(isinstance(r[name], int) and r[name] >= 0, f"rl.{name}", r[name], "must be an integer >= 0")
  _require(isinstance(r.seed, int), "rl.seed", r.seed, "must be an integer")
  _choice(r, "data", "rl", RL_DATA)


def validate_sft(s) -> None:
  """The sft section's fields, named as the user set them (they become train.* / optim.* fields)."""
  for name, low, why in (("steps", 0, "must be an integer >= 0 (0 = one epoch of the nanochat mixture)"),
                         ("lr", None, "must be > 0"),
                         ("warmup_steps", 0, "must be an integer >= 0"),
                         ("chat_eval_every", 0, "must be an integer >= 0 (0 = off)"),
                         ("chat_eval_items", 0, "must be an integer >= 0 (0 = every item)"),
                         ("chat_eval_max_new_tokens", 1, "must be an integer >= 1")):
    value = s[name]
    if low is None:  # a float: its type and finiteness are check_float_fields'
      _require(not isinstance(value, (int, float)) or value > 0 or math.isnan(value), f"sft.{name}", value, why)
      continue
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"sft.{name}", value, why)
  check_float_fields(s, "sft")  # finite too: lr=inf passed `> 0`
  _require(isinstance(s.init_lr_frac, (int, float)) and s.init_lr_frac > 0, "sft.init_lr_frac", s.init_lr_frac,
           "must be > 0 (nanochat: 0.8)")
  _require(isinstance(s.load_optimizer, bool), "sft.load_optimizer", s.load_optimizer, "must be True or False")


def tracker_names(t) -> tuple[str, ...]:
  """train.trackers as names: "tensorboard,wandb" -> ("tensorboard", "wandb")."""
  return tuple(name.strip() for name in str(t.trackers).split(",") if name.strip())


def validate_tracking(t) -> None:
  """train.trackers (wandb installed when named: one line with the pip command, before any training),
  the W&B fields and train.profile_*."""
  for name in tracker_names(t):
    _require(name in TRACKERS, "train.trackers", t.trackers, f"{name!r} is not one of {', '.join(TRACKERS)}")
  if "wandb" in tracker_names(t) and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.train.trackers={t.trackers!r}: wandb is not installed: pip install -e '.[track]' "
                      "(or pip install wandb)")
  _require(t.wandb_mode in WANDB_MODES, "train.wandb_mode", t.wandb_mode, 'must be online, offline or ""')
  for name in ("tracker_group", "wandb_project"):
    _require(isinstance(t[name], str), f"train.{name}", t[name], "must be a string")
  for name, why in (("profile_steps", "must be an integer >= 0 (0 = off)"),
                    ("profile_skip", "must be an integer >= 0 (steps before the trace)")):
    _require(isinstance(t[name], int) and not isinstance(t[name], bool) and t[name] >= 0, f"train.{name}", t[name], why)


def validate_lora(lora) -> None:
  check_float_fields(lora, "lora")
  _require(isinstance(lora.rank, int) and not isinstance(lora.rank, bool) and lora.rank >= 0, "lora.rank",
           lora.rank, "must be an integer >= 0 (0: full fine-tuning)")


def validate(cfg) -> None:
  """Every section's checks that need no devices and no data (the mesh's, the data's and the
  task names' are lmtiny.training.resolved's)."""
  validate_model(cfg.model)
  validate_rl(cfg.rl)
  validate_sft(cfg.sft)
  validate_lora(cfg.lora)
  validate_tracking(cfg.train)
  for section in ("train", "optim"):
    check_float_fields(cfg[section], section)
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
  _require(t.device_batch_size >= 0, "train.device_batch_size", t.device_batch_size, "must be >= 0")
  _choice(t, "grad_reduce", "train", GRAD_REDUCE)
  _require(t.grad_reduce != "step" or cfg.mesh.tensor == 1, "train.grad_reduce", t.grad_reduce,
           f"needs mesh.tensor=1 (tensor parallelism reduces activations inside every micro-step; "
           f"mesh.tensor={cfg.mesh.tensor})")
  _require(cfg.model.loss_chunk_tokens > 0, "model.loss_chunk_tokens", cfg.model.loss_chunk_tokens, "must be > 0")
  _require(cfg.model.loss_kernel in ("auto", "fused", "chunked", "pallas"), "model.loss_kernel",
           cfg.model.loss_kernel, "must be auto, fused, chunked or pallas")
  _require(t.steps > 0 or t.tokens_per_param > 0 or t.flops_budget > 0, "train.steps", t.steps,
           "must be > 0 (or set train.tokens_per_param or train.flops_budget)")
  _require(not (t.flops_budget > 0 and t.tokens_per_param > 0), "train.flops_budget", t.flops_budget,
           f"sets the horizon, as train.tokens_per_param={t.tokens_per_param!r} does: set one of them")
  _require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, "must be >= 0")
  _require(t.horizon_params in ("all", "scaling"), "train.horizon_params", t.horizon_params,
           "must be all or scaling")
  _require(isinstance(t.batch_reference_depth, int) and t.batch_reference_depth >= 1,
           "train.batch_reference_depth", t.batch_reference_depth, "must be an integer >= 1")
  _require(isinstance(t.batch_reference_size, int) and t.batch_reference_size >= 1,
           "train.batch_reference_size", t.batch_reference_size, "must be a positive number of tokens")
  if t.auto_batch:
    _require(t.tokens_per_param > 0, "train.auto_batch", True, "needs train.tokens_per_param > 0 (the horizon it sizes for)")
  if t.core_every:
    _require(isinstance(t.core_every, int) and t.core_every > 0, "train.core_every", t.core_every,
             "must be an integer >= 0 (0 = off)")
    _require(isinstance(t.core_items, int) and t.core_items >= 0, "train.core_items", t.core_items,
             "must be an integer >= 0 (0 = every item)")
    # the task names are checked where the tasks live (lmtiny.training.resolved)
  _require(isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1, "train.keep_checkpoints",
           t.keep_checkpoints, "must be an integer >= 1 (the newest checkpoint is what a re-run resumes)")
  _require(isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0, "data.num_workers",
           cfg.data.num_workers, "must be an integer >= 0 (0 = in-process)")
  _require(isinstance(cfg.data.shuffle_seed, int) and 0 <= cfg.data.shuffle_seed < 2**32, "data.shuffle_seed",
           cfg.data.shuffle_seed, "must be an integer in [0, 2**32)")
  _require(isinstance(cfg.data.embedded_max_chars, int) and cfg.data.embedded_max_chars >= 0,
           "data.embedded_max_chars", cfg.data.embedded_max_chars, "must be an integer >= 0 (0 = all of it)")
  _require(isinstance(cfg.data.prefetch, int) and cfg.data.prefetch >= 0, "data.prefetch", cfg.data.prefetch,
           "must be an integer >= 0 (0 = no prefetch thread)")
  _require(isinstance(cfg.data.max_docs_per_row, int) and cfg.data.max_docs_per_row >= 0, "data.max_docs_per_row",
           cfg.data.max_docs_per_row, "must be an integer >= 0 (0 = no cap)")
  _require(isinstance(cfg.data.document_mask, bool), "data.document_mask", cfg.data.document_mask,
           "must be True or False")
  _choice(cfg.data, "packing", "data", PACKINGS)
  _require(isinstance(cfg.data.bestfit_buffer, int) and not isinstance(cfg.data.bestfit_buffer, bool)
           and cfg.data.bestfit_buffer >= 1, "data.bestfit_buffer", cfg.data.bestfit_buffer,
           "must be an integer >= 1 (documents the best-fit choice searches)")
  if cfg.data.packing == "bestfit":
    _require(cfg.data.max_docs_per_row == 0, "data.max_docs_per_row", cfg.data.max_docs_per_row,
             "must be 0 with data.packing=bestfit (best-fit rows have no padding to cap documents with)")
  for name in ("b1", "b2"):
    _require(0 <= o[name] < 1, f"optim.{name}", o[name], "must be in [0, 1)")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
  _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
  _choice(o, "name", "optim", OPTIMIZERS)
  _choice(o, "schedule", "optim", SCHEDULES)
  _require(0 <= o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in [0, 1]")
  _require(0 <= o.muon_momentum < 1 and 0 <= o.muon_momentum_start < 1, "optim.muon_momentum",
           (o.muon_momentum_start, o.muon_momentum), "momenta must be in [0, 1)")
  _require(o.muon_momentum_warmup >= 0, "optim.muon_momentum_warmup", o.muon_momentum_warmup, "must be >= 0")
  _require(o.muon_ns_steps > 0, "optim.muon_ns_steps", o.muon_ns_steps, "must be > 0")
  _require(o.muon_ns_dtype in ("float32", "bfloat16"), "optim.muon_ns_dtype", o.muon_ns_dtype,
           "must be one of float32, bfloat16")
  _require(0 <= o.muon_beta2 < 1, "optim.muon_beta2", o.muon_beta2, "must be in [0, 1)")
  _require(0 <= o.muon_momentum_warmdown < 1, "optim.muon_momentum_warmdown", o.muon_momentum_warmdown,
           "must be in [0, 1) (0 = stay at optim.muon_momentum)")
  _choice(o, "weight_decay_schedule", "optim", WEIGHT_DECAY_SCHEDULES)
  _require(isinstance(o.cautious_weight_decay, bool), "optim.cautious_weight_decay", o.cautious_weight_decay,
           "must be True or False")
  if o.name == "normuon":  # Polar Express has one coefficient triple per iteration, five in all
    _require(o.muon_ns_steps <= 5, "optim.muon_ns_steps", o.muon_ns_steps, "must be <= 5 with optim.name=normuon")
  _require(o.loss_scale_period > 0, "optim.loss_scale_period", o.loss_scale_period, "must be > 0")
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    _require(isinstance(size, int) and (size == -1 or size > 0), f"mesh.{axis}", size, "must be -1 or a positive integer")
  _require(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", dict(cfg.mesh), "at most one axis may be -1")


# torch.nn.functional.rms_norm with eps=None uses the machine epsilon of float32.
FLOAT32_EPS = 2.0 ** -23


def nanochat_width(depth: int, head_dim_: int = 128, aspect: int = 64) -> tuple[int, int]:
  """nanochat's (width, heads) at a depth: aspect x depth rounded up to a whole number of heads."""
  width = -(-depth * aspect // head_dim_) * head_dim_
  return width, width // head_dim_


def nanochat_leaderboard_config(depth: int, tokens_per_param: float = 12.0) -> ml_collections.ConfigDict:
  """nanochat's leaderboard recipe (karpathy/nanochat at 92d63d4, 2026: d24 reaches GPT-2's CORE in
  99 min on 8 x H100), at depth `depth` (configs/d12_2026.py, d24_2026.py).

  Model: width 64 x depth rounded to 128-wide heads, vocab 32,768 padded to a multiple of 64,
  relu^2 4x MLP, untied, parameter-free RMSNorm (after the embedding too), QK-norm with q and k
  x 1.2, RoPE base 100,000, logit softcap 15, sliding windows "SSSL" (S = a quarter of the
  2,048-token context, rounded up to 128; the last layer full), value embeddings on alternate
  layers, per-layer residual scalars, smear, backout, nanochat's 2026 init.
  Optimizer (lmtiny.training.normuon): Muon with Polar Express, NorMuon and cautious weight decay
  0.28 (cosine to 0) on the block matrices at lr 0.02, momentum 0.85 -> 0.97 over 400 steps and
  0.90 by the end; AdamW on lm_head (0.008), embedding (0.3), value embeddings (0.15), scalars
  (0.5) and smear (0.2), the first three x (768 / width) ** 0.5; 40 warmup steps, constant, then
  a linear warmdown over the last 65% to 5%. Horizon `tokens_per_param` (base_train's default 12;
  the leaderboard's d24 runs 8) tokens per scaling parameter; batch size
  from nanochat's rule (524,288 tokens at d12, x (horizon ratio) ** 0.383), LRs x sqrt of the
  batch ratio and weight decay rescaled with it (lmtiny.plan.recipe).
  """
  c = base_config()
  width, heads = nanochat_width(depth)
  c.model.update(vocab_size=32768, vocab_multiple=64, num_layers=depth, d_model=width, num_heads=heads,
                 head_dim=128, activation="relu2", mlp_ratio=4.0, tie_embeddings=False, norm_scale=False,
                 qk_norm=True, embed_norm=True, norm_eps=FLOAT32_EPS, logit_softcap=15.0, init="nanochat_2026",
                 rope_theta=100000.0, max_seq_len=2048, window_pattern="SSSL", value_embeds=True,
                 residual_scalars=True, smear=True, backout=True, qk_scale=1.2, remat="dots_no_batch",
                 scan_layers=False)
  c.train.update(seq_len=2048, batch_tokens=524288, tokens_per_param=tokens_per_param, horizon_params="scaling",
                 auto_batch=True, batch_reference_depth=12, batch_reference_size=524288, lr_batch_scaling=True,
                 weight_decay_scaling=True, eval_every=250, device_batch_size=32 if depth <= 12 else 16)
  c.optim.update(name="normuon", lr=0.02, embed_lr=0.3, unembed_lr=0.008, scalar_lr=0.5, smear_lr=0.2,
                 scale_lr_by_width=True, weight_decay=0.28, weight_decay_schedule="cosine",
                 cautious_weight_decay=True, grad_clip=0.0, schedule="warmdown", warmup_steps=40,
                 decay_fraction=0.65, min_lr_ratio=0.05, muon_momentum_start=0.85, muon_momentum=0.97,
                 muon_momentum_warmup=400, muon_momentum_warmdown=0.90, muon_beta2=0.9, muon_ns_steps=5,
                 muon_ns_dtype="bfloat16")
  return c


def nanochat_config(depth: int) -> ml_collections.ConfigDict:
  """nanochat's GPT and its base_train recipe at depth `depth` (configs/d12 ... d32).

  Follows karpathy/nanochat at 962b6bf (2026-01-04; before value embeddings and per-layer
  residual scalars): width = 64 * depth, head dim 128 (depth // 2 heads for even depths), vocab
  65,536, relu^2 4x MLP, untied embeddings, parameter-free RMSNorm with torch's default eps after
  the embedding, before every block and at the end, QK-norm, RoPE theta 10,000, logit softcap 15,
  nanochat's init; 524,288-token batches of 2,048-token rows for 20 tokens per parameter.
  Optimizer: Muon (lr 0.02, Nesterov momentum warming 0.85 -> 0.95 over 300 steps, 5 quintic
  Newton-Schulz steps in bfloat16) on the block matrices; AdamW (betas 0.8/0.95, eps 1e-10, no
  weight decay) on the embedding (lr 0.2) and unembedding (0.004), both x (768 / width) ** 0.5;
  global-norm clip 1.0; no warmup, constant LR, then linear warmdown to 0 over the last 20%.
  """
  c = base_config()
  c.model.update(vocab_size=65536, num_layers=depth, d_model=64 * depth, num_heads=depth // 2,
                 head_dim=128, activation="relu2", mlp_ratio=4.0, tie_embeddings=False,
                 norm_scale=False, qk_norm=True, logit_softcap=15.0, init="nanochat",
                 max_seq_len=2048, remat="dots_no_batch", embed_norm=True, norm_eps=FLOAT32_EPS)
  c.train.update(seq_len=2048, batch_tokens=524288, tokens_per_param=20.0, eval_every=250)
  c.optim.update(name="muon", lr=0.02, embed_lr=0.2, unembed_lr=0.004, scale_lr_by_width=True,
                 b1=0.8, b2=0.95, eps=1e-10, grad_clip=1.0, schedule="wsd", decay_fraction=0.2,
                 warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0, muon_momentum=0.95,
                 muon_momentum_start=0.85, muon_momentum_warmup=300, muon_ns_steps=5,
                 muon_ns_dtype="bfloat16")
  # Sized to fit one 80 GB H100 per data-parallel device even with the XLA attention path (its
  # [T, T] scores); lax.scan over layers keeps exactly what the remat policy saves. Checked with
  # `python -m lmtiny.bench --config configs/dNN.py --compile-only --config.model.dtype=bfloat16`.
  c.model.scan_layers = True
  c.train.device_batch_size = 32 if depth <= 12 else 16 if depth <= 20 else 8 if depth <= 26 else 4
  return c
