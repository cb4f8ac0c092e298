"""The MFU a step's FLOPs, bytes and collective bytes per token allow on a chip: a roofline.

Per token of the global batch, on `chips` chips sharing the work evenly, a step takes at least

    compute  F_exec / (chips x peak)        F_exec: the FLOPs the program runs (recompute included)
    memory   B / (chips x HBM bandwidth)    B: bytes it reads and writes in HBM
    links    C / link bandwidth             C: bytes one chip sends over its links for collectives

and MFU = F_model / (chips x peak x time), F_model the 6N + attention training FLOPs
(lmtiny.plan.counts). Two bounds: "overlapped" takes time >= max(compute, memory, links), the
best a perfect scheduler does (an upper bound on MFU); "serial" adds them, nothing overlapping.
Peak FLOP/s are lmtiny.plan.counts.PEAK_FLOPS; bandwidths are the vendors' figures below.
Importing this module does not import JAX.
"""
from __future__ import annotations

from lmtiny.plan.counts import PEAK_FLOPS

# Memory bandwidth per chip, bytes/s (vendor figures: H100 SXM HBM3, H200 HBM3e, A100 80 GB SXM
# 2,039 and 40 GB 1,555 GB/s, L4 300, RTX 4090 1,008, RTX 3090 936, RTX 3080 760 GB/s; TPU system specs).
HBM_BANDWIDTH = {"h100": 3.35e12, "h200": 4.8e12, "a100": 2.039e12, "a100_40": 1.555e12, "l4": 300e9,
                 "rtx4090": 1.008e12, "rtx3090": 936e9, "rtx3080": 760e9,
                 "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}
# Interconnect bandwidth per chip, bytes/s, one direction: NVLink 4 (900 GB/s both ways) on
# H100/H200; TPU inter-chip interconnect as Google states it (v5e 1,600, v5p 4,800, v6e 3,584 Gbit/s).
LINK_BANDWIDTH = {"h100": 450e9, "h200": 450e9, "v5e": 200e9, "v5p": 600e9, "v6e": 448e9}
REPORT_CHIPS = ("h100", "v5p", "v6e")


def bound(chip: str, model_flops: float, flops: float, bytes_moved: float, link_bytes: float,
          chips: int = 1) -> dict:
  """The roofline for one token on `chips` chips of kind `chip`: seconds each resource needs
  (compute, memory, links), the one that binds, and the MFU bounds (overlapped: max of the
  times; serial: their sum). `link_bytes` is per chip; the rest are the whole step's."""
  times = {"compute": flops / (chips * PEAK_FLOPS[chip]),
           "memory": bytes_moved / (chips * HBM_BANDWIDTH[chip]),
           "links": link_bytes / LINK_BANDWIDTH[chip]}
  ideal = model_flops / (chips * PEAK_FLOPS[chip])
  slowest = max(times, key=times.get)
  return {"seconds": times, "binds": slowest, "mfu_overlapped": ideal / times[slowest],
          "mfu_serial": ideal / sum(times.values())}


def format_bounds(model_flops: float, flops: float, bytes_moved: float, link_bytes: float,
                  chips: int = 1, names=REPORT_CHIPS) -> str:
  """'h100 <= 81% (memory-bound; 52% serial), v5p ...': the MFU bound on each chip."""
  parts = []
  for chip in names:
    b = bound(chip, model_flops, flops, bytes_moved, link_bytes, chips)
    parts.append(f"{chip} <= {100 * b['mfu_overlapped']:.0f}% ({b['binds']}-bound; "
                 f"{100 * b['mfu_serial']:.0f}% serial)")
  return ", ".join(parts)
