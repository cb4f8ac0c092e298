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


@pytest.mark.slow(seconds=6)
def test_profile_traces_one_step_after_the_timed_ones_and_prints_where_its_time_went(capsys, tmp_path):
  out = _run(capsys, "--steps=1", "--warmup=0", f"--profile={tmp_path / 'prof'}", f"--json={tmp_path / 'r.json'}")
  assert re.search(r"profile: 1 step after the timed ones on cpu: \d+ devices? \| [\d.]+ ms per step per device", out)
  shares = re.search(r"share of device time: matmul ([\d.]+)% \| attention ([\d.]+)% \| collectives ([\d.]+)% \| "
                     r"elementwise ([\d.]+)% \| idle ([\d.]+)%", out)
  assert shares, out
  assert float(shares.group(1)) > 0 and sum(map(float, shares.groups())) == pytest.approx(100, abs=0.5)
  r = json.loads((tmp_path / "r.json").read_text())
  assert len(r["step_times"]) == 1  # the profiled step is not among the timed ones
  profile = r["profile"]
  assert profile["shares"]["matmul"] == pytest.approx(float(shares.group(1)) / 100, abs=1e-3)
  assert profile["top"] and all(t["op"].endswith(" @ jit_train_step") for t in profile["top"])  # that step only
  assert all(f"  {t['op']} " in out for t in profile["top"])
  trace = profile["trace"]
  assert trace.startswith(str(tmp_path / "prof")) and os.path.isfile(trace) and f"profile: trace {trace}" in out


def test_profile_refuses_a_non_empty_directory_and_runs_that_time_no_step(capsys, tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("not lmtiny's")
  config = ["bench", "--config", os.path.join(ROOT, "configs", "tiny.py"), *SMALL]
  for flags, says in (([f"--profile={theirs}"], "exists and is not empty"),
                      ([f"--profile={tmp_path / 'new'}", "--compile-only"], "--compile-only runs none")):
    assert bench.main([*config, *flags, f"--json={tmp_path / 'r.json'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --profile=") and says in err and len(err.splitlines()) == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # nothing written, not even the report
  assert os.listdir(theirs) == ["notes.txt"]
