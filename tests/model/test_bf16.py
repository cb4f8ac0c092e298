"""The model in bfloat16 (and fp8), as users train it on GPUs and TPUs: the scalar mixes of
nanochat 2026 (residual scalars, backout, smear, the value-embedding gate, the q/k scale) keep
their gradients summed in float32 and their constants exact, and fp8 blocks keep no more for the
backward pass than bf16 ones. Float32 tests cannot see these: the reference here is float64 NumPy
over the very bf16 activations the model saw, the lowered program, and the saved residuals."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm_fixtures import dot_types, load_config_module
from saved_residuals import residual_bytes, saved_residuals, token_loss
from lmtiny import config as config_lib
from lmtiny.model.transformer import ACTIVATIONS, REMAT_POLICIES, Transformer, dense, embed_lookup, mix_layer_input
from lmtiny.parallel import sharding
from lmtiny.training import lowering, step_cost

B, T, D = 8, 512, 192  # 786,432 products per scalar's gradient


def _model(num_layers=4, **model):
  m = config_lib.nanochat_leaderboard_config(4).model
  m.update(vocab_size=512, d_model=D, num_heads=3, head_dim=64, num_kv_heads=3, max_seq_len=T, dtype="bfloat16",
           remat="none", num_layers=num_layers, window_pattern="L")
  m.update(**model)
  return Transformer(m, nnx.Rngs(0))


def _bf16(key, shape):
  """|N(0, 1)| in bf16: positive terms, so a sum of them cancels nothing and its float32 value
  is accurate to ~1e-6 (a bf16 accumulator stalls once the sum is 256 x a term)."""
  return jnp.abs(jax.random.normal(jax.random.key(key), shape)).astype(jnp.bfloat16)


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _relative(ours, reference) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def test_residual_scalar_and_backout_gradients_sum_in_float32():
  """One layer with an identity block: out = (1 - b) (r x0 + s x0), loss = sum(c * out). The
  gradients of r, s and b are sums over B x T x D, here against float64 over the same inputs."""
  model = _model(num_layers=1)
  x0, c = _bf16(1, (B, T, D)), _f64(_bf16(2, (B, T, D)))
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    mixed = nnx.merge(graph, params, rest).run_layers(x0, lambda i, block, x, scalars: mix_layer_input(x, scalars))
    return jnp.sum(mixed.astype(jnp.float32) * c)

  grads = jax.jit(jax.grad(loss))(params)
  r, s, b = (float(params[k][...][0]) for k in ("resid_lambdas", "x0_lambdas", "backout_lambda"))
  x1 = _f64((r * x0.astype(jnp.float32) + s * x0.astype(jnp.float32)).astype(jnp.bfloat16))  # as the model rounds it
  into_x0 = (1 - b) * np.sum(c * _f64(x0))
  assert _relative(grads["resid_lambdas"][...], into_x0) < 1e-4
  assert _relative(grads["x0_lambdas"][...], into_x0) < 1e-4
  assert _relative(grads["backout_lambda"][...], -np.sum(c * x1)) < 1e-4


def test_smear_gradient_sums_in_float32():
  model = _model(num_layers=1)
  x, c = _bf16(3, (B, T, D)), _f64(_bf16(4, (B, T, D)))
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  params["smear_lambda"][...] = jnp.full((1,), 0.5)
  params["smear_gate"][...] = jax.random.normal(jax.random.key(5), params["smear_gate"][...].shape)

  def loss(params):
    return jnp.sum(nnx.merge(graph, params, rest).smear(x, positions).astype(jnp.float32) * c)

  grads = jax.jit(jax.grad(loss))(params)
  xs = _f64(x)
  gate_logit = _f64(x[..., :config_lib.SMEAR_CHANNELS] @ params["smear_gate"][...].astype(jnp.bfloat16))
  gate = 1 / (1 + np.exp(-gate_logit))  # [B, T, 1]
  previous = np.concatenate([np.zeros_like(xs[:, :1]), xs[:, :-1]], axis=1)
  assert _relative(grads["smear_lambda"][...], np.sum(c * gate * previous)) < 1e-3


@pytest.mark.slow(seconds=8)
def test_the_bf16_gradient_has_no_bf16_accumulated_sum():
  """Every knob on (value embeddings, residual scalars, smear, backout): no reduction over the
  batch's tokens in the lowered gradient keeps a bf16 accumulator (there were 17)."""
  model = _model(num_layers=4, window_pattern="SSSL", max_seq_len=256)
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(6), (4, 257), 0, 512)

  def loss(params):
    ce, _ = nnx.merge(graph, params, rest).token_losses(tokens[:, :-1], tokens[:, 1:])
    return ce.mean()

  hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
  assert "stablehlo.reduce" in hlo and "bf16" in hlo  # the scan can see what it looks for
  assert lowering.bf16_sums(hlo) == []


