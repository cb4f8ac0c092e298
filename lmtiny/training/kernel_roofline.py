"""The kernels of a step compiled by XLA:GPU on a roofline, and the step time they predict.

    python -m lmtiny.bench --config configs/d24_2026.py --topology h100:1   # the kernels line

XLA:GPU's compiled module (`compiled.as_text()`) lists each kernel a step launches: cuBLAS and
Triton GEMMs, cuDNN's fused attention, and a fusion, copy or reduction for everything else. Each
reads its operands from HBM and writes its result there, so a kernel takes at least
max(FLOPs / peak, bytes / HBM bandwidth). `kernels(text)` sums that per category, the profile's
own (lmtiny.runs.trace_summary: matmul, attention, elementwise), walking from ENTRY through
`while` loops times XLA's known trip count (a double-buffered loop's body holds two iterations
and XLA counts half the trips), calls, conditionals (the costliest branch) and async wrappers.
An in-place dynamic-update-slice fusion moves its update, not the buffer it updates, and a
fusion operand read only through gathers or dynamic slices moves what they pick. GEMM FLOPs come
from the dot's shapes; attention FLOPs are the causal-half convention's
(lmtiny.training.hlo_cost.ATTENTION_MATMULS: 2 matmuls forward, 5 backward, over
`keys_per_query` keys).

`predict` divides each category's roofline time by the share of it an H100 reached, measured
(`EFFICIENCY`), so the step's time, tokens/s and MFU can be read off a compile on a machine without
a GPU. Collectives are left out: one GPU has none, and on several they are taken as overlapped.
Importing this module does not import JAX.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from lmtiny.plan.counts import PEAK_FLOPS
from lmtiny.plan.roofline import HBM_BANDWIDTH
from lmtiny.training import hlo_cost

CATEGORIES = ("matmul", "attention", "elementwise")
# The share of its roofline time each kind of kernel reached on one H100 (jax 0.11.2, cuDNN 9.19,
# 2026-11-27): the `bench --profile` device time of d12_2026 and d24_2026 in bf16 with full
# attention, over `kernels` of that commit's step (4809aa4) compiled for an H100 on a CPU host.
# d12_2026 (1.191 s a step): matmul 532 ms against 353.5 at peak (0.66), attention 181 against 70.0
# (0.39), elementwise 469 against 397.8 (0.85). d24_2026 (11.45 s): 6.45 s against 4.68 (0.73), 1.50
# against 0.56 (0.37), 3.45 against 2.94 (0.85). The means predict the two steps at 1.157 and
# 11.62 s; each step's own shares predict the other within 5%. (While gathered and sliced operands
# counted whole, the elementwise shares read 0.94 and 0.88.)
EFFICIENCY = {"matmul": 0.70, "attention": 0.38, "elementwise": 0.85}
FP8_SPEEDUP = 2.0  # H100/H200 dense fp8 tensor-core peak over bf16's (1,979 against 989 TFLOP/s)

_NAME = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = ")
_OPCODE = re.compile(r" ([\w\-]+)\(")
_BOOKKEEPING = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                          "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota"})
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast|send|recv)")


@dataclass
class Instruction:
  name: str
  shape: str
  op: str
  operands: list[str]
  attributes: str
  parameter: int | None = None  # a parameter's number


@dataclass
class Kernels:
  """Per step and per device: launches, FLOPs, bytes and roofline seconds of each category."""
  launches: dict = field(default_factory=lambda: defaultdict(float))
  flops: dict = field(default_factory=lambda: defaultdict(float))
  bytes: dict = field(default_factory=lambda: defaultdict(float))
  seconds: dict = field(default_factory=lambda: defaultdict(float))
  unknown_loops: int = 0  # while loops without a known trip count, counted once


def _bytes(shape: str) -> float:
  return hlo_cost.nbytes(t for t in hlo_cost.hlo_types(shape) if t[1] != "token")


def _dims(shape: str) -> tuple[int, ...]:
  """The dimensions of the first array in `shape` (a tuple's first element)."""
  types = hlo_cost.hlo_types(shape)
  return types[0][0] if types else ()


def _contracted(lhs: str, dims: list[str]) -> int:
  """The size of the dimensions `dims` of the array `lhs` (a dot's contracting dimensions)."""
  sizes = _dims(lhs)
  return math.prod(sizes[int(d)] for d in dims)


def _closing(s: str, start: int) -> int:
  """The index just past the parenthesis that closes the one at s[start]."""
  depth = 0
  for i in range(start, len(s)):
    depth += {"(": 1, ")": -1}.get(s[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced parentheses: {s[start:start + 80]}")


def _instruction(line: str) -> Instruction | None:
  """'%name = SHAPE op(%a, %b), attributes' (a tuple SHAPE may nest) -> Instruction."""
  head = _NAME.match(line)
  if head is None:
    return None
  at = head.end()
  shape_end = _closing(line, at) if line[at] == "(" else line.index(" ", at)
  op = _OPCODE.match(line, shape_end)
  if op is None:
    return None
  args_end = _closing(line, op.end() - 1)
  args = line[op.end():args_end - 1]
  return Instruction(head.group(1), line[at:shape_end], op.group(1), re.findall(r"%([\w.\-]+)", args),
                     line[args_end:], int(args) if op.group(1) == "parameter" else None)


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation: its instructions}, the ENTRY computation's name) of a compiled module's text."""
  computations, entry = {}, None
  for name, is_entry, chunk in hlo_cost.computations(text):
    computations[name] = [i for i in map(_instruction, chunk.splitlines()[1:]) if i is not None]
    entry = name if is_entry else entry
  if entry is None:
    raise ValueError("not a compiled HLO module: no ENTRY computation")
  return computations, entry


class _Walk:
  def __init__(self, text: str, keys_per_query: float, peak: float, bandwidth: float):
    self.computations, self.entry = parse(text)
    self.shapes = {i.name: i.shape for body in self.computations.values() for i in body}
    self.keys_per_query, self.peak, self.bandwidth = keys_per_query, peak, bandwidth

  def called(self, i: Instruction) -> list[str]:
    """The computations an instruction names: a fusion's, a call's, a conditional's branches."""
    return [c for c in re.findall(r"%([\w.\-]+)", i.attributes) if c in self.computations]

  def root(self, computation: str) -> Instruction | None:
    body = self.computations.get(computation, [])
    return body[-1] if body else None

  def fused_dot_flops(self, computation: str) -> float:
    """2 x result x contracted size of every dot inside a fusion (Triton GEMMs), nested ones too."""
    flops = 0.0
    for i in self.computations.get(computation, []):
      if i.op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", i.attributes)
        dims = list(filter(None, contracting.group(1).split(","))) if contracting else []
        flops += 2.0 * math.prod(_dims(i.shape)) * _contracted(self.shapes[i.operands[0]], dims)
      elif i.op == "fusion":
        flops += sum(self.fused_dot_flops(c) for c in self.called(i))
    return flops

  def cost(self, i: Instruction) -> tuple[str, float, float, float]:
    """(category, FLOPs, bytes, FLOP/s peak it runs against) of one kernel launch."""
    target = re.search(r'custom_call_target="([^"]+)"', i.attributes)
    target = target.group(1) if target else ""
    operands = [self.shapes.get(o, "") for o in i.operands]
    moved = _bytes(i.shape) + sum(_bytes(s) for s in operands)
    fp8 = any(s.startswith("f8") for s in operands)
    if "cublas" in target:
      result = i.shape.split(", s8[")[0]  # cuBLASLt's workspace is no traffic
      contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', i.attributes)
      dims = re.findall(r'"(\d+)"', contracting.group(1) if contracting else "")
      flops = 2.0 * math.prod(_dims(result)) * _contracted(operands[0], dims)
      return "matmul", flops, _bytes(result) + sum(_bytes(s) for s in operands), self.peak * (FP8_SPEEDUP if fp8 else 1)
    if "cudnn" in target and "fmha" in target.lower():
      matmuls = hlo_cost.ATTENTION_MATMULS["cudnn_bwd" if "Backward" in target else "cudnn_fwd"]
      queries = math.prod(_dims(operands[0]))  # q's elements: tokens x heads x head_dim
      return "attention", matmuls * 2.0 * queries * self.keys_per_query, moved, self.peak
    if i.op == "fusion":
      called = self.called(i)
      flops = sum(self.fused_dot_flops(c) for c in called)
      if flops:
        return "matmul", flops, moved, self.peak * (FP8_SPEEDUP if fp8 else 1)
      root = self.root(called[0]) if called else None
      if root is not None and root.op == "dynamic-update-slice":
        # in place: the updated buffer is neither read nor written whole, only the update's region
        buffer = i.shape.split("{")[0]
        return ("elementwise", 0.0, _bytes(self.shapes[root.operands[1]]) + self.read(operands, called[0], buffer),
                self.peak)
      if called:
        return "elementwise", 0.0, _bytes(i.shape) + self.read(operands, called[0]), self.peak
    return "elementwise", 0.0, moved, self.peak

  def read(self, operands: list[str], computation: str, skip: str | None = None) -> float:
    """Bytes a fusion reads of its operands (those of shape `skip` left out). One its computation
    reads only through gathers or dynamic slices moves what they pick: the loss's target logits
    are one float32 a row of a [tokens, vocab] chunk."""
    body = self.computations[computation]
    number = {i.name: i.parameter for i in body if i.op == "parameter"}
    uses = defaultdict(list)
    for i in body:
      for position, name in enumerate(i.operands):
        if name in number:
          uses[number[name]].append((i, position))
    moved = 0.0
    for k, shape in enumerate(operands):
      if skip is not None and shape.split("{")[0] == skip:
        continue
      picks = uses[k]
      if picks and all(u.op in ("gather", "dynamic-slice") and position == 0 for u, position in picks):
        moved += sum(_bytes(u.shape) for u, _ in picks)
      else:
        moved += _bytes(shape)
    return moved

  def walk(self, computation: str, times: float, into: Kernels) -> None:
    for i in self.computations[computation]:
      if i.op in _BOOKKEEPING or i.op.endswith("-done") or _COLLECTIVE.match(i.op):
        continue
      if i.op == "while":
        trips = hlo_cost.known_trip_count(i.attributes)
        body = re.search(r"body=%([\w.\-]+)", i.attributes).group(1)
        into.unknown_loops += trips is None
        self.walk(body, times * (trips or 1), into)
      elif i.op == "conditional" and self.called(i):
        self.walk(max(self.called(i), key=self.seconds), times, into)
      elif i.op in ("call", "async-start"):
        for c in self.called(i):
          self.walk(c, times, into)
      else:
        category, flops, moved, peak = self.cost(i)
        into.launches[category] += times
        into.flops[category] += times * flops
        into.bytes[category] += times * moved
        into.seconds[category] += times * max(flops / peak, moved / self.bandwidth)

  def seconds(self, computation: str) -> float:
    """Roofline seconds of one run of a computation (a conditional's branch)."""
    probe = Kernels()
    self.walk(computation, 1, probe)
    return sum(probe.seconds.values())


def kernels(text: str, chip: str, keys_per_query: float) -> Kernels:
  """The kernels one device launches in a step of the compiled module `text`, on `chip`'s roofline
  (counts.PEAK_FLOPS, roofline.HBM_BANDWIDTH); `keys_per_query`: the keys a query attends to on
  average (causal-half: half the sequence, less in windowed layers)."""
  w, step = _Walk(text, keys_per_query, PEAK_FLOPS[chip], HBM_BANDWIDTH[chip]), Kernels()
  w.walk(w.entry, 1, step)
  return step


def predict(k: Kernels, model_flops_per_step: float, tokens_per_step: int, devices: int, chip: str) -> dict:
  """The step time each category's roofline time over its measured EFFICIENCY gives, the tokens/s
  and the MFU (model FLOPs over devices x peak x time) it means."""
  seconds = sum(k.seconds[c] / EFFICIENCY[c] for c in CATEGORIES)
  return {"seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
          "mfu": model_flops_per_step / (devices * PEAK_FLOPS[chip] * seconds)}
