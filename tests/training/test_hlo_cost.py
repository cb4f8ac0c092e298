"""lmtiny.training.hlo_cost and lmtiny.plan.roofline: FLOPs, bytes and collectives counted from
StableHLO text, on hand-written programs with known counts, and on the tiny config's real step."""
import jax
import pytest

from lm_fixtures import tiny_config
from lmtiny.parallel import sharding
from lmtiny.plan import counts, roofline
from lmtiny.training import hlo_cost, lowering, step_cost

# A [4, 8] x [8, 16] bf16 GEMM inside a 3-trip while loop, called twice from @main; a reduce of
# an f32 conversion of the bf16 GEMM result; an all_reduce over groups of 4.
LOOPED = """
module @jit_step attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%arg0: tensor<4x8xbf16>, %arg1: tensor<8x16xbf16>) -> (tensor<4x16xbf16> {jax.result_info = "result"}) {
    %0 = func.call @body(%arg0, %arg1) : (tensor<4x8xbf16>, tensor<8x16xbf16>) -> tensor<4x16xbf16>
    %1 = func.call @body(%arg0, %arg1) : (tensor<4x8xbf16>, tensor<8x16xbf16>) -> tensor<4x16xbf16>
    %2 = "stablehlo.all_reduce"(%1) <{channel_handle = #stablehlo.channel_handle<handle = 1, type = 1>, replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>, use_global_device_ids}> ({
    ^bb0(%a: tensor<bf16>, %b: tensor<bf16>):
      %s = stablehlo.add %a, %b : tensor<bf16>
      stablehlo.return %s : tensor<bf16>
    }) : (tensor<4x16xbf16>) -> tensor<4x16xbf16>
    return %2 : tensor<4x16xbf16>
  }
  func.func private @body(%arg0: tensor<4x8xbf16>, %arg1: tensor<8x16xbf16>) -> tensor<4x16xbf16> {
    %c = stablehlo.constant dense<0> : tensor<i32>
    %0:2 = stablehlo.while(%iterArg = %c, %iterArg_1 = %arg0) : tensor<i32>, tensor<4x8xbf16>
    cond {
      %c_2 = stablehlo.constant dense<3> : tensor<i32>
      %1 = stablehlo.compare LT, %iterArg, %c_2, SIGNED : (tensor<i32>, tensor<i32>) -> tensor<i1>
      stablehlo.return %1 : tensor<i1>
    } do {
      %1 = stablehlo.dot_general %iterArg_1, %arg1, contracting_dims = [1] x [0] : (tensor<4x8xbf16>, tensor<8x16xbf16>) -> tensor<4x16xbf16>
      %2 = stablehlo.convert %1 : (tensor<4x16xbf16>) -> tensor<4x16xf32>
      %3 = stablehlo.multiply %2, %2 : tensor<4x16xf32>
      %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
      %4 = stablehlo.reduce(%3 init: %cst) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x16xf32>, tensor<f32>) -> tensor<f32>
      %c_3 = stablehlo.constant dense<1> : tensor<i32>
      %5 = stablehlo.add %iterArg, %c_3 : tensor<i32>
      stablehlo.return %5, %iterArg_1 : tensor<i32>, tensor<4x8xbf16>
    }
    %9 = stablehlo.dot_general %0#1, %arg1, contracting_dims = [1] x [0] : (tensor<4x8xbf16>, tensor<8x16xbf16>) -> tensor<4x16xbf16>
    return %9 : tensor<4x16xbf16>
  }
}
"""


def test_gemm_flops_and_bytes_multiply_out_through_loops_and_calls():
  cost = hlo_cost.count(LOOPED)
  gemm = 2 * 4 * 8 * 16  # FLOPs of one [4, 8] x [8, 16]
  assert cost.work["flops_gemm"] == 2 * (3 + 1) * gemm  # two calls x (3 loop trips + 1 after the loop)
  assert cost.work["bytes_gemm"] == 2 * 4 * (4 * 8 + 8 * 16 + 4 * 16) * 2  # bf16 operands and result
  # The reduce reads its f32 input at the bf16 width it was converted from (fused), once per trip.
  assert cost.work["bytes_reduce"] == 2 * 3 * 4 * 16 * 2
  # other FLOPs: the square (64) and the reduce (64 inputs) per trip; the counter's add (1) too
  assert cost.work["flops_other"] == 2 * 3 * (64 + 64 + 1)
  assert cost.work["bytes_state"] == (4 * 8 + 8 * 16 + 4 * 16) * 2  # @main's arguments in, result out
  assert cost.links == {"all_reduce_payload": 4 * 16 * 2, "all_reduce": 2 * 3 / 4 * 4 * 16 * 2}  # a ring of 4
  assert cost.unknown_loops == 0