def test_qk_scale_is_exactly_its_value_in_bf16():
  """q and k grow by 1.2 (nanochat's float multiply), not by 1.2 rounded to bf16 (1.203125)."""
  x = _bf16(7, (B, 64, D)) - 0.75
  scaled, plain = (_model(num_layers=1, qk_scale=scale, value_embeds=False) for scale in (1.2, 1.0))  # same weights
  rope_BxT = scaled.rope_tables(jnp.broadcast_to(jnp.arange(64), (B, 64)))
  (q1, k1, _), (q0, k0, _) = (m.layers[0].attn.project_qkv(x, rope_BxT) for m in (scaled, plain))
  for ours, base in ((q1, q0), (k1, k0)):
    ratio = np.sum(np.abs(_f64(ours))) / np.sum(np.abs(_f64(base)))
    assert abs(ratio - 1.2) < 2e-4, ratio  # 1.203125 is 3.1e-3 away


@pytest.mark.parametrize("norm_scale", [False, True])
def test_q_and_k_are_rounded_once_after_norm_rotation_and_scale(norm_scale):
  """QK-norm, RoPE and the q/k scale run in float32 and round q and k to bf16 once. XLA:GPU then
  reads each twice (the norm's sums, then one kernel); rounded after each stage, it also wrote the
  rotated halves for the norm's kernels to read (lmtiny.training.kernel_roofline: 5.6% of
  d24_2026's elementwise roofline). Each value is within one rounding of float64's; three
  roundings (rotation, norm, scale) left some two apart."""
  model = _model(num_layers=1, qk_scale=1.2, value_embeds=False, norm_scale=norm_scale)
  attn, x = model.layers[0].attn, _bf16(3, (4, 256, D)) - 0.75
  if norm_scale:  # a learned scale that is not all ones
    attn.q_norm.scale[...] = 1 + jax.random.normal(jax.random.key(4), (64,)) * 0.1
    attn.k_norm.scale[...] = 1 + jax.random.normal(jax.random.key(5), (64,)) * 0.1
  rope_BxT = model.rope_tables(jnp.broadcast_to(jnp.arange(256), (4, 256)))
  q, k, _ = jax.jit(lambda x: attn.project_qkv(x, rope_BxT))(x)
  cos, sin = (_f64(t) for t in rope_BxT)
  for ours, w, norm in ((q, attn.q, attn.q_norm), (k, attn.k, attn.k_norm)):
    y = _f64(dense(x, w[...]))  # the GEMM's bf16 output, as the model has it
    y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + norm.eps)
    y = y * (_f64(norm.scale[...]) if norm_scale else 1.0)
    y1, y2 = np.split(y, 2, axis=-1)
    reference = 1.2 * np.concatenate([y1 * cos - y2 * sin, y2 * cos + y1 * sin], axis=-1)
    # one rounding: within 2^-8 of the value (bf16's unit roundoff), plus float32's own error where
    # the rotation cancels (values are O(1) after the norm)
    excess = np.abs(_f64(ours) - reference) - 2.0**-8 * np.abs(reference)
    assert ours.dtype == jnp.bfloat16 and np.max(excess) <= 1e-6, np.max(excess)


def test_built_for_tpu_the_projections_keep_their_dimensions_and_compute_the_same():
  """For XLA:TPU, `dense` contracts [B, T, D] with [D, H, Dh] as they are (no flattened rows) and
  project_qkv runs QK-norm and RoPE heads-first, as splash reads them: layouts XLA:TPU need not
  copy between. The values are the CPU program's, and dw still comes out of the GEMM in float32."""
  x, w = _bf16(1, (2, 256, D)) - 0.75, jax.random.normal(jax.random.key(2), (D, 3, 64)) * 0.05

  def loss(x, w):
    return jnp.sum(dense(x, w).astype(jnp.float32) ** 2)
  grad = jax.grad(loss, argnums=(0, 1))
  with lowering.target("tpu"):
    jaxpr = str(jax.make_jaxpr(grad)(x, w))
    tpu = _traced_afresh(grad)(x, w)
  assert "reshape" not in jaxpr and "(([0, 1], [0, 1]), ([], []))" in jaxpr, jaxpr  # dw sums B and T at once
  cpu = _traced_afresh(grad)(x, w)
  assert tpu[1].dtype == jnp.float32 and tpu[0].dtype == jnp.bfloat16
  # dw contracts B and T as two dimensions, not one: float32 sums in another order (3e-5 of 91 here)
  np.testing.assert_allclose(_f64(tpu[1]), _f64(cpu[1]), rtol=0, atol=1e-6 * np.max(np.abs(_f64(cpu[1]))))
  np.testing.assert_allclose(_f64(tpu[0]), _f64(cpu[0]), rtol=1e-2, atol=1e-3)  # one bf16 rounding apart at most

  model = _model(num_layers=1, qk_scale=1.2, value_embeds=False)
  rope_BxT = model.rope_tables(jnp.broadcast_to(jnp.arange(256), (2, 256)))

  def project(x):
    return model.layers[0].attn.project_qkv(x, rope_BxT)
  with lowering.target("tpu"):
    assert "transpose" in str(jax.make_jaxpr(project)(x))
    heads_first = _traced_afresh(project)(x)
  for ours, reference in zip(heads_first, _traced_afresh(project)(x)):
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(reference, np.float32))


