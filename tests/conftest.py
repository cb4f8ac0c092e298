"""Test setup: 8 emulated CPU devices, set before anything imports jax."""
import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the environment is set)

# Many tests build the same small programs again (a resumed trainer, the same config on another
# run): a session-wide compilation cache turns those recompiles into cache reads. The variables
# hand it to the subprocesses tests start (README and speedrun smokes, signal tests), whose
# stages and re-runs compile the same programs as each other.
_CACHE_DIR = tempfile.mkdtemp(prefix="lmtiny-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


import pytest  # noqa: E402


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
