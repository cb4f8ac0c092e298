"""A pytest plugin (tests/conftest.py loads it) that measures what each test costs in CPU seconds:
its own process's user + system time (XLA's threads included) plus that of the processes it started
and waited for, setup and teardown included. Wall time doubles when the other worker is busy; CPU
time does not, so this is the figure to cut when the suite must fit a time on two cores.

With LMTINY_CPU_LOG=FILE set, every test appends "SECONDS NODEID WORKER END" to FILE (END: the
Unix time it finished, to see which worker ran last); .ci/run prints the costliest tests and the
total by module.
"""
import os
import resource
import time

import pytest

ENV = "LMTINY_CPU_LOG"


def _cpu_seconds() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  path = os.environ.get(ENV)
  start = _cpu_seconds()
  yield
  if path:
    with open(path, "a", encoding="utf-8") as f:  # one short line per append: workers do not interleave
      worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
      f.write(f"{_cpu_seconds() - start:.2f} {item.nodeid} {worker} {time.time():.1f}\n")
