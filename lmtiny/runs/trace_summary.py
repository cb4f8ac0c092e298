"""Where the device time of a profiled window went, read from jax.profiler's Chrome-trace JSON
(`perfetto_trace.json.gz`, written beside the `.xplane.pb` that TensorBoard's profile plugin reads).

  summary = summarize(load_trace(path))      # {"devices", "window_us", "shares", "top", ...}
  text = format_summary(summary)             # the lines the trainer prints and summary.md holds

Which events are device operations:
- a `/device:...` process (GPU, TPU): its "XLA Ops" thread when it has one (TPU, and GPU traces
  with derived lines), else its "Stream ..." threads (GPU kernels); module, step and framework
  lines are never counted;
- the host process on CPU, when no device process has any: every event with an `hlo_op` argument
  (XLA:CPU's thunks, traced at host_tracer_level 3), on the device its `device_ordinal` names; the
  `end: ...` markers are not.

Time on each device is split exactly: over its window (its first operation's start to its last
one's end) every instant belongs to one category. Where operations nest (a TPU fusion holding its
parts) the innermost one owns the instant; where they overlap on parallel streams a computation
owns it before a collective, so "collectives" is communication nothing else hid; instants with no
operation are "idle". The shares therefore sum to 1. Categories, from the operation's own names
(event name, `hlo_op`, the opcode of its `long_name`) and xprof's `hlo_category` where present:
  collectives  all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute (their
               -start/-done halves), send/recv, NCCL kernels;
  attention    attention kernels: cuDNN fused attention (fmha, sdpa, and the cudnn::fusion helpers
               its backward launches), flash / splash / Pallas MHA;
  matmul       dot, convolution (XLA's name for many dots), GEMM kernels: cuBLAS, cuBLASLt
               (nvjet), CUTLASS, xmma/wgmma, Triton gemm fusions, and whatever the profile's HLO
               (hlo_ops) says came from dot_general or conv_general_dilated (XLA:CPU's YNNPACK
               fusions hold dots or reductions: see `category`);
  elementwise  everything else: loop/input/output fusions, copies, reductions, transposes.
"""
from __future__ import annotations

import collections
import gzip
import json
import re

CATEGORIES = ("matmul", "attention", "collectives", "elementwise", "idle")

_COLLECTIVE = re.compile(r"all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|"
                         r"collective[-_]?permute|collective[-_]?broadcast|\bnccl|\bsend\b|\brecv\b|send-done|"
                         r"recv-done|sendrecv")
_ATTENTION = re.compile(r"attention|fmha|sdpa|flash|splash|\bmha\b|_mha_|mha_fwd|mha_bwd|cudnn::fusion")
_MATMUL = re.compile(r"\bdot\b|dot[._]|_dot\b|convolution|\bconv\b|conv[._]|gemm|matmul|cublas|nvjet|cutlass|"
                     r"xmma|wgmma")
_LIBRARY = re.compile(r"[xy]nn_fusion|__[xy]nn")  # XLA:CPU's YNNPACK / XNNPACK fusions
MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")
_SKIP_THREADS = re.compile(r"modules|steps|framework|tensorflow ops|source|launch stats|host offload|"
                           r"sparsecore|counters", re.I)


def _opcode(long_name: str) -> str:
  """'%fusion.3 = bf16[8,16] fusion(%a, %b), kind=kOutput' -> 'fusion'; '' when not that shape."""
  m = re.match(r"\s*%?[\w.\-]+\s*=\s*.*?\s([\w\-]+)\(", long_name)
  return m.group(1) if m else ""


def category(name: str, args: dict | None = None) -> str:
  """The category (CATEGORIES, never "idle") of one device operation. `args` may add, besides the
  trace's own, the instruction's `hlo_opcode` and `op_name` (the JAX primitive it came from) from
  the HLO the profile holds (hlo_ops): they settle XLA:CPU's YNNPACK/XNNPACK fusions, which hold
  dots by default and reductions under lmtiny's CPU options (lmtiny.parallel.xla_options); without
  them such a fusion counts as a matmul."""
  args = args or {}
  target = re.search(r'custom_call_target="([^"]+)"', str(args.get("long_name", "")))
  own = " ".join([name, str(args.get("hlo_op", "")), _opcode(str(args.get("long_name", ""))),
                  target.group(1) if target else ""]).lower()
  hlo_category = str(args.get("hlo_category", "")).lower().strip('"')
  primitive = str(args.get("op_name", "")).rsplit("/", 1)[-1]
  if _COLLECTIVE.search(own) or _COLLECTIVE.search(hlo_category):
    return "collectives"
  if _ATTENTION.search(own):
    return "attention"
  library = _LIBRARY.search(own)
  if library and primitive:
    return "matmul" if primitive in MATMUL_PRIMITIVES else "elementwise"
  if (library or _MATMUL.search(own) or "convolution" in hlo_category or primitive in MATMUL_PRIMITIVES
      or args.get("hlo_opcode") in ("dot", "convolution")):
    return "matmul"
  return "elementwise"


