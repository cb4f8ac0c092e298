"""tests/skip_log.py: the list of skipped tests that .ci/run runs again with the optional packages."""
import os

pytest_plugins = ["pytester"]


def test_skipped_tests_and_modules_and_partial_skips_are_listed(pytester, tmp_path, monkeypatch):
  log = tmp_path / "skipped.txt"
  monkeypatch.setenv("LMTINY_SKIPPED_LOG", str(log))
  monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))  # where skip_log lives
  pytester.makepyfile(
      test_missing="""
import pytest
pytest.importorskip("no_such_package_here")
def test_never():
  pass
""",
      test_mixed="""
import pytest
from skip_log import record_partial_skip
def test_runs():
  pass
def test_skips():
  pytest.skip("needs a GPU")
def test_part_skipped():
  record_partial_skip()
""")
  result = pytester.runpytest_subprocess("-p", "skip_log", "-q", "-p", "no:cacheprovider")
  result.assert_outcomes(passed=2, skipped=2)
  assert sorted(set(log.read_text().splitlines())) == [
      "test_missing.py", "test_mixed.py::test_part_skipped", "test_mixed.py::test_skips"]
