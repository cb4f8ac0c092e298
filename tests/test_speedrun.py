"""launch/speedrun.sh: the toy preset at smoke scale runs every stage for real and resumes; the
other presets' commands (dry run) and bad input."""
import json
import os
import subprocess
import sys

import pytest

from lm_fixtures import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEEDRUN = os.path.join(ROOT, "launch", "speedrun.sh")


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())  # one device, as a user has
  return env


def _run(*args, timeout=900):
  return subprocess.run(["bash", SPEEDRUN, *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_toy_preset_at_smoke_scale_runs_every_stage_and_resumes(tmp_path):
  run_dir = str(tmp_path / "run")
  out = _run("toy", "--smoke", "--workdir", run_dir, "--python", sys.executable, "--price-per-chip-hour", "1")
  assert out.returncode == 0, out.stderr[-3000:]
  stages = ("tokenizer", "shards", "base", "mid", "sft", "rl", "eval")
  for s in stages:
    assert os.path.exists(os.path.join(run_dir, ".stages", f"{s}.done")), s
  card = open(os.path.join(run_dir, "report.md")).read()
  for section in ("## Tokenizer", "## Base model", "## Midtraining", "## SFT", "## RL", "## Evaluation"):
    assert section in card
  assert "| bpb | bits per byte |" in card and "| gsm8k | accuracy (2 problems) |" in card
  assert "estimated cost: $" in card
  sft = json.load(open(os.path.join(run_dir, "sft", "config.json")))["sft"]
  assert "toy_arithmetic" in sft["sources"]  # SFT sees the problems RL is rewarded on
  again = _run("toy", "--smoke", "--workdir", run_dir, "--python", sys.executable)
  assert again.returncode == 0, again.stderr[-3000:]
  for s in stages:
    assert f"== {s}: done already" in again.stderr
  assert "lmtiny.train" not in again.stderr and "lmtiny.report" in again.stderr


def test_dry_run_of_a_gpu_preset_names_every_stage():
  out = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--eval-data", "evals/")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[2].startswith("python3 -m lmtiny.train --config configs/d20.py --config.model.vocab_size=65536")
  assert ("python3 -m lmtiny.sft --init runs/x --workdir runs/x/mid "
          "--config.sft.sources=embedded_chat:1.0,pretrain:0.3") in lines  # midtraining keeps pretraining text
  assert "python3 -m lmtiny.sft --init runs/x/mid --workdir runs/x/sft" in lines
  assert "python3 -m lmtiny.rl --init runs/x/sft --workdir runs/x/rl --data gsm8k" in lines
  assert "python3 -m lmtiny.eval --workdir runs/x --tasks bpb,core --data-dir evals/" in lines
  assert lines[-1] == "python3 -m lmtiny.report --workdir runs/x"
  # A skipped stage is never a later one's start: sft then starts from the base, eval reads sft.
  skip = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--skip", "mid,rl").stdout.splitlines()
  assert "python3 -m lmtiny.sft --init runs/x --workdir runs/x/sft" in skip
  assert any(l.startswith("python3 -m lmtiny.eval --workdir runs/x/sft") for l in skip)
  v5e = _run("d20-v5e8", "--dry-run", "--workdir", "runs/v").stdout.splitlines()
  from lm_fixtures import load_config_module
  from lmtiny import memory
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