def test_a_loop_whose_bound_is_not_a_constant_counts_once_and_says_so():
  text = LOOPED.replace("%c_2 = stablehlo.constant dense<3> : tensor<i32>", "%c_2 = stablehlo.add %c, %c : tensor<i32>")
  cost = hlo_cost.count(text)
  assert cost.work["flops_gemm"] == 2 * (1 + 1) * 2 * 4 * 8 * 16 and cost.unknown_loops == 2


CUDNN = """
func.func public @main(%q: tensor<2x256x4x64xbf16>, %k: tensor<2x256x2x64xbf16>) -> (tensor<2x256x4x64xbf16>) {
  %0:2 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%q, %k, %k) {backend_config = "{\\22mask_type\\22: \\22CAUSAL\\22}"} : (tensor<2x256x4x64xbf16>, tensor<2x256x2x64xbf16>, tensor<2x256x2x64xbf16>) -> (tensor<2x256x4x64xbf16>, tensor<2x4x256xf32>)
  %1:3 = stablehlo.custom_call @__cudnn$fmhaSoftmaxBackward(%q, %k, %k, %0#1, %0#0, %0#0) {backend_config = ""} : (tensor<2x256x4x64xbf16>, tensor<2x256x2x64xbf16>, tensor<2x256x2x64xbf16>, tensor<2x4x256xf32>, tensor<2x256x4x64xbf16>, tensor<2x256x4x64xbf16>) -> (tensor<2x256x4x64xbf16>, tensor<2x256x2x64xbf16>, tensor<2x256x2x64xbf16>)
  %2 = stablehlo.custom_call @tpu_custom_call(%q) {backend_config = "", kernel_name = "mystery"} : (tensor<2x256x4x64xbf16>) -> tensor<2x256x4x64xbf16>
  return %1#0 : tensor<2x256x4x64xbf16>
}
"""


def test_fused_attention_counts_its_matmuls_over_the_keys_a_query_attends_to():
  cost = hlo_cost.count(CUDNN, keys_fraction=0.5)
  one = 2 * (2 * 256 * 4 * 64) * 256 * 0.5  # one [T, keys] x D product, causal half
  assert cost.work["flops_attention"] == (2 + 5) * one  # forward QK^T and PV; backward 5
  q, kv, lse = 2 * 256 * 4 * 64 * 2, 2 * 256 * 2 * 64 * 2, 2 * 4 * 256 * 4
  forward, backward = q + 2 * kv + q + lse, (q + 2 * kv + lse + 2 * q) + (q + 2 * kv)
  assert cost.work["bytes_kernel"] == forward + backward + 2 * q  # never a [T, T] score
  assert cost.uncounted == {"mystery": 1}  # a kernel without a FLOP rule is named, not guessed
  assert hlo_cost.count(CUDNN, keys_fraction=0.25).work["flops_attention"] == (2 + 5) * one / 2


def test_dtype_sizes():
  assert [hlo_cost.dtype_bytes(t) for t in ("f32", "bf16", "f8E4M3FN", "i1", "i64", "ui8")] == [4, 2, 1, 1, 8, 1]
  assert hlo_cost.tensor_types("(tensor<2x3xf32>, tensor<i32>)") == [((2, 3), "f32"), ((), "i32")]


def test_roofline_takes_the_slowest_resource_and_the_sum():
  peak, hbm, link = counts.PEAK_FLOPS["h100"], roofline.HBM_BANDWIDTH["h100"], roofline.LINK_BANDWIDTH["h100"]
  b = roofline.bound("h100", model_flops=peak * 0.5, flops=peak, bytes_moved=2 * hbm, link_bytes=link / 2, chips=2)
  assert b["seconds"] == pytest.approx({"compute": 0.5, "memory": 1.0, "links": 0.5})
  assert b["binds"] == "memory" and b["mfu_overlapped"] == pytest.approx(0.25)
  assert b["mfu_serial"] == pytest.approx(0.25 / 2.0)
  assert "h100 <= 25% (memory-bound; 12% serial)" in roofline.format_bounds(peak * 0.5, peak, 2 * hbm, link / 2, 2)


