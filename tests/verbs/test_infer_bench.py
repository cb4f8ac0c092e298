"""benchmarks/infer.py: its figures agree with each other and with the bytes the model holds (an
independent count from lmtiny.plan.counts), bad flags are one line and exit 2, and its GPU-kit
part (benchmarks/gpu_suite.sh infer) runs it and puts its table in the summary."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess

import numpy as np
import pytest

from lm_fixtures import ROOT
from lmtiny import config as config_lib
from lmtiny.plan import counts

BATCHES, PROMPT, NEW = (1, 2), 8, 4
CONFIG = """
from lmtiny.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128, num_layers=2, d_model=32, num_heads=4, max_seq_len=32, dtype="float32")
  return c
"""


def _load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load("infer")


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
  """(the JSON benchmarks/infer.py wrote, what it printed, the config's model) for batch 1 and 2,
  prompt 8, 4 new tokens, the device's bandwidth from the CPU probe."""
  root = tmp_path_factory.mktemp("infer_bench")
  (root / "mini.py").write_text(CONFIG)
  out = root / "infer.json"
  argv = ["--configs", str(root / "mini.py"), "--batch-sizes", *map(str, BATCHES), "--prompt-lens", str(PROMPT),
          "--new-tokens", str(NEW), "--repeats", "1", "--json", str(out)]
  printed = io.StringIO()  # capsys is function-scoped
  with contextlib.redirect_stdout(printed):
    assert bench.main(argv) == 0
  return json.loads(out.read_text()), printed.getvalue(), config_lib.load_file(str(root / "mini.py")).model


@pytest.mark.slow(seconds=6)
def test_figures_are_consistent_and_count_the_models_bytes(bench, measured):
  result, printed, m = measured
  assert "measured: jit(x * 2) in place" in result["bandwidth_source"] and result["bandwidth_bytes_per_s"] > 0
  (model,) = result["models"]
  parts = counts.param_breakdown(m)
  # Read in full each step: everything but the (untied) embedding table, float32 on CPU; of the
  # table, one row of d_model per request.
  assert model["weight_bytes_full"] == 4 * (parts["total"] - parts["embedding"])
  assert model["weight_bytes_lookup_row"] == 4 * m.d_model
  kv_per_position = 2 * m.num_layers * m.num_heads * (m.d_model // m.num_heads) * 4
  assert [r["batch"] for r in model["rows"]] == list(BATCHES)
  for r in model["rows"]:
    b = r["batch"]
    assert (r["generated_tokens"], r["decode_tokens"], r["decode_steps"]) == (b * NEW, b * (NEW - 1), NEW)
    assert (r["prompt_len"], r["cache_len"]) == (PROMPT, 16)
    assert r["decode_tokens_per_s"] * r["decode_s"] == pytest.approx(b * (NEW - 1))
    assert r["decode_tokens_per_s_per_request"] * b == pytest.approx(r["decode_tokens_per_s"])
    assert r["prefill_tokens_per_s"] * r["ttft_s"] == pytest.approx(b * PROMPT)
    assert r["step_s"] * NEW == pytest.approx(r["decode_s"])
    assert r["weight_bytes_per_step"] == model["weight_bytes_full"] + b * model["weight_bytes_lookup_row"]
    # Step i attends to positions 0..PROMPT + i: 9, 10, 11, 12 keys, 10.5 on average.
    assert r["kv_bytes_per_step"] == pytest.approx(b * kv_per_position * 10.5)
    assert r["kv_bytes_per_step_as_run"] == b * kv_per_position * 16
    assert r["bytes_per_step"] == pytest.approx(r["weight_bytes_per_step"] + r["kv_bytes_per_step"])
    util = r["bytes_per_step"] / r["step_s"] / result["bandwidth_bytes_per_s"]
    assert r["bandwidth_utilisation"] == pytest.approx(util) and 0 < util <= 1.5
    assert r["bandwidth_utilisation_as_run"] > r["bandwidth_utilisation"]
    assert bench.format_row(bench.table_cells(r)) in printed.splitlines()


def test_kv_bytes_count_sliding_windows_and_prompts_are_capped_by_the_context(bench):
  m = config_lib.base_config().model
  m.update(num_layers=2, d_model=32, num_heads=4, max_seq_len=64, window_pattern="SL", short_window=4)
  live, as_run = bench.kv_bytes_per_step(m, batch=3, prompt_len=8, steps=4, cache_len=16)
  per_position = 2 * 4 * 8 * np.dtype(np.float32).itemsize  # k and v, 4 heads x 8
  # The S layer attends to its window's 5 positions at every step, the L layer to 9..12.
  assert live == pytest.approx(3 * per_position * (4 * 5 + 9 + 10 + 11 + 12) / 4)
  assert as_run == 3 * per_position * 2 * 16
  assert bench.capped_prompt_lens([16, 256, 300], 64, 256) == (
      [16, 192], ["prompt 256 capped to 192 (context 256 - 64 new tokens)",
                  "prompt 300 capped to 192 (context 256 - 64 new tokens)"])


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--batch-sizes", "0"], "error: --batch-sizes=0: must be >= 1"),
    (["--prompt-lens", "x"], "error: argument --prompt-lens: invalid int value: 'x'"),
    (["--configs", "nope"], "error: --configs: no configs/nope.py"),
    (["--configs", "nope.py"], "error: --configs: no nope.py"),
    (["--json", "/"], "error: --json=/: a directory, or in a directory that does not exist"),
    (["--new-tokens", "1"], "error: --new-tokens=1: must be >= 2 (the first token is prefill's)"),
    (["--bandwidth", "0"], "error: --bandwidth=0.0: must be a positive number of GB/s"),
    (["--temperature", "-1"], "error: --temperature=-1.0: must be a finite number >= 0"),
    (["--configs"], "error: nothing to measure: give --configs NAME ... and/or --run RUN"),
])
def test_bad_flags_are_one_error_line_and_exit_2(bench, capsys, argv, message):
  assert bench.main(argv) == 2
  assert capsys.readouterr().err == message + "\n"