def _fields(buf: bytes, number: int) -> list[bytes]:
  """The length-delimited fields `number` of one protobuf message (the others are skipped)."""
  out, i = [], 0
  while i < len(buf):
    key, i = _varint(buf, i)
    kind = key & 7
    if kind == 0:
      _, i = _varint(buf, i)
    elif kind == 2:
      size, i = _varint(buf, i)
      if key >> 3 == number:
        out.append(buf[i:i + size])
      i += size
    elif kind in (1, 5):
      i += 8 if kind == 1 else 4
    else:
      raise ValueError(f"protobuf wire type {kind}")
  return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, i


def _first(buf: bytes, number: int) -> str:
  found = _fields(buf, number)
  return found[0].decode(errors="replace") if found else ""


def hlo_ops(xplane: bytes, modules: set[str] | None = None) -> dict[tuple[str, str], tuple[str, str]]:
  """{(module, instruction): (opcode, op_name)} from the HLO the profiler keeps in a `.xplane.pb`
  (ProfileOptions.enable_hlo_proto, on by default): XSpace.planes (1) -> the "/host:metadata"
  plane's event_metadata (4) values (2) -> their stats (5) bytes (6) = HloProto -> hlo_module (1):
  name (1), computations (3) -> instructions (2): name (1), opcode (2), metadata (7) op_name (2).
  `modules`: read only these (trace_modules: those the trace ran); the profile holds every program
  the process has loaded, and decoding each instruction in Python is what reading costs."""
  out = {}
  for plane in _fields(xplane, 1):
    if _first(plane, 2) != "/host:metadata":
      continue
    for entry in _fields(plane, 4):
      for meta in _fields(entry, 2):
        for hlo in (b for stat in _fields(meta, 5) for b in _fields(stat, 6)):
          for module in _fields(hlo, 1):
            name = _first(module, 1)
            if modules is not None and name not in modules:
              continue
            for computation in _fields(module, 3):
              for ins in _fields(computation, 2):
                metadata = _fields(ins, 7)
                out[(name, _first(ins, 1))] = (_first(ins, 2), _first(metadata[0], 2) if metadata else "")
  return out


def trace_modules(trace: dict) -> set[str]:
  """The HLO modules whose operations the trace holds (its events' `hlo_module`)."""
  return {str(e["args"]["hlo_module"]) for e in trace.get("traceEvents", [])
          if isinstance(e.get("args"), dict) and e["args"].get("hlo_module")}


