"""Every config's v5e plan, compiled by XLA:TPU on this machine: does it fit, and how far is the estimate?

  pip install -e ".[tpu]"        # libtpu: XLA:TPU compiles here, no TPU needed
  python benchmarks/tpu_plans.py [--configs d20 d32] [--plans 2] [--json PATH]

For each config, `lmtiny.arch`'s 16 GB v5e plans (lmtiny.plan.memory.fsdp_plans: the smallest FSDP
degrees at which the estimate stays under 80% of the chip, each with its largest
device_batch_size) are compiled with `python -m lmtiny.bench --topology v5e:AxB` for a slice of
that many chips (one process per compile). It prints per plan: lmtiny.plan.memory's estimate,
XLA:TPU's per-chip figure (its peak: lmtiny.training.benchmark.memory_analysis), their ratio, and the
share of the 16 GiB chip; a plan whose XLA figure does not fit prints DOES NOT FIT and the
script exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmtiny import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmtiny.plan import memory  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = ("d4_38m", "d7_38m", "d29_38m", "d12", "d20", "d26", "d32")
# v5e slices by chip count (libtpu topology names: chips in a 2-D torus).
V5E_SLICES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def compile_plan(name: str, fsdp: int, dbs: int) -> dict:
  """XLA:TPU's report (lmtiny.bench --json) for config `name` on v5e chips at this plan."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [sys.executable, "-m", "lmtiny.bench", "--config", os.path.join(ROOT, "configs", f"{name}.py"),
           "--topology", f"v5e:{V5E_SLICES[fsdp]}", "--config.mesh.data=1", f"--config.mesh.fsdp={fsdp}",
           "--config.mesh.tensor=1", f"--config.train.device_batch_size={dbs}", "--json", out]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(out) as f:
      return json.load(f)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
  parser.add_argument("--plans", type=int, default=1, help="Plans per config, smallest FSDP degree first.")
  parser.add_argument("--json", help="Also write the rows as JSON.")
  args = parser.parse_args()
  rows, ok = [], True
  print(f"{'config':<9}{'fsdp':>5}{'dbs':>5}{'accum':>6}{'estimate':>10}{'XLA:TPU':>10}{'ratio':>7}{'chip':>6}"
        f"{'compile':>9}")
  for name in args.configs:
    cfg = config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py"))
    plans = [p for p in memory.fsdp_plans(cfg) if p[1] is not None and p[0] in V5E_SLICES][:args.plans]
    if not plans:
      print(f"{name:<9} no v5e plan (lmtiny.arch)")
      ok = False
    for fsdp, dbs, accumulation, _ in plans:
      r = compile_plan(name, fsdp, dbs)
      xla, est, chip = r["xla_memory"]["peak"], r["estimate"]["total"], r["chip_bytes"]
      fits = xla <= chip
      ok &= fits
      print(f"{name:<9}{fsdp:>5}{dbs:>5}{accumulation:>6}{est / 2**30:>9.2f}G{xla / 2**30:>9.2f}G"
            f"{est / xla:>7.2f}{100 * xla / chip:>5.0f}%{r['compile_s']:>8.1f}s" + ("" if fits else "  DOES NOT FIT"),
            flush=True)
      rows.append({"config": name, "fsdp": fsdp, "device_batch_size": dbs, "accumulation": accumulation,
                   "estimate": est, "xla": xla, "chip_bytes": chip, "estimate_parts": r["estimate"],
                   "xla_memory": r["xla_memory"], "compile_s": r["compile_s"]})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
