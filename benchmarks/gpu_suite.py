"""The Python half of benchmarks/gpu_suite.sh: the environment probe and the summary.

  python benchmarks/gpu_suite.py env WORK/env.json      # versions, devices, the MFU peak; imports lmtiny.bench
  python benchmarks/gpu_suite.py summary WORK OUT       # OUT/summary.json + OUT/summary.md from WORK

`summary` reads what the shell half left in WORK: runs.tsv (one line per run: part, run, exit
status or "skip", seconds, time limit, the run's JSON, its last line of output), env.json, and the JSON each
benchmark wrote (`benchmarks/attention.py --json`, `python -m lmtiny.bench --json`,
`benchmarks/torch_reference.py --only torch --json`, `benchmarks/infer.py --json`), and pairs
each bench-CONFIG part with its torch-CONFIG part: lmtiny's best tokens/s over backends /
PyTorch's. It imports nothing but the standard library and never fails on a missing or broken
file: the suite calls it after every run, so a call cut off at its time limit still leaves the
figures so far.
"""
from __future__ import annotations

import base64
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
            "grain", "array-record", "ml-collections", "portpicker", "sentencepiece", "absl-py", "etils", "protobuf",
            "torch", "triton")
TIMED_OUT = ("124", "137")  # timeout(1)'s status, and SIGKILL after --kill-after


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def target_config_text(config) -> str:
  """A GPU target config as JSON can hold it: text as is, bytes as UTF-8 text when they are
  (a text proto), else "base64:" and their base64."""
  if isinstance(config, str):
    return config
  try:
    return bytes(config).decode("utf-8")
  except UnicodeDecodeError:
    return "base64:" + base64.b64encode(bytes(config)).decode("ascii")


