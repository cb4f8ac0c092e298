"""lmtiny.runs.trace_summary on synthetic traces whose device time per category is known: a GPU's
streams, a TPU's XLA Ops line, XLA:CPU's host events, each with the lines that must not count."""
import gzip
import json
import struct

import pytest

from lmtiny.runs import trace_summary
from lmtiny.runs.tensorboard import field, varint  # the protobuf wire encoding TensorBoard events use
from lmtiny.runs.trace_summary import category, summarize


def _meta(pid, process, threads):
  out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
  out += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}} for tid, name in threads.items()]
  return out


def _op(pid, tid, event_name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": event_name, "ts": ts, "dur": dur, "args": args}


def gpu_trace():
  """GPU 0 over 0-310 us: matmul 140, attention 50, collectives 40 (all-reduce 240-300 on the NCCL
  stream, its first 20 us hidden under a reduction), elementwise 40, idle 40 (200-240)."""
  compute, nccl, modules = 1, 2, 3
  events = _meta(7, "/device:GPU:0", {compute: "Stream #13(Compute)", nccl: "Stream #20(NCCL)",
                                      modules: "XLA Modules"})
  events += [
      _op(7, compute, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 0, 100, hlo_op="custom-call.3",
          hlo_module="jit_train_step"),
      _op(7, compute, "nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNN", 100, 30, hlo_op="custom-call.4",
          hlo_module="jit_train_step"),
      _op(7, compute, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", 130, 50,
          hlo_op="custom-call.9", hlo_module="jit_train_step"),
      _op(7, compute, "loop_add_fusion", 180, 20, hlo_op="loop_add_fusion.2", hlo_module="jit_train_step"),
      _op(7, compute, "input_reduce_fusion", 240, 20, hlo_op="input_reduce_fusion.1", hlo_module="jit_train_step"),
      _op(7, nccl, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 240, 60, hlo_op="all-reduce-start.1",
          hlo_module="jit_train_step"),
      _op(7, compute, "gemm_fusion_dot_1", 300, 10, hlo_op="gemm_fusion_dot.1", hlo_module="jit_train_step"),
      _op(7, modules, "jit_train_step(12)", 0, 310),  # the module's span: not an operation
  ]
  events += _meta(701, "/host:CPU", {4: "tf_XLAGpuClient"})  # the host's launch of a kernel: not device time
  events += [_op(701, 4, "custom-call.3", 0, 5, hlo_op="custom-call.3", hlo_module="jit_train_step", device_ordinal="0")]
  return {"traceEvents": events}


def tpu_trace():
  """TPU 0 over 0-520 us: matmul 220, elementwise 120, collectives 50, attention 80 (a Pallas
  kernel with a copy nested in it for 20 us), idle 50 (350-400)."""
  ops, modules, steps = 5, 6, 7
  events = _meta(3, "/device:TPU:0", {ops: "XLA Ops", modules: "XLA Modules", steps: "Steps"})
  events += [
      _op(3, ops, "fusion.12", 0, 200, hlo_category="convolution fusion",
          long_name="%fusion.12 = bf16[8,512]{1,0} fusion(bf16[8,128]{1,0} %p0, bf16[128,512]{1,0} %p1), kind=kOutput"),
      _op(3, ops, "fusion.40", 200, 100, hlo_category="loop fusion",  # an operand named all-reduce: still a loop
          long_name="%fusion.40 = bf16[8,128]{1,0} fusion(bf16[8,128]{1,0} %all-reduce.3), kind=kLoop"),
      _op(3, ops, "all-reduce.3", 300, 50, hlo_category="all-reduce"),
      _op(3, ops, "splash_mha_fwd_no_residuals.1", 400, 100, hlo_category="custom-call"),
      _op(3, ops, "copy.4", 420, 20, hlo_category="data formatting"),
      _op(3, ops, "convolution.7", 500, 20),
      _op(3, modules, "jit_train_step(3)", 0, 520),
      _op(3, steps, "1", 0, 520),
  ]
  return {"traceEvents": events}


def cpu_trace():
  """XLA:CPU, host events: device 0 over 0-90 us (matmul 30, elementwise 10, idle 10, collectives 40),
  device 1 over 0-60 us (matmul 20, elementwise 40); the end markers, the rendezvous inside the
  all-reduce and the Python thread's events are not operations."""
  python, worker = 1, 2
  events = _meta(701, "/host:CPU", {python: "python", worker: "tf_XLAPjRtCpuClient/123"})
  events += [
      _op(701, worker, "ynn_fusion", 0, 30, hlo_op="ynn_fusion", hlo_module="jit_f", device_ordinal="0"),
      _op(701, worker, "end: ynn_fusion", 30, 0.05),
      _op(701, worker, "wrapped_tanh", 30, 10, hlo_op="wrapped_tanh", hlo_module="jit_f", device_ordinal="0"),
      _op(701, worker, "all-reduce", 50, 40, hlo_op="all-reduce", hlo_module="jit_f", device_ordinal="0"),
      _op(701, worker, "Rendezvous", 51, 30, name="all reduce RendezvousKey"),
      _op(701, worker, "dot.1", 0, 20, hlo_op="dot.1", hlo_module="jit_f", device_ordinal="1"),
      _op(701, worker, "multiply_add_fusion", 20, 40, hlo_op="multiply_add_fusion", hlo_module="jit_f",
          device_ordinal="1"),
      _op(701, python, "PjitFunction(f)", 0, 200),
      _op(701, worker, "CommonPjRtLoadedExecutable::Execute (jit_f)", 0, 95, name="jit_f"),
  ]
  return {"traceEvents": events}


@pytest.mark.parametrize("trace, devices, window, expected", [
    (gpu_trace(), 1, 310, dict(matmul=140, attention=50, collectives=40, elementwise=40, idle=40)),
    (tpu_trace(), 1, 520, dict(matmul=220, attention=80, collectives=50, elementwise=120, idle=50)),
    (cpu_trace(), 2, 150, dict(matmul=50, attention=0, collectives=40, elementwise=50, idle=10)),
], ids=["gpu", "tpu", "cpu"])
def test_shares_equal_the_known_device_time(trace, devices, window, expected):
  summary = summarize(trace)
  assert summary["devices"] == devices and summary["window_us"] == pytest.approx(window)
  assert summary["category_us"] == pytest.approx({c: float(v) for c, v in expected.items()})
  assert summary["shares"] == pytest.approx({c: v / window for c, v in expected.items()})
  assert sum(summary["shares"].values()) == pytest.approx(1.0)


def test_top_operations_rank_exclusive_time_and_name_the_module():
  top = summarize(gpu_trace(), top=3)["top"]
  assert [(t["op"], t["category"]) for t in top] == [
      ("custom-call.3 @ jit_train_step", "matmul"), ("custom-call.9 @ jit_train_step", "attention"),
      ("all-reduce-start.1 @ jit_train_step", "collectives")]
  assert [t["us"] for t in top] == pytest.approx([100, 50, 40])  # the all-reduce's hidden 20 us are the reduction's
  lines = trace_summary.format_summary(summarize(gpu_trace()), steps=2)
  assert lines[0] == "1 device | 0.15 ms per step per device"
  assert lines[1] == ("share of device time: matmul 45.2% | attention 16.1% | collectives 12.9% | "
                      "elementwise 12.9% | idle 12.9%")


def test_kernels_inside_xla_gpus_command_buffers_are_named_by_kernel():
  """XLA:GPU launches most of a step as CUDA graphs: every kernel's hlo_op is then its graph's
  (command_buffer_N), which would rank graphs, not kernels (an H100 profile of d12_2026 read
  "command_buffer_968 41.4%")."""
  compute = 1
  events = _meta(7, "/device:GPU:0", {compute: "Stream #13(Compute)"})
  graph = {"hlo_op": "command_buffer_968", "hlo_module": "jit_train_step"}
  events += [
      _op(7, compute, "nvjet_sm90_tss_128x160_64x5_2x1_v_bz_NNT", 0, 30, **graph),
      _op(7, compute, "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*, void*)", 30, 50, **graph),
      _op(7, compute, "loop_convert_fusion", 80, 10, **graph),
      _op(7, compute, "nvjet_sm90_tss_128x160_64x5_2x1_v_bz_NNT", 90, 30, **graph),
  ]
  top = summarize({"traceEvents": events})["top"]
  assert [(t["op"], t["category"], t["count"]) for t in top] == [
      ("nvjet_sm90_tss_128x160_64x5_2x1_v_bz_NNT @ jit_train_step", "matmul", 2),
      ("cudnn::fusion::compute_dot_do_o_specialized<true, 128> @ jit_train_step", "attention", 1),
      ("loop_convert_fusion @ jit_train_step", "elementwise", 1)]


@pytest.mark.parametrize("name, args, expected", [
    ("all-gather-start.2", {}, "collectives"), ("reduce-scatter.1", {}, "collectives"),
    ("all-to-all.3", {}, "collectives"), ("all_gather.7", {}, "collectives"), ("collective-permute-done", {}, "collectives"),
    ("ncclDevKernel_AllGather_RING_LL", {"hlo_op": "all-gather-start"}, "collectives"),
    ("fusion.9", {"hlo_category": "all-reduce fusion"}, "collectives"),
    ("custom-call.2", {"long_name": '%custom-call.2 = (bf16[2,8,4,64]{3,2,1,0}) custom-call(%q, %k, %v), '
                                    'custom_call_target="__cudnn$fmhaSoftmax"'}, "attention"),
    ("flash_attention_fwd", {}, "attention"),
    ("custom-call.5", {"long_name": '%custom-call.5 = bf16[64,64]{1,0} custom-call(%a, %b), '
                                    'custom_call_target="__cublas$lt$matmul"'}, "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", {}, "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", {}, "matmul"),
    ("fusion.3", {"hlo_category": "convolution fusion"}, "matmul"), ("dot.12", {}, "matmul"),
    ("convolution", {}, "matmul"), ("xnn_fusion.2", {}, "matmul"),
    ("convert.3", {}, "elementwise"), ("transpose.8", {}, "elementwise"), ("copy-start.1", {}, "elementwise"),
    ("reduce.2", {}, "elementwise"), ("multiply_select_fusion", {}, "elementwise"),
    ("fusion.40", {"long_name": "%fusion.40 = f32[8] fusion(f32[8] %all-reduce.1, f32[8] %dot.2), kind=kLoop"},
     "elementwise"),
])
def test_category_of_xla_and_kernel_names(name, args, expected):
  assert category(name, args) == expected


def test_reads_gzipped_traces_and_ignores_a_trace_without_device_operations(tmp_path):
  path = tmp_path / "perfetto_trace.json.gz"
  path.write_bytes(gzip.compress(json.dumps(cpu_trace()).encode()))
  assert summarize(trace_summary.load_trace(str(path)))["window_us"] == pytest.approx(150)
  empty = summarize({"traceEvents": _meta(1, "/host:CPU", {1: "python"}) + [_op(1, 1, "f", 0, 5)]})
  assert empty["devices"] == 0 and trace_summary.format_summary(empty) == ["no device operations in the trace"]


def _msg(*fields) -> bytes:
  """A protobuf message: (number, bytes or str) length-delimited, (number, int) varint, (number, float) fixed64."""
  out = b""
  for number, value in fields:
    if isinstance(value, int):
      out += varint(number << 3) + varint(value)
    elif isinstance(value, float):
      out += varint(number << 3 | 1) + struct.pack("<d", value)
    else:
      out += field(number, value.encode() if isinstance(value, str) else value)
  return out


def _xspace(module: str, instructions) -> bytes:
  """An XSpace as jax.profiler writes it: the HLO of `module` in the "/host:metadata" plane (one of
  its event metadata's stats), beside a device plane whose event metadata is not HLO."""
  computation = _msg((1, "main.3_spmd"), *[(2, _msg((1, name), (2, opcode), (3, _msg((2, 11))),
                                                    (7, _msg((1, "op"), (2, op_name))))) for name, opcode, op_name in instructions])
  hlo = _msg((1, _msg((1, module), (2, "main.3_spmd"), (3, computation))))
  metadata = _msg((1, 7), (2, f"{module}(7)"), (5, _msg((1, 4), (2, 0.5))), (5, _msg((1, 4), (6, hlo))))
  plane = _msg((1, 3), (2, "/host:metadata"), (4, _msg((1, 7), (2, metadata))))
  device = _msg((1, 4), (2, "/host:CPU"), (4, _msg((1, 9), (2, _msg((1, 9), (2, "ynn_fusion.3"))))))
  return _msg((1, device), (1, plane))


def test_the_profiles_hlo_settles_what_xla_cpus_library_fusions_hold():
  """lmtiny's CPU steps hand reductions to YNNPACK (lmtiny.parallel.xla_options), XLA's default hands
  it dots: the fusions' names are the same, the op_name their HLO records is not."""
  instructions = [("ynn_fusion.3", "fusion", "jit(train_step)/jvp()/reduce_sum"),
                  ("ynn_fusion.4", "fusion", "jit(train_step)/bkrd,bksd->bkrs/dot_general"),
                  ("fusion.9", "fusion", "jit(train_step)/dot_general"),
                  ("exponential.2", "exponential", "jit(train_step)/exp")]
  hlo = trace_summary.hlo_ops(_xspace("jit_train_step", instructions))
  assert hlo == {("jit_train_step", name): (opcode, op_name) for name, opcode, op_name in instructions}
  events = _meta(701, "/host:CPU", {2: "tf_XLAPjRtCpuClient/1"})
  events += [_op(701, 2, name, 10 * i, 10, hlo_op=name, hlo_module="jit_train_step", device_ordinal="0")
             for i, (name, _, _) in enumerate(instructions)]
  # Only the programs the trace ran are decoded (a profile holds every program the process loaded).
  assert trace_summary.trace_modules({"traceEvents": events}) == {"jit_train_step"}
  assert trace_summary.hlo_ops(_xspace("jit_train_step", instructions), {"jit_train_step"}) == hlo
  assert trace_summary.hlo_ops(_xspace("jit_train_step", instructions), {"jit_eval_step"}) == {}
  def categories(**kw):
    return {t["op"].split(" @ ")[0]: t["category"] for t in summarize({"traceEvents": events}, **kw)["top"]}

  assert categories(hlo=hlo) == {"ynn_fusion.3": "elementwise", "ynn_fusion.4": "matmul", "fusion.9": "matmul",
                                 "exponential.2": "elementwise"}
  assert categories() == {"ynn_fusion.3": "matmul", "ynn_fusion.4": "matmul", "fusion.9": "elementwise",
                          "exponential.2": "elementwise"}  # by name alone: YNNPACK fusions are XLA's dots
  assert category("ynn_fusion.3", {}) == "matmul"
  assert category("ynn_fusion.3", {"op_name": "jit(f)/reduce_max"}) == "elementwise"
