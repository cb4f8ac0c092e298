"""Weighted mixtures of shard directories: `data.shards="web:0.9,code:0.1"` (lmtiny.data.dataset).

Weights are shares of training *tokens* (normalised to sum to 1), not of documents: a source of
long documents gets fewer of them. A mixture is one random-access sequence of documents, so the
pipeline's shuffle, process slicing and exact resume apply to it unchanged.

Train: one pass of the mixture (an epoch) holds every document of every source at least once.
The source with the most tokens for its weight sets the epoch's size and is used once; the others
are repeated (document k of a source of n is its document k mod n) until they reach their share, and
`describe_mixture` says how many passes over each source an epoch makes. Nothing is subsampled,
so no part of a source is left out of every epoch.

Val: each source's held-out documents, none repeated: the source with the fewest val tokens for
its weight is used whole and the others cut to their share, interleaved evenly so that the first
eval batches already follow the weights. Sources without a val split are left out of it.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np

from lmtiny.data.shards import DataError, document_index


MAX_WEIGHT_RATIO = 1e6  # the largest weight over the smallest


def parse_weighted(text: str, field: str, error: type[Exception] = DataError) -> list[tuple[str, float]]:
  """"a:0.7,b:0.3" -> [("a", 0.7), ("b", 0.3)]; an item without a weight counts 1.0 (so a plain
  path, colons and all, is one source). Raises `error` naming `field` for a weight that is not a
  finite number > 0, or one under 1/MAX_WEIGHT_RATIO of the largest: a train epoch holds every
  source whole, so such a source would make the others repeat over a million times (at 1e-300
  the epoch's length no longer fits an index), and a sampling share that small is noise."""
  out = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    spec, _, weight = item.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      spec, value = item, 1.0
    if not spec or not 0 < value < math.inf:
      raise error(f"{field}={text!r}: {item!r} needs a source and a finite weight > 0")
    out.append((spec, value))
  if not out:
    raise error(f"{field}={text!r}: no sources")
  (small_spec, small), (_, large) = min(out, key=lambda o: o[1]), max(out, key=lambda o: o[1])
  if large > small * MAX_WEIGHT_RATIO:
    raise error(f"{field}={text!r}: the weight {small:g} of {small_spec!r} is under a millionth of the largest "
                f"({large:g}); weights must lie within a factor of a million of each other: leave "
                "that source out or raise its weight")
  if not math.isfinite(sum(w for _, w in out)):
    raise error(f"{field}={text!r}: the weights add up to more than a float holds; only their ratios "
                "matter, so use smaller numbers")
  return out


def train_counts(weights: Sequence[float], documents: Sequence[int], tokens: Sequence[int]) -> list[int]:
  """Documents per source in one train epoch: every document at least once, token shares as weighed."""
  share = np.asarray(weights, np.float64) / sum(weights)
  tokens = np.maximum(np.asarray(tokens, np.float64), 1)
  epoch_tokens = float(np.max(tokens / share))  # the most plentiful source for its weight, used once
  return [max(int(d), int(round(s * epoch_tokens * d / t))) for s, d, t in zip(share, documents, tokens)]


def val_counts(weights: Sequence[float], documents: Sequence[int], tokens: Sequence[int]) -> list[int]:
  """Documents per source of the val mixture: none repeated, token shares as weighed (0 for a source
  without val documents; the others' shares grow to fill its place)."""
  present = [i for i, d in enumerate(documents) if d]
  if not present:
    return [0] * len(documents)
  share = np.zeros(len(documents))
  share[present] = np.asarray(weights, np.float64)[present] / sum(weights[i] for i in present)
  epoch_tokens = min(max(tokens[i], 1) / share[i] for i in present)  # the scarcest source used whole
  return [min(int(d), max(1, int(round(share[i] * epoch_tokens * d / max(tokens[i], 1))))) if d else 0
          for i, d in enumerate(documents)]


class MixedDocs:
  """counts[i] documents of sources[i] (its document k mod len), as one random-access sequence:
  source after source, or interleaved evenly (document k of source i at the place (k + 1/2) /
  counts[i] of the whole). Picklable when the sources are (grain worker processes)."""

  def __init__(self, sources: Sequence[Sequence], counts: Sequence[int], interleave: bool = False):
    keep = [i for i, c in enumerate(counts) if c]
    self.sources, self.counts = [sources[i] for i in keep], [int(counts[i]) for i in keep]
    self._ends = list(np.cumsum(self.counts)) if self.counts else []
    self._order = None
    if interleave and self.counts:
      source = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(self.counts)])
      within = np.concatenate([np.arange(c, dtype=np.int64) for c in self.counts])
      place = (within + 0.5) / np.asarray(self.counts, np.float64)[source]
      self._order = np.lexsort((source, place))  # by place, ties by source

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._ends else 0

  def __getitem__(self, index: int) -> np.ndarray:
    index = document_index(index, len(self))
    if self._order is not None:
      index = int(self._order[index])
    i = bisect.bisect_right(self._ends, index)
    k = index - (int(self._ends[i - 1]) if i else 0)
    return self.sources[i][k % len(self.sources[i])]

  def __repr__(self):
    return f"MixedDocs({len(self)} documents from {len(self.sources)} sources)"


def describe_mixture(names: Sequence[str], weights: Sequence[float], documents: Sequence[int],
                     tokens: Sequence[int], counts: Sequence[int]) -> str:
  """One line: each source's token share, and how many passes over it one train epoch makes."""
  total = sum(weights)
  parts = [f"{name} {w / total:.0%} of tokens ({t:,} tokens, {c / max(d, 1):.2f} passes per epoch)"
           for name, w, d, t, c in zip(names, weights, documents, tokens, counts)]
  return "mixture: " + ", ".join(parts)
