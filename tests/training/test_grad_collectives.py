"""lmtiny.training.hlo_cost's collective roles on the 2026 recipe's compiled step (8 emulated devices):
the gradients' reductions told apart from the optimizer's collectives and counted per step and per
micro-step.

On a data-parallel mesh the step sums each device's gradients over the micro-steps and reduces
them once: exactly one float32 gradient (plus the loss sum and token count) per step, none inside
the micro-step loop. NorMuon's collectives come on top and are not gradient reductions: each
matrix is orthogonalised on one device (muon.orthogonalise_by_shape) and the results gathered
back to every device. Left to XLA's partitioner that way back was an all-reduce of zero-padded
shares with all-to-alls and permutes around it (the "1.30x the parameters" all-reduce payload
bench --lower-for reported for d12_2026); sharding.map_matrices makes it one all-gather.
"""
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_fixtures import load_config_module, train_on_mesh
from lmtiny import config as config_lib
from lmtiny.model.transformer import abstract_model
from lmtiny.parallel import sharding
from lmtiny.training import hlo_cost, step_cost
from lmtiny.training.muon import is_muon_param, matrix_view

F32, BF16 = 4, 2
ROWS, T = 32, 64


def _cfg(**mesh):
  """The 2026 recipe at 2 layers of width 128 with value embeddings, 32 rows of 64 tokens in 2
  micro-steps."""
  cfg = load_config_module("tiny_2026").get_config()
  cfg.model.update(num_layers=2, d_model=128, num_heads=2, head_dim=64, vocab_size=512, max_seq_len=T,
                   dtype="float32")
  cfg.train.update(seq_len=T, batch_tokens=ROWS * T, micro_batch_size=ROWS // 2, device_batch_size=0, steps=3)
  cfg.mesh.update(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh})
  return cfg


