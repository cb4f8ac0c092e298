"""An independent PyTorch version of nanochat's optimizer step and base_train's three schedules
(karpathy/nanochat at 92d63d4e8bb4df75c3b71618f31ddde2378b2bcd, 2026-07-03: nanochat/optim.py's
MuonAdamW on one rank, gpt.py's setup_optimizer, scripts/base_train.py's get_lr_multiplier,
get_muon_momentum and get_weight_decay), written here from their description, on torch tensors
in nanochat's layout (nn.Linear weights [out, in]); lmtiny's parameters map into it with
tests/nanochat_reference.py's lmtiny_to_nanochat (its sign flips of q/k half-heads commute with
every step here: each piece is equivariant under flipping a matrix's columns). It imports nothing
from nanochat nor from lmtiny.

Per Muon matrix X [out, in] with gradient G (nanochat stacks same-shape matrices; each matrix is
independent, so here they are stepped one by one), momentum m, lr, weight decay wd:
  buf.lerp_(G, 1 - m); U = G.lerp(buf, m)                                    Nesterov
  U *= (|U|_F / sqrt(out)) / |row|   (row norms over `in`, clamped at 1e-6)    MuonEq
  U /= 1.01 |U|_F + 1e-6; 5 Polar Express iterations, A = U^T U if out > in else U U^T
  U *= sqrt(min(out, in)) / |U|_F                                             Muon+
  NorMuon: mean of U^2 over `in` (out >= in: one per row) or over `out` (one per column), an EMA
  of it with beta2 in a factored buffer, U *= rsqrt(buffer), rescaled to U's Frobenius norm
  X -= lr' U + lr' wd X [U X >= 0],  lr' = lr * sqrt(max(1, out / in))        cautious decay
AdamW: X *= 1 - lr wd; Adam moments by lerp; X -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps).

The switches of `MuonAdamW` (equilibrate, renormalise, variance_reduction, cautious) turn single
pieces off, to show that the equality test notices each of them.
"""
from __future__ import annotations

import math

import torch

POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


# ----------------------------------------------------------------------------- schedules

def lr_multiplier(it: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float):
  warmdown = round(warmdown_ratio * num_iterations)
  if it < warmup_steps:
    return (it + 1) / warmup_steps
  if it <= num_iterations - warmdown:
    return 1.0
  progress = (num_iterations - it) / warmdown
  return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(it: int, num_iterations: int, warmdown_ratio: float, *, warmup: int = 400, start: float = 0.85,
                  peak: float = 0.97, final: float = 0.90):
  """nanochat's constants as defaults (base_train hard-codes 400, 0.85, 0.97, 0.90)."""
  warmdown = round(warmdown_ratio * num_iterations)
  warmdown_start = num_iterations - warmdown
  if it < warmup:
    frac = it / warmup
    return (1 - frac) * start + frac * peak
  if it >= warmdown_start:
    progress = (it - warmdown_start) / warmdown
    return peak * (1 - progress) + final * progress
  return peak


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float):
  return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


# ----------------------------------------------------------------------------- groups

def is_matrix(name: str) -> bool:
  return name.startswith("transformer.h.")