def _traced_afresh(fn):
  """`fn` jitted as a new function: jax's trace cache does not key on lowering.target, so a jit of
  the same function would run the program traced under the other target."""
  return jax.jit(lambda *args: fn(*args))


def _saved_activation_bytes(matmul_dtype: str, remat: str, mesh_cfg=None) -> int:
  """Bytes of what the backward pass keeps (jax's saved residuals, the parameters excluded) for a
  2-layer bf16 model whose block GEMMs are all fp8-eligible (traced on the mesh `mesh_cfg` lays
  over the 8 devices: sharded fp8 GEMMs run in shard_map)."""
  m = config_lib.base_config().model
  m.update(vocab_size=256, d_model=128, num_heads=2, head_dim=64, num_layers=2, max_seq_len=128, dtype="bfloat16",
           remat=remat, matmul_dtype=matmul_dtype, attention="xla")
  return residual_bytes(saved_residuals(*token_loss(Transformer(m, nnx.Rngs(0))), mesh_cfg))


def test_residual_scalars_keep_no_activation_for_the_backward_under_remat_full():
  """nanochat 2026's per-layer residual mix runs inside the layer's remat region: the backward
  keeps the same [B, T, D] activations with the scalars as without them (one a layer, the remat
  region's input). Outside it, each layer kept the mix's input and output, and float32 copies of
  x and x0 besides (18 such residuals here, against 10)."""
  m = load_config_module("tiny_2026").get_config().model
  m.update(num_layers=4, d_model=128, num_heads=2, head_dim=64, vocab_size=256, max_seq_len=64, dtype="bfloat16",
           remat="full", attention="xla")
  activations = {}
  for scalars in (True, False):
    m.residual_scalars = scalars
    saved = saved_residuals(*token_loss(Transformer(m, nnx.Rngs(0))))
    activations[scalars] = [what for _, shape, what in saved if shape == (8, 64, 128)]
  assert len(activations[False]) >= m.num_layers - 1  # the remat regions' inputs, at least
  assert len(activations[True]) == len(activations[False]), activations[True]


def test_relu2_keeps_only_its_output_and_its_gradient_is_nanochats_bf16_bits():
  """Kept whole (remat none), each layer's MLP leaves one [B, T, mlp] array for the backward:
  relu²'s output, which the down projection's weight gradient reads anyway. Autodiff kept the
  pre-activation and relu's output too (three a layer). From that output alone, the bf16 gradient
  is nanochat's bf16 one, g * (2 relu(x)) rounded once, bit for bit, at every positive bf16 x whose
  square neither overflows nor underflows (the exact product, rounded once, is the reference);
  computed in float32 and rounded at the end, 12.5% of the positive elements were a rounding away."""
  m = _model(num_layers=2).cfg
  saved = saved_residuals(*token_loss(Transformer(m, nnx.Rngs(0)), rows=2))
  hidden = [what for _, shape, what in saved if shape == (2, T, config_lib.mlp_dim(m))]  # (the GEMM's flat copy aside)
  assert len(hidden) == m.num_layers, hidden
  positive = np.arange(1, 0x7F80, dtype=np.uint16).view(jnp.bfloat16).astype(np.float32)  # every finite bf16 > 0
  positive = positive[(positive >= 2.0 ** -62) & (positive <= 2.0 ** 63)]  # squares in bf16's normal range
  x = jnp.asarray(np.concatenate([positive, -positive]), jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), x.shape).astype(jnp.bfloat16)
  # The backward compiled apart from the forward, as a step has it: y reaches it rounded to bf16.
  y, vjp = jax.vjp(ACTIVATIONS["relu2"], x)
  (dx,) = jax.jit(lambda vjp, g: vjp(g))(vjp, g)
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(_f64(y), np.maximum(_f64(x), 0) ** 2, rtol=2 ** -8)
  # 2 g x has at most 16 significant bits: exact in float32, then one rounding to bf16.
  nanochat = (2 * np.asarray(g, np.float32) * np.maximum(np.asarray(x, np.float32), 0)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(dx).view(np.uint16), np.asarray(nanochat).view(np.uint16))


