"""launch/speedrun.sh: the presets' commands (dry run) and bad input. The toy preset at smoke
scale runs every stage for real, and resumes, in tests/journeys/test_journey.py (the README's command)."""
import os
import subprocess

import pytest

from lm_fixtures import xla_flags, ROOT

SPEEDRUN = os.path.join(ROOT, "launch", "speedrun.sh")


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())  # one device, as a user has
  return env


def _run(*args, timeout=900):
  return subprocess.run(["bash", SPEEDRUN, *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_a_gpu_preset_names_every_stage():
  out = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--eval-data", "evals/")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[2].startswith("python3 -m lmtiny.train --config configs/d20.py --config.model.vocab_size=65536")
  assert ("python3 -m lmtiny.sft --init runs/x --workdir runs/x/mid "
          "--config.sft.sources=embedded_chat:1.0,pretrain:0.3") in lines  # midtraining keeps pretraining text
  assert "python3 -m lmtiny.sft --init runs/x/mid --workdir runs/x/sft" in lines
  assert "python3 -m lmtiny.rl --init runs/x/sft --workdir runs/x/rl --config.rl.data=gsm8k" in lines
  assert "python3 -m lmtiny.eval --workdir runs/x --tasks bpb,core --data-dir evals/" in lines
  assert lines[-1] == "python3 -m lmtiny.report --workdir runs/x"
  # A skipped stage is never a later one's start: sft then starts from the base, eval reads sft.
  skip = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--skip", "mid,rl").stdout.splitlines()
  assert "python3 -m lmtiny.sft --init runs/x --workdir runs/x/sft" in skip
  assert any(l.startswith("python3 -m lmtiny.eval --workdir runs/x/sft") for l in skip)
  v5e = _run("d20-v5e8", "--dry-run", "--workdir", "runs/v").stdout.splitlines()
  from lm_fixtures import load_config_module
  from lmtiny.plan import memory
  plan = next(p for p in memory.fsdp_plans(load_config_module("d20").get_config()) if p[0] == 8)
  # The preset trains at lmtiny.arch's plan for fsdp=8 on 16 GB chips.
  assert v5e[2].endswith(f"--config.mesh.data=1 --config.mesh.fsdp=8 --config.train.device_batch_size={plan[1]}")
  pod = _run("d32-pod", "--dry-run", "--tpu-name", "p", "--zone", "z", "--workdir", "gs://b/r", "--shards", "gs://b/s")
  assert pod.returncode == 0 and "tpu.sh train --name p --zone z -- --config configs/d32.py" in pod.stdout
  assert "--workdir gs://b/r --config.mesh.data=1 --config.mesh.fsdp=-1" in pod.stdout  # ZeRO-3 over the slice
  assert "--config.data.shards=gs://b/s" in pod.stdout and "lmtiny.tokenizer" not in pod.stdout
  assert "lmtiny.rl" not in pod.stdout  # the script returns once the pod trains


@pytest.mark.parametrize("args, message", [
    ([], "a preset is required"), (["huge"], "unknown preset 'huge'"), (["toy", "--skip", "nap"], "--skip 'nap'"),
    (["d26-pod"], "--tpu-name and --zone are required"), (["toy", "--price-per-chip-hour", "x"], "must be a number"),
])
def test_bad_input_is_one_line_exit_2(args, message):
  out = _run(*args, "--dry-run")
  assert out.returncode == 2 and out.stdout == "" and message in out.stderr and out.stderr.count("\n") == 1
