"""The text `python -m lmtiny.arch --config ...` prints: the parameter split, FLOPs per token, the
token budget and training time, and the memory per chip."""
from __future__ import annotations

from lmtiny import config as config_lib
from lmtiny.plan import memory
from lmtiny.plan.arch import (PEAK_FLOPS, chinchilla_tokens, describe, inference_flops_per_token, matmul_params,
                              param_breakdown, train_flops_per_token, training_seconds)
from lmtiny.plan.units import duration, human


def report(cfg, tokens_per_param: float = 20.0, chip: str = "h100", mfu: float = 0.4,
           num_chips: int = 1) -> str:
  """The text `python -m lmtiny.arch --config ...` prints, for a full config (model + train)."""
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
      ("final norm", p["final_norm"]),
      ("total", total),
  ]
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
      f" = {train:.4g}",
      f"  training, nanochat convention (full square) 6*N_matmul + 12*L*T*H*Dh = "
      f"{train_flops_per_token(m, seq_len, 'nanochat'):.4g}",
      f"  inference 2*N_matmul + 2*L*T*H*Dh = {infer:.4g}",
  ]
  tokens = chinchilla_tokens(m, tokens_per_param)
  seconds = training_seconds(m, seq_len, tokens, chip, mfu, num_chips)
  lines += [
      "",
      f"Token budget: {tokens_per_param:g} tokens/param x {total:,} params = {human(tokens)} tokens",
      f"  training compute {tokens * train:.3g} FLOPs; on {num_chips} x {chip} "
      f"({PEAK_FLOPS[chip] / 1e12:g} TFLOP/s dense bf16 each) at {100 * mfu:g}% MFU: {duration(seconds)}",
      "",
  ]
  lines += memory.format_estimate(cfg)
  return "\n".join(lines)
