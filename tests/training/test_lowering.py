"""lmtiny.training.lowering: the train step lowered for an H100 (cuDNN) and a TPU (splash) on this CPU.

Nothing here compiles or runs for the accelerator; the StableHLO is what it would be handed.
These checks fail if attention falls back to XLA on the target, if a remat policy reruns the
fused forward, if cuDNN gets a mask tensor instead of its causal mask type, or if q and k/v
reach cuDNN's partitioner sharded unlike."""
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from lm_fixtures import HAS_CUDA_PLUGIN, load_config_module, needs_cuda_plugin, needs_libtpu, ROOT, tiny_config
from lmtiny import bench, config as config_lib
from lmtiny.training import benchmark
from lmtiny.errors import ConfigError
from lmtiny.model import attention as attn_lib
from lmtiny.parallel import sharding
from lmtiny.plan import counts
from lmtiny.training import lowering
from lmtiny.training.resolved import resolve_run

T = 256  # long enough for packed runs (T // 64 = 4) and a splash tile (256)


def _cudnn_operands(text):
  """The operand types of the first cuDNN forward call in the StableHLO."""
  signature = re.search(r"custom_call @__cudnn\$fmhaSoftmax\(.*?\} : \(([^)]*)\)", text).group(1)
  return [x.strip() for x in signature.split(",")]


def _cfg(**model):
  cfg = tiny_config(seq_len=T, batch_tokens=4 * T)
  cfg.model.update(**{"max_seq_len": T, "d_model": 128, "num_heads": 2, "dtype": "auto", "attention": "auto", **model})
  return cfg


def _lower(cfg, platform, mesh_shape=None):
  devices = jax.devices()[:1] if mesh_shape is None else jax.devices()
  if mesh_shape is not None:
    cfg.mesh.update(**mesh_shape)
  text, _, lowered = lowering.lower_train_step(cfg, platform, sharding.make_mesh(cfg.mesh, devices))
  return text, lowering.summarize(text, T), lowered


def test_auto_resolves_as_on_the_target():
  cfg = _cfg()
  gpu, tpu = lowering.for_platform(cfg, "cuda").model, lowering.for_platform(cfg, "tpu").model
  assert (gpu.attention, gpu.dtype, tpu.attention, tpu.dtype) == ("cudnn", "bfloat16", "splash", "bfloat16")
  cfg.train.seq_len = 200  # no splash tile divides it
  assert lowering.for_platform(cfg, "tpu").model.attention == "xla"
  assert cfg.model.attention == "auto" and cfg.model.dtype == "auto"  # the caller's config is untouched