def probe() -> dict:
  """What the figures depend on; every field best effort, so the probe itself cannot fail."""
  env = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
         "packages": {p: v for p in PACKAGES if (v := _version(p))}}
  try:
    import jax
    devices = jax.devices()
    env.update(backend=jax.default_backend(), devices=[str(d) for d in devices], device_kind=devices[0].device_kind,
               device_count=len(devices), compute_capability=getattr(devices[0], "compute_capability", None))
  except Exception as e:  # pylint: disable=broad-except
    env["jax_error"] = f"{type(e).__name__}: {e}"
    return env
  try:  # XLA:GPU's description of the device: jax's deviceless topology takes it to compile for this
    # GPU on a CPU host (topologies.get_topology_desc(platform="cuda", target_config=..., topology="1x1x1"))
    if env["backend"] == "gpu":
      from jax._src.lib import xla_client
      env["target_config"] = target_config_text(xla_client.get_topology_for_devices(devices[:1]).target_config)
  except Exception as e:  # pylint: disable=broad-except
    env["target_config"] = f"unknown ({type(e).__name__})"
  try:  # cuDNN and CUDA as jax's CUDA plugin loaded them (private, hence guarded)
    from jax._src.lib import cuda_versions
    if cuda_versions is not None:
      env["cudnn"] = cuda_versions.cudnn_get_version()
      env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
  except Exception as e:  # pylint: disable=broad-except
    env["cudnn"] = f"unknown ({type(e).__name__})"
  try:  # the chip lmtiny's MFU divides by: a wrong or missing match makes every MFU figure wrong
    sys.path.insert(0, ROOT)
    from lmtiny.plan import counts
    from lmtiny.runs import metrics
    chip = metrics.chip_name()
    env.update(chip=chip, peak_tflops=counts.PEAK_FLOPS[chip] / 1e12 if chip else None)
    import lmtiny.bench  # noqa: F401  (fails here, once, if a wheel is missing)
    env["lmtiny_bench_imports"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    env["lmtiny_bench_imports"] = f"{type(e).__name__}: {e}"
  return env


def _load(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_runs(work: str) -> list[dict]:
  runs = []
  try:
    with open(os.path.join(work, "runs.tsv")) as f:
      lines = f.read().splitlines()
  except OSError:
    return runs
  for line in lines:
    fields = line.split("\t")
    if len(fields) < 6:
      continue
    part, name, rc, seconds, limit, result = fields[:6]
    last = fields[6] if len(fields) > 6 else ""
    status = ("ok" if rc == "0" else "skipped (budget)" if rc == "skip" else f"timed out ({limit} s)"
              if rc in TIMED_OUT else f"failed (exit {rc})")
    runs.append({"part": part, "run": name, "rc": rc, "status": status, "seconds": int(seconds or 0),
                 "limit_s": int(limit or 0), "result": _load(result) if result else None,
                 "last_line": last})
  return runs


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return "-" if x is None else format(x * scale, spec)


def _gib(n) -> str:
  return "-" if not n else f"{n / 2**30:.1f}"


def markdown(env: dict, runs: list[dict], meta: dict) -> str:
  kind = env.get("device_kind", "?")
  pk = env.get("packages", {})
  lines = [f"# lmtiny GPU suite: {env.get('device_count', '?')} x {kind}, {meta['date']}", ""]
  lines.append(f"python {env.get('python')}, jax {pk.get('jax')}, jaxlib {pk.get('jaxlib')}, "
               f"cuDNN {env.get('cudnn', '-')}, flax {pk.get('flax')}, optax {pk.get('optax')}, grain {pk.get('grain')}, "
               f"torch {pk.get('torch')}, triton {pk.get('triton')}")
  peak = env.get("peak_tflops")
  lines.append(f"MFU peak: {env.get('chip')} {peak:g} TFLOP/s dense bf16 (lmtiny.runs.metrics)" if peak else
               f"MFU peak: none for device_kind {kind!r}: MFU is n/a (lmtiny.runs.metrics._DEVICE_KINDS)")
  if env.get("lmtiny_bench_imports", "ok") != "ok":
    lines.append(f"**lmtiny.bench does not import: {env['lmtiny_bench_imports']}**")
  counts = {}
  for r in runs:
    counts[r["status"].split(" (")[0]] = counts.get(r["status"].split(" (")[0], 0) + 1
  lines += [f"wall {meta['wall_s']} s of a {meta['budget_s']} s budget; runs: " +
            (", ".join(f"{n} {k}" for k, n in counts.items()) or "none"), ""]

  att = [r for r in runs if r["part"] == "attention"]
  for r in att:
    a = r["result"]
    lines.append(f"## attention (benchmarks/attention.py): {r['status']}")
    if a:
      lines += [f"B={a['batch']} T={a['seq']} H={a['heads']} K={a['kv_heads']} Dh={a['head_dim']} {a['dtype']}, "
                f"median of {a['repeats']}, fwd+bwd, FLOPs causal-half; diffs relative to xla, "
                f"tolerance {a['tolerance']:g}",
                "", "| backend | layout | ms | TFLOP/s | temp MiB | cuDNN in HLO | max rel diff vs xla |",
                "|---|---|---:|---:|---:|---|---:|"]
      for row in a["rows"]:
        if "error" in row:
          lines.append(f"| {row['backend']} | {row['layout']} | failed: {row['error'].replace('|', '/')} | | | | |")
          continue
        diff = row.get("rel_diff_vs_xla")
        diff_s = "-" if not diff else f"{max(diff.values()):.2e}" + (" MISMATCH" if row.get("mismatch") else "")
        lines.append(f"| {row['backend']} | {row['layout']} | {row['ms']:.3f} | {row['tflops']:.1f} | "
                     f"{row['temp_mib']:.1f} | {'yes' if row['cudnn_in_hlo'] else 'no'} | {diff_s} |")
    lines.append("")

  bench = [r for r in runs if r["part"].startswith("bench")]
  if bench:
    lines += ["## lmtiny.bench: synthetic tokens, the trainer's jitted step (compile includes init; a program "
              "identical to an earlier run's is a compilation-cache hit)", "",
              "| run | status | attention -> cuDNN in HLO | batch (accum) | dtype | compile s | step ms (median) | "
              "tokens/s | MFU causal-half | MFU nanochat | peak GiB | XLA GiB | loss |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench:
      b = r["result"]
      if not b or "tokens_per_s" not in b:
        lines.append(f"| {r['run']} | {r['status']} | | | | | | | | | | | |")
        continue
      cudnn = {True: "yes", False: "no"}.get(b.get("cudnn_attention"), "?")
      lines.append(
          f"| {r['run']} | {r['status']} | {b.get('attention')} -> {cudnn} | {b['global_batch']}x{b['seq_len']} "
          f"({b['accumulation']}) | {b.get('dtype')} | {b['compile_s']:.1f} | {b['median_step_s'] * 1e3:.1f} | "
          f"{b['tokens_per_s']:,.0f} | {_fmt(b.get('mfu'), '.1f', 100)}% | "
          f"{_fmt(b.get('mfu_nanochat'), '.1f', 100)}% | "
          f"{_gib(b.get('peak_memory_bytes'))} | {_gib((b.get('xla_memory') or {}).get('peak'))} | "
          f"{b.get('final_loss', float('nan')):.3f} |")
    lines.append("")

  torch_runs = [r for r in runs if r["part"].startswith(("torch", "nanochat"))]
  if torch_runs:
    lines += ["## PyTorch: torch-* runs are benchmarks/torch_reference.py --only torch (the same model, batch and "
              "micro-batches; torch.compile, bf16 autocast over float32 weights, SDPA, AdamW where nanochat has Muon "
              "on the block matrices); nanochat-* runs are nanochat's own scripts/base_train.py "
              "(benchmarks/nanochat_train.py; MFU as base_train prints it). First step includes the compile", "",
              "| run | status | device | batch (accum) | dtype | compiled | first step s | step ms (median) | "
              "tokens/s | MFU causal-half | MFU nanochat | peak GiB | loss |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in torch_runs:
      t, side = r["result"], _torch_side(r)
      if not side:
        lines.append(f"| {r['run']} | {r['status']} | | | | | | | | | | | |")
        continue
      lines.append(
          f"| {r['run']} | {r['status']} | {side.get('device')} | {t['global_batch']}x{t['seq_len']} "
          f"({t.get('accumulation')}) | {t.get('dtype')} | {'yes' if t.get('compile') else 'no'} | "
          f"{_fmt(side.get('first_step_s'), '.1f')} | {side['median_step_s'] * 1e3:.1f} | "
          f"{side['tokens_per_s']:,.0f} | {_fmt(side.get('mfu'), '.1f', 100)}% | "
          f"{_fmt(side.get('mfu_nanochat'), '.1f', 100)}% | {_gib(side.get('peak_memory_bytes'))} | "
          f"{side.get('final_loss', float('nan')):.3f} |")
    lines.append("")
  ratios = lmtiny_vs_torch(runs)
  if ratios:
    lines += ["## lmtiny / PyTorch: tokens/s of lmtiny's best backend over PyTorch's (> 1: lmtiny faster); lmtiny "
              "runs the config's optimizer (d20: Muon on the block matrices), PyTorch AdamW", "",
              "| config | lmtiny tokens/s (run) | PyTorch tokens/s | ratio |", "|---|---:|---:|---:|"]
    for q in ratios:
      best = f"{q['lmtiny_tokens_per_s']:,.0f} ({q['lmtiny_run']})" if q["lmtiny_tokens_per_s"] else "-"
      torch_s = _tokens_per_s(q["torch_tokens_per_s"])
      ratio = q["note"] if not q["ratio"] else f"{q['ratio']:.2f}x" + (f" ({q['note']})" if q["note"] != "-" else "")
      lines.append(f"| {q['config']} | {best} | {torch_s} | {ratio} |")
    lines.append("")

  pairs = lmtiny_vs_nanochat(runs)
  if pairs:
    lines += ["## lmtiny / nanochat: the same config, batch and GEMM dtype; tokens/s of lmtiny.bench (attention auto) "
              "over nanochat's base_train (> 1: lmtiny faster)", "",
              "| config | GEMMs | lmtiny tokens/s | nanochat tokens/s | ratio |", "|---|---|---:|---:|---:|"]
    for q in pairs:
      ratio = f"{q['ratio']:.2f}x" if q["ratio"] else q["note"]
      lines.append(f"| {q['config']} | {q['gemm']} | {_tokens_per_s(q['lmtiny_tokens_per_s'])} | "
                   f"{_tokens_per_s(q['nanochat_tokens_per_s'])} | {ratio} |")
    lines.append("")

  lines += infer_lines([r for r in runs if r["part"] == "infer"])
  lines += ["## runs", "", "| part | run | status | seconds | last line of output (failures) |",
            "|---|---|---|---:|---|"]
  lines += [f"| {r['part']} | {r['run']} | {r['status']} | {r['seconds']} | "
            f"{'' if r['rc'] == '0' else r['last_line'].replace('|', '/')} |" for r in runs]
  return "\n".join(lines) + "\n"


def _percent(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def infer_lines(runs: list[dict]) -> list[str]:
  """The infer part's table: one line per (model, prompt, batch) point its runs measured."""
  if not runs:
    return []
  sources = {(r["result"] or {}).get("bandwidth_source") for r in runs} - {None}
  lines = ["## inference (benchmarks/infer.py): medians after a warm-up compile; TTFT = prefill of the batch + its "
           "first token; util = (weights + live KV bytes per decode step) / step time / bandwidth; as run: the whole "
           "bucketed cache; bandwidth: " + ("; ".join(sorted(sources)) or "-"), "",
           "| run | status | model | dtype | batch | prompt | TTFT ms | decode tok/s | per request | step ms | GB/s | "
           "util | util as run |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in runs:
    points = [(m, p) for m in (r["result"] or {}).get("models", []) for p in m.get("rows", [])]
    if not points:
      lines.append(f"| {r['run']} | {r['status']} | | | | | | | | | | | |")
    for m, p in points:
      lines.append(f"| {r['run']} | {r['status']} | {m['name']} | {m['compute_dtype']} | {p['batch']} | "
                   f"{p['prompt_len']} | {p['ttft_s'] * 1e3:,.1f} | {p['decode_tokens_per_s']:,.0f} | "
                   f"{p['decode_tokens_per_s_per_request']:,.1f} | {p['step_s'] * 1e3:.2f} | "
                   f"{p['bytes_per_s'] / 1e9:,.1f} | {_percent(p['bandwidth_utilisation'])} | "
                   f"{_percent(p['bandwidth_utilisation_as_run'])} |")
  return lines + [""]


def _torch_side(run: dict) -> dict | None:
  r = run["result"]
  side = ((r or {}).get("sides") or {}).get("torch")
  return side if side and "tokens_per_s" in side else None


def _shape_mismatch(lmtiny: dict, other: dict, who: str) -> str | None:
  """Why two runs' tokens/s do not compare (other tokens per step or seq_len), or None."""
  if (lmtiny.get("seq_len"), lmtiny.get("batch_tokens")) == (other.get("seq_len"), other.get("batch_tokens")):
    return None
  return (f"not comparable: lmtiny {lmtiny.get('batch_tokens')} tokens at seq {lmtiny.get('seq_len')}, "
          f"{who} {other.get('batch_tokens')} at {other.get('seq_len')}")


def _tokens_per_s(x) -> str:
  return f"{x:,.0f}" if x else "-"


def lmtiny_vs_torch(runs: list[dict]) -> list[dict]:
  """Per config with a bench and a torch part: lmtiny's best tokens/s over its backends (runs that
  finished) against PyTorch's, when both ran the same tokens per step at the same seq_len."""
  out = []
  for part in dict.fromkeys(r["part"] for r in runs if r["part"].startswith("torch-")):
    config = part[len("torch-"):]
    torch_run = next((r for r in runs if r["part"] == part and _torch_side(r)), None)
    lmtiny = [r for r in runs if r["part"] == f"bench-{config}" and r["rc"] == "0"
              and (r["result"] or {}).get("tokens_per_s")]
    best = max(lmtiny, key=lambda r: r["result"]["tokens_per_s"], default=None)
    q = {"config": config, "lmtiny_run": best and best["run"],
         "lmtiny_tokens_per_s": best and best["result"]["tokens_per_s"],
         "torch_tokens_per_s": torch_run and _torch_side(torch_run)["tokens_per_s"], "ratio": None, "note": "-"}
    if best and torch_run:
      b, t = best["result"], torch_run["result"]
      mismatch = _shape_mismatch(b, t, "PyTorch")
      if mismatch:
        q["note"] = mismatch
      else:
        q["ratio"] = q["lmtiny_tokens_per_s"] / q["torch_tokens_per_s"]
        if b.get("dtype") != t.get("dtype"):  # SMOKE: lmtiny in bf16, PyTorch in float32
          q["note"] = f"dtypes differ: lmtiny {b.get('dtype')}, PyTorch {t.get('dtype')}"
    out.append(q)
  return out


def lmtiny_vs_nanochat(runs: list[dict]) -> list[dict]:
  """Each nanochat-CONFIG run (CONFIG-nanochat-GEMM) beside bench-CONFIG's run CONFIG-GEMM."""
  out = []
  for r in runs:
    if not r["part"].startswith("nanochat-") or "-nanochat-" not in r["run"]:
      continue
    config, gemm = r["run"].split("-nanochat-")
    bench = next((b for b in runs if b["part"] == f"bench-{config}" and b["run"] == f"{config}-{gemm}"
                  and b["rc"] == "0" and (b["result"] or {}).get("tokens_per_s")), None)
    nc = _torch_side(r) if r["rc"] == "0" else None
    q = {"config": config, "gemm": gemm, "lmtiny_tokens_per_s": bench and bench["result"]["tokens_per_s"],
         "nanochat_tokens_per_s": nc and nc["tokens_per_s"], "ratio": None, "note": "-"}
    if bench and nc:
      mismatch = _shape_mismatch(bench["result"], r["result"], "nanochat")
      if mismatch:
        q["note"] = mismatch
      else:
        q["ratio"] = q["lmtiny_tokens_per_s"] / q["nanochat_tokens_per_s"]
    out.append(q)
  return out


def summarize(work: str, out: str) -> None:
  env = _load(os.path.join(work, "env.json")) or {}
  runs = read_runs(work)
  meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
          "wall_s": int(os.environ.get("SUITE_WALL_S", "0")), "budget_s": int(os.environ.get("SUITE_BUDGET_S", "0")),
          "smoke": os.environ.get("SMOKE", "0") == "1"}
  os.makedirs(out, exist_ok=True)
  md = markdown(env, runs, meta)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"meta": meta, "env": env, "runs": runs, "lmtiny_vs_torch": lmtiny_vs_torch(runs),
               "lmtiny_vs_nanochat": lmtiny_vs_nanochat(runs)}, f, indent=1)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(md)


def main(argv: list[str]) -> int:
  if len(argv) == 3 and argv[1] == "env":
    env = probe()
    with open(argv[2], "w") as f:
      json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))
    return 0
  if len(argv) == 4 and argv[1] == "summary":
    try:
      summarize(argv[2], argv[3])
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()  # the shell half then writes its plain fallback
      return 1
    return 0
  print(__doc__.strip(), file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
