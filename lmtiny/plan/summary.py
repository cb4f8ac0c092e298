"""The text `python -m lmtiny.arch --config ...` prints: the parameter split, FLOPs per token, the
token budget and training time, and the memory per chip."""
from __future__ import annotations

from lmtiny import config as config_lib
from lmtiny.plan import memory, recipe
from lmtiny.plan.counts import (PEAK_FLOPS, chinchilla_tokens, count_params, describe, inference_flops_per_token,
                              matmul_params, param_breakdown, train_flops_per_token, training_seconds)
from lmtiny.plan.units import duration, human


# The slices the time-to-horizon table prints (nanochat's leaderboard machine and two TPU pods;
# v5p slices are named by TensorCores, two per chip, v6e slices by chips).
SLICES = (("8 x H100", "h100", 8), ("v5p-64", "v5p", 32), ("v6e-64", "v6e", 64))


def report(cfg, tokens_per_param: float | None = None, chip: str = "h100", mfu: float = 0.4,
           num_chips: int = 1) -> str:
  """The text `python -m lmtiny.arch --config ...` prints, for a full config (model + train).
  tokens_per_param None: the config's own horizon (train.tokens_per_param over the parameters
  train.horizon_params counts), or 20 per parameter when the config gives steps."""
  cfg = recipe.resolve(cfg)
  m, seq_len = cfg.model, cfg.train.seq_len
  p = param_breakdown(m)
  total = p["total"]
  rows = [
      ("token embedding", p["embedding"]),
      ("lm_head" if not m.tie_embeddings else "lm_head (tied to embedding)", p["lm_head"]),
      (f"transformer blocks ({m.num_layers} layers)", p["blocks"]),
      ("  per layer: attention", p["attention_per_layer"]),
      ("  per layer: MLP", p["mlp_per_layer"]),
      ("  per layer: norms", p["norms_per_layer"]),
      ("  per layer: total", p["layer"]),
  ]
  if p["blocks"] != m.num_layers * p["layer"]:
    rows.append(("  value-embedding gates", p["blocks"] - m.num_layers * p["layer"]))
  if p["value_embeds"]:
    rows.append(("value embeddings", p["value_embeds"]))
  if p["scalars"]:
    rows.append(("scalars (residual, smear, backout)", p["scalars"]))
  rows += [("final norm", p["final_norm"]), ("total", total)]
  lines = [describe(m), "", f"{'parameters':<40}{'count':>15}{'share':>10}"]
  lines += [f"{name:<40}{count:>15,}{100 * count / total:>9.2f}%" for name, count in rows]
  lines[-1] += f"  ({human(total)})"

  n_mm, hd = matmul_params(m), config_lib.head_dim(m)
  train, infer = train_flops_per_token(m, seq_len), inference_flops_per_token(m, seq_len)
  lines += [
      "",
      f"FLOPs per token at seq_len T={seq_len} (causal attention counted half, MaxText convention):",
      f"  N_matmul = {n_mm:,} (every weight matrix that multiplies, lm_head included, embedding lookup excluded)",
      f"  training  6*N_matmul + 6*L*T*H*Dh = 6*{n_mm:,} + 6*{m.num_layers}*{seq_len}*{m.num_heads}*{hd}"
      f"{' (T capped by each layer window)' if any(config_lib.layer_windows(m)) else ''} = {train:.4g}",
      f"  training, nanochat convention (full square) 6*N_matmul + 12*L*T*H*Dh = "
      f"{train_flops_per_token(m, seq_len, 'nanochat'):.4g}",
      f"  inference 2*N_matmul + 2*L*T*H*Dh = {infer:.4g}",
  ]
  windows = config_lib.layer_windows(m)
  if any(windows):
    lines.append(f"  sliding windows: {sum(w > 0 for w in windows)} of {m.num_layers} layers attend to "
                 f"{max(windows):,} tokens back (counted as such above)")
  t = cfg.train
  if tokens_per_param is None and t.tokens_per_param > 0:
    tokens_per_param, counted = t.tokens_per_param, recipe.horizon_params(m, t)
    what = "scaling params (block matrices + lm_head)" if t.horizon_params == "scaling" else "params"
  else:
    tokens_per_param, counted, what = tokens_per_param or 20.0, total, "params"
  tokens = chinchilla_tokens(m, tokens_per_param) * counted / total
  seconds = training_seconds(m, seq_len, tokens, chip, mfu, num_chips)
  lines += [
      "",
      f"Token budget: {tokens_per_param:g} tokens/param x {counted:,} {what} = {human(tokens)} tokens "
      f"({t.batch_tokens:,} tokens per step: {tokens / t.batch_tokens:,.0f} steps)",
      f"  training compute {tokens * train:.3g} FLOPs; on {num_chips} x {chip} "
      f"({PEAK_FLOPS[chip] / 1e12:g} TFLOP/s dense bf16 each) at {100 * mfu:g}% MFU: {duration(seconds)}",
      "  " + "; ".join(f"{name}: {duration(training_seconds(m, seq_len, tokens, kind, mfu, chips))}"
                       for name, kind, chips in SLICES) + f" (at {100 * mfu:g}% MFU)",
      "",
  ]
  lines += memory.format_estimate(cfg)
  return "\n".join(lines)


def run_plan(cfg, chip: str = "h100", num_chips: int = 1, mfus: tuple[float, ...] = (0.4,)) -> list[str]:
  """What a run of this config trains, in four lines (`python -m lmtiny.arch --brief`): its parameters,
  tokens and steps (train.steps, or the horizon train.tokens_per_param sets, as the trainer counts
  them), training FLOPs (6N + attention, causal-half) and the time on `num_chips` x `chip` at each MFU."""
  cfg = recipe.resolve(cfg)
  m, t = cfg.model, cfg.train
  steps = config_lib.total_steps(cfg, recipe.horizon_params(m, t), train_flops_per_token(m, t.seq_len))
  tokens = steps * t.batch_tokens
  flops = tokens * train_flops_per_token(m, t.seq_len)
  times = "; ".join(f"{duration(training_seconds(m, t.seq_len, tokens, chip, mfu, num_chips))} at {100 * mfu:g}% MFU"
                    for mfu in mfus)
  return [
      f"plan: {count_params(m):,} parameters ({human(count_params(m))}), depth {m.num_layers}, width {m.d_model}, "
      f"vocab {m.vocab_size:,}",
      f"  {tokens:,} tokens ({human(tokens)}) = {steps:,} steps x {t.batch_tokens:,} tokens",
      f"  training compute {flops:.3g} FLOPs ({train_flops_per_token(m, t.seq_len):.4g} per token, causal-half)",
      f"  on {num_chips} x {chip} ({PEAK_FLOPS[chip] / 1e12:g} TFLOP/s dense bf16 each): {times}",
  ]
