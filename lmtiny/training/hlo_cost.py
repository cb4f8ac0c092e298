"""What a lowered step does, counted from its StableHLO text: FLOPs, bytes moved, collectives.

XLA's own cost analysis needs a compiled program of the local backend (a step lowered for cuda or
tpu on a CPU machine has none), and a lowering's unfused "bytes accessed" sums every elementwise
op's operands. So `count(text)` reads the program the accelerator would be handed, once per op,
multiplied out through calls (`func.call`), `while` loops (the trip count is the bound its `cond`
compares the counter with: jax's scan and fori_loop count up from 0) and shard_map bodies (run
once per device of their manual axes):

- **matmul FLOPs**: every `dot_general`, 2 x result elements x contracted size; and the fused
  attention kernels (cuDNN, splash), 2 x q elements x keys per query for each of their matmuls
  (forward 2, cuDNN backward 5, splash dq 3 and dkv 4), the keys being `keys_fraction` of the
  key length (what the causal-half convention counts: lmtiny.plan.counts); the Pallas loss
  kernels, 2 x N x D x V per GEMM (statistics 1, dx 2, dw 2).
- **other FLOPs**: one per result element of each elementwise arithmetic op, one per input
  element of each reduction (XLA's convention).
- **bytes moved** (fusion-ideal lower bound): what the step reads and writes if every elementwise,
  layout and slicing op fuses into a neighbour. Each GEMM reads its operands and writes its
  result; each kernel likewise (flash attention's q, k, v, output and statistics, never the
  scores; the Pallas loss kernels also what their tiles read again, lmtiny.kernels.loss_tiles); a reduction reads its input; a gather reads the rows it takes; a scatter reads its
  updates and writes its result; the step's inputs are read and its outputs written once (the
  optimizer's pass over weights and moments). Copies XLA leaves unfused come on top.
- **collectives**: each cross-device op with its payload (its operand per device; an all-gather's
  result) and the bytes a ring moves over one chip's links for it: all-reduce 2(n-1)/n x payload,
  all-gather and reduce-scatter (n-1)/n x the gathered size, all-to-all (n-1)/n, permute 1x, n the
  group size. Only the program's own collectives (shard_map's) are in the lowered text: the SPMD
  partitioner adds the sharded step's gradient reductions when XLA compiles it, which
  `compiled_collectives` counts in a compiled module (lmtiny.training.step_cost compiles one),
  by role: the gradients' reductions, the optimizer's collectives (Muon's matrices gathered back
  from the devices that orthogonalised them), the rest; and how many of each run inside loops
  (per micro-step), from the jax op names (named scopes) XLA keeps in the ops' metadata; at the
  dtypes of the module right after partitioning where one is given (`partitioned_dtypes`: a
  CPU-compiled module moves bf16 in float32).

Custom calls without a FLOP rule (a kernel under XLA's custom partitioning, which it lowers only
when compiling) are listed by name in `uncounted`. Importing this module does not import JAX.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from lmtiny.kernels import loss_tiles

ELEMENTWISE = frozenset("add subtract multiply divide remainder maximum minimum negate abs exponential "
                        "exponential_minus_one log log_plus_one logistic tanh sqrt rsqrt cbrt power sine cosine "
                        "tan atan2 floor ceil round_nearest_even round_nearest_afz sign compare select clamp "
                        "and or xor not".split())
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
               "collective_broadcast")
# Matmuls each attention kernel runs, in units of one [q, keys] x D product (QK^T or PV).
ATTENTION_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "cudnn_fwd": 2, "cudnn_bwd": 5}
# GEMMs of N x D x V each Pallas loss kernel runs (lmtiny.kernels.pallas_cross_entropy).
LOSS_GEMMS = dict(zip(loss_tiles.KERNELS, (1, 2, 2)))

_TYPE = re.compile(r"tensor<((?:\d+x)*)([a-zA-Z]\w*)>")
_OP = re.compile(r"^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?\"?(stablehlo|sdy|func|mhlo)\.(\w+)\"?")
_CALL = re.compile(r"\bcall @([\w$.]+)\(")
_FUNC = re.compile(r"\s*func\.func (?:public |private )?@([\w$.]+)\(")


@dataclass
class Cost:
  """Counts for one step (or one function, before it is multiplied out). `work`: FLOPs and bytes
  of the whole (global) program; `links`: collective bytes per device."""
  work: Counter = field(default_factory=Counter)
  links: Counter = field(default_factory=Counter)
  uncounted: Counter = field(default_factory=Counter)
  unknown_loops: int = 0
  # A compiled step's collectives by role (`collective_role`): "{role}_{kind}_payload" and
  # "{role}_{kind}_ops" per step, and in `in_loops` the part of them run inside `while` loops.
  roles: Counter = field(default_factory=Counter)
  in_loops: Counter = field(default_factory=Counter)

  def add(self, other: Cost, reps: float, shards: float = 1.0, loop: bool = False) -> None:
    """Adds `other` run `reps` times (on `shards` devices); `loop`: as a `while` body."""
    for key, value in other.work.items():
      self.work[key] += value * reps * shards
    for key, value in other.links.items():
      self.links[key] += value * reps
    for key, value in other.uncounted.items():
      self.uncounted[key] += value * reps
    for key, value in other.roles.items():
      self.roles[key] += value * reps
    for key, value in (other.roles if loop else other.in_loops).items():
      self.in_loops[key] += value * reps
    self.unknown_loops += other.unknown_loops


def tensor_types(text: str) -> list[tuple[tuple[int, ...], str]]:
  """Every `tensor<AxBxdtype>` in `text`, as (dims, dtype)."""
  return [(tuple(int(d) for d in dims.split("x") if d), dtype) for dims, dtype in _TYPE.findall(text)]


def dtype_bytes(dtype: str) -> float:
  """Bytes per element: f8E4M3FN 1, bf16 2, f32 4, i1 1 (a byte each, as XLA stores them)."""
  if dtype.startswith("f8") or dtype in ("i1", "pred"):
    return 1
  bits = re.search(r"(\d+)$", dtype)
  return int(bits.group(1)) / 8 if bits else 4


def nbytes(types) -> float:
  return sum(math.prod(dims) * dtype_bytes(dtype) for dims, dtype in types)


def _signature(line: str) -> tuple[list, list]:
  """(operand types, result types) of an op from the `: (operands) -> results` at its line's end."""
  cut = line.rfind("} : (") + 2 if "} : (" in line else line.rfind(" : ")
  sig = line[cut:]
  if "->" not in sig:  # `%y = stablehlo.add %a, %b : tensor<...>`: operands and result alike
    types = tensor_types(sig)
    return types, types[-1:]
  operands, results = sig.split("->", 1)
  return tensor_types(operands), tensor_types(results)


