"""lmtiny.training.kernel_roofline: the kernels of a compiled XLA:GPU step, counted and put on a roofline.

The CI tests read a module written here in XLA:GPU's text form (the shapes of a compile for an
H100, cut small); with jax's CUDA plugin installed, the step of configs/tiny.py compiled for an H100
is counted against lmtiny.plan.counts.
"""
import pytest

from lm_fixtures import needs_cuda_plugin
from lmtiny import config as config_lib
from lmtiny.plan import counts
from lmtiny.training import benchmark, kernel_roofline as kr, lowering, step_cost

# A loop of 3 micro-steps (XLA's known trip count) holding a cuBLAS GEMM, a Triton GEMM fusion, a
# cast and an in-place dynamic-update-slice into an accumulator; then cuDNN attention once; the
# loop state is a nested tuple.
MODULE = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

%fused_convert (param_0: bf16[64,16]) -> f32[64,16] {
  %param_0 = bf16[64,16]{1,0} parameter(0)
  ROOT %convert.1 = f32[64,16]{1,0} convert(%param_0), metadata={op_name="jit(train_step)/convert_element_type"}
}

%fused_dus (param_0.1: f32[8,64,16], param_1: f32[64,16], param_2: s32[]) -> f32[8,64,16] {
  %param_0.1 = f32[8,64,16]{2,1,0} parameter(0)
  %param_1 = f32[64,16]{1,0} parameter(1)
  %bitcast.2 = f32[1,64,16]{2,1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[8,64,16]{2,1,0} dynamic-update-slice(%param_0.1, %bitcast.2, %param_2, %constant_0, %constant_0)
}

%triton_gemm (p0: bf16[64,32], p1: f32[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  %convert.3 = bf16[32,16]{1,0} convert(%p1)
  ROOT %dot.3 = bf16[64,16]{1,0} dot(%p0, %convert.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], (bf16[64,32], bf16[32,16]), f32[8,64,16], f32[32,16])) -> (s32[], (bf16[64,32], bf16[32,16]), f32[8,64,16], f32[32,16]) {
  %arg = (s32[], (bf16[64,32]{1,0}, bf16[32,16]{1,0}), f32[8,64,16]{2,1,0}, f32[32,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %xw = (bf16[64,32]{1,0}, bf16[32,16]{1,0}) get-tuple-element(%arg), index=1
  %x = bf16[64,32]{1,0} get-tuple-element(%xw), index=0
  %w = bf16[32,16]{1,0} get-tuple-element(%xw), index=1
  %acc = f32[8,64,16]{2,1,0} get-tuple-element(%arg), index=2
  %w32 = f32[32,16]{1,0} get-tuple-element(%arg), index=3
  %gemm = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %y = bf16[64,16]{1,0} get-tuple-element(%gemm), index=0
  %cast = f32[64,16]{1,0} fusion(%y), kind=kLoop, calls=%fused_convert
  %update = f32[8,64,16]{2,1,0} fusion(%acc, %cast, %i), kind=kLoop, calls=%fused_dus
  %tgemm = bf16[64,16]{1,0} fusion(%x, %w32), kind=kCustom, calls=%triton_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %next = (s32[], (bf16[64,32]{1,0}, bf16[32,16]{1,0}), f32[8,64,16]{2,1,0}, f32[32,16]{1,0}) tuple(%i, %xw, %update, %w32)
}

%cond (arg.1: (s32[], (bf16[64,32], bf16[32,16]), f32[8,64,16], f32[32,16])) -> pred[] {
  %arg.1 = (s32[], (bf16[64,32]{1,0}, bf16[32,16]{1,0}), f32[8,64,16]{2,1,0}, f32[32,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%arg.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main (state: (s32[], (bf16[64,32], bf16[32,16]), f32[8,64,16], f32[32,16]), q: bf16[2,4,128,64], k: bf16[2,4,128,64], v: bf16[2,4,128,64]) -> f32[] {
  %state = (s32[], (bf16[64,32]{1,0}, bf16[32,16]{1,0}), f32[8,64,16]{2,1,0}, f32[32,16]{1,0}) parameter(0)
  %loop = (s32[], (bf16[64,32]{1,0}, bf16[32,16]{1,0}), f32[8,64,16]{2,1,0}, f32[32,16]{1,0}) while(%state), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %q = bf16[2,4,128,64]{3,2,1,0} parameter(1)
  %k = bf16[2,4,128,64]{3,2,1,0} parameter(2)
  %v = bf16[2,4,128,64]{3,2,1,0} parameter(3)
  %attention = (bf16[2,4,128,64]{3,1,2,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %zero = f32[] constant(0)
}
"""
GEMM_FLOPS = 2 * 64 * 16 * 32
KEYS = 64.0


def test_counts_each_kernel_once_per_trip_with_its_flops_and_bytes():
  k = kr.kernels(MODULE, "h100", KEYS)
  assert dict(k.launches) == {"matmul": 6, "elementwise": 6, "attention": 1}
  assert k.flops["matmul"] == 6 * GEMM_FLOPS
  # cuBLAS: its result (not the workspace) and bf16 operands; Triton: the float32 weight it casts
  assert k.bytes["matmul"] == 3 * (64 * 16 * 2 + 64 * 32 * 2 + 32 * 16 * 2) + 3 * (64 * 16 * 2 + 64 * 32 * 2 + 32 * 16 * 4)
  # the cast reads bf16 and writes float32; the in-place update reads its row block and index and
  # writes the block, never the [8, 64, 16] accumulator
  assert k.bytes["elementwise"] == 3 * (64 * 16 * 6) + 3 * (2 * 64 * 16 * 4 + 4)
  q = 2 * 4 * 128 * 64
  assert k.flops["attention"] == 2 * 2 * q * KEYS  # QK^T and PV over KEYS keys a query
  assert k.bytes["attention"] == 3 * q * 2 + q * 2 + 2 * 4 * 128 * 4
  assert k.unknown_loops == 0


# The loss's pick of each row's target logit from a float32 [tokens, vocab] chunk, written in place
# into a [chunks, tokens] buffer; and a fusion that reads one row of a table through a dynamic slice.
PICKS = """HloModule jit_train_step, entry_computation_layout={()->f32[8,64]}

%fused_pick (param_0: f32[8,64], param_1: f32[64,1024], param_2: s32[64,2], param_3: s32[]) -> f32[8,64] {
  %param_0 = f32[8,64]{1,0} parameter(0)
  %param_1 = f32[64,1024]{1,0} parameter(1)
  %param_2 = s32[64,2]{1,0} parameter(2)
  %gather.1 = f32[64,1,1]{2,1,0} gather(%param_1, %param_2), offset_dims={1,2}, collapsed_slice_dims={}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
  %bitcast.1 = f32[1,64]{1,0} bitcast(%gather.1)
  %param_3 = s32[] parameter(3)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[8,64]{1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_3, %constant_0)
}

%fused_row (param_0.1: f32[4096,64], param_1.1: s32[], param_2.1: f32[1,64]) -> f32[1,64] {
  %param_0.1 = f32[4096,64]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant_1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,64]{1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_1), dynamic_slice_sizes={1,64}
  %param_2.1 = f32[1,64]{1,0} parameter(2)
  ROOT %add.1 = f32[1,64]{1,0} add(%dynamic-slice.1, %param_2.1)
}

ENTRY %main (buf: f32[8,64], logits: f32[64,1024], at: s32[64,2], i: s32[], table: f32[4096,64], x: f32[1,64]) -> f32[8,64] {
  %buf = f32[8,64]{1,0} parameter(0)
  %logits = f32[64,1024]{1,0} parameter(1)
  %at = s32[64,2]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %table = f32[4096,64]{1,0} parameter(4)
  %x = f32[1,64]{1,0} parameter(5)
  %row = f32[1,64]{1,0} fusion(%table, %i, %x), kind=kLoop, calls=%fused_row
  ROOT %picked = f32[8,64]{1,0} fusion(%buf, %logits, %at, %i), kind=kLoop, calls=%fused_pick
}
"""


def test_an_operand_read_through_a_gather_or_dynamic_slice_moves_what_they_pick():
  """Counted whole, the [64, 1024] logits would be 256 KB where the pick reads 64 floats; at
  d12_2026's shape that pick was the costliest elementwise kernel of the step (41 ms of 336)."""
  k = kr.kernels(PICKS, "h100", KEYS)
  assert k.launches["elementwise"] == 2
  pick = 64 * 4 + (64 * 4 + 64 * 2 * 4 + 4)  # writes its row of the buffer; reads 64 logits, the indices, i
  row = 64 * 4 + (64 * 4 + 4 + 64 * 4)  # writes a row; reads one row of the table, i and x
  assert k.bytes["elementwise"] == pick + row


def test_each_kernel_takes_the_longer_of_its_compute_and_its_traffic():
  k = kr.kernels(MODULE, "h100", KEYS)
  peak, bandwidth = counts.PEAK_FLOPS["h100"], 3.35e12
  assert k.seconds["matmul"] == pytest.approx(k.bytes["matmul"] / bandwidth)  # small GEMMs: traffic-bound
  assert k.seconds["elementwise"] == pytest.approx(k.bytes["elementwise"] / bandwidth)
  big = kr.kernels(MODULE, "h100", 1e9)  # a billion keys a query: the attention kernel is compute-bound
  assert big.seconds["attention"] == pytest.approx(big.flops["attention"] / peak)


def test_a_loop_without_a_known_trip_count_is_counted_once_and_said():
  k = kr.kernels(MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""), "h100", KEYS)
  assert k.launches["matmul"] == 2 and k.unknown_loops == 1


def test_the_prediction_divides_each_category_by_what_an_h100_reached():
  k = kr.Kernels()
  k.seconds.update(matmul=0.7, attention=0.38, elementwise=0.91)
  p = kr.predict(k, model_flops_per_step=1e15, tokens_per_step=1_000_000, devices=2, chip="h100")
  expected = sum(k.seconds[c] / kr.EFFICIENCY[c] for c in kr.CATEGORIES)
  assert p["seconds"] == pytest.approx(expected)
  assert p["tokens_per_s"] == pytest.approx(1_000_000 / expected)
  assert p["mfu"] == pytest.approx(1e15 / (2 * counts.PEAK_FLOPS["h100"] * expected))


def test_text_without_an_entry_computation_is_refused():
  with pytest.raises(ValueError, match="no ENTRY"):
    kr.kernels("HloModule empty\n", "h100", KEYS)


def test_the_report_sets_the_prediction_beside_a_timed_step():
  k = kr.kernels(MODULE, "h100", KEYS)
  predicted = {c: kr.predict(k, 1e9, 4096, 1, "h100") for c in counts.MFU_CONVENTIONS}
  kernels = {"chip": "h100", "launches": dict(k.launches), "flops": dict(k.flops), "bytes": dict(k.bytes),
             "seconds": dict(k.seconds), "predicted": predicted}
  compiled_only = benchmark.format_kernels({"kernels": kernels})
  assert [line.split()[0] for line in compiled_only] == ["kernels", "predicted"]
  assert compiled_only[0].startswith("kernels      13 launches a step per device; on the h100's roofline")
  timed = benchmark.format_kernels({"kernels": kernels, "median_step_s": 2 * predicted["nanochat"]["seconds"]})
  assert timed[1] == compiled_only[1] + "; the measured median step is 2.00x that"
  assert benchmark.format_kernels({"kernels": None}) == []  # not a GPU


@needs_cuda_plugin
def test_the_tiny_step_compiled_for_an_h100_runs_6n_gemm_flops_a_token():
  """XLA:GPU's step of configs/tiny.py for an H100, described on this host: its GEMMs run the 6 x
  matmul-parameter FLOPs a token that lmtiny.plan.counts counts, and its cuDNN attention runs once
  forward and once backward per layer and micro-step. (Under AdamW: Muon's Newton-Schulz GEMMs
  add 1.04M FLOPs a token of this 4,096-token step, 10%.)"""
  cfg = config_lib.load_file("configs/tiny.py")
  cfg.optim.name = "adamw"
  compiled, _, cfg, _ = lowering.compile_for_topology(cfg, "h100:1")
  m, t = cfg.model, cfg.train
  k = kr.kernels(compiled.as_text(), "h100", t.seq_len * step_cost.keys_fraction(m, t.seq_len))
  tokens = config_lib.global_batch_size(t) * t.seq_len
  assert k.flops["matmul"] / tokens == pytest.approx(6 * counts.matmul_params(m), rel=0.01)
  assert k.launches["attention"] == 2 * m.num_layers * config_lib.accumulation_steps(config_lib.resolve_batch(cfg, 1).train)
  assert k.unknown_loops == 0
