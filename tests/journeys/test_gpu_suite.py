"""benchmarks/gpu_suite.sh and gpu_wheels.sh: the GPU kit's code paths, run on CPU (SMOKE=1).

The suite is meant for one offline device call that nobody can debug: these tests hold it to
leaving a summary with figures whatever happens (a run that fails, times out or finds the
budget spent) and to running the commands its --dry-run prints.
"""
import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lm_fixtures import xla_flags, ROOT

BENCH = os.path.join(ROOT, "benchmarks")
SUITE = os.path.join(BENCH, "gpu_suite.sh")


def _suite(tmp_path, *args, **env):
  """Runs the suite with OUT=tmp_path/out; returns (process, OUT)."""
  out = tmp_path / "out"
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT", "BACKENDS", "LIMIT_S", "BUDGET_S")}
  # One CPU device (the conftest's 8 emulated ones only slow a subprocess down); no wheels to install.
  e.update({"SMOKE": "1", "WHEELS": "", "OUT": str(out), "TMPDIR": str(tmp_path), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(),
            "PYTHON": sys.executable, **env})  # this interpreter: its packages (torch, in CI's extras venv)
  proc = subprocess.run(["bash", SUITE, *args], env=e, capture_output=True, text=True, timeout=120)
  return proc, out


def _runs(out):
  return json.loads((out / "summary.json").read_text())["runs"]