def param_groups(named: dict[str, torch.Tensor], *, model_dim: int, unembedding_lr: float, embedding_lr: float,
                 matrix_lr: float, weight_decay: float, scalar_lr: float) -> list[dict]:
  """setup_optimizer's groups over nanochat's parameter names (one Muon entry per matrix)."""
  scale = (model_dim / 768) ** -0.5

  def pick(pred):
    return [n for n in named if pred(n)]

  groups = [
      dict(kind="adamw", names=pick(lambda n: n == "lm_head.weight"), lr=unembedding_lr * scale,
           betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
      dict(kind="adamw", names=pick(lambda n: n == "transformer.wte.weight"), lr=embedding_lr * scale,
           betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
      dict(kind="adamw", names=pick(lambda n: n.startswith("value_embeds.")), lr=embedding_lr * scale * 0.5,
           betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
      dict(kind="adamw", names=["resid_lambdas"], lr=scalar_lr * 0.01, betas=(0.8, 0.95), eps=1e-10,
           weight_decay=0.05),
      dict(kind="adamw", names=["x0_lambdas"], lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
      dict(kind="adamw", names=["smear_gate.weight", "smear_lambda", "backout_lambda"], lr=0.2,
           betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
  ]
  groups += [dict(kind="muon", names=[n], lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.9,
                  weight_decay=weight_decay) for n in pick(is_matrix)]
  covered = [n for g in groups for n in g["names"]]
  assert sorted(covered) == sorted(named), "every parameter in exactly one group"
  for g in groups:
    g["initial_lr"] = g["lr"]
  return groups


# ----------------------------------------------------------------------------- the step

def polar_express(x: torch.Tensor, steps: int) -> torch.Tensor:
  x = x / (x.norm() * 1.01 + 1e-6)
  tall = x.size(0) > x.size(1)
  for a, b, c in POLAR_EXPRESS[:steps]:
    if tall:
      gram = x.T @ x
      x = a * x + x @ (b * gram + c * (gram @ gram))
    else:
      gram = x @ x.T
      x = a * x + (b * gram + c * (gram @ gram)) @ x
  return x


class MuonAdamW:
  """nanochat's combined optimizer on one rank, over a dict of named tensors (updated in place)."""

  def __init__(self, named: dict[str, torch.Tensor], groups: list[dict], *, equilibrate=True, renormalise=True,
               variance_reduction=True, cautious=True):
    self.named, self.groups, self.state = named, groups, {}
    self.equilibrate, self.renormalise = equilibrate, renormalise
    self.variance_reduction, self.cautious = variance_reduction, cautious

  @torch.no_grad()
  def step(self, grads: dict[str, torch.Tensor]) -> None:
    for group in self.groups:
      for name in group["names"]:
        step = self._adamw if group["kind"] == "adamw" else self._muon
        step(self.named[name], grads[name].clone(), self.state.setdefault(name, {}), group)

  def _adamw(self, p, g, state, group):
    if not state:
      state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
    state["t"] += 1
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    p.mul_(1 - lr * wd)
    state["m"].lerp_(g, 1 - b1)
    state["v"].lerp_(g.square(), 1 - b2)
    denom = (state["v"] / (1 - b2 ** state["t"])).sqrt() + eps
    p.add_(state["m"] / denom, alpha=-lr / (1 - b1 ** state["t"]))

  def _muon(self, p, g, state, group):
    out, inp = p.shape
    reduce_dim = -1 if out >= inp else -2
    if not state:
      state.update(buf=torch.zeros_like(p), v=torch.zeros((out, 1) if out >= inp else (1, inp), dtype=p.dtype))
    m = group["momentum"]
    state["buf"].lerp_(g, 1 - m)
    u = g.lerp(state["buf"], m)
    if self.equilibrate:
      target = u.norm() / out ** 0.5
      u = u * (target / u.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    u = polar_express(u, group["ns_steps"])
    if self.renormalise:
      u = u * (min(out, inp) ** 0.5 / u.norm().clamp_min(1e-6))
    if self.variance_reduction:
      mean_sq = u.square().mean(dim=reduce_dim, keepdim=True)
      n = u.size(reduce_dim)
      norm = (mean_sq.sum() * n).sqrt()
      state["v"].lerp_(mean_sq, 1 - group["beta2"])
      step = state["v"].clamp_min(1e-10).rsqrt()
      new_norm = (mean_sq * n * step.square()).sum().sqrt()
      u = u * (step * (norm / new_norm.clamp_min(1e-10)))
    lr = group["lr"] * max(1.0, out / inp) ** 0.5
    mask = (u * p >= 0) if self.cautious else torch.ones_like(p, dtype=torch.bool)
    p.sub_(lr * u + lr * group["weight_decay"] * p * mask)


def set_schedules(groups: list[dict], it: int, *, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float, weight_decay: float, momentum: dict, cosine_decay: bool = True) -> None:
  """base_train's per-step settings: every group's LR x the multiplier, Muon's momentum and decay."""
  lrm = lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac)
  for g in groups:
    g["lr"] = g["initial_lr"] * lrm
    if g["kind"] == "muon":
      g["momentum"] = muon_momentum(it, num_iterations, warmdown_ratio, **momentum)
      g["weight_decay"] = muon_weight_decay(it, num_iterations, weight_decay) if cosine_decay else weight_decay