def _dot_flops(line: str, operands) -> float:
  lhs, result = operands[0][0], _signature(line)[1][0][0]
  contracting = re.search(r"contracting_dims = \[([\d, ]*)\]", line)
  size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i.strip()) if contracting else 1
  return 2.0 * math.prod(result) * size


def _attention(line: str, operands, keys_fraction: float) -> tuple[str, float] | None:
  """(kind, FLOPs) of a fused attention kernel call, or None if the line is none."""
  cudnn = re.search(r"custom_call @__cudnn\$fmha(\w*)\(", line)
  splash = re.search(r'kernel_name = "splash_\w*?(fwd|dq|dkv)\w*"', line)
  if not (cudnn or splash):
    return None
  q, k = [dims for dims, dtype in operands if dtype.startswith(("bf", "f"))][:2]
  if cudnn:  # BTNH: q [B, T, H, D], k [B, S, K, D]
    kind, keys = ("cudnn_bwd" if "Backward" in cudnn.group(1) else "cudnn_fwd"), k[1]
  else:  # splash: [..., T, D] and [..., S, D]
    kind, keys = splash.group(1), k[-2]
  return kind, ATTENTION_MATMULS[kind] * 2.0 * math.prod(q) * keys * keys_fraction


def _loss_kernel(name: str, operands) -> tuple[float, float]:
  """(GEMM FLOPs, HBM bytes) of a Pallas loss kernel from its operands, x [N, D] and w [D, V]
  first: its N x D x V GEMMs, and what its tiles read and write (lmtiny.kernels.loss_tiles:
  the operand its inner grid axis walks is read once per outer tile)."""
  (n, d), (_, v) = operands[0][0], operands[1][0]
  return LOSS_GEMMS[name] * 2.0 * n * d * v, loss_tiles.hbm_bytes(name, n, v, d)


