"""Numbers as people read them, one way everywhere: counts, bytes and durations.

  human(37748736)          -> '37.7M'       parameters, tokens, FLOPs
  human_bytes(3 * 2**30)   -> '3.00 GiB'    memory (lmtiny.bench, the lowering report)
  duration(12.5)           -> '12.5s'       wall time (the report card), training-time estimates
  duration(125)            -> '2m05s'       (then '1h02m', '3d04h')
  duration(12, clock=True) -> '0m12s'       a countdown (the trainer's ETA)
"""
from __future__ import annotations


def human(n: float) -> str:
  """37748736 -> '37.7M'."""
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= scale:
      return f"{n / scale:.1f}{suffix}"
  return f"{n:g}"


def human_bytes(n: float) -> str:
  """GiB from 1 GiB up, else MiB."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def duration(seconds: float, clock: bool = False) -> str:
  """The two largest units: '12.5s' under a minute, '2m05s', '1h02m', '3d04h'. A `clock` (a countdown,
  where tenths of a second are noise) keeps minutes and whole seconds under a minute too: '0m12s'."""
  seconds = max(seconds, 0.0)
  if seconds < 60 and not clock:
    return f"{seconds:.1f}s"
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  days, h = divmod(hours, 24)
  if days:
    return f"{days}d{h:02d}h"
  return f"{hours}h{m:02d}m" if hours else f"{minutes}m{s:02d}s"
