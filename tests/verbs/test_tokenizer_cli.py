"""The train / evaluate entry points: exit status 2 with one line on bad input, real runs."""
import json
import os
import re
import subprocess
import sys

import pytest

from lmtiny.tokenizer import compare, evaluate
from lm_fixtures import ROOT



def run_cli(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, **(env or {})})


def write_recipe(tmp_path, sources, total_chars=60_000):
  path = tmp_path / "recipe.py"
  path.write_text(f"RECIPE = dict(sources={sources!r}, total_chars={total_chars}, seed=0)\n")
  return path


@pytest.mark.parametrize("case", ["weights", "missing", "unknown_type", "vocab", "too_small",
                                  "too_large"])
def test_train_bad_input_exits_2_and_writes_nothing(tmp_path, case):
  (tmp_path / "a.txt").write_text("some text " * 50)
  (tmp_path / "cjk.txt").write_text("".join(chr(0x4E00 + i) for i in range(1000)) * 3)
  sources = dict(
      weights=[dict(spec=f"txt:{tmp_path}/a.txt", weight=0)],
      missing=[dict(spec=f"txt:{tmp_path}/missing/*.txt", weight=1)],
      unknown_type=[dict(spec=f"xml:{tmp_path}/a.xml", weight=1)],
      vocab=[dict(spec=f"txt:{tmp_path}/a.txt", weight=1)],
      too_small=[dict(spec=f"txt:{tmp_path}/cjk.txt", weight=1)],
      too_large=[dict(spec=f"txt:{tmp_path}/a.txt", weight=1)],
  )[case]
  vocab = dict(vocab=1000, too_large=8192).get(case, 512)
  out = tmp_path / "out"
  r = run_cli("lmtiny.tokenizer.train", "--mixture", write_recipe(tmp_path, sources),
              "--vocab-size", vocab, "--out", out, "--quiet", "--character-coverage", 1)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()        # a "note:" may precede the error
  assert lines[-1].startswith("error: ") and sum(l.startswith("error") for l in lines) == 1
  if case.startswith("too_"):
    assert "vocab_size" in lines[-1] and ("too small" in lines[-1]) == (case == "too_small")
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("flags, stray, message", [
    (["--character-coverage", "0.5"], False, r"--character-coverage=0.5: must be in \[0.98, 1\]"),
    (["--threads", "0"], False, "--threads=0: must be >= 1"),
    (["--total-chars", "0"], False, r"--total-chars=0: must be >= 1 \(leave it out for the recipe's budget\)"),
    (["--total-chars", "-5"], False, r"--total-chars=-5: must be >= 1 .*"),
    (["--seed", "-1"], False, r"--seed=-1: must be an integer in \[0, 2\*\*32\)"),
    (["--seed", str(2**32)], False, rf"--seed={2**32}: must be an integer in \[0, 2\*\*32\)"),
    (["--vocab-size", "0"], False, "vocab_size 0: must be a multiple of 128 and at least 512"),
    (["--character-coverage", "nan"], False, r"--character-coverage=nan: must be in \[0.98, 1\]"),
    ([], True, r"out: exists and holds other files \(a.txt, \.\.\.\); choose a new --out"),
])
def test_train_flags_and_out_dir_are_checked_before_sampling(tmp_path, monkeypatch, capsys, flags, stray, message):
  from lmtiny.tokenizer import train
  monkeypatch.setattr(train, "MixtureSampler", lambda *a, **k: pytest.fail("sampled before the check"))
  (tmp_path / "a.txt").write_text("some text " * 50)
  if stray:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("keep me")
  recipe = write_recipe(tmp_path, [dict(spec=f"txt:{tmp_path}/a.txt", weight=1)])
  assert train.main(["--mixture", str(recipe), "--vocab-size", "512", "--out", str(tmp_path / "out"), *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert re.fullmatch("error: .*" + message, err), err
  assert os.listdir(tmp_path / "out") == ["a.txt"] if stray else not (tmp_path / "out").exists()


def test_train_then_evaluate(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(30):
    (docs / f"{i:02d}.txt").write_text(f"Document {i}: the quick brown fox, 12{i} times.\n" * 40)
  recipe = write_recipe(tmp_path, [dict(spec=f"txt:{docs}/*.txt", weight=1), dict(
      spec="embedded?max_chars=40000", weight=1)])
  out = tmp_path / "tok"
  r = run_cli("lmtiny.tokenizer.train", "--mixture", recipe, "--vocab-size", 512,
              "--out", out, "--quiet")
  assert r.returncode == 0, r.stderr
  report = json.loads((out / "report.json").read_text())
  assert [s["chars"] for s in report["sources"]] == [30_000, 30_000]
  assert report["characters"] == 60_000 and report["vocab_size"] == 512
  sample = tmp_path / "sample.txt"
  sample.write_text("The quick brown fox.\n" * 10)
  r = run_cli("lmtiny.tokenizer.evaluate", "--tokenizer", f"mine={out}", "--texts",
              f"fox={sample}", "--no-reference")
  assert r.returncode == 0, r.stderr
  header, row = r.stdout.strip().splitlines()[-2:]
  assert "mine tok" in header and row.split()[:2] == ["fox", "210"]
  r = run_cli("lmtiny.tokenizer.evaluate", "--tokenizer", out, "--texts", f"x={tmp_path}/no.txt",
              "--no-reference")
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "no such file" in r.stderr


def test_references_unavailable_is_one_line(monkeypatch):
  tiktoken = pytest.importorskip("tiktoken")

  def offline(name):
    raise ConnectionError("no network")

  monkeypatch.setattr(tiktoken, "get_encoding", offline)
  counters, why = compare.load_references(timeout_s=5)
  assert counters == {} and "\n" not in why and "TIKTOKEN_CACHE_DIR" in why


def test_table_arithmetic():
  rows = [dict(text="english", bytes=1000, tokens=dict(gpt2=250, gpt4=200, ours=160))]
  table = compare.format_table(rows, ["gpt2", "gpt4"], ["ours"])
  cells = table.splitlines()[1].split()
  assert cells[:8] == ["english", "1,000", "250", "4.00", "200", "5.00", "160", "6.25"]
  assert cells[8:] == ["+36.0%", "+20.0%", "ours"]     # (250-160)/250, (200-160)/200
  assert compare.relative_diff(100, 110) == pytest.approx(-10.0)


def test_read_text_caps_and_joins(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("a\n\n\x1e\n\nb")
  assert evaluate.read_text(f"txt:{path}?delimiter=record", 0) == "a\n\nb"
  assert evaluate.read_text(str(path), 3) == "a\n\n"


def test_evaluate_rejects_a_negative_max_chars(capsys):
  assert evaluate.main(["--tokenizer", "x", "--max-chars", "-1"]) == 2
  assert capsys.readouterr().err == "error: --max-chars=-1: must be >= 0 (0: no cap)\n"


def test_train_refuses_an_out_that_holds_a_tokenizer_already(tmp_path, monkeypatch, capsys):
  # Before: replaced silently; pointed at the tokenizer a shard set was made with, it broke the shards.
  from lmtiny.tokenizer import train
  monkeypatch.setattr(train, "MixtureSampler", lambda *a, **k: pytest.fail("sampled before the check"))
  (tmp_path / "a.txt").write_text("some text " * 50)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "tokenizer.model").write_bytes(b"the shards' tokenizer")
  recipe = write_recipe(tmp_path, [dict(spec=f"txt:{tmp_path}/a.txt", weight=1)])
  assert train.main(["--mixture", str(recipe), "--vocab-size", "512", "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (f"error: --out={tmp_path / 'out'}: holds a tokenizer already; shards and runs "
                                     "made with it need it unchanged: choose a new --out (or remove it yourself "
                                     "first)\n")
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"the shards' tokenizer"


def test_train_on_one_source_instead_of_a_recipe(tmp_path, capsys):
  from lmtiny.tokenizer import train
  out = tmp_path / "tok"
  assert train.main(["--source", "embedded?max_chars=200000", "--vocab-size", "512", "--total-chars", "100000",
                     "--out", str(out), "--quiet"]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["recipe"] == "--source embedded?max_chars=200000" and report["total_chars"] == 100000
  (tmp_path / "a.txt").write_text("x")
  recipe = write_recipe(tmp_path, [dict(spec=f"txt:{tmp_path}/a.txt", weight=1)])
  with pytest.raises(SystemExit) as info:  # argparse's usage error
    train.main(["--source", "embedded", "--mixture", str(recipe), "--out", str(tmp_path / "x")])
  assert info.value.code == 2 and "not allowed with argument --source" in capsys.readouterr().err
