"""benchmarks/nanochat_train.py, against a stand-in nanochat checkout written here (nanochat itself
is never in this repository): the scratch NANOCHAT_BASE_DIR it builds is what base_train reads
(a tiktoken tokenizer with nanochat's specials, token_bytes.pt, train and val parquet shards with
enough tokens), the flags reach base_train, the wandb/rustbpe stand-ins load, the step lines become
medians after the warm-up, base_train's exit status is its own, and the GPU kit's nanochat-* parts
run it and pair it with lmtiny.bench's run of the same config."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lm_fixtures import ROOT, xla_flags

pytest.importorskip("torch")  # base_train's token_bytes.pt is a torch tensor
pytest.importorskip("tiktoken")

SCRIPT = os.path.join(ROOT, "benchmarks", "nanochat_train.py")
TOKENIZER = '''import rustbpe  # never run: nanochat_train.py reads the two constants with ast
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
]
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}{1,2}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"""
'''
# What nanochat's base_train reads and prints, and nothing else: the tokenizer and shards under
# NANOCHAT_BASE_DIR, its flags, one line per step in its format, the peak memory line.
BASE_TRAIN = """import json, os, pickle, sys
import pyarrow.parquet as pq
import torch
import rustbpe, wandb  # imported at module level by the real one too
base = os.environ["NANOCHAT_BASE_DIR"]
enc = pickle.load(open(os.path.join(base, "tokenizer", "tokenizer.pkl"), "rb"))
token_bytes = torch.load(os.path.join(base, "tokenizer", "token_bytes.pt"))
shards = sorted(os.listdir(os.path.join(base, "base_data_climbmix")))
train = pq.read_table(os.path.join(base, "base_data_climbmix", shards[0])).column("text").to_pylist()
tokens = sum(len(enc.encode_ordinary(t)) for t in train)
sample = train[0][:2000]
ids = enc.encode_ordinary(sample)
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
json.dump({"argv": sys.argv[1:], "vocab": enc.n_vocab, "bos": enc.encode_single_token("<|bos|>"),
           "token_bytes": [len(token_bytes), int(token_bytes[ids].sum()), len(sample.encode())],
           "shards": shards, "train_tokens": tokens, "chars_per_token": len(sample) / len(ids)},
          open(os.environ["FAKE_REPORT"], "w"))
steps = int(flags["num-iterations"])
for step in range(steps):
    dt = 5000.0 if step == 0 else 100.0 + step
    print(f"step {step:05d}/{steps:05d} (0.00%) | loss: {9 - step / 10:.6f} | lrm: 0.03 | dt: {dt:.2f}ms | "
          f"tok/sec: {int(512 / dt * 1000):,} | bf16_mfu: {40 + step:.2f} | epoch: 1 pq: 0 rg: 0 | total time: 0.00m")
print("Peak memory usage: 1024.00MiB")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture()
def checkout(tmp_path):
  root = tmp_path / "nanochat"
  (root / "nanochat").mkdir(parents=True)
  (root / "scripts").mkdir()
  (root / "nanochat" / "tokenizer.py").write_text(TOKENIZER)
  (root / "scripts" / "base_train.py").write_text(BASE_TRAIN)
  return root


def _run(checkout, tmp_path, *args, **env):
  e = dict(os.environ, FAKE_REPORT=str(tmp_path / "fake.json"), TMPDIR=str(tmp_path), **env)
  argv = [sys.executable, SCRIPT, "--nanochat", str(checkout), "--depth", "2", "--max-seq-len", "64",
          "--device-batch-size", "4", "--total-batch-size", "512", "--vocab-size", "1024", "--steps", "3",
          "--warmup", "2", "--json", str(tmp_path / "out.json"), *args]
  return subprocess.run(argv, env=e, capture_output=True, text=True, timeout=120)


def test_base_train_gets_a_tokenizer_shards_and_flags_and_its_steps_become_medians(checkout, tmp_path):
  proc = _run(checkout, tmp_path, "--fp8", "--window-pattern", "L")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  fake = json.loads((tmp_path / "fake.json").read_text())
  assert fake["argv"] == ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
                          "--window-pattern=L", "--num-iterations=5", "--eval-every=-1", "--core-metric-every=-1",
                          "--sample-every=-1", "--run=dummy", "--fp8"]
  assert fake["vocab"] == 1024 and fake["bos"] == 1022  # the specials follow the 1,022 mergeable tokens
  n, counted, actual = fake["token_bytes"]
  assert n == 1024 and counted == actual  # token_bytes.pt: each token's byte length, 0 for the specials
  assert fake["shards"] == ["shard_00000.parquet", "shard_00001.parquet"]  # the last one is val, as nanochat's
  assert fake["train_tokens"] >= 2 * 512 * (5 + 2)  # every step's tokens, twice: best-fit rows crop
  assert 1.6 < fake["chars_per_token"] < 2.5  # byte pairs over lowercase words
  result = json.loads((tmp_path / "out.json").read_text())
  side = result["sides"]["torch"]
  assert [s["step"] for s in result["steps"]] == [0, 1, 2, 3, 4]
  assert side["median_step_s"] == pytest.approx(0.103)  # steps 2, 3, 4 (dt 102, 103, 104 ms), not the warm-up
  assert side["mfu_nanochat"] == pytest.approx(0.43) and side["first_step_s"] == pytest.approx(5.0)
  assert side["peak_memory_bytes"] == 2**30 and side["final_loss"] == pytest.approx(8.6)
  assert (result["dtype"], result["global_batch"], result["seq_len"], result["accumulation"]) == ("fp8", 8, 64, 2)
  assert "nanochat d2 fp8: 4,970 tokens/s, 103.0 ms/step" in proc.stdout
  assert not list(tmp_path.glob("nanochat-base-*"))  # the scratch base dir is removed


def test_base_trains_exit_status_is_kept_and_bad_flags_exit_2(checkout, tmp_path):
  assert _run(checkout, tmp_path, FAKE_EXIT="3").returncode == 3
  assert not list(tmp_path.glob("nanochat-base-*"))
  for args in (["--steps", "0"], ["--warmup", "0"]):
    proc = _run(checkout, tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
  proc = _run(tmp_path / "nowhere", tmp_path)
  assert proc.returncode == 2 and "no scripts/base_train.py" in proc.stderr


def _suite(tmp_path, *args, **env):
  out = tmp_path / "out"
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT", "BACKENDS", "LIMIT_S", "BUDGET_S")}
  e.update({"SMOKE": "1", "WHEELS": "", "OUT": str(out), "TMPDIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(), "PYTHON": sys.executable, "FAKE_REPORT": str(tmp_path / "fake.json"), **env})
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), *args], env=e, capture_output=True,
                        text=True, timeout=120)
  return proc, out


def test_dry_run_names_the_2026_runs_on_both_sides(tmp_path, checkout):
  proc, out = _suite(tmp_path, "2026", "--dry-run", SMOKE="0", NANOCHAT=str(checkout), WINDOW_PATTERN="L")
  assert proc.returncode == 0, proc.stderr
  runs = [ln for ln in proc.stdout.splitlines() if ln.startswith("=== ") and " (limit " in ln]
  names = [ln.split()[1] for ln in runs]
  assert names == [f"{side}-{c}/{c}-{who}{g}" for c in ("d12_2026", "d24_2026") for side, who in
                   (("bench", ""), ("nanochat", "nanochat-")) for g in ("bf16", "fp8")]
  assert all("--config.model.window_pattern=L" in ln for ln in runs if "lmtiny.bench" in ln)
  assert sum("--config.model.matmul_dtype=fp8" in ln for ln in runs) == 2
  assert sum(" --fp8 " in ln for ln in runs) == 2
  assert "--depth 12 --device-batch-size 32 --total-batch-size 524288 --window-pattern L" in runs[2]
  assert "--depth 24 --device-batch-size 16 --total-batch-size 1048576 --window-pattern L" in runs[6]
  assert not out.exists()


@pytest.mark.slow(seconds=20)
def test_smoke_pairs_lmtiny_with_nanochat_and_a_missing_checkout_fails_its_part(tmp_path, checkout):
  proc, out = _suite(tmp_path, "bench-d12_2026", "nanochat-d12_2026", NANOCHAT=str(checkout))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert [(r["run"], r["status"]) for r in summary["runs"]] == [("d12_2026-bf16", "ok"),
                                                                ("d12_2026-nanochat-bf16", "ok")]
  [pair] = summary["lmtiny_vs_nanochat"]
  assert (pair["config"], pair["gemm"]) == ("d12_2026", "bf16")
  assert pair["ratio"] == pytest.approx(pair["lmtiny_tokens_per_s"] / pair["nanochat_tokens_per_s"])
  assert "| d12_2026 | bf16 |" in (out / "summary.md").read_text()

  proc, out = _suite(tmp_path / "again", "nanochat-d24_2026", NANOCHAT=str(tmp_path / "nowhere"))
  assert proc.returncode == 1
  [run] = json.loads((out / "summary.json").read_text())["runs"]
  assert run["status"] == "failed (exit 1)" and "no nanochat checkout at NANOCHAT=" in run["last_line"]


def test_summary_pairs_runs_by_config_and_gemm_dtype():
  spec = importlib.util.spec_from_file_location("gpu_suite_summary", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  shape = {"seq_len": 2048, "batch_tokens": 524288}
  bench = lambda run, tps: {"part": "bench-d12_2026", "run": run, "rc": "0", "result": {"tokens_per_s": tps, **shape}}
  nano = lambda run, tps, rc="0", **kw: {"part": "nanochat-d12_2026", "run": run, "rc": rc,
                                         "result": {"sides": {"torch": {"tokens_per_s": tps}}, **shape, **kw}}
  runs = [bench("d12_2026-bf16", 400.0), bench("d12_2026-fp8", 300.0), nano("d12_2026-nanochat-bf16", 500.0),
          nano("d12_2026-nanochat-fp8", 600.0, rc="124")]
  assert [(q["gemm"], q["ratio"]) for q in suite.lmtiny_vs_nanochat(runs)] == [("bf16", 0.8), ("fp8", None)]
  runs[2] = nano("d12_2026-nanochat-bf16", 500.0, batch_tokens=1048576)
  [q, _] = suite.lmtiny_vs_nanochat(runs)
  assert q["ratio"] is None and q["note"].startswith("not comparable: lmtiny 524288 tokens at seq 2048, nanochat 1048576")