def test_cuda_step_calls_cudnn_once_per_layer_with_packed_causal_runs():
  text, s, cfg = _lower(_cfg(), "cuda")
  assert cfg.model.attention == "cudnn"
  assert s["cudnn"] == {"forward": 2, "backward": 2}
  assert s["mask_types"] == ["PADDING_CAUSAL"] and s["max_runs"] == [T // 64]
  assert s["square"] == {}  # no [T, T] mask, bias or score tensor anywhere in the step
  # q, k and v, then the run lengths [B, M] twice and the run starts [B, M + 1] twice: no bias
  # or mask operand.
  operands = _cudnn_operands(text)
  assert operands[0] == operands[1] == operands[2] == f"tensor<4x{T}x2x64xbf16>"
  assert operands[3:] == ["tensor<4x4xi32>"] * 2 + ["tensor<4x5xi32>"] * 2


@pytest.fixture
def kv_offset_stride(monkeypatch):
  """Makes jax's packed kv offsets stride by the query's heads ("query", jax <= 0.11.0) or by the
  kv heads ("kv", later jax), whichever jax is installed, and re-asks the probe."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
  original = cudnn_fmha._fix_seqlen_offsets  # pylint: disable=protected-access

  def use(heads):
    def fix(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
      # With key=query every jax strides both by the query's heads; "kv" rescales to the kv heads.
      out = original(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, query)
      return (*out[:3], out[3] if heads == "query" else out[3] // query.shape[2] * key.shape[2])
    monkeypatch.setattr(cudnn_fmha, "_fix_seqlen_offsets", fix)
    attn_lib.packed_gqa_needs_repeat.cache_clear()

  yield use
  attn_lib.packed_gqa_needs_repeat.cache_clear()


@pytest.mark.slow(seconds=3)  # measured on 2 cores: out of the inner loop
def test_gqa_packed_rows_repeat_kv_heads_only_where_jax_strides_kv_runs_by_query_heads(kv_offset_stride):
  kv_offset_stride("query")
  assert attn_lib.packed_gqa_needs_repeat()
  text, s, _ = _lower(_cfg(num_heads=4, num_kv_heads=2), "cuda")
  assert s["cudnn"] == {"forward": 2, "backward": 2}
  assert _cudnn_operands(text)[:3] == [f"tensor<4x{T}x4x32xbf16>"] * 3
  kv_offset_stride("kv")
  assert not attn_lib.packed_gqa_needs_repeat()
  text, s, _ = _lower(_cfg(num_heads=4, num_kv_heads=2), "cuda")
  assert s["cudnn"] == {"forward": 2, "backward": 2}
  assert _cudnn_operands(text)[:3] == [f"tensor<4x{T}x4x32xbf16>"] + [f"tensor<4x{T}x2x32xbf16>"] * 2


def test_the_repeat_probe_answers_repeat_when_jax_offers_no_answer(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(cudnn_fmha, "_fix_seqlen_offsets")
  attn_lib.packed_gqa_needs_repeat.cache_clear()
  try:
    assert attn_lib.packed_gqa_needs_repeat()
  finally:
    monkeypatch.undo()
    attn_lib.packed_gqa_needs_repeat.cache_clear()


@pytest.mark.parametrize("remat,forwards", [("save_attn_out", 2), ("minimal", 2), ("full", 4)])
def test_remat_policies_that_save_the_attention_output_run_the_cudnn_forward_once(remat, forwards):
  _, s, _ = _lower(_cfg(remat=remat), "cuda")
  assert s["cudnn"] == {"forward": forwards, "backward": 2}


@pytest.mark.slow(seconds=4)  # measured on 2 cores: out of the inner loop
def test_value_embedding_rows_are_looked_up_once_per_micro_step_under_fsdp():
  # Looked up inside a layer's remat region, the rows were gathered again for the backward (4
  # gathers here before, with jax 0.10 and 0.12) and under FSDP each whole table all-gathered
  # again (4 all-gathers with jax 0.10; 0.12's XLA merged those). remat minimal: the same.
  cfg = tiny_config()  # 4 layers, 2 of them with a [128, 1 x 16] table
  cfg.model.update(num_layers=4, num_kv_heads=1, value_embeds=True, remat="full")
  cfg.mesh.update(data=1, fsdp=8)
  hlo = lowering.compile_train_step(cfg, devices=jax.devices())[0].as_text()
  assert len(re.findall(r" gather\([^\n]*slice_sizes=\{1,16\}", hlo)) == 2  # rows of 1 x 16
  assert len(re.findall(r"= \S+\[128,16\]\S* all-gather(?:-start)?\(", hlo)) == 2


def test_scanned_layers_lower_one_cudnn_call_pair_in_the_layer_body():
  _, s, _ = _lower(_cfg(scan_layers=True, remat="save_attn_out"), "cuda")
  assert s["cudnn"] == {"forward": 1, "backward": 1}


def test_packed_cudnn_is_sized_by_the_packers_cap_on_documents_per_row():
  cfg = _cfg()
  cfg.data.max_docs_per_row = 3
  _, s, _ = _lower(cfg, "cuda")
  assert s["mask_types"] == ["PADDING_CAUSAL"] and s["max_runs"] == [3]  # not T // 64 = 4


@pytest.mark.parametrize("name", ["d12_2026", "d24_2026"])
def test_the_2026_configs_run_the_causal_cudnn_kernel_as_nanochat_does(name):
  """nanochat's rows attend across their documents, and so do the 2026 configs': the cuda step
  calls cuDNN with its causal mask type, never the packed layout (an H100 profile of d12_2026 with
  the document mask spent 35% of the step in it)."""
  cfg = load_config_module(name).get_config()
  cfg.model.num_layers = 2
  cfg.train.update(seq_len=T, batch_tokens=T, micro_batch_size=0, device_batch_size=0, tokens_per_param=0.0,
                   auto_batch=False, steps=2)
  cfg.model.max_seq_len = T
  _, s, lowered = _lower(cfg, "cuda")
  assert lowered.model.attention == "cudnn" and s["cudnn"]["forward"] == 2
  assert s["mask_types"] == ["CAUSAL"] and s["max_runs"] == [1]  # one run: the whole row


def test_cudnn_without_segment_ids_uses_the_causal_mask_type_and_no_mask_operand():
  q = jax.ShapeDtypeStruct((2, T, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, T, 2, 64), jnp.bfloat16)

  def loss(q, k, v):
    return jnp.sum(attn_lib.attention(q, k, v, impl="auto").astype(jnp.float32))

  with lowering.target("cuda"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  s = lowering.summarize(text, T)
  assert s["cudnn"] == {"forward": 1, "backward": 1} and s["mask_types"] == ["CAUSAL"] and s["square"] == {}
  assert len(_cudnn_operands(text)) == 3  # q, k, v (k/v keep their 2 heads: cuDNN's native GQA)
  assert attn_lib.target_platform() == "cpu"  # restored on leaving the target
  if not HAS_CUDA_PLUGIN:  # with it, jax's own cuDNN probes answer (the training guide's GPU check)
    with pytest.raises(RuntimeError, match="cuDNN"):  # and so are jax's cuDNN probes
      attn_lib.attention(*(jnp.zeros(x.shape, x.dtype) for x in (q, kv, kv)), impl="cudnn")


def test_cuda_step_under_a_tensor_mesh_hands_cudnn_to_the_partitioner():
  _, s, _ = _lower(_cfg(num_heads=4, num_kv_heads=1), "cuda", {"data": 2, "fsdp": 1, "tensor": 4})
  assert s["partitioned"] == 4 and s["square"] == {}  # 2 layers x (forward, backward)


@pytest.mark.parametrize("mesh_shape,h,k", [({"data": 8}, 4, 4), ({"data": 2, "tensor": 4}, 8, 2),
                                            ({"data": 2, "tensor": 4}, 4, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 6, 3),
                                            ({"tensor": 2, "data": 4}, 3, 1)])
def test_qkv_specs_pass_cudnns_own_partitioner_check(mesh_shape, h, k):
  """jax's cuDNN partitioner demands one spec for q, k and v and no split sequence or head dim;
  the specs lmtiny gives them (after repeating kv heads) pass its own check."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha
  shape = {"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape}
  k_repeated = k * sharding.kv_head_repeats(h, k, shape)
  q_spec, kv_spec, _ = sharding.attention_specs((8, T, h, 64), (8, T, k_repeated, 64), shape)
  cudnn_fmha._check_qkv_bias_mask_spec(tuple(q_spec), tuple(kv_spec), tuple(kv_spec), None,
                                       cudnn_fmha.AttentionLayout.BTNH.value)
  assert q_spec[0] is not None or shape["data"] * shape["fsdp"] == 1  # the batch is split
  # An unrepeated MQA kv head under tensor=4 is what the check rejects.
  with pytest.raises(ValueError, match="same sharding"):
    cudnn_fmha._check_qkv_bias_mask_spec(tuple(P("data", None, "tensor", None)), tuple(P("data", None, None, None)),
                                         tuple(P("data", None, None, None)), None, cudnn_fmha.AttentionLayout.BTNH.value)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 1, "tensor": 4}])
