"""Architecture search: designs near a parameter target, ranked by how balanced their split is.

The 38M design study's goal: a third each for the token embedding, the lm_head and the
transformer (untied), or half each for the shared embedding and the transformer (tied). Widths are
multiples of the head dimension (heads = width / head_dim); the MLP, activation and norm settings
come from a template model config (the base config's, or `--config`'s).
"""
from __future__ import annotations

import dataclasses
import types

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.plan import counts
from lmtiny.plan.units import human


@dataclasses.dataclass(frozen=True)
class Candidate:
  depth: int
  width: int
  heads: int
  kv_heads: int
  vocab: int
  params: int
  shares: tuple[float, ...]   # (embedding, lm_head, transformer) untied; (embedding, transformer) tied
  params_per_layer: int
  imbalance: float            # largest |share - goal| over the parts


def parse_int_list(text: str, flag: str) -> list[int]:
  """'2..32' -> [2, ..., 32]; '8192,24576' -> [8192, 24576]; positive integers only."""
  try:
    if ".." in text:
      lo, hi = (int(x) for x in text.split(".."))
      values = list(range(lo, hi + 1))
    else:
      values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"{flag}={text!r}: expected 'A..B' or a comma-separated list of integers") from None
  if not values or min(values) < 1:
    raise ConfigError(f"{flag}={text!r}: expected a non-empty range of positive integers")
  return values


def _template_fields(template) -> dict:
  if template is None:
    template = config_lib.base_config().model
  return template.to_dict() if hasattr(template, "to_dict") else dict(vars(template))


def search(target_params: float, head_dim: int, vocabs, depths, tied: bool = False, kv_group: int = 1,
           tolerance: float = 0.1, template=None) -> list[Candidate]:
  """Every design within `tolerance` of `target_params`, most balanced first (then nearest the target).

  Raises ConfigError for impossible requests, including when no design is near enough.
  """
  if not target_params > 0:
    raise ConfigError(f"--target-params={target_params:g}: must be > 0")
  if head_dim < 2 or head_dim % 2:
    raise ConfigError(f"--head-dim={head_dim}: must be a positive even number (RoPE rotates pairs)")
  if kv_group < 1:
    raise ConfigError(f"--gqa={kv_group}: query heads per kv head must be >= 1")
  if not 0 < tolerance < 1:
    raise ConfigError(f"--tolerance={tolerance:g}: must be in (0, 1)")
  fields = _template_fields(template)
  fields.update(head_dim=head_dim, tie_embeddings=tied, mlp_dim=0)
  lo, hi = target_params * (1 - tolerance), target_params * (1 + tolerance)
  goals = (0.5, 0.5) if tied else (1 / 3, 1 / 3, 1 / 3)

  found = []
  for vocab in vocabs:
    for depth in depths:
      heads = 0
      while True:  # params grow with width: stop at the first width past the window
        heads += 1
        m = types.SimpleNamespace(**dict(fields, vocab_size=vocab, num_layers=depth, d_model=heads * head_dim,
                                         num_heads=heads, num_kv_heads=max(1, heads // kv_group)))
        p = counts.param_breakdown(m)
        if p["total"] > hi:
          break
        if p["total"] < lo or heads % kv_group:
          continue
        transformer = p["total"] - p["embedding"] - p["lm_head"]
        parts = (p["embedding"], transformer) if tied else (p["embedding"], p["lm_head"], transformer)
        shares = tuple(x / p["total"] for x in parts)
        found.append(Candidate(
            depth=depth, width=m.d_model, heads=heads, kv_heads=m.num_kv_heads, vocab=vocab,
            params=p["total"], shares=shares, params_per_layer=p["layer"],
            imbalance=max(abs(s - g) for s, g in zip(shares, goals))))
  if not found:
    raise ConfigError(
        f"--target-params={target_params:g}: no design within {100 * tolerance:g}% with head_dim {head_dim}, "
        f"vocab {','.join(map(str, vocabs))} and depth {min(depths)}..{max(depths)} "
        f"(widen --tolerance, --vocab or --depth)")
  found.sort(key=lambda c: (round(c.imbalance, 9), abs(c.params - target_params)))
  return found


def format_candidates(candidates: list[Candidate], target_params: float, tied: bool, template=None) -> str:
  """The seed's options table: depth, width, heads, vocab, params, split %, params per layer."""
  t = _template_fields(template)
  split = "emb/transformer %" if tied else "emb/lm_head/transformer %"
  lines = [f"Designs near {human(target_params)} parameters, most balanced split first "
           f"(goal {'1/2-1/2' if tied else '1/3-1/3-1/3'}; {'tied' if tied else 'untied'}, "
           f"{t['activation']} MLP {t['mlp_ratio']:g}x, norm scale {'on' if t['norm_scale'] else 'off'}, "
           f"qk-norm {'on' if t['qk_norm'] else 'off'}):",
           f"{'rank':>4} {'depth':>5} {'width':>6} {'heads':>8} {'vocab':>7} {'params':>12} "
           f"{split:>26} {'per layer':>11} {'imbalance':>9}"]
  for i, c in enumerate(candidates, 1):
    heads = f"{c.heads}" if c.kv_heads == c.heads else f"{c.heads}/{c.kv_heads}kv"
    shares = "/".join(f"{100 * s:.1f}" for s in c.shares)
    lines.append(f"{i:>4} {c.depth:>5} {c.width:>6} {heads:>8} {c.vocab:>7} {c.params:>12,} "
                 f"{shares:>26} {c.params_per_layer:>11,} {100 * c.imbalance:>8.2f}%")
  return "\n".join(lines)