def _group_size(line: str) -> int:
  groups = re.search(r"replica_groups = dense<[^>]*> : tensor<(\d+)x(\d+)x", line)
  if groups:
    return int(groups.group(2))
  return 2 if "source_target_pairs" in line else 1  # a permute sends its payload to one peer


def _collective(kind: str, line: str, operands, results) -> tuple[float, float]:
  """(payload, bytes over one chip's links) of a collective."""
  n = _group_size(line)
  payload = nbytes(results if kind == "all_gather" else operands)
  if kind == "all_reduce":
    return payload, 2.0 * (n - 1) / n * payload
  if kind == "reduce_scatter":
    return payload, (n - 1) / n * payload
  if kind in ("all_gather", "all_to_all"):
    return payload, (n - 1) / n * payload
  return payload, payload if n > 1 else 0.0


def _reads(types, names, widths: dict) -> float:
  """Bytes an op reads of its operands: each at its own element size, or at its source's where
  it is an elementwise function of a narrower array (a bf16 activation converted to f32 and
  squared is read as bf16 by the fused op)."""
  if len(names) != len(types):
    return nbytes(types)
  return sum(math.prod(dims) * min(dtype_bytes(dtype), widths.get(name.split("#")[0], math.inf))
             for (dims, dtype), name in zip(types, names))


def _operand_names(line: str) -> list[str]:
  """The SSA values an op line uses, in order (before its attributes' and signature's text)."""
  body = line.split(" = ", 1)[-1]
  cut = body.rfind("} : (") if "} : (" in body else body.rfind(" : ")
  return re.findall(r"%[\w#.]+", re.sub(r"\{.*", "", body[:cut] if cut > 0 else body))