def test_tpu_step_lowers_splash_to_mosaic_once_per_layer(mesh_shape):
  _, s, cfg = _lower(_cfg(num_heads=4, num_kv_heads=1), "tpu", mesh_shape)
  assert cfg.model.attention == "splash"
  assert s["splash"] == {"splash_mqa_fwd_segmented_residuals": 2, "splash_mqa_dq_segmented_no_residuals": 2,
                         "splash_mqa_dkv_segmented_no_residuals": 2}
  assert s["cudnn"] == {"forward": 0, "backward": 0} and s["square"] == {}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_step_lowered_for_an_accelerator_runs_the_fused_loss_in_three_lm_head_gemms(platform):
  """auto picks the fused loss on the target (logits, dx, dw once each); the chunked loss, over
  several chunks, recomputes the logits in the backward: four. Neither holds [tokens, V] in f32."""
  vocab, tokens = 320, 4 * T  # a vocab no other width shares
  for kernel, gemms in (("auto", 3), ("chunked", 4)):
    text, _, cfg = _lower(_cfg(loss_kernel=kernel, loss_chunk_tokens=T, vocab_size=vocab), platform)
    s = lowering.summarize(text, T, vocab=vocab)
    assert s["lm_head_gemms"] == gemms, kernel
    assert s["vocab_f32"][0][0] == f"{T}x{vocab}xf32" and f"{tokens}x{vocab}xf32" not in text


def test_the_pallas_loss_lowers_for_tpu_as_three_mosaic_kernels_and_is_refused_for_cuda():
  """model.loss_kernel=pallas: no lm_head GEMM left to XLA, and the only float32 [.., V] array is
  the weight's gradient [D, V] (the logits stay in the kernels' VMEM). GPU grids cannot run it."""
  vocab = 320
  text, _, cfg = _lower(_cfg(loss_kernel="pallas", vocab_size=vocab), "tpu")
  s = lowering.summarize(text, T, vocab=vocab)
  assert s["lm_head_gemms"] == 0 and s["loss_kernels"] == {"loss_stats": 1, "loss_dx": 1, "loss_dw": 1}, s
  assert s["vocab_f32"][0][0] == f"{cfg.model.d_model}x{vocab}xf32"
  with pytest.raises(ConfigError, match="model.loss_kernel=pallas: .* on GPU use fused"):
    _lower(_cfg(loss_kernel="pallas"), "cuda")


def test_xla_attention_lowered_for_cuda_calls_no_fused_kernel():
  _, s, _ = _lower(_cfg(attention="xla"), "cuda")
  assert s["cudnn"] == {"forward": 0, "backward": 0} and not s["splash"] and s["partitioned"] == 0