@pytest.mark.parametrize("mesh_cfg", [None, dict(data=1, fsdp=8, tensor=1)], ids=["one_device", "fsdp8"])
@pytest.mark.parametrize("remat", ["minimal", "dots"])
def test_fp8_blocks_save_no_more_than_bf16_blocks(remat, mesh_cfg):
  """Policies that keep weight GEMMs' outputs keep an fp8 GEMM's output in bf16, by name, not its
  dot's float32 accumulator (1.52x bf16's bytes under minimal before, 1.45x under dots); on fsdp=8
  too, where the GEMM runs in shard_map (measured 0.97x bf16's bytes, the fp8 lm_head included)."""
  assert remat in REMAT_POLICIES
  bf16, fp8 = (_saved_activation_bytes(dtype, remat, mesh_cfg) for dtype in ("default", "fp8"))
  assert bf16 > 0 and fp8 <= bf16, (fp8, bf16)


def _table_casts(mesh_shape: dict) -> int:
  """f32 -> bf16 converts of a whole [V, D] table in tiny_2026's train step lowered for cuda (the
  token embedding and the value embeddings are all 4,096 x 192)."""
  cfg = load_config_module("tiny_2026").get_config()
  cfg.train.update(batch_tokens=8 * cfg.train.seq_len)
  cfg.mesh.update(**mesh_shape)
  text, _, _ = lowering.lower_train_step(cfg, "cuda", sharding.make_mesh(cfg.mesh, jax.devices()))
  return len(re.findall(r"stablehlo\.convert .*\(tensor<4096x192xf32>\) -> tensor<4096x192xbf16>", text))


@pytest.mark.slow(seconds=6)
def test_a_table_held_whole_casts_the_rows_it_gathers_not_the_table():
  """Per micro-step, a lookup cast all V x D entries of each embedding table to bf16 (3 tables in
  tiny_2026) where it needs B x T rows. Under FSDP the table is all-gathered, as a bf16 copy on
  purpose (half the bytes), which is what the second count shows."""
  assert _table_casts(dict(data=8, fsdp=1, tensor=1)) == 0
  assert _table_casts(dict(data=1, fsdp=8, tensor=1)) >= 3


def test_fsdp_gathers_an_embedding_table_as_its_bf16_copy_cast_where_it_lies():
  """Under FSDP each device casts its share of the float32 table and the bf16 shares are gathered.
  Told only that the bf16 copy is whole, XLA's partitioner gathered the float32 table and cast it
  after: twice the bytes (d12_2026 on fsdp=8: 7 tables, 672 MiB a step, not 336). Read in the
  module right after partitioning, as XLA:CPU then widens every bf16 op to float32."""
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.update(data=1, fsdp=8)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices())
  table = jax.device_put(jnp.ones((64, 32), jnp.float32), jax.sharding.NamedSharding(mesh, P(None, "fsdp")))
  tokens = jnp.zeros((8, 4), jnp.int32)
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda t, x: embed_lookup(t, x, jnp.bfloat16)).lower(table, tokens)
  _, partitioned = step_cost.with_partitioned_module(lambda options: lowered.compile(compiler_options=options))
  assert re.findall(r"= (\w+)\[64,32\]\S* all-gather\(", partitioned) == ["bf16"]


def _lm_head_dots(fp8_lm_head: bool) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of the dots with a vocab-wide operand or result in the train step of a
  2-layer fp8 model (d 128, vocab 384: the lm_head fp8-eligible, no other width 384) lowered for
  cuda (the fused loss)."""
  cfg = load_config_module("tiny_2026").get_config()
  cfg.model.update(num_layers=2, d_model=128, num_heads=2, head_dim=64, vocab_size=384, max_seq_len=64,
                   matmul_dtype="fp8", fp8_lm_head=fp8_lm_head)
  cfg.train.update(seq_len=64, batch_tokens=4 * 64, micro_batch_size=4, device_batch_size=0)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  text, _, _ = lowering.lower_train_step(cfg, "cuda", sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  return [(lhs.split("x")[-1], rhs.split("x")[-1]) for lhs, rhs, out, _ in dot_types(text)
          if "384" in f"{lhs}x{rhs}x{out}".split("x")]


def test_the_lm_head_gemms_take_fp8_operands_with_fp8_lm_head():
  """model.fp8_lm_head (on by default with matmul_dtype=fp8, as nanochat's --fp8): the loss's
  logits, dx and dw GEMMs on e4m3/e5m2 operands; off, in bf16."""
  on, off = _lm_head_dots(True), _lm_head_dots(False)
  assert len(on) >= 3 and all(a.startswith("f8") and b.startswith("f8") for a, b in on), on
  assert len(off) >= 3 and all(a == b == "bf16" for a, b in off), off
  assert config_lib.base_config().model.fp8_lm_head
