"""lmtiny's train step side by side with a plain PyTorch eager implementation of the same model.

    pip install -e ".[bench]"     # torch (CPU wheels are enough)
    python benchmarks/torch_reference.py --config configs/tiny.py [--rounds 10] [--attention sdpa]

The PyTorch model mirrors lmtiny.model for the config's shapes: token embedding, pre-norm blocks
(RMSNorm with learned scale, q/k/v/o projections with optional QK-norm and half-split RoPE,
causal attention, relu^2 / GELU / SiLU / SwiGLU MLP), final norm, untied or tied lm_head,
cross-entropy with the optional logit softcap; AdamW (b1, b2, eps, weight decay on matrices only)
after global-norm clipping; float32, the same rows x seq_len tokens per step. Attention is
`F.scaled_dot_product_attention(is_causal=True)` (what nanochat runs) or, with
`--attention math`, softmax(QK^T + causal mask) V written out.

Both run in one process on the same threads (torch.set_num_threads = the cores XLA:CPU uses),
one step of each in turn, so background load hits both alike; the script prints each side's
median step time and the ratio torch / lmtiny (> 1 means lmtiny is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import numpy as np


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("lmtiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for item in overrides:  # section.field=value
    key, value = item.split("=", 1)
    section, field = key.split(".", 1)
    old = cfg[section][field]
    cfg[section][field] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true")
  return cfg


# ---------------------------------------------------------------------------------------------
# The PyTorch model.


def build_torch(cfg, attention: str):
  import torch
  import torch.nn.functional as F
  from torch import nn

  from lmtiny import config as config_lib
  m = cfg.model
  d, h, k, dh = m.d_model, m.num_heads, config_lib.num_kv_heads(m), config_lib.head_dim(m)
  f = config_lib.mlp_dim(m)

  class RMSNorm(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.scale = nn.Parameter(torch.ones(dim)) if m.norm_scale else None

    def forward(self, x):
      y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
      return y * self.scale if self.scale is not None else y

  def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  def activation(up):
    if m.activation == "relu2":
      return F.relu(up).square()
    if m.activation == "gelu":
      return F.gelu(up, approximate="tanh")
    return F.silu(up)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
      self.q, self.k, self.v = nn.Linear(d, h * dh, bias=False), nn.Linear(d, k * dh, bias=False), \
          nn.Linear(d, k * dh, bias=False)
      self.o = nn.Linear(h * dh, d, bias=False)
      self.q_norm, self.k_norm = (RMSNorm(dh), RMSNorm(dh)) if m.qk_norm else (None, None)
      self.up = nn.Linear(d, f, bias=False)
      self.gate = nn.Linear(d, f, bias=False) if m.activation == "swiglu" else None
      self.down = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, mask):
      b, t, _ = x.shape
      y = self.attn_norm(x)
      q = self.q(y).view(b, t, h, dh)
      kk = self.k(y).view(b, t, k, dh)
      v = self.v(y).view(b, t, k, dh)
      if self.q_norm is not None:
        q, kk = self.q_norm(q), self.k_norm(kk)
      q, kk = rope(q, cos, sin).transpose(1, 2), rope(kk, cos, sin).transpose(1, 2)
      v = v.transpose(1, 2)
      if k != h:
        kk, v = kk.repeat_interleave(h // k, dim=1), v.repeat_interleave(h // k, dim=1)
      if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
      else:
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(dh)
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
      x = x + self.o(out.transpose(1, 2).reshape(b, t, h * dh))
      y = self.mlp_norm(x)
      hidden = F.silu(self.gate(y)) * self.up(y) if self.gate is not None else activation(self.up(y))
      return x + self.down(hidden)

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(m.vocab_size, d)
      self.blocks = nn.ModuleList([Block() for _ in range(m.num_layers)])
      self.final_norm = RMSNorm(d)
      self.lm_head = None if m.tie_embeddings else nn.Linear(d, m.vocab_size, bias=False)
      for p in self.parameters():
        if p.dim() >= 2:
          nn.init.normal_(p, std=m.init_std)

    def forward(self, tokens, targets):
      t = tokens.shape[1]
      half = dh // 2
      freqs = m.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
      angles = torch.arange(t, dtype=torch.float32)[:, None] * freqs
      cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
      mask = torch.ones(t, t, dtype=torch.bool).tril()
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x, cos, sin, mask)
      x = self.final_norm(x)
      logits = x @ (self.embed.weight.T if self.lm_head is None else self.lm_head.weight.T)
      if m.logit_softcap > 0:
        logits = m.logit_softcap * torch.tanh(logits / m.logit_softcap)
      return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

  model = Model()
  o = cfg.optim
  decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and "lm_head" not in n]
  rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n and "lm_head" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=True)

  def step(tokens, targets):
    loss = model(tokens, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
    opt.step()
    return loss.item()

  return model, step


# ---------------------------------------------------------------------------------------------
# Side by side.


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/tiny.py")
  ap.add_argument("--rounds", type=int, default=10, help="timed steps of each, alternating")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--attention", choices=("sdpa", "math"), default="sdpa")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA:CPU uses all cores)")
  ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
  args = ap.parse_args(argv)

  import jax
  import torch
  from lmtiny import bench, sharding
  from lmtiny import config as config_lib
  from lmtiny.trainer import build_steps, device_batch

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cfg = load_config(args.config, args.set)
  if cfg.optim.name != "adamw":  # the PyTorch side implements AdamW: time the same update
    print(f"lmtiny runs optim.name=adamw here (the config says {cfg.optim.name})")
    cfg.optim.name = "adamw"
  cfg.model.dtype = "float32"
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  t = cfg.train
  rows = config_lib.global_batch_size(t)
  local = bench.synthetic_batch(cfg, rows)

  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = build_steps(cfg, mesh, total_steps=args.rounds + args.warmup + 1)
  _, torch_step = build_torch(cfg, args.attention)
  tokens_pt = torch.from_numpy(local["inputs"].astype(np.int64))
  targets_pt = torch.from_numpy(local["targets"].astype(np.int64))

  with jax.set_mesh(mesh):
    state = steps.init()
    batch = device_batch(local, mesh)
    compiled = steps.train_step.lower(state, batch).compile()
    times = {"lmtiny": [], "torch": []}
    losses = {}
    for i in range(args.warmup + args.rounds):
      order = ("lmtiny", "torch") if i % 2 == 0 else ("torch", "lmtiny")
      for name in order:
        t0 = time.perf_counter()
        if name == "lmtiny":
          state, metrics = compiled(state, batch)
          losses[name] = float(metrics["loss"])
        else:
          losses[name] = torch_step(tokens_pt, targets_pt)
        if i >= args.warmup:
          times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"config {args.config}: {rows} x {t.seq_len} tokens per step, float32, {args.threads} torch threads, "
        f"torch attention {args.attention}, {args.rounds} alternating rounds")
  for name in ("lmtiny", "torch"):
    print(f"  {name:<7} median {1e3 * med[name]:8.1f} ms  min {1e3 * min(times[name]):8.1f} ms  "
          f"(last loss {losses[name]:.3f})")
  print(f"  speed ratio torch/lmtiny step time: {med['torch'] / med['lmtiny']:.2f}x (> 1: lmtiny faster)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