@pytest.mark.slow(seconds=4)  # measured on 2 cores: out of the inner loop
def test_bench_lower_for_prints_the_kernels_and_rejects_unknown_platforms(capsys):
  from lm_fixtures import ROOT
  config = f"{ROOT}/configs/tiny.py"
  flags = [f"--config.train.seq_len={T}", f"--config.train.batch_tokens={8 * T}"]
  assert bench.main(["bench", "--config", config, *flags, "--lower-for", "cuda"]) == 0
  # 8 emulated devices: data=8, where each device runs its own rows (the gradients are summed
  # once per step), so cuDNN is called on local arrays, not through XLA's partitioner
  out = capsys.readouterr().out
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}, attention=cudnn, dtype bfloat16" in out, out
  assert "cuDNN fused attention: 2 forward, 2 backward calls" in out and "partitioned" not in out  # 2 layers
  assert "[T, T]       none" in out
  assert bench.main(["bench", "--config", config, "--lower-for", "rocm"]) == 2
  err = capsys.readouterr().err
  assert "--lower-for='rocm': must be one of cuda, tpu" in err and len(err.strip().splitlines()) == 1


def test_a_dense_mask_is_what_the_square_search_finds():
  q = jax.ShapeDtypeStruct((2, T, 4, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, T), jnp.int32)

  def dense(q, seg):
    return attn_lib.xla_attention(q, q, q, attn_lib.attention_mask(seg, seg))

  text = jax.jit(dense).trace(q, seg).lower(lowering_platforms=("cuda",)).as_text()
  square = lowering.summarize(text, T)["square"]
  assert f"2x1x{T}x{T}xi1" in square and f"2x4x1x{T}x{T}xf32" in square
  assert lowering.summarize(text, T, widths={T})["square"] is None  # T = a model width: not told apart


# --- XLA:TPU compiles here for a described slice (libtpu: the test extra installs it) ---------

@pytest.mark.slow(seconds=4)
@needs_libtpu
def test_topology_compile_runs_splash_kernels_under_a_sharded_mesh():
  cfg = _cfg(num_heads=4, num_kv_heads=1)  # MQA: k/v replicated while q is head-sharded
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  compiled, _, compiled_cfg, mesh = lowering.compile_for_topology(cfg, "v5e:2x4")
  assert mesh.devices.flat[0].device_kind == "TPU v5 lite" and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert compiled_cfg.model.attention == "splash" and compiled_cfg.model.dtype == "bfloat16"
  text = compiled.as_text()  # XLA:TPU's optimised program: Mosaic kernels compiled, not interpreted
  for kernel in ("splash_mqa_fwd_segmented_residuals", "splash_mqa_dq_segmented_no_residuals",
                 "splash_mqa_dkv_segmented_no_residuals"):
    assert re.search(rf"%{kernel}\S* = .*custom_call_target=\"tpu_custom_call\"", text), kernel
  memory = benchmark.memory_analysis(compiled, "tpu")
  params = 4 * counts.count_params(compiled_cfg.model)  # float32 bytes of the whole model
  # Per chip: float32 params and AdamW's two moments, mostly split 4 ways (~1.1x the model's
  # bytes); replicated they would be 3x.
  assert params / 2 < memory["argument"] < 2 * params, (memory, params)


@pytest.mark.slow(seconds=15)
@needs_libtpu
@pytest.mark.parametrize("topology", ["v6e:2x2", "v5p:2x2x1"])
def test_an_fsdp_step_compiles_for_the_other_tpu_generations(topology):
  # jax 0.12's libtpu refuses the step on these chips if it asks to fuse FSDP's all-gathers
  # (a v5e-only option: lmtiny.parallel.xla_options)
  cfg = _cfg()
  cfg.mesh.update(data=1, fsdp=4, tensor=1)
  compiled, _, compiled_cfg, mesh = lowering.compile_for_topology(cfg, topology)
  assert dict(mesh.shape)["fsdp"] == 4 and compiled_cfg.model.attention == "splash"
  assert "all-gather" in compiled.as_text()


@pytest.mark.slow(seconds=40)
@needs_libtpu
def test_xla_tpu_memory_figure_is_the_peak_its_out_of_memory_check_holds_to():
  """d20 at 11 sequences a v5e chip (fsdp=8) compiles for the chip's 15.75 GiB, and the figure
  lmtiny reports is under the chip: 14.94 GiB, XLA:TPU's peak. Its temp figure added to the
  arguments and outputs read 17.23 GiB, more than the chip, for a step that fits (at 12
  sequences XLA:TPU refuses the step: 16.18 GiB needed)."""
  cfg = load_config_module("d20").get_config()
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  cfg.train.update(device_batch_size=11, batch_tokens=11 * 8 * 2048 * 2)
  compiled = lowering.compile_for_topology(cfg, "v5e:2x4")[0]  # ConfigError if XLA:TPU finds it too big
  memory, chip = benchmark.memory_analysis(compiled, "tpu"), counts.HBM_BYTES["v5e"]
  assert 0.85 * chip < memory["peak"] < chip, memory
  assert memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] == memory["peak"]


