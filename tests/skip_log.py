"""A pytest plugin (tests/conftest.py loads it) that lists what a run skipped, so that .ci/run can
run exactly those tests again in a second environment that has the optional packages.

With LMTINY_SKIPPED_LOG=FILE set, every skipped test and every module skipped at collection (a
module-level `pytest.importorskip`) appends its node id to FILE, one per line, as does a test that
ran but left part of its work undone for a missing package (`record_partial_skip`: a journey that
skipped a `# needs: torch` command). Under pytest-xdist both the worker and the controller see a
report, so a node id may appear twice: read the file with `sort -u`.
"""
import os

ENV = "LMTINY_SKIPPED_LOG"


def _log(nodeid: str) -> None:
  path = os.environ.get(ENV)
  if path and nodeid:
    with open(path, "a", encoding="utf-8") as f:  # one short line per append: processes do not interleave
      f.write(nodeid + "\n")


def record_partial_skip() -> None:
  """The running test skipped part of its work: list it for the environment with the extras."""
  current = os.environ.get("PYTEST_CURRENT_TEST", "")  # "<node id> (call)"
  _log(current.rsplit(" (", 1)[0])


def pytest_runtest_logreport(report):
  if report.skipped:
    _log(report.nodeid)


def pytest_collectreport(report):
  if report.skipped:
    _log(report.nodeid)