def load_trace(path: str) -> dict:
  """A Chrome-trace JSON file, gzipped or not."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  trace = json.loads(data)
  return trace if isinstance(trace, dict) else {"traceEvents": trace}


def device_ops(trace: dict, hlo: dict | None = None) -> dict[str, list[dict]]:
  """{device: [its operations' "X" events]} (see the module's docstring for which events count)."""
  events = trace.get("traceEvents", [])
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e.get("pid")] = str((e.get("args") or {}).get("name") or "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str((e.get("args") or {}).get("name") or "")
  with_ops_line = {pid for (pid, _), name in threads.items() if name == "XLA Ops"}
  out, host = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or not e.get("dur") or str(e.get("name") or "").startswith("end: "):
      continue
    pid, args = e.get("pid"), e.get("args") or {}
    if hlo and (args.get("hlo_module"), args.get("hlo_op")) in hlo:
      opcode, op_name = hlo[(args["hlo_module"], args["hlo_op"])]
      e = {**e, "args": {**args, "hlo_opcode": opcode, "op_name": op_name}}
    process, thread = processes.get(pid, ""), threads.get((pid, e.get("tid")), "")
    if process.startswith("/device:"):
      keep = thread == "XLA Ops" if pid in with_ops_line else thread.startswith("Stream") or (
          not _SKIP_THREADS.search(thread) and "hlo_op" in args)
      if keep:
        out[process.removeprefix("/device:")].append(e)
    elif "hlo_op" in args and "device_ordinal" in args:
      host[f"CPU:{args['device_ordinal']}"].append(e)
  return dict(out) or dict(host)  # a GPU's host-side launches are not device time


def op_name(event: dict) -> str:
  """The HLO instruction (`hlo_op`, else the event's name: a GPU kernel's), with its module when
  the event names one: 'fusion.3 @ jit_train_step'. A kernel that XLA:GPU launched inside a
  command buffer (a CUDA graph, `command_buffer_N`: most of a step by default) is named by the
  kernel itself, without its argument list, so a step's top operations are kernels, not graphs."""
  args = event.get("args") or {}
  name = str(args.get("hlo_op") or event["name"])
  if name.startswith("command_buffer"):
    name = str(event["name"]).removeprefix("void ").split("(", 1)[0]
  return f"{name} @ {args['hlo_module']}" if args.get("hlo_module") else name


def _split_time(ops: list[dict]) -> tuple[dict[str, float], dict[str, float], float]:
  """(category -> exclusive microseconds, op name -> exclusive microseconds, window) on one device."""
  cats = [category(e["name"], e.get("args")) for e in ops]
  names = [op_name(e) for e in ops]
  edges = sorted([(float(e["ts"]), 1, i) for i, e in enumerate(ops)] +
                 [(float(e["ts"]) + float(e["dur"]), 0, i) for i, e in enumerate(ops)])
  by_cat, by_name = collections.Counter(), collections.Counter()
  active: set[int] = set()
  last = edges[0][0]
  for t, opening, i in edges:
    if t > last:
      if active:
        computing = [j for j in active if cats[j] != "collectives"]
        owner = max(computing or active, key=lambda j: (float(ops[j]["ts"]), -float(ops[j]["dur"])))
        by_cat[cats[owner]] += t - last
        by_name[names[owner]] += t - last
      else:
        by_cat["idle"] += t - last
      last = t
    (active.add if opening else active.discard)(i)
  return dict(by_cat), dict(by_name), edges[-1][0] - edges[0][0]


def summarize(trace: dict, top: int = 10, hlo: dict | None = None) -> dict:
  """Shares of device time per category and the top operations (over every device), or a summary
  with devices 0 when the trace holds no device operation. `hlo`: hlo_ops of the same profile."""
  per_device = device_ops(trace, hlo)
  by_cat, by_name, counts, cat_of, window = collections.Counter(), collections.Counter(), collections.Counter(), {}, 0.0
  for ops in per_device.values():
    cats, names, span = _split_time(ops)
    by_cat.update(cats)
    by_name.update(names)
    window += span
    for e in ops:
      name = op_name(e)
      counts[name] += 1
      cat_of.setdefault(name, category(e["name"], e.get("args")))
  shares = {c: (by_cat.get(c, 0.0) / window if window else 0.0) for c in CATEGORIES}
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return {"devices": len(per_device), "window_us": window, "shares": shares,
          "category_us": {c: by_cat.get(c, 0.0) for c in CATEGORIES},
          "top": [{"op": name, "category": cat_of[name], "us": us, "share": us / window if window else 0.0,
                   "count": counts[name]} for name, us in ranked]}


def format_summary(summary: dict, *, steps: int | None = None, header: str = "") -> list[str]:
  """Lines: a header, the shares, then the top operations by device time."""
  n = summary["devices"]
  if not n:
    return [f"{header}no device operations in the trace".strip()]
  per = f" | {summary['window_us'] / n / 1e3 / steps:.2f} ms per step per device" if steps else ""
  lines = [f"{header}{n} device{'s' if n > 1 else ''}{per}".strip(),
           "share of device time: " + " | ".join(f"{c} {100 * summary['shares'][c]:.1f}%" for c in CATEGORIES),
           "top operations by device time (all devices):"]
  width = max([len(t["op"]) for t in summary["top"]] + [2])
  for t in summary["top"]:
    lines.append(f"  {t['op']:<{width}}  {t['category']:<11}  {t['us'] / 1e3:9.3f} ms  {100 * t['share']:5.1f}%  "
                 f"x{t['count']}")
  return lines