@pytest.mark.slow(seconds=6)
@needs_libtpu
def test_topology_compile_runs_the_pallas_loss_vocab_sharded_under_fsdp():
  """XLA:TPU compiles the on-chip loss inside the loss's shard_map (vocab over tensor, the lm_head
  gathered over fsdp) into Mosaic kernels; a step too big for the chips is one error line."""
  cfg = _cfg(loss_kernel="pallas")
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  compiled, _, compiled_cfg, _ = lowering.compile_for_topology(cfg, "v5e:2x4")
  text = compiled.as_text()
  for kernel in ("loss_stats", "loss_dx", "loss_dw"):
    assert re.search(rf"%{kernel}\S* = .*custom_call_target=\"tpu_custom_call\"", text), kernel
  cfg.train.batch_tokens = 2 ** 18 * T  # 2^18 sequences: terabytes of activations
  with pytest.raises(ConfigError, match=r"^the step does not fit the chip \(mesh .*\): RESOURCE_EXHAUSTED"):
    lowering.compile_for_topology(cfg, "v5e:2x4")


@pytest.mark.slow(seconds=6)
@needs_libtpu
def test_weight_gradients_are_summed_across_devices_in_float32():
  """Autodiff through a bf16 cast of a weight hands XLA bf16 gradients, which it then sums over
  the data and fsdp axes in bf16. XLA:TPU's program has every weight-sized sum in float32."""
  cfg = _cfg()
  cfg.mesh.update(data=2, fsdp=4, tensor=1)  # no tensor parallelism: no activation sums
  cfg.train.batch_tokens = 8 * T
  compiled, _, compiled_cfg, _ = lowering.compile_for_topology(cfg, "v5e:2x4")
  assert compiled_cfg.model.dtype == "bfloat16"
  reductions = lowering.gradient_reductions(compiled.as_text())
  assert reductions["bf16"] == 0 and reductions["f32"] >= 8, reductions  # 2 layers x 4 matrices at least


@pytest.mark.slow(seconds=25)
@needs_libtpu
def test_fsdp_weight_gathers_are_all_gathers_not_windowed_einsum_rings():
  """lmtiny's TPU options turn XLA:TPU's windowed einsum off for all-gathers
  (lmtiny.parallel.xla_options). At this shape (2 layers of d12, 8 x 1024 tokens a chip, fsdp=4)
  it ran the bf16 weight gathers as rings of 90 collective-permutes; at d24_2026's shape each
  unrolled layer kept about 0.9 GiB more live with it."""
  cfg = load_config_module("d12").get_config()
  cfg.model.update(num_layers=2, remat="full")
  cfg.train.update(seq_len=1024, batch_tokens=4 * 8 * 1024, device_batch_size=8)
  cfg.mesh.update(data=1, fsdp=4, tensor=1)
  compiled, _, _, _ = lowering.compile_for_topology(cfg, "v5e:2x2")
  text = compiled.as_text()
  assert "bf16" not in lowering.ring_steps(text), lowering.ring_steps(text)


@pytest.mark.slow(seconds=90)
@needs_libtpu
def test_splash_layers_leave_xla_tpu_little_to_relayout():
  """Splash reads q, k and v heads-first. With QK-norm and RoPE run tokens-first and the
  projections' rows flattened, XLA:TPU copied each float32 q/k up to three times between layouts
  around the norm's reduction and the backward's head-major gradients back into rows: 70.6 KB of
  copies a token and layer at this shape (2 layers of d12_2026, 4 x 2048 tokens, a v5e; the same on
  a v6e), 19.5 KB with both in the kernel's layout (lmtiny.model.transformer.dense and
  Attention.project_qkv)."""
  cfg = load_config_module("d12_2026").get_config()
  cfg.model.update(num_layers=2, vocab_size=4096)  # the vocabulary's own copies left small
  cfg.train.update(batch_tokens=4 * cfg.train.seq_len, device_batch_size=4)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  compiled, _, compiled_cfg, _ = lowering.compile_for_topology(cfg, "v5e:1x1")
  per_token_layer = lowering.relayout_bytes(compiled.as_text()) / (4 * compiled_cfg.train.seq_len * 2)
  assert compiled_cfg.model.qk_norm and compiled_cfg.model.attention == "splash"
  assert per_token_layer < 30_000, per_token_layer


def _activations_per_scalar_reduction(hlo_text: str, activation: str) -> int:
  """The most operands of type `activation` (e.g. "bf16[8,256,192]") that one fusion with float32
  scalar outputs reads: how many activations a gradient-of-scalars reduction keeps alive to it."""
  types = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = ((?:\([^=]*?\))|\S+) ", hlo_text, re.M))
  most = 0
  for outputs, operands in re.findall(r"^\s*(?:ROOT )?%\S+ = (\(.*?\)|\S+) fusion\((.*?)\), kind", hlo_text, re.M):
    if "f32[]" in outputs:
      most = max(most, sum(types.get(name, "").startswith(activation) for name in re.findall(r"%([\w.\-]+)", operands)))
  return most


