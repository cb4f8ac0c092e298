"""lmtiny.bench: a timed run and --compile-only print MFU in both conventions and XLA's memory figures."""
import json
import os
import re

import pytest
from lm_fixtures import ROOT
from lmtiny import bench
from lmtiny.plan import counts

SMALL = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
         "--config.model.vocab_size=256", "--config.train.seq_len=32", "--config.train.batch_tokens=256"]


def _run(capsys, *flags):
  assert bench.main(["bench", "--config", os.path.join(ROOT, "configs", "tiny.py"), *SMALL, *flags]) == 0
  return capsys.readouterr().out


@pytest.mark.slow(seconds=6)
def test_timed_run_names_both_mfu_conventions_and_memory(capsys, tmp_path):
  out = _run(capsys, "--steps=2", "--warmup=0", f"--json={tmp_path / 'r.json'}")
  mfu = re.search(r"MFU +([\d.e-]+)% causal-half \(6\*N \+ 6\*L\*T\*H\*Dh\), ([\d.e-]+)% nanochat \(6\*N \+ 12\*L\*T\*H\*Dh\)", out)
  assert mfu, out
  assert float(mfu.group(2)) > float(mfu.group(1)) > 0  # nanochat counts twice the attention FLOPs
  assert re.search(r"XLA memory +[\d.]+ [MG]iB per device = arguments", out) and "estimate" in out
  assert "accumulation 1" in out
  assert "cuDNN fused attention in the compiled step: no" in out  # CPU: the xla path
  r = json.loads((tmp_path / "r.json").read_text())  # what benchmarks/gpu_suite.sh collects
  assert r["tokens_per_s"] > 0 and len(r["step_times"]) == 2 and r["seq_len"] == 32
  assert r["cudnn_attention"] is False and r["accumulation"] == 1
  assert r["mfu"] == pytest.approx(float(mfu.group(1)) / 100, rel=1e-2)


def test_compile_only_runs_nothing_and_reports_memory(capsys):
  out = _run(capsys, "--compile-only", "--config.train.device_batch_size=1", "--config.model.dtype=bfloat16")
  assert "step " not in out and "throughput" not in out
  assert "accumulation 1" in out  # 1 sequence on each of 8 devices covers the 8-sequence batch
  xla = float(re.search(r"XLA memory +([\d.]+) MiB", out).group(1))
  ratio = float(re.search(r"estimate .*\(([\d.]+)x XLA's\)", out).group(1))
  assert xla > 0 and ratio > 0


def test_flops_conventions_differ_by_the_attention_half():
  from lm_fixtures import load_config_module
  m = load_config_module("d20").get_config().model
  half, full = counts.train_flops_per_token(m, 2048), counts.train_flops_per_token(m, 2048, "nanochat")
  assert full - half == 6 * m.num_layers * 2048 * m.num_heads * 128
  assert counts.PEAK_FLOPS["h100_pcie"] == 756e12 and counts.PEAK_FLOPS["a100"] == 312e12