def test_scripts_parse_and_are_shellcheck_clean():
  scripts = ["gpu_suite.sh", "gpu_wheels.sh"]
  for s in scripts:
    subprocess.run(["bash", "-n", os.path.join(BENCH, s)], check=True)
  if shutil.which("shellcheck"):
    out = subprocess.run(["shellcheck", "-x", *scripts], cwd=BENCH, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_dry_run_prints_the_gpu_runs_and_creates_nothing(tmp_path):
  proc, out = _suite(tmp_path, "--dry-run", SMOKE="0")
  assert proc.returncode == 0, proc.stderr
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("=== ")]
  runs = [ln for ln in lines if " -m lmtiny.bench " in ln]
  assert [re.search(r"=== (\S+) ", ln).group(1) for ln in runs] == [
      f"{part}/{name}-{b}" for part, name in (("bench-d4", "d4_38m"), ("bench-d20", "d20"))
      for b in ("cudnn", "auto", "xla")]
  for ln in runs:
    assert "--config.model.dtype=bfloat16" in ln and "--json" in ln
  assert all("configs/d4_38m.py --config.train.seq_len=2048 --config.train.device_batch_size=32" in ln
             and "--steps 10 --warmup 2" in ln for ln in runs[:3])
  assert all("configs/d20.py" in ln and "--steps 5 --warmup 1" in ln for ln in runs[3:])
  assert any("benchmarks/attention.py --json" in ln for ln in lines)
  torch_runs = [ln for ln in lines if " benchmarks/torch_reference.py " in ln]
  assert [re.search(r"=== (\S+) ", ln).group(1) for ln in torch_runs] == ["torch-d4/d4_38m-torch", "torch-d20/d20-torch"]
  for ln in torch_runs:  # nanochat's way, PyTorch side only, on the bench part's model and batch
    assert "--device cuda --dtype bfloat16 --compile --only torch" in ln and "--json WORK/torch-d" in ln
  assert "configs/d4_38m.py --set train.seq_len=2048 --set train.device_batch_size=32" in torch_runs[0]
  assert "--steps 10 --warmup 2" in torch_runs[0]
  assert "configs/d20.py" in torch_runs[1] and "--steps 5 --warmup 2" in torch_runs[1]
  assert lines.index(torch_runs[0]) > lines.index(runs[-1])  # after the bench parts
  assert not out.exists()


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
  for args, env in ((["bogus"], {}), ([], {"BACKENDS": "flash"}), ([], {"STEPS": "ten"})):
    proc, out = _suite(tmp_path, *args, **env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow(seconds=36)
def test_smoke_run_leaves_logs_and_a_summary_with_tokens_per_second(tmp_path):
  pytest.importorskip("torch")  # its torch parts time PyTorch's side of the comparison
  proc, out = _suite(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert files == ["attention.log", "bench-d20.log", "bench-d4.log", "env.log", "summary.json", "summary.md",
                   "torch-d20.log", "torch-d4.log"]  # 8: all a device call brings back
  summary = json.loads((out / "summary.json").read_text())
  assert summary["env"]["lmtiny_bench_imports"] == "ok" and summary["env"]["chip"] == "cpu"
  runs = summary["runs"]
  assert [(r["part"], r["run"], r["status"]) for r in runs] == [
      ("attention", "attention", "ok"), ("bench-d4", "tiny-xla", "ok"), ("bench-d20", "tiny-xla", "ok"),
      ("torch-d4", "tiny-torch", "ok"), ("torch-d20", "tiny-torch", "ok")]
  assert [row["layout"] for row in runs[0]["result"]["rows"]] == ["causal", "packed", "packed1"]
  for r in runs[3:]:  # the PyTorch side alone, on the bench smoke's batch
    assert list(r["result"]["sides"]) == ["torch"] and r["result"]["sides"]["torch"]["tokens_per_s"] > 0
    assert (r["result"]["global_batch"], r["result"]["seq_len"], r["result"]["dtype"]) == (8, 64, "float32")
  for q in summary["lmtiny_vs_torch"]:
    assert q["ratio"] == pytest.approx(q["lmtiny_tokens_per_s"] / q["torch_tokens_per_s"])
  assert [q["config"] for q in summary["lmtiny_vs_torch"]] == ["d4", "d20"]
  for r in runs[1:3]:
    assert r["result"]["tokens_per_s"] > 0 and r["result"]["cudnn_attention"] is False
    assert r["result"]["attention"] == "xla"
  md = (out / "summary.md").read_text()
  assert re.search(r"\| tiny-xla \| ok \| xla -> no \| 8x64 \(1\) \| bfloat16 \|[^|]+\|[^|]+\| [\d,]+ \|", md), md
  assert re.search(r"\| tiny-torch \| ok \| cpu \| 8x64 \(1\) \| float32 \| no \|[^|]+\|[^|]+\| [\d,]+ \|", md), md
  assert re.search(r"\| d20 \| [\d,]+ \(tiny-xla\) \| [\d,]+ \| [\d.]+x \(dtypes differ", md), md
  assert "tokens/s" in md and md in proc.stdout  # printed at the end, for a caller that sees only stdout
  assert not list(tmp_path.glob("gpu-suite-work.*"))  # the scratch (per-run JSONs, XLA cache) is gone


@pytest.mark.slow(seconds=5)
def test_a_failing_run_is_reported_and_the_next_part_still_runs(tmp_path):
  proc, out = _suite(tmp_path, "bench-d4", "bench-d20", EXTRA_BENCH_FLAGS="--config.train.seq_len=0")
  assert proc.returncode == 1
  runs = _runs(out)
  assert [(r["part"], r["status"]) for r in runs] == [("bench-d4", "failed (exit 2)"), ("bench-d20", "failed (exit 2)")]
  assert "config.train.seq_len=0" in runs[0]["last_line"]
  assert "config.train.seq_len=0" in (out / "summary.md").read_text()


@pytest.mark.parametrize("env, status", [({"LIMIT_S": "1"}, "timed out (1 s)"),
                                         ({"BUDGET_S": "30"}, "skipped (budget)")])
@pytest.mark.slow(seconds=5)  # measured on 2 cores, both cases: out of the inner loop
def test_a_run_past_its_limit_or_the_budget_still_leaves_a_summary(tmp_path, env, status):
  proc, out = _suite(tmp_path, "bench-d4", **env)
  assert proc.returncode == 1
  assert [r["status"] for r in _runs(out)] == [status]
  assert status in (out / "summary.md").read_text()


def test_wheels_dry_run_names_the_pinned_cp312_wheels():
  proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_wheels.sh"), "--dry-run"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  cmd = proc.stdout.split()
  assert "--no-deps" in cmd and cmd[cmd.index("--python-version") + 1] == "3.12"
  assert {"grain==0.2.18", "array-record==0.8.6", "ml-collections==1.1.0", "portpicker==1.6.0"} <= set(cmd)


def test_the_probe_records_a_gpus_target_config_as_json_text():
  """env.target_config (a GPU's XLA target description, for compiling for it on a CPU host with
  jax's deviceless topology) survives JSON whether XLA hands it as text or as binary bytes."""
  spec = importlib.util.spec_from_file_location("gpu_suite_probe", os.path.join(BENCH, "gpu_suite.py"))
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  text = 'gpu_device_info {\n  core_count: 132\n}\nplatform_name: "CUDA"\n'
  assert suite.target_config_text(text) == text == suite.target_config_text(text.encode())
  binary = bytes([0x0A, 0x8F, 0xFF, 0x01])
  encoded = suite.target_config_text(binary)
  assert encoded.startswith("base64:") and base64.b64decode(encoded.removeprefix("base64:")) == binary
  assert "target_config" not in suite.probe()  # a CPU host has none to give