@pytest.mark.parametrize("platform", lowering.PLATFORMS)
def test_the_tiny_steps_flops_match_6n_plus_attention(platform):
  """The tiny config's step lowered for the platform (no remat: nothing recomputed): the GEMMs the
  count finds are 6N per token to within 1% (the fused loss runs the lm_head's three), and with
  the attention kernels' matmuls the total is within 1% of 6N + attention (causal-half) scaled
  for the kernels' 7 or 9 matmuls against the convention's 6."""
  t = 256
  cfg = tiny_config(seq_len=t, batch_tokens=4 * t)
  cfg.model.update(max_seq_len=t, dtype="auto", attention="auto", remat="none")
  text, _, lowered = lowering.lower_train_step(cfg, platform, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  p = step_cost.per_token(text, lowered, chips=1)
  m = lowered.model
  six_n = 6 * counts.matmul_params(m)
  attention = counts.train_flops_per_token(m, t) - six_n
  assert p["flops"]["gemm"] == pytest.approx(six_n, rel=0.01)
  matmuls = 7 if platform == "cuda" else 9  # cuDNN: forward 2 + backward 5; splash: 2 + dq 3 + dkv 4
  assert p["flops"]["attention_kernels"] == pytest.approx(attention * matmuls / 6, rel=0.01)
  assert p["model_flops"]["causal-half"] == pytest.approx(six_n + attention)
  assert 0 < p["bytes"]["total"] and p["bytes"]["state"] > 0 and not p["uncounted_kernels"]
  assert set(p["mfu_bound"]) == {"h100", "v5p", "v6e"}
  assert 0 < p["mfu_bound"]["h100"]["mfu_overlapped"] <= 1


# A compiled module: a 4-trip loop that all-reduces over 8 devices (f32[64,32] + a scalar) each
# trip, then one async all-gather (start and done: counted once) to 2 x bf16[16,32].
COMPILED = """
HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body.3 (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p = (s32[], f32[64,32]{1,0}) parameter(0)
  %all-reduce.1 = (f32[64,32]{1,0}, f32[]) all-reduce(%x, %y), channel_id=1, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %g)
}

ENTRY %main.9 (x: f32[64,32]) -> bf16[32,32] {
  %while.5 = (s32[], f32[64,32]{1,0}) while(%tuple.4), condition=%cond.2, body=%body.3, backend_config={"known_trip_count":{"n":"4"}}
  %all-gather-start.6 = bf16[32,32]{1,0} all-gather-start(%w), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  ROOT %all-gather-done.7 = bf16[32,32]{1,0} all-gather-done(%all-gather-start.6)
}
"""


def test_compiled_collectives_multiply_out_through_the_loops_xla_knows_the_length_of():
  cost = hlo_cost.compiled_collectives(COMPILED)
  reduced, gathered = 64 * 32 * 4 + 4, 32 * 32 * 2
  assert cost.work == {"all_reduce": 4, "all_gather": 1}  # per step: once per trip, and once
  assert cost.links == pytest.approx({"all_reduce_payload": 4 * reduced, "all_reduce": 4 * 2 * 7 / 8 * reduced,
                                      "all_gather_payload": gathered, "all_gather": gathered / 2})
  unknown = hlo_cost.compiled_collectives(COMPILED.replace(', backend_config={"known_trip_count":{"n":"4"}}', ""))
  assert unknown.work["all_reduce"] == 1 and unknown.unknown_loops == 1


# The same collectives right after SPMD partitioning (bf16 where the program had it) and as
# XLA:CPU compiles them (float32 everywhere): two reductions merged into one, an all-to-all split
# in two, one shape gathered in both dtypes, and shard_map's collectives sharing channel 1.
PARTITIONED = """
ENTRY %main (x: f32[64,32]) -> f32[8,8] {
  %ar.1 = bf16[64,32]{1,0} all-reduce(%x), channel_id=3, replica_groups=[1,8]<=[8], to_apply=%add
  %ar.2 = bf16[64,32]{1,0} all-reduce(%y), channel_id=4, replica_groups=[1,8]<=[8], to_apply=%add
  %a2a = bf16[1,2,96]{2,1,0} all-to-all(%z), channel_id=5, replica_groups=[4,2]<=[8], dimensions={1}
  %ag.1 = f32[16,8]{1,0} all-gather(%u), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
  %ag.2 = bf16[16,8]{1,0} all-gather(%v), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}
  %sm.1 = f32[8,8]{1,0} all-gather(%p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %sm.2 = bf16[8,8]{1,0} all-gather(%q), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
}
"""
CPU_COMPILED = """
ENTRY %main (x: f32[64,32]) -> f32[8,8] {
  %ar = (f32[64,32]{1,0}, f32[64,32]{1,0}) all-reduce(%x, %y), channel_id=3, replica_groups=[1,8]<=[8], to_apply=%add.clone_promoted
  %a2a.1 = (f32[1,1,96]{2,1,0}, f32[1,1,96]{2,1,0}) all-to-all(%z1, %z2), channel_id=5, replica_groups=[4,2]<=[8]
  %ag.1 = f32[16,8]{1,0} all-gather(%u), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
  %ag.2 = f32[16,8]{1,0} all-gather(%v), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}
  %sm.1 = f32[8,8]{1,0} all-gather(%p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %sm.2 = f32[8,8]{1,0} all-gather(%q), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
}
"""


def test_cpu_compiled_collectives_get_the_widths_the_partitioner_gave_them():
  """XLA:CPU moves bf16 in float32; counted with the partitioned module, a merged op's arrays take
  their shape's one dtype, a split op its channel's, and what neither settles stays float32."""
  as_compiled = hlo_cost.compiled_collectives(CPU_COMPILED).links
  assert as_compiled["all_reduce_payload"] == 2 * 64 * 32 * 4 and as_compiled["all_to_all_payload"] == 2 * 96 * 4
  links = hlo_cost.compiled_collectives(CPU_COMPILED, PARTITIONED).links
  assert links["all_reduce_payload"] == 2 * 64 * 32 * 2  # both merged reductions were bf16 [64, 32]
  assert links["all_to_all_payload"] == 2 * 96 * 2       # channel 5: bf16, as many elements
  # [16, 8] was gathered in both dtypes: channel 6 says float32, channel 7 bf16; [8, 8] too, but
  # shard_map's channel 1 names no single op, so both stay float32
  assert links["all_gather_payload"] == 16 * 8 * 4 + 16 * 8 * 2 + 2 * 8 * 8 * 4


def test_newer_xlas_mesh_axis_groups_are_sized_by_the_axes_they_span():
  """jax 0.12's XLA writes a group as the mesh's axes and those it spans: a 2 x 4 mesh's fsdp group is 4."""
  mesh_form = COMPILED.replace("replica_groups=[1,8]<=[8]", "replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}")
  reduced = 64 * 32 * 4 + 4
  assert hlo_cost.compiled_collectives(mesh_form).links["all_reduce"] == pytest.approx(4 * 2 * 3 / 4 * reduced)
  both = COMPILED.replace("replica_groups=[1,8]<=[8]", "replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}")
  assert hlo_cost.compiled_collectives(both).links["all_reduce"] == pytest.approx(4 * 2 * 7 / 8 * reduced)


def test_the_pallas_loss_kernels_count_their_lm_head_gemms_and_the_tiles_they_read_again():
  """Statistics 1, dx 2 (logits again, then dx), dw 2 GEMMs of N x D x V: tokens [4096, 512],
  lm_head [512, 2048], the per-token rows packed [4096, 128]. Bytes: each kernel's outer tiles'
  operand once, the inner one once per outer tile (4 token tiles of 1024 for the statistics and
  dx, 2 vocab tiles of 1024 for dw), the results once."""
  sig = "(tensor<4096x512xbf16>, tensor<512x2048xbf16>, tensor<4096x128xf32>) -> tensor<4096x128xf32>"
  text = "func.func public @main() -> () {\n" + "".join(
      f'  %{i} = stablehlo.custom_call @tpu_custom_call(%x, %w, %t) {{backend_config = "", kernel_name = "{k}"}} : {sig}\n'
      for i, k in enumerate(("loss_stats", "loss_dx", "loss_dw"))) + "}\n"
  cost = hlo_cost.count(text)
  assert cost.work["flops_loss_kernel"] == 5 * 2 * 4096 * 512 * 2048 and not cost.uncounted
  x, w, rows = 4096 * 512 * 2, 512 * 2048 * 2, 4096 * 512
  stats, dx, dw = x + 4 * w + rows + rows, x + 4 * w + rows + x, 2 * (x + rows) + w + 512 * 2048 * 4
  assert cost.work["bytes_kernel"] == stats + dx + dw