@pytest.mark.slow(seconds=1)  # shares the measured fixture
def test_the_gpu_kit_part_runs_it_and_summarizes_its_table(measured, tmp_path):
  dry = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "infer", "--dry-run"],
                       capture_output=True, text=True, env={**os.environ, "SMOKE": "0", "WHEELS": ""})
  assert dry.returncode == 0, dry.stderr
  runs = [ln for ln in dry.stdout.splitlines() if " benchmarks/infer.py " in ln]
  assert [ln.split()[1] for ln in runs] == ["infer/d4_38m", "infer/d20"]
  for ln, config in zip(runs, ("d4_38m", "d20")):
    assert f"--configs {config} --batch-sizes 1 8 32 128 --prompt-lens 16 512 --new-tokens 128" in ln
    assert f"--json WORK/infer-{config}.json" in ln
  result, _, _ = measured
  work, out = tmp_path / "work", tmp_path / "out"
  work.mkdir()
  (work / "infer-mini.json").write_text(json.dumps(result))
  (work / "runs.tsv").write_text(f"infer\tmini\t0\t5\t120\t{work / 'infer-mini.json'}\t\n"
                                 "infer\td20\t124\t300\t300\t/nonexistent.json\tkilled\n")
  _load("gpu_suite").summarize(str(work), str(out))
  md = (out / "summary.md").read_text()
  assert result["bandwidth_source"] in md
  for r in result["models"][0]["rows"]:
    assert (f"| mini | ok | {result['models'][0]['name']} | float32 | {r['batch']} | {PROMPT} | "
            f"{r['ttft_s'] * 1e3:,.1f} | {r['decode_tokens_per_s']:,.0f} |") in md
  assert "| d20 | timed out (300 s) | | |" in md