def _op_cost(kind: str, line: str, keys_fraction: float, widths: dict | None = None) -> Cost:
  """One op's FLOPs, bytes and collective bytes, once."""
  cost = Cost()
  if kind in ("constant", "return", "while", "optimization_barrier"):
    return cost
  operands, results = _signature(line)
  names, widths = _operand_names(line), widths or {}
  w = cost.work
  if kind == "dot_general":
    w["flops_gemm"] += _dot_flops(line, operands)
    w["bytes_gemm"] += _reads(operands, names, widths) + nbytes(results)
  elif kind == "custom_call":
    attention = _attention(line, operands, keys_fraction)
    kernel = re.search(r'kernel_name = "(\w+)"', line)
    partitioned = "@CustomSPMDPartitioning" in line
    if kernel and kernel.group(1) in LOSS_GEMMS:  # its bytes are its tiles' (re-reads included)
      flops, moved = _loss_kernel(kernel.group(1), operands)
      w["flops_loss_kernel"] += flops
      w["bytes_kernel"] += moved
      return cost
    if attention:
      w["flops_attention"] += attention[1]
    elif kernel or partitioned:
      cost.uncounted[kernel.group(1) if kernel else "CustomSPMDPartitioning"] += 1
    if attention or kernel or partitioned:
      w["bytes_kernel"] += _reads(operands, names, widths) + nbytes(results)
  elif kind in COLLECTIVES:
    payload, over_links = _collective(kind, line, operands, results)
    cost.links[f"{kind}_payload"] += payload
    cost.links[kind] += over_links
  elif kind in ("reduce", "reduce_window"):
    inputs = max(1, len(operands) // 2)  # then as many init values
    w["flops_other"] += sum(math.prod(dims) for dims, _ in operands[:inputs])
    w["bytes_reduce"] += _reads(operands[:inputs], names[:inputs], widths)
  elif kind == "gather":
    w["bytes_gather"] += nbytes(results) + nbytes(operands[1:])
  elif kind == "scatter":
    w["bytes_gather"] += nbytes(operands[1:]) + nbytes(results)
  elif kind in ELEMENTWISE:
    w["flops_other"] += sum(math.prod(dims) for dims, _ in results)
  return cost


def _mesh_axes(text: str) -> dict[str, int]:
  mesh = re.search(r"sdy\.mesh @\w+ = <\[(.*?)\]>", text)
  return {k: int(v) for k, v in re.findall(r'"(\w+)"=(\d+)', mesh.group(1))} if mesh else {}


def _walk(lines: list[str], keys_fraction: float, mesh: dict) -> tuple[Cost, list]:
  """One function body: its own ops' Cost, and its calls as (callee, reps, shards). A stack of
  regions carries the multipliers: a `while` body runs its trip count, its cond is not counted, a
  shard_map body runs once per device of its manual axes. An op whose region comes before its
  signature (a generic-form scatter or all_reduce) is counted at the line that closes it."""
  cost, calls, widths = Cost(), [], _signature_widths(lines[0]) if lines else {}
  lines = lines[1:]
  stack = [(1.0, 1.0, None)]  # (reps, shards, op whose signature closes the region)
  constants, trips = {}, None
  for line in lines:
    stripped = line.strip()
    if stripped.startswith("}"):
      closed = stack.pop() if len(stack) > 1 else stack[-1]
      if closed[2] and " : " in stripped:  # its attributes on the opening line, its types on this one
        kind, opening = closed[2]
        cost.add(_op_cost(kind, f"{opening} {stripped}", keys_fraction, widths), *stack[-1][:2])
    reps, shards, _ = stack[-1]
    constant = re.match(r"(%\w+) = stablehlo\.constant dense<(-?\d+)> : tensor<i(?:32|64)>", stripped)
    if constant:
      constants[constant.group(1)] = int(constant.group(2))
    bound = re.search(r"stablehlo\.compare\s+LT, %\w+, (%\w+)", stripped)
    if bound and reps == 0:
      trips = constants.get(bound.group(1))
    if stripped.endswith("{"):
      if stripped == "cond {":
        stack.append((0.0, shards, None))
        trips = None
      elif stripped == "} do {":
        cost.unknown_loops += trips is None
        stack.append((reps * (trips if trips is not None else 1), shards, None))
      elif not stripped.startswith("}"):
        op = _OP.match(stripped)
        manual = re.search(r"manual_axes=\{([^}]*)\}", stripped)
        factor = math.prod(mesh.get(a, 1) for a in re.findall(r'"(\w+)"', manual.group(1))) if manual else 1
        later = op.group(2) if op and op.group(1) == "stablehlo" and stripped.endswith("({") else None
        body_reps = 0.0 if later in _REDUCERS else reps  # a reducer's body is its op's per-element sum
        stack.append((body_reps, shards * factor, (later, stripped[:-2]) if later else None))
      else:  # `}, {`: the next branch of the same op
        stack.append(stack[-1] if len(stack) > 1 else (reps, shards, None))
      continue
    if stripped.startswith("}") or reps == 0:
      continue
    for callee in _CALL.findall(stripped):
      calls.append((callee, reps, shards))
    op = _OP.match(stripped)
    if op and op.group(1) == "stablehlo":
      cost.add(_op_cost(op.group(2), stripped, keys_fraction, widths), reps, shards)
      _note_width(op.group(2), stripped, widths)
  return cost, calls


_REDUCERS = {"all_reduce", "reduce_scatter", "scatter", "reduce", "reduce_window", "sort", "select_and_scatter"}
# Ops an ideal fuser folds into their consumer: the consumer reads their inputs instead.
_PASS_THROUGH = ELEMENTWISE | {"convert", "reshape", "transpose", "slice", "dynamic_slice", "concatenate", "pad",
                               "reduce_precision", "bitcast_convert"}
_FREE = {"broadcast_in_dim", "iota", "constant"}  # made from (next to) nothing


def _note_width(kind: str, line: str, widths: dict) -> None:
  """Records the bytes per element a fused consumer reads for the value `line` defines."""
  name = re.match(r"\s*(%[\w.]+)(:\d+)? = ", line)
  if name is None or name.group(2):
    return
  if kind in _FREE:
    widths[name.group(1)] = 0
  elif kind in _PASS_THROUGH:
    widths[name.group(1)] = max((widths.get(o.split("#")[0], math.inf) for o in _operand_names(line)), default=0)
  else:
    result = _signature(line)[1]
    widths[name.group(1)] = dtype_bytes(result[-1][1]) if result else math.inf


def _signature_widths(line: str) -> dict:
  """Bytes per element of a function's arguments or a while loop's carried values, by name."""
  return {n: dtype_bytes(t) for n, t in re.findall(r"(%[\w.]+)(?: = %[\w#.]+)?: tensor<(?:\d+x)*([a-zA-Z]\w*)>", line)}


def _entry_bytes(signature: str) -> float:
  """The step's inputs read once and outputs written once, from @main's signature line."""
  arrow = signature.find(") -> ")
  return nbytes(tensor_types(signature[:arrow])) + nbytes(tensor_types(signature[arrow:])) if arrow > 0 else 0.0


def count(text: str, keys_fraction: float = 0.5) -> Cost:
  """The whole step's Cost, from its StableHLO text. `keys_fraction`: the share of the key length
  one query of an attention kernel attends to (0.5 causal; less with sliding windows)."""
  mesh = _mesh_axes(text)
  own, calls, entry = {}, {}, ""
  for chunk in re.split(r"\n(?=\s*func\.func )", text):
    head = _FUNC.match(chunk)
    if head is None:
      continue
    lines = chunk.splitlines()
    own[head.group(1)], calls[head.group(1)] = _walk(lines, keys_fraction, mesh)
    if head.group(1) == "main":
      entry = lines[0]
  totals: dict[str, Cost] = {}

  def total(name: str) -> Cost:
    if name not in totals:
      out = Cost()
      out.add(own.get(name, Cost()), 1.0)
      for callee, reps, shards in calls.get(name, []):
        out.add(total(callee), reps, shards)
      totals[name] = out
    return totals[name]

  step = total("main")
  step.work["bytes_state"] += _entry_bytes(entry)
  return step


# --- a compiled (HLO) module's collectives: what XLA's SPMD partitioner put in the step ----------

# Named scopes (jax.named_scope) the train step wraps its phases in (lmtiny.training.steps), read
# back from the compiled ops' op_name metadata to tell a collective's role.
GRADIENT_SCOPE = "gradient_sum"  # the step's one cross-device sum of per-device gradient sums
OPTIMIZER_SCOPE = "optimizer"    # the optimizer's update (Muon's split of its matrices over devices)
ROLES = ("gradient", "optimizer", "other")

_HLO_COLLECTIVE = re.compile(r"\s*(?:ROOT )?%\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                             r"collective-permute)(?:-start)?\(")
_HLO_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_REDUCTIONS = ("all_reduce", "reduce_scatter")


def collective_role(kind: str, op_name: str) -> str:
  """What a collective (`kind` as in COLLECTIVES) made from the jax op `op_name` does:
  "optimizer" inside OPTIMIZER_SCOPE; "gradient" for a reduction in GRADIENT_SCOPE or in the
  backward pass (`transpose(...)`: the partitioner's sums of sharded or replicated weights'
  gradients; under a tensor axis also those of the activations); "other" otherwise (weight
  all-gathers, the forward's collectives, metrics)."""
  scopes = op_name.split("/")
  if OPTIMIZER_SCOPE in scopes:
    return "optimizer"
  if kind in _REDUCTIONS and (GRADIENT_SCOPE in scopes or any(p.startswith("transpose(") for p in scopes)):
    return "gradient"
  return "other"


def operand_op_names(op_name: str, operands: int) -> list[str]:
  """The jax op name of each operand of an op: XLA's combiners join those of the ops they merge as
  `prefix/(name1:name2:...)`, one per operand in order; otherwise all share `op_name`."""
  for opening in (i for i, c in enumerate(op_name) if c == "(" and op_name.endswith(")")):
    parts = op_name[opening + 1:-1].split(":")
    if len(parts) == operands and opening > 0 and op_name[opening - 1] == "/":
      return [op_name[:opening] + part for part in parts]
  return [op_name] * operands


def _hlo_group_size(line: str) -> int:
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)
  if iota:
    return int(iota.group(1))
  # newer XLA (jax 0.12): the mesh's axes and those the group spans, e.g. mesh['data'=2,'fsdp'=4] {'fsdp'}
  axes = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if axes:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", axes.group(1))}
    return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", axes.group(2)))
  groups = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
  if groups:
    return len(groups.group(1).split(","))
  return 2 if "source_target_pairs" in line else 1


def _channel(line: str) -> str | None:
  found = re.search(r"\bchannel_id=(\d+)", line)
  return found.group(1) if found else None


def _elements(dims: str) -> int:
  return math.prod(int(d) for d in dims.split(",") if d)


class PartitionedDtypes(NamedTuple):
  """The dtypes the SPMD partitioner gave a module's collectives (`partitioned_dtypes`)."""
  by_shape: dict[tuple[str, str], set[str]]   # (kind, dims) -> the dtypes of arrays of that shape
  by_channel: dict[str, tuple[str, int]]      # channel id -> (its one dtype, elements)


def partitioned_dtypes(hlo_text: str) -> PartitionedDtypes:
  """The collectives' dtypes in a module right after SPMD partitioning, before the backend's
  passes. XLA:CPU runs every bf16 op in float32, collectives too (its float normalization wraps
  them in converts); this gives a CPU-compiled collective back the width the partitioner gave it,
  which is what a GPU or TPU moves. Later passes merge ops (combiners: the shapes stay) and split
  them (all-to-all into pieces: the channel id stays), hence the two keys."""
  by_shape, by_channel, channels = {}, {}, Counter()
  for line in hlo_text.splitlines():
    op = _HLO_COLLECTIVE.match(line)
    if not op:
      continue
    kind, shapes, channel = op.group(2).replace("-", "_"), _HLO_SHAPE.findall(op.group(1)), _channel(line)
    for dtype, dims in shapes:
      by_shape.setdefault((kind, dims), set()).add(dtype)
    channels[channel] += 1
    if len({dtype for dtype, _ in shapes}) == 1:
      by_channel[channel] = (shapes[0][0], sum(_elements(dims) for _, dims in shapes))
  # shard_map's own collectives share one channel id: it names none of them
  return PartitionedDtypes(by_shape, {c: v for c, v in by_channel.items() if c and channels[c] == 1})


def _partitioned_shapes(kind: str, shapes: list, line: str, dtypes: PartitionedDtypes) -> list:
  """`shapes` (dtype, dims) of a CPU-compiled collective with the partitioner's dtypes where they
  are unambiguous: an array of a shape all its kind's arrays had in one dtype, else all of an op
  whose channel had one dtype and as many elements."""
  def of_shape(dtype, dims):
    found = dtypes.by_shape.get((kind, dims), set())
    return next(iter(found)) if dtype == "f32" and len(found) == 1 else dtype

  shapes = [(of_shape(dtype, dims), dims) for dtype, dims in shapes]
  own, elements = dtypes.by_channel.get(_channel(line), (None, 0))
  if own and {dtype for dtype, _ in shapes} == {"f32"} and sum(_elements(dims) for _, dims in shapes) == elements:
    shapes = [(own, dims) for _, dims in shapes]
  return shapes


def _hlo_collective(kind: str, types: str, line: str, cost: Cost, dtypes: PartitionedDtypes | None = None) -> None:
  """Adds one compiled collective to `cost`: its payload (the array reduced or gathered: a
  reduce-scatter's operand, n times its result) and link bytes by kind, and by role per operand;
  with `dtypes` (`partitioned_dtypes`), at the partitioner's widths."""
  n = _hlo_group_size(line)
  shapes = [(dtype, dims) for dtype, dims in _HLO_SHAPE.findall(types) if dtype not in ("token", "u32", "s32")]
  if dtypes:
    shapes = _partitioned_shapes(kind, shapes, line, dtypes)
  sizes = [_elements(dims) * dtype_bytes(dtype) * (n if kind == "reduce_scatter" else 1) for dtype, dims in shapes]
  factor = {"all_reduce": 2.0 * (n - 1) / n, "collective_permute": 1.0 if n > 1 else 0.0}.get(kind, (n - 1) / n)
  cost.links[f"{kind}_payload"] += sum(sizes)
  cost.links[kind] += factor * sum(sizes)
  cost.work[kind] += 1
  op_name = re.search(r'op_name="([^"]*)"', line)
  names = operand_op_names(op_name.group(1) if op_name else "", len(sizes))
  for role in {collective_role(kind, name) for name in names}:
    cost.roles[f"{role}_{kind}_ops"] += 1
  for size, name in zip(sizes, names):
    cost.roles[f"{collective_role(kind, name)}_{kind}_payload"] += size


def hlo_types(text: str) -> list[tuple[tuple[int, ...], str]]:
  """Every array type `f32[8,128]` in compiled (HLO) text, as (dims, dtype): `tensor_types` for HLO."""
  return [(tuple(int(d) for d in dims.split(",") if d), dtype) for dtype, dims in _HLO_SHAPE.findall(text)]


def known_trip_count(line: str) -> int | None:
  """The trip count XLA knows for the `while` on this line of a compiled module, or None."""
  trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  return int(trips.group(1)) if trips else None


def computations(hlo_text: str) -> list[tuple[str, bool, str]]:
  """A compiled (HLO) module's computations, in order: (name, whether it is the ENTRY, its text)."""
  out = []
  for chunk in re.split(r"\n(?=ENTRY |%?[\w.\-]+ \()", hlo_text):
    head = re.match(r"(ENTRY )?%?([\w.\-]+) \(", chunk)
    if head:
      out.append((head.group(2), bool(head.group(1)), chunk))
  return out


def compiled_collectives(hlo_text: str, partitioned: str | None = None) -> Cost:
  """The cross-device ops of a compiled HLO module per step, by kind (`links`: payload and bytes
  over one chip's links as in `count`; `work`: how many ops run, by kind; `roles`: payload and
  ops by role and kind, `collective_role`, with `in_loops` the part inside `while` loops: the
  micro-step loop's), multiplied out through `while` bodies (XLA's known trip count; else once,
  counted in `unknown_loops`) and the computations ops call. Async pairs count once (their start).
  `partitioned`: the same module right after SPMD partitioning, for the collectives' own dtypes
  (`partitioned_dtypes`)."""
  dtypes = partitioned_dtypes(partitioned) if partitioned else None
  own, edges, entry = {}, {}, None
  for name, is_entry, chunk in computations(hlo_text):
    cost, out = Cost(), []
    entry = name if is_entry else entry
    for line in chunk.splitlines()[1:]:
      op = _HLO_COLLECTIVE.match(line)
      if op:
        _hlo_collective(op.group(2).replace("-", "_"), op.group(1), line, cost, dtypes)
      body = re.search(r"\bbody=%([\w.\-]+)", line)
      if body:
        trips = known_trip_count(line)
        cost.unknown_loops += trips is None
        out.append((body.group(1), float(trips or 1), True))
      out.extend((callee, 1.0, False) for callee in re.findall(r"\b(?:calls|to_apply)=%([\w.\-]+)", line))
    own[name], edges[name] = cost, out
  totals: dict[str, Cost] = {}

  def total(name: str) -> Cost:
    if name not in totals:
      totals[name] = Cost()
      totals[name].add(own.get(name, Cost()), 1.0)
      for callee, reps, loop in edges.get(name, []):
        totals[name].add(total(callee), reps, loop=loop)
    return totals[name]

  return total(entry) if entry else Cost()