@pytest.mark.parametrize("platform, held", [("tpu", True), ("cuda", False)])
def test_the_backward_holds_each_layers_gradients_behind_barriers_on_tpu_only(platform, held):
  """For a TPU each weight gradient (q, k, v, o, up and down a layer, the value-embedding gate
  and the smear gate here) and each layer's residual-scalar sums leave the backward behind an
  optimization barrier, which keeps XLA:TPU's scheduler from moving them to its end
  (lmtiny.model.transformer.tpu_scheduling_barrier). For a GPU nothing holds them, so XLA:GPU
  fuses them (tests/model/test_gpu_step.py)."""
  cfg = load_config_module("tiny_2026").get_config()
  cfg.model.num_layers = 2
  text, _, _ = lowering.lower_train_step(cfg, platform, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  held_types = re.findall(r"stablehlo\.optimization_barrier .*? : (.*)", text)
  weight_gradients = [t for t in held_types if re.search(r", tensor<[0-9x]+xf32>$", t)]
  scalar_sums = [t for t in held_types if re.match(r"tensor<(\d+x\d+)xf32>, tensor<\1xf32>, ", t)]
  assert (len(weight_gradients), len(scalar_sums)) == ((6 * 2 + 2, 2) if held else (0, 0)), held_types


@pytest.mark.slow(seconds=20)
@needs_libtpu
def test_residual_scalar_gradients_are_summed_layer_by_layer():
  """The gradients of nanochat 2026's per-layer residual scalars are sums over B x T x D of a
  layer's input times its cotangent. Left to autodiff, XLA:TPU fused every layer's sums into one
  reduction at the end of the backward (here 8 scalars from 11 activations; at d24_2026's shape on
  v6e:2x4 two activations a layer stayed alive, 96 MiB each). lmtiny.model.transformer.residual_mix
  sums each layer's over D before the backward moves on."""
  cfg = load_config_module("tiny_2026").get_config()
  cfg.model.update(num_layers=4, remat="full")
  cfg.train.update(batch_tokens=8 * cfg.train.seq_len, device_batch_size=8)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  compiled, _, compiled_cfg, _ = lowering.compile_for_topology(cfg, "v5e:1x1")
  activation = f"bf16[8,{compiled_cfg.train.seq_len},{compiled_cfg.model.d_model}]"
  assert compiled_cfg.model.residual_scalars and compiled_cfg.model.dtype == "bfloat16"
  assert 1 <= _activations_per_scalar_reduction(compiled.as_text(), activation) <= 2


def test_gradient_reductions_count_weight_sized_sums_by_dtype():
  hlo = """
  %all-reduce.1 = (bf16[512,2048]{1,0}, f32[8,64]{1,0}) all-reduce(%a, %b), channel_id=1
  %all-reduce.2 = f32[]{:T(128)} all-reduce(%c), channel_id=2
  %reduce-scatter.3 = f32[128,512]{1,0} reduce-scatter(%d), dimensions={0}
  %all-reduce-start.4 = bf16[64,64]{1,0} all-reduce-start(%e)
  %fusion.5 = f32[256,64]{1,0} fusion(%f), kind=kCustom, calls=%all-reduce-scatter.4.clone
  %all-gather.6 = bf16[512,2048]{1,0} all-gather(%g), dimensions={0}
  %fusion.7 = f32[256,64]{1,0} fusion(%h), kind=kLoop, calls=%fused_add
  %collective-permute-start.8 = (bf16[160,5120]{1,0}, bf16[160,5120]{1,0}) collective-permute-start(%i)
  %collective-permute.9 = f32[160,5120]{1,0} collective-permute(%j), source_target_pairs={{0,1}}
  """
  assert lowering.gradient_reductions(hlo) == {"bf16": 2, "f32": 3}
  assert lowering.ring_steps(hlo) == {"bf16": 2, "f32": 1}


@needs_libtpu
def test_bench_topology_names_a_slice_libtpu_cannot_describe(capsys):
  """(What `--topology` prints for a real slice is the training guide's promise, typed by the
  journey test: tests/journeys/test_journey_guides.py.)"""
  from lm_fixtures import ROOT
  assert bench.main(["bench", "--config", f"{ROOT}/configs/tiny.py", "--topology", "v9z:2x2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --topology='v9z:2x2': libtpu cannot describe it") and len(err.strip().splitlines()) == 1


def test_topology_without_libtpu_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import fails as on a machine without it
  with pytest.raises(ConfigError, match=r"--topology=v5e:2x4: .*needs libtpu: pip install"):
    lowering.tpu_devices("v5e:2x4")


def test_gpu_topology_without_the_cuda_plugin_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)  # import fails as on a machine without it
  with pytest.raises(ConfigError, match=r"--topology=h100:8: compiling for a GPU needs jax's CUDA plugin: "
                                        r"pip install 'jax-cuda12-plugin\[with-cuda\]=="):
    lowering.gpu_devices("h100:8")


def test_gpu_topology_when_the_cuda_plugin_failed_to_load_says_so(monkeypatch):
  """The plugin is installed but checked the CUDA driver as jax started its backends, and failed:
  jax then has no CUDA topologies (NotImplementedError), which is one line, not a traceback."""
  for name in ("jax_plugins", "jax_plugins.xla_cuda12"):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

  def no_cuda(**_):
    raise NotImplementedError("topology not implemented for cuda")
  monkeypatch.setattr(lowering.topologies, "get_topology_desc", no_cuda)
  with pytest.raises(ConfigError, match=r"^--topology=h100:1: jax's CUDA plugin did not load .* JAX_PLATFORMS=cpu$"):
    lowering.gpu_devices("h100:1")


@pytest.mark.parametrize("topology, message", [
    ("h300:8", "--topology=h300:8: GPUs are named h100, h200, a100 (e.g. h100:8); TPU slices look like "
                "v5e:2x4, v5p:2x2x2, v6e:4x4, v4:2x2x1"),
    ("h100:16", "--topology=h100:16: one host of 1 to 8 GPUs")])
def test_bench_gpu_topology_bad_input_is_one_line_and_exit_2(topology, message, capsys):
  assert bench.main(["bench", "--config", f"{ROOT}/configs/tiny.py", "--topology", topology]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {message}\n"


@pytest.mark.slow(seconds=15)
@needs_cuda_plugin
def test_gpu_topology_compiles_the_step_for_an_h100_here():
  """Two layers of d12_2026 for one described H100: XLA:GPU's step calls cuDNN's fused attention,
  and the memory plan reads within 5% of its figure (1.00x for the whole config)."""
  cfg = load_config_module("d12_2026").get_config()
  cfg.model.num_layers = 2
  report = benchmark.compile_report(cfg, "h100:1")
  assert report["device"] == "NVIDIA H100 80GB HBM3" and report["chip_bytes"] == 80e9
  assert report["attention"] == "cudnn" and report["dtype"] == "bfloat16"
  assert report["estimate"]["total"] / report["xla_memory"]["peak"] == pytest.approx(1.0, abs=0.05)
  # and its kernels on the H100's roofline (tests/training/test_kernel_roofline.py counts them)
  kernels = report["kernels"]
  resolved = resolve_run(cfg, devices=lowering.gpu_devices("h100:1")).cfg
  micro_steps = config_lib.accumulation_steps(config_lib.resolve_batch(resolved, 1).train)
  assert kernels["chip"] == "h100" and kernels["launches"]["attention"] == 2 * 2 * micro_steps  # fwd + bwd, 2 layers
  assert 0.2 < kernels["predicted"]["causal-half"]["mfu"] < kernels["predicted"]["nanochat"]["mfu"] < 0.7
  lines = benchmark.format_report(report, cfg).splitlines()
  assert [line.split()[0] for line in lines[-2:]] == ["kernels", "predicted"]


SHIPPED = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "configs")) if name.endswith(".py"))
# Sizes: they change a program's shapes, never which dtype a sum accumulates in.
_SIZES = ("num_layers", "d_model", "num_heads", "head_dim", "vocab_size", "mlp_dim", "init", "norm_eps", "rope_theta")


