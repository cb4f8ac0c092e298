"""Test setup: 8 emulated CPU devices and fast compiles, set before anything imports jax."""
import atexit
import collections
import gc
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"


def _take_this_workers_share_of_the_cpus() -> None:
  """Under `pytest -n N`, worker i keeps CPUs i, i+N, ... (and so do the processes it starts). XLA
  spreads each program over every CPU it may use; with N workers on N cores that bought no speed
  (the other worker held the other core) and cost CPU time in handing work between threads."""
  worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
  if worker.startswith("gw") and count > 1 and hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
      os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])


_take_this_workers_share_of_the_cpus()
from lm_fixtures import xla_flags  # noqa: E402  (imports no jax)

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()

import jax  # noqa: E402  (after the environment is set)

# Many tests build the same small programs again (a resumed trainer, the same config on another
# run): a session-wide compilation cache turns those recompiles into cache reads. The variables
# hand it to the subprocesses tests start (README and speedrun smokes, signal tests), whose
# stages and re-runs compile the same programs as each other. Each test process has its own:
# JAX writes an entry in place, so a worker reading what the other is writing aborted (a shared
# cache crashed a worker in a full run); a process and the subprocesses it waits for never overlap.
_CACHE_DIR = tempfile.mkdtemp(prefix="lmtiny-jax-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, True)  # each test process removes the cache it made
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
# Python's full collections traverse every object JAX's caches keep (2.9 GB in a worker after
# tests/model), 0.3 s each. Letting one wait for 1,000 collections of the middle generation, not
# 10, took tests/model + tests/training (-n 2) from 271-274 to 244-245 CPU s; a worker's peak
# memory in a full run stayed within its run-to-run spread (3.5-4.2 GB, 3.6 before). The young
# generations keep Python's default: the commands' setting (lmtiny.cli.collect_garbage_for_jax)
# aborted a worker once in two full runs, inside an eager 8-device op, cause not found.
gc.set_threshold(*gc.get_threshold()[:2], 1000)


import pytest  # noqa: E402

pytest_plugins = ["skip_log", "cpu_log"]  # what .ci/run runs again with the extras; CPU seconds per test


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """`-n N` sends whole modules to a worker (xdist's loadscope) instead of single tests: many
  modules share an expensive module-scoped fixture (a reference run, launched processes), which
  each worker that ran one of the module's tests would otherwise build again. An explicit
  --dist other than load is left as asked."""
  if config.getvalue("dist") == "load":
    from xdist.scheduler import LoadScopeScheduling
    config.option.loadscopereorder = False  # keep the order below, not "most tests first"
    return LoadScopeScheduling(config, log)
  return None


def pytest_configure(config):
  config.addinivalue_line("markers", 'slow(seconds=30): takes seconds or more on 2 cores; `-m "not slow"` is the '
                          "inner loop. `seconds` (measured) orders the modules that hold slow tests, longest first.")


def _slow_seconds(item) -> float:
  marker = item.get_closest_marker("slow")
  return 0.0 if marker is None else float(marker.kwargs.get("seconds", marker.args[0] if marker.args else 30))


def pytest_collection_modifyitems(config, items):
  """Modules holding the slowest tests first (by their markers' measured seconds): xdist's default
  order (most tests first) left few-test, slow modules such as the journeys for last, with one
  worker running them while the other idled."""
  weight = collections.Counter()
  for item in items:
    weight[item.path] += _slow_seconds(item)
  items.sort(key=lambda item: -weight[item.path])  # stable: modules stay whole


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
  """A run directory (tokenizer that knows the toy problems, tiny random model, one checkpoint)
  shared by the eval, RL and report tests."""
  from eval_fixtures import make_run, make_tokenizer
  root = tmp_path_factory.mktemp("chat_run")
  tok = make_tokenizer(str(root / "tok"))
  make_run(str(root / "run"), tok)
  return str(root / "run")


@pytest.fixture(scope="session")
def lora_run(chat_run, tmp_path_factory):
  """(a LoRA run over chat_run with random adapters, the same model merged into a full run)."""
  from eval_fixtures import make_lora_run
  root = tmp_path_factory.mktemp("lora_run")
  make_lora_run(str(root / "lora"), chat_run, str(root / "merged"))
  return str(root / "lora"), str(root / "merged")
