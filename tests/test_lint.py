"""The lint: ruff with the rule families the code follows (.ci/ruff.toml says which and why)."""
import os
import subprocess
import sys

from lm_fixtures import ROOT

TREES = ("lmtiny", "tests", "configs", "launch", "benchmarks")


def test_ruff_finds_nothing():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", os.path.join(".ci", "ruff.toml"),
                        "--output-format", "concise", "--no-cache", *TREES],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_the_lint_fails_on_what_it_selects(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n")  # F401: an unused import
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", os.path.join(ROOT, ".ci", "ruff.toml"),
                        "--no-cache", str(bad)], capture_output=True, text=True)
  assert out.returncode == 1 and "F401" in out.stdout
