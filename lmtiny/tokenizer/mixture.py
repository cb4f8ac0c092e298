"""Mixture recipes: which sources a tokenizer trains on, in what proportions.

A recipe is a Python file in `tokenizer_data/` that defines a dict named RECIPE:

  RECIPE = dict(
      sources=[dict(spec="tfds:wiki40b/en?split=train", weight=45),     # lmtiny.corpus.sources
               dict(spec="txt:books/*.txt.gz?delimiter=record", weight=40, sample=0.5)],
      total_chars=400_000_000,   # characters drawn in all; source i gets total * w_i / sum(w)
      seed=0,                    # drives `sample` and sentencepiece's random generator
  )

Each source is streamed in its own order until its share is drawn (the document crossing the
budget is cut). `sample` (default 1) keeps each document with that probability, seeded, to
spread a share over a larger corpus instead of taking its head. To keep evaluation text out of
training, `hold_out_every=N` sets aside every N-th document (index % N == N - 1) and
`hold_out_pattern=REGEX` every document whose start matches; `held_out_documents` yields them.
Relative paths in specs are relative to the current directory.
"""
from __future__ import annotations

import os
import random
import re
import runpy
import sys
from typing import Iterator

from lmtiny.corpus.sources import open_source, Source
from lmtiny.tokenizer.spm import TokenizerError

_RECIPE_KEYS = {"sources", "total_chars", "seed", "description"}
_SOURCE_KEYS = {"spec", "weight", "sample", "hold_out_every", "hold_out_pattern"}


def validate_recipe(recipe, where: str = "recipe") -> dict:
  """Checks a recipe dict; returns it with defaults filled. Raises TokenizerError (one line)."""
  if not isinstance(recipe, dict):
    raise TokenizerError(f"{where}: RECIPE must be a dict")
  unknown = set(recipe) - _RECIPE_KEYS
  if unknown:
    raise TokenizerError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
  sources = recipe.get("sources")
  if not isinstance(sources, (list, tuple)) or not sources:
    raise TokenizerError(f"{where}: sources must be a non-empty list")
  checked = []
  for i, src in enumerate(sources):
    field = f"{where}: sources[{i}]"
    if not isinstance(src, dict) or not isinstance(src.get("spec"), str):
      raise TokenizerError(f"{field} must be a dict with a 'spec' string")
    unknown = set(src) - _SOURCE_KEYS
    if unknown:
      raise TokenizerError(f"{field}: unknown key(s) {', '.join(sorted(unknown))}")
    weight, sample = src.get("weight", 1), src.get("sample", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise TokenizerError(f"{field}.weight = {weight!r}: must be a number >= 0")
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
      raise TokenizerError(f"{field}.sample = {sample!r}: must be in (0, 1]")
    every, pattern = src.get("hold_out_every", 0), src.get("hold_out_pattern")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0 or every == 1:
      raise TokenizerError(f"{field}.hold_out_every = {every!r}: must be 0 (none) or >= 2")
    if pattern is not None:
      try:
        pattern = re.compile(pattern)
      except (re.error, TypeError) as e:
        raise TokenizerError(f"{field}.hold_out_pattern: not a regex ({e})") from None
    checked.append(dict(spec=src["spec"], weight=float(weight), sample=float(sample),
                        hold_out_every=every, hold_out_pattern=pattern))
  total_weight = sum(s["weight"] for s in checked)
  if total_weight <= 0:
    raise TokenizerError(f"{where}: source weights sum to {total_weight:g}; need a positive sum")
  total_chars, seed = recipe.get("total_chars", 100_000_000), recipe.get("seed", 0)
  if isinstance(total_chars, bool) or not isinstance(total_chars, int) or total_chars <= 0:
    raise TokenizerError(f"{where}: total_chars = {total_chars!r}: must be a positive integer")
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise TokenizerError(f"{where}: seed = {seed!r}: must be an integer in [0, 2**32)")
  for s in checked:
    s["chars"] = round(total_chars * s["weight"] / total_weight)
  return dict(sources=checked, total_chars=total_chars, seed=seed,
              description=recipe.get("description", ""))


def load_recipe(path: str, total_chars: int | None = None, seed: int | None = None) -> dict:
  """Runs a recipe file and validates its RECIPE (or `FILE:NAME`, another dict it defines),
  optionally overriding budget and seed."""
  name = "RECIPE"
  if not os.path.isfile(path) and ":" in path:
    path, name = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise TokenizerError(f"{path}: no such recipe file")
  try:
    namespace = runpy.run_path(path)
  except Exception as e:  # a recipe is user code: report, do not trace back
    raise TokenizerError(f"{path}: cannot run recipe ({type(e).__name__}: {e})") from None
  if name not in namespace:
    raise TokenizerError(f"{path}: defines no {name}")
  recipe = namespace[name]
  if isinstance(recipe, dict):
    overrides = dict(total_chars=total_chars, seed=seed)
    recipe = {**recipe, **{k: v for k, v in overrides.items() if v is not None}}
  return validate_recipe(recipe, path if name == "RECIPE" else f"{path}:{name}")


def single_source_recipe(spec: str, total_chars: int | None = None, seed: int | None = None) -> dict:
  """The recipe of one source (`--source SPEC`): the recipe defaults for what is None."""
  recipe = dict(sources=[dict(spec=spec)], total_chars=total_chars, seed=seed)
  return validate_recipe({k: v for k, v in recipe.items() if v is not None}, f"--source {spec}")


def is_held_out(entry: dict, index: int, doc: str) -> bool:
  """Whether document `index` of a recipe source is kept out of training."""
  every, pattern = entry.get("hold_out_every", 0), entry.get("hold_out_pattern")
  return bool((every and index % every == every - 1) or (pattern and pattern.match(doc)))


def held_out_documents(entry: dict) -> Iterator[str]:
  """The documents of a (validated) recipe source that training never sees."""
  for index, doc in enumerate(open_source(entry["spec"]).iter_documents()):
    if is_held_out(entry, index, doc):
      yield doc


class MixtureSampler:
  """Opens every source of a recipe up front (so missing files fail before any work), then
  streams the mixture's documents; `stats` says what each source gave."""

  def __init__(self, recipe: dict, progress: bool = True):
    self.recipe = recipe
    self.progress = progress
    active = [s for s in recipe["sources"] if s["chars"] > 0]
    self.sources: list[tuple[dict, Source]] = [(s, open_source(s["spec"])) for s in active]
    self.stats: list[dict] = []

  def __iter__(self) -> Iterator[str]:
    from tqdm import tqdm
    rng = random.Random(self.recipe["seed"])
    self.stats.clear()
    with tqdm(total=self.recipe["total_chars"], unit="char", unit_scale=True, file=sys.stderr,
              disable=not self.progress, desc="sampling") as bar:
      for entry, source in self.sources:
        budget, drawn, docs = entry["chars"], 0, 0
        bar.set_postfix_str(source.name[:40])
        for index, doc in enumerate(source.iter_documents()):
          if is_held_out(entry, index, doc):
            continue
          if entry["sample"] < 1 and rng.random() >= entry["sample"]:
            continue
          doc = doc[:budget - drawn]
          drawn += len(doc)
          docs += 1
          bar.update(len(doc))
          yield doc
          if drawn >= budget:
            break
        self.stats.append(dict(spec=source.name, weight=entry["weight"], budget_chars=budget,
                               chars=drawn, documents=docs,
                               undecodable_bytes=source.undecodable))
        if drawn < budget:
          print(f"note: {source.name} ran out after {drawn:,} of {budget:,} characters",
                file=sys.stderr)