def _shipped_designs() -> dict[tuple, list]:
  """The shipped configs grouped by design: {model knobs but the sizes: [(name, config), ...]}
  (d12, d20, d26 and d32 are one design at four sizes)."""
  designs = {}
  for name in SHIPPED:
    cfg = load_config_module(name).get_config()
    knobs = tuple(sorted((k, str(v)) for k, v in cfg.model.items() if k not in _SIZES))
    designs.setdefault(knobs + (("seq_len", cfg.train.seq_len),), []).append((name, cfg))
  return designs


@pytest.mark.slow(seconds=12)
@pytest.mark.parametrize("platform", lowering.PLATFORMS)
def test_no_shipped_config_sums_a_gradient_in_bf16(platform):
  """Every configs/*.py design (one config of each), its train step lowered for the platform in
  bf16 (4 layers at most, one row: the knobs, not the size, decide the program's reductions): no
  sum over a rank >= 3 tensor keeps a bf16 accumulator. Before the scalar mixes ran in float32,
  d24_2026's step held 77 (tiny_2026's 17)."""
  designs = _shipped_designs()
  assert len(designs) >= 7 and sum(map(len, designs.values())) == len(SHIPPED) >= 12
  found = {}
  for (name, cfg), *_ in designs.values():
    cfg.model.num_layers = min(cfg.model.num_layers, 4)
    cfg.train.update(batch_tokens=cfg.train.seq_len, micro_batch_size=0, device_batch_size=0, tokens_per_param=0.0,
                     auto_batch=False, steps=2)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    text, _, lowered = lowering.lower_train_step(cfg, platform, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    assert lowered.model.dtype == "bfloat16"
    found[name] = lowering.bf16_sums(text)
  assert not any(found.values()), {k: v[:2] for k, v in found.items() if v}


def test_bf16_sums_finds_a_bf16_accumulator_over_activations_only():
  line = ("%1 = stablehlo.reduce(%0 init: %c) applies stablehlo.add across dimensions = [0, 1, 2] : "
          "(tensor<16x2048x1536xbf16>, tensor<bf16>) -> tensor<bf16>")
  assert lowering.bf16_sums(line) == [line]
  assert lowering.bf16_sums(line.replace("xbf16>, tensor<bf16>", "xf32>, tensor<f32>")) == []
  assert lowering.bf16_sums(line.replace("16x2048x1536xbf16", "1536xbf16")) == []  # a vector: not a token sum


@pytest.mark.slow(seconds=4)  # measured on 2 cores: out of the inner loop
def test_bench_hlo_out_writes_the_lowered_step_and_needs_lower_for(tmp_path, capsys):
  config = f"{ROOT}/configs/tiny.py"
  out = tmp_path / "sub" / "step.stablehlo"
  flags = [f"--config.train.seq_len={T}", f"--config.train.batch_tokens={8 * T}"]
  assert bench.main(["bench", "--config", config, *flags, "--lower-for", "tpu", "--hlo-out", str(out)]) == 0
  text = out.read_text()
  assert "func.func public @main" in text and "splash_" in text  # the kernels the summary counted
  capsys.readouterr()
  assert bench.main(["bench", "--config", config, "--hlo-out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.strip() == "error: --hlo-out needs --lower-for cuda|tpu (it writes the lowered step)"
  assert not (tmp_path / "x").exists()


def test_bench_lower_for_prints_the_per_token_block_and_writes_it_as_json(tmp_path, capsys):
  import json
  config = f"{ROOT}/configs/tiny.py"
  flags = [f"--config.train.seq_len={T}", f"--config.train.batch_tokens={8 * T}"]
  out = tmp_path / "lowered.json"
  assert bench.main(["bench", "--config", config, *flags, "--lower-for", "cuda", "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  for head in ("per token    ", "bytes        ", "collectives  ", "MFU bound    h100 <= "):
    assert f"\n{head}" in printed, printed
  assert "6N + attention" in printed and "v5p <= " in printed and "v6e <= " in printed
  figures = json.loads(out.read_text())
  assert figures["platform"] == "cuda" and figures["per_token"]["tokens_per_step"] == 8 * T
  p = figures["per_token"]
  assert p["flops"]["total"] >= p["flops"]["matmul"] > 0 and p["chips"] == 8
  # 8 emulated devices, data=8: the partitioner sums the float32 gradients across them once a step
  assert p["collectives_source"] == "partitioned" and p["collectives_per_step"].get("all_reduce", 0) >= 1
  line = printed.split("collectives  ")[1].splitlines()[0]
  assert p["link_bytes"] > 0 and re.search(r"all_reduce \S+B payload, \S+B over links \(\d+ per step\)", line), line


@pytest.mark.slow(seconds=5)
@needs_libtpu
@pytest.mark.parametrize("mesh", [dict(data=1), dict(data=1, fsdp=8)], ids=["one_chip", "fsdp8"])
def test_the_softcapped_fused_loss_writes_one_float32_logits_array_per_chunk(mesh):
  """logit_softcap: the fused loss's first fusion writes the capped logits of a chunk once. The
  softcap's derivative written as (capped / c)^2 let XLA simplify it to tanh(l / c)^2, and
  XLA:TPU's GEMM fusion then wrote tanh beside the capped logits: a second float32 [C, V] array
  (d20 on a v5e-8: 2 x 1 GiB live, 8.09 GiB of temporaries against 6.29)."""
  vocab = 2048
  cfg = _cfg(vocab_size=vocab, logit_softcap=15.0, loss_kernel="fused")
  cfg.train.batch_tokens = 8 * T  # one micro-step: a chunk of 8 x 256 tokens, or 256 a chip under fsdp=8
  cfg.mesh.update(**mesh)
  compiled, _, _, _ = lowering.compile_for_topology(cfg, "v5e:2x4" if mesh.get("fsdp") else "v5e:1x1")
  chunk = f"f32[{8 * T // mesh.get('fsdp', 1)},{vocab}]"
  fusions = [line.split(" fusion(")[0] for line in compiled.as_text().splitlines()
             if re.match(r"\s*%\S+ = \(.*\) fusion\(", line)]
  written = [outputs.count(chunk) for outputs in fusions]
  assert max(written) == 1, [outputs for outputs, n in zip(fusions, written) if n > 1]