def _values(cfg) -> tuple[int, int, int]:
  """(parameters, of which Muon's block matrices, those matrices in batches of one shape each
  zero-padded to a multiple of 8 devices)."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(abstract_model(cfg.model), nnx.Param))[0]
  batches = Counter()
  for path, p in flat:
    if is_muon_param(path, p):
      (count, fan_in, fan_out), _ = matrix_view(path, p.shape)
      batches[(min(fan_in, fan_out), max(fan_in, fan_out))] += count
  return (sum(math.prod(p.shape) for _, p in flat),
          sum(math.prod(p.shape) for path, p in flat if is_muon_param(path, p)),
          sum(-(-count // 8) * 8 * m * n for (m, n), count in batches.items()))


def _collectives(cfg):
  """(the compiled step's collectives, its micro-steps)."""
  collectives, compiled_cfg = step_cost.step_collectives(cfg)
  return collectives, config_lib.accumulation_steps(compiled_cfg.train)


@pytest.mark.slow(seconds=6)
def test_data_parallel_2026_step_reduces_one_gradient_per_step_and_counts_the_optimizers_apart():
  cfg = _cfg(data=8)
  params, matrices, padded = _values(cfg)
  collectives, accum = _collectives(cfg)
  roles = step_cost.by_role(collectives)
  assert accum == 2
  gradient, optimizer = roles["gradient"], roles["optimizer"]
  # one float32 gradient and the loss sum and token count, once per step; none per micro-step
  assert gradient["payload"] == F32 * (params + 2) and gradient["ops_in_loops"] == 0, gradient
  assert collectives.links["all_reduce_payload"] == gradient["payload"], collectives.links  # the only all-reduce
  # Muon's matrices gathered once from the devices that orthogonalised them, zero-padded to 8 a
  # batch (before: an all-reduce of them, and all-to-alls and permutes), and nothing else; in bf16,
  # Polar Express's dtype, renormalised once gathered (before: in float32, twice the bytes)
  assert padded > matrices and optimizer["payload"] == BF16 * padded and optimizer["ops_in_loops"] == 0, optimizer
  assert set(collectives.links) == {"all_reduce", "all_reduce_payload", "all_gather", "all_gather_payload"}
  assert roles["other"]["payload"] == 0, roles


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_fsdp_2026_step_reduces_its_gradients_once_per_micro_step_by_default(mesh):
  """Sharded weights under train.grad_reduce=auto (ZeRO-3's memory): XLA gathers them once per step
  (out of the loop) and sums every micro-step's full weight gradients inside the loop."""
  cfg = _cfg(**mesh)
  _, matrices, _ = _values(cfg)
  collectives, accum = _collectives(cfg)
  roles = step_cost.by_role(collectives)
  gradient = roles["gradient"]
  assert accum == 2 and gradient["ops_in_loops"] > 0
  assert gradient["payload_in_loops"] == gradient["payload"] >= accum * F32 * matrices, gradient
  assert roles["other"]["payload"] > 0 and roles["other"]["payload_in_loops"] < roles["other"]["payload"]


def _fsdp_sharded(cfg) -> int:
  """Parameters whose weights the mesh splits over fsdp (the rest are replicated)."""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  state = nnx.state(abstract_model(cfg.model), nnx.Param)
  specs = jax.tree.leaves(sharding.specs(sharding.tree_shardings(state, mesh)),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return sum(math.prod(p.shape) for p, spec in zip(jax.tree.leaves(state), specs) if "fsdp" in str(spec))


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_fsdp_with_grad_reduce_step_reduce_scatters_once_per_step_with_one_devices_losses(mesh):
  """train.grad_reduce=step: each device sums its micro-batches' whole gradients, then one
  reduce-scatter over fsdp (and, on data x fsdp, an all-reduce of the shard over data) per step:
  no gradient collective inside the micro-step loop, and the losses of one device."""
  cfg = _cfg(**mesh)
  cfg.train.grad_reduce = "step"
  params, _, _ = _values(cfg)
  collectives, accum = _collectives(cfg)
  gradient = step_cost.by_role(collectives)["gradient"]
  sharded, data = _fsdp_sharded(cfg), mesh.get("data", 1)
  assert accum == 2 and 0 < sharded < params and gradient["ops_in_loops"] == 0, gradient
  assert collectives.roles["gradient_reduce_scatter_payload"] == F32 * sharded, collectives.roles
  # the rest (replicated weights, loss sum, token count) whole, and each shard over data
  all_reduced = (params - sharded + 2) + (sharded // mesh["fsdp"] if data > 1 else 0)
  assert gradient["payload"] == F32 * (sharded + all_reduced), gradient
  if data > 1:  # the general layout, data x fsdp, trains as one device does
    np.testing.assert_allclose(_losses(cfg, jax.devices()), _losses(_cfg(), jax.devices()[:1]), rtol=1e-5)


def _losses(cfg, devices, steps=3):
  """The losses of `steps` train steps on the mesh cfg.mesh lays over `devices`."""
  return train_on_mesh(cfg, devices, steps)[0]


@pytest.mark.slow(seconds=10)
def test_data_parallel_2026_losses_equal_one_device():
  """(The weights after 3 steps differ from one device's by more than the losses do, before and
  after map_matrices alike: Adam at eps 1e-10 on the scalars and NorMuon on the zero-initialised
  projections take sign-like steps that the reduction order can flip.)"""
  cfg = _cfg()
  one_losses = _losses(cfg, jax.devices()[:1])
  cfg.mesh.update(data=8)
  losses = _losses(cfg, jax.devices())
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  assert one_losses[-1] < one_losses[0]


@pytest.mark.slow(seconds=4)
def test_data_by_fsdp_optimizer_gathers_each_block_over_data_and_all_reduces_no_matrix():
  """data x fsdp (the multi-host layout: fsdp within a host, data across): the partitioner splits
  Muon's batches over fsdp, and each device slices its data share of its fsdp block and gathers
  the results over data (sharding.map_matrices). Left to the partitioner, the data share's way
  back was an all-reduce of every zero-padded matrix with permutes around it (d12_2026 at data=2 x
  fsdp=4: 79 full rematerialisations, 694 MiB of optimizer collectives a step, 99 MiB at fsdp=8,
  both at XLA:CPU's float32 widths)."""
  cfg = _cfg(data=2, fsdp=4)
  _, matrices, padded = _values(cfg)
  collectives, _ = _collectives(cfg)
  optimizer = {k.removeprefix("optimizer_"): v for k, v in collectives.roles.items() if k.startswith("optimizer_")}
  assert optimizer.get("all_gather_payload") == BF16 * padded // 4, optimizer  # each fsdp block, once, in bf16
  assert optimizer.get("collective_permute_ops", 0) == 0, optimizer
  assert optimizer["all_reduce_payload"] < F32 * matrices / 20, optimizer  # norms' sums, no matrix


def test_map_matrices_runs_each_share_on_its_device_and_gathers_once():
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  x_BxMxN = jax.random.normal(jax.random.key(0), (16, 4, 8))

  def cube(x_BxMxN):
    return x_BxMxN @ jnp.swapaxes(x_BxMxN, -1, -2) @ x_BxMxN

  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    mapped = jax.jit(lambda x: sharding.map_matrices(cube, x), in_shardings=replicated, out_shardings=replicated)
    text = mapped.lower(x_BxMxN).compile().as_text()
    out = mapped(x_BxMxN)
  # fp32 rounding only (jax 0.12's XLA:CPU blocks a 2-matrix batch's matmuls unlike a 16-matrix one:
  # 7e-6 relative); a wrong share or a missing gather is off by O(1)
  np.testing.assert_allclose(out, cube(x_BxMxN), rtol=2e-5, atol=2e-5)
  assert hlo_cost.compiled_collectives(text).work == {"all_gather": 1}


COMBINED = """
%body.3 (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %reduce-scatter.1 = f32[8,32]{1,0} reduce-scatter(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/while/body/transpose(jvp())/dot_general"}
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %g)
}

ENTRY %main.9 (x: f32[64,32]) -> f32[64,32] {
  %while.5 = (s32[], f32[64,32]{1,0}) while(%tuple.4), condition=%cond.2, body=%body.3, backend_config={"known_trip_count":{"n":"3"}}
  %all-reduce.6 = (f32[16]{0}, f32[4,4]{1,0}, f32[]) all-reduce(%a, %b, %c), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add, metadata={op_name="jit(step)/(optimizer/reshape:shard_map/gradient_sum/psum:reduce_sum)"}
  ROOT %all-gather.7 = f32[64,32]{1,0} all-gather(%w), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(step)/optimizer/concatenate"}
}
"""


def test_roles_split_combined_ops_by_operand_and_count_loops_apart():
  cost = hlo_cost.compiled_collectives(COMBINED)
  assert cost.roles == {"gradient_reduce_scatter_payload": 3 * 64 * 32 * F32, "gradient_reduce_scatter_ops": 3,
                        "optimizer_all_reduce_payload": 16 * F32, "optimizer_all_reduce_ops": 1,
                        "gradient_all_reduce_payload": 16 * F32, "gradient_all_reduce_ops": 1,
                        "other_all_reduce_payload": F32, "other_all_reduce_ops": 1,
                        "optimizer_all_gather_payload": 64 * 32 * F32, "optimizer_all_gather_ops": 1}
  assert {k: v for k, v in cost.in_loops.items() if v} == {"gradient_reduce_scatter_payload": 3 * 64 * 32 * F32,
                                                           "gradient_reduce_scatter_ops": 3}
  # a reduce-scatter's payload is the array it reduces: n times its result
  assert cost.links["reduce_scatter_payload"] == 3 * 64 * 32 * F32
  assert hlo_cost.operand_op_names("jit(f)/(a/b:c)", 2) == ["jit(f)/a/b", "jit(f)/c"]
  assert hlo_cost.operand_op_names("jit(f)/(a:b:c)", 2) == ["jit(f)/(a:b:c)"] * 2


def test_the_report_says_per_step_what_each_role_moves_and_how_much_of_it_per_micro_step():
  roles = step_cost.by_role(hlo_cost.compiled_collectives(COMBINED))
  assert roles["gradient"] == {"payload": (3 * 64 * 32 + 16) * F32, "ops": 4,
                               "payload_in_loops": 3 * 64 * 32 * F32, "ops_in_loops": 3}
  assert roles["optimizer"]["ops"] == 2 and roles["other"]["ops"] == 1
  assert step_cost._role_line(roles) == (  # pylint: disable=protected-access
      "by role      per step: gradient reductions 0.0 MiB in 4 ops, 3 of them in loops (0.0 MiB); "
      "optimizer 0.0 MiB in 2 ops; other 0.0 MiB in 1 ops")
