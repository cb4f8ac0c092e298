"""Mixture recipes: validation, proportions, hold-out, determinism."""
import os

import pytest

from lmtiny.tokenizer import TokenizerError
from lmtiny.tokenizer.mixture import held_out_documents, load_recipe, MixtureSampler, validate_recipe
from lm_fixtures import ROOT


RECIPES = os.path.join(ROOT, "tokenizer_data")


def write_docs(path, docs):
  path.write_text("\n\n\x1e\n\n".join(docs))
  return f"txt:{path}?delimiter=record"


@pytest.mark.parametrize("recipe, message", [
    (["not a dict"], "RECIPE must be a dict"),
    (dict(sources=[]), "non-empty list"),
    (dict(sources=[dict(spec="embedded", weight=0)]), "weights sum to 0"),
    (dict(sources=[dict(spec="embedded", weight=-1)]), r"sources\[0\]\.weight = -1"),
    (dict(sources=[dict(spec="embedded", weight="1")]), "must be a number"),
    (dict(sources=[dict(spec="embedded", sample=0)]), r"sample = 0: must be in \(0, 1\]"),
    (dict(sources=[dict(spec="embedded", hold_out_every=1)]), "hold_out_every = 1"),
    (dict(sources=[dict(spec="embedded", hold_out_pattern="(")]), "not a regex"),
    (dict(sources=[dict(spec="embedded", wieght=1)]), r"unknown key\(s\) wieght"),
    (dict(sources=[dict(weight=1)]), "'spec' string"),
    (dict(sources=[dict(spec="embedded")], total_chars=0), "total_chars = 0"),
    (dict(sources=[dict(spec="embedded")], seed="0"), "seed = '0'"),
    (dict(sources=[dict(spec="embedded")], seed=-1), r"seed = -1: must be an integer in \[0, 2\*\*32\)"),
    (dict(sources=[dict(spec="embedded")], seed=2**32), "seed = 4294967296"),
    (dict(sources=[dict(spec="embedded")], extra=1), r"unknown key\(s\) extra"),
])
def test_validation_errors(recipe, message):
  with pytest.raises(TokenizerError, match=message):
    validate_recipe(recipe, "r.py")


def test_budget_is_split_by_weight():
  recipe = validate_recipe(dict(sources=[dict(spec="a", weight=3), dict(spec="b", weight=1)],
                                total_chars=1000))
  assert [s["chars"] for s in recipe["sources"]] == [750, 250]


def test_sampler_draws_each_share_and_cuts_the_last_document(tmp_path):
  a = write_docs(tmp_path / "a.txt", ["a" * 40] * 10)
  b = write_docs(tmp_path / "b.txt", ["b" * 40] * 10)
  recipe = validate_recipe(dict(sources=[dict(spec=a, weight=3), dict(spec=b, weight=1)],
                                total_chars=200))
  sampler = MixtureSampler(recipe, progress=False)
  docs = list(sampler)
  assert "".join(docs) == "a" * 150 + "b" * 50
  assert [s["chars"] for s in sampler.stats] == [150, 50]
  assert [s["documents"] for s in sampler.stats] == [4, 2]


def test_hold_out_is_never_sampled_and_is_returned(tmp_path):
  docs = [f"= T{i} =\nbody {i}" for i in range(20)]
  spec = write_docs(tmp_path / "w.txt", docs)
  recipe = validate_recipe(dict(sources=[dict(spec=spec, hold_out_every=5,
                                               hold_out_pattern="= T(0|1) =")],
                                total_chars=10_000))
  trained = list(MixtureSampler(recipe, progress=False))
  held = list(held_out_documents(recipe["sources"][0]))
  assert held == [docs[i] for i in (0, 1, 4, 9, 14, 19)]
  assert not set(trained) & set(held) and set(trained) | set(held) == set(docs)


def test_sample_is_seeded(tmp_path):
  spec = write_docs(tmp_path / "s.txt", [f"doc {i:03d}" for i in range(300)])

  def draw(seed):
    recipe = validate_recipe(dict(sources=[dict(spec=spec, sample=0.3)], total_chars=10**6,
                                  seed=seed))
    return list(MixtureSampler(recipe, progress=False))

  assert draw(1) == draw(1) != draw(2)
  assert 50 < len(draw(1)) < 130


def test_missing_files_fail_before_sampling(tmp_path):
  recipe = validate_recipe(dict(sources=[dict(spec="embedded"),
                                         dict(spec=f"txt:{tmp_path}/none/*.txt")]))
  with pytest.raises(ValueError, match="no files match"):
    MixtureSampler(recipe, progress=False)


def test_load_recipe_file_and_named_dict(tmp_path):
  path = tmp_path / "r.py"
  path.write_text("A = dict(sources=[dict(spec='embedded')], total_chars=5)\n"
                  "RECIPE = dict(A, seed=3)\n")
  assert load_recipe(str(path))["seed"] == 3
  assert load_recipe(f"{path}:A")["seed"] == 0
  assert load_recipe(str(path), total_chars=9, seed=4)["total_chars"] == 9
  with pytest.raises(TokenizerError, match="defines no B"):
    load_recipe(f"{path}:B")
  with pytest.raises(TokenizerError, match="no such recipe file"):
    load_recipe(str(tmp_path / "nope.py"))
  (tmp_path / "broken.py").write_text("RECIPE = dict(\n")
  with pytest.raises(TokenizerError, match="cannot run recipe"):
    load_recipe(str(tmp_path / "broken.py"))


def test_repository_recipes_validate():
  for name in ("seed.py", "local_files.py", "embedded.py", "shared_corpora.py",
               "shared_corpora.py:BROAD"):
    assert load_recipe(os.path.join(RECIPES, name))["total_chars"] > 0
