"""Which chip a jax device is: its device_kind as the chip names lmtiny.plan.counts keys its
peak FLOP/s and memory by, and lmtiny.parallel.xla_options its per-generation TPU options by."""
from __future__ import annotations

# Substrings of jax's device_kind (lower-cased) -> chip names, first match first. The
# GeForce Ti cards have other peaks: no name (None), not their base card's.
_DEVICE_KINDS = (("h200", "h200"), ("h100 pcie", "h100_pcie"), ("h100", "h100"), ("a100-sxm4-40gb", "a100_40"),
                 ("a100-pcie-40gb", "a100_40"), ("a100", "a100"), ("rtx 4090", "rtx4090"), ("rtx 3090 ti", None),
                 ("rtx 3090", "rtx3090"), ("rtx 3080 ti", None), ("rtx 3080", "rtx3080"), ("v6", "v6e"),
                 ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"), ("cpu", "cpu"))


def chip_of_device_kind(kind: str) -> str | None:
  """The chip name (lmtiny.plan.counts' PEAK_FLOPS / HBM_BYTES key) of a jax device_kind
  ("TPU v5 lite" -> "v5e"), or None for a chip lmtiny has no figures for."""
  kind = kind.lower()
  return next((name for key, name in _DEVICE_KINDS if key in kind), None)
