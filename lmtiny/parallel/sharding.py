"""The only module that knows mesh axis names: the mesh, the logical-axis rules, the shardings.

Three layers (as in MaxText): a physical mesh with named axes (data, fsdp, tensor); logical axis
names on every parameter (`logical_axes` metadata, set in lmtiny.model) and on key activations
(`constrain`); and the RULES table below mapping one to the other.

  data   - pure data parallelism: parameters replicated, batch split.
  fsdp   - ZeRO-3: batch split AND every parameter's `embed` dimension split, so parameters,
           gradients and optimizer state are sharded; XLA all-gathers weights where they are used.
  tensor - Megatron tensor parallelism: attention heads, MLP hidden units and vocab split, so
           the column-parallel then row-parallel matmul pair needs one reduction per block.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmtiny.config import MESH_AXES
from lmtiny.errors import ConfigError
from lmtiny.kernels import cross_entropy as loss_lib
from lmtiny.kernels import fp8

# Logical axis -> mesh axes. Parameters use the plain names, activations the act_ names.
RULES = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",       # lm_head columns: the logits come out vocab-parallel
    "embed_vocab": None,     # embedding rows stay whole so the lookup is a local gather
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "gate_in": None,         # the few input channels that drive a gate (value embeddings, smear)
    # A batch of whole matrices (Muon's Newton-Schulz input): split over as many of these axes,
    # in this order, as divide the batch (`spread_matrices`; `map_matrices` splits over data by hand).
    "matrix_batch": ("fsdp", "data", "tensor"),
    "lora_rank": None,       # LoRA adapters' low-rank dimension: small, replicated
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 filled; raises ConfigError when they cannot cover the devices."""
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      if num_devices % fixed:
        raise ConfigError(f"config.mesh={sizes}: fixed axes ({fixed}) do not divide {num_devices} devices")
      sizes[axis] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.mesh={sizes}: product {math.prod(sizes.values())} != {num_devices} devices")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _mesh_axes_for(name, dim: int, mesh_shape_: dict) -> str | tuple | None:
  axes = RULES[name] if name is not None else None
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else axes
  names = tuple(a for a in names if mesh_shape_.get(a, 1) > 1)
  # A dimension the mesh axes do not divide (3 heads on tensor=2, MQA's single kv head) is
  # replicated: correct, only less sharded. Megatron does the same for kv heads.
  if not names or dim % math.prod(mesh_shape_[a] for a in names):
    return None
  return names[0] if len(names) == 1 else names


def logical_to_spec(logical_axes, shape, mesh_shape_: dict) -> P:
  return P(*(_mesh_axes_for(name, dim, mesh_shape_) for name, dim in zip(logical_axes, shape)))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings, leaf for leaf, for a pytree holding nnx Variables (params, optimizer
  moments: sharded by their logical axes) and other leaves (step, RNG: replicated)."""
  shape = dict(mesh.shape)

  def sharding(x):
    if _is_variable(x) and not hasattr(x.get_value(), "shape"):  # optax.masked's placeholder: no array
      return x
    if _is_variable(x):
      axes = x.get_metadata().get("logical_axes")
      spec = logical_to_spec(axes, x.get_value().shape, shape) if axes is not None else P()
      return jax.tree.map(lambda _: NamedSharding(mesh, spec), x)
    return NamedSharding(mesh, P())

  return jax.tree.map(sharding, abstract_tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] arrays: batch over (data, fsdp), sequence whole."""
  return NamedSharding(mesh, logical_to_spec(("batch", "seq"), (0, 0), dict(mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def traced_mesh():
  """The abstract mesh being traced under, or None: outside a mesh, and inside
  `sum_over_batch_shards`, where every axis is manual (arrays are one device's own, so constraints
  and shard_maps no longer apply)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.manual_axes) >= set(mesh.axis_names):
    return None
  return mesh


def gathers_weights() -> bool:
  """Whether the traced mesh splits parameters over `fsdp`, so a weight is all-gathered where it
  is used (ZeRO-3)."""
  mesh = traced_mesh()
  return mesh is not None and mesh.shape["fsdp"] > 1


def accumulates_per_device(mesh: Mesh, grad_reduce: str = "auto") -> bool:
  """Whether a step's micro-batch gradients are summed on each device and reduced once per step
  (sum_over_batch_shards), as train.grad_reduce asks: "auto" does so on a pure data-parallel mesh,
  where every parameter is replicated anyway; "step" also under fsdp (weights gathered whole once
  per step, gradients reduce-scattered once per step). Otherwise the gradients stay sharded and XLA
  sums them inside every micro-step (XLA:CPU's partition: an all-reduce of the whole weight
  gradients of the weights it gathered before the loop, then each device keeps its shard)."""
  sizes = dict(mesh.shape)
  if grad_reduce == "micro_step" or math.prod(sizes.values()) == 1:
    return False
  if grad_reduce == "step":
    if sizes["tensor"] > 1:
      raise ConfigError(f"config.train.grad_reduce='step': needs mesh.tensor=1, not {sizes['tensor']}")
    return True
  return _data_parallel_only(sizes)


def _data_parallel_only(sizes: dict) -> bool:
  """A mesh of more than one device that splits only the batch: every parameter replicated."""
  return sizes["data"] > 1 and sizes["fsdp"] == 1 and sizes["tensor"] == 1


def specs(shardings):
  """The PartitionSpecs of a pytree of NamedShardings (nnx Variables kept as they are)."""
  return jax.tree.map(lambda s: s.spec, shardings)


def _spec_axes(spec: P) -> list[str]:
  return [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]


def _gather_whole(x: jax.Array, spec: P) -> jax.Array:
  """A device's shard of x (laid out as spec, inside shard_map) -> the whole array."""
  for dim, axes in enumerate(spec):
    if axes is not None:
      x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
  return x


def _sum_to_shard(x: jax.Array, spec: P, sizes: dict) -> jax.Array:
  """Every device's whole partial sum x -> this device's shard (laid out as spec) of their total:
  a psum over the (non-trivial) axes spec does not split x over, a reduce-scatter over those it does."""
  for dim, axes in enumerate(spec):  # first, so the psum below moves a shard, not the whole
    if axes is not None:
      x = jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True)
  rest = tuple(a for a, n in sizes.items() if n > 1 and a not in _spec_axes(spec))
  return jax.lax.psum(x, rest) if rest else x


def sum_over_batch_shards(fn, mesh: Mesh, weights, batch, *, weight_specs=P(), sum_specs=P(),
                          scope: str = "batch_shard_sum"):
  """fn(weights, batch) -> a pytree of sums, run on each device's rows of `batch` ([micro-steps,
  rows, ...], rows split over the batch axes) with no collective inside, then summed across the
  devices once: one reduction per step instead of one per micro-step. `weights` arrive laid out
  as `weight_specs` (a pytree prefix of PartitionSpecs; P() = replicated) and are gathered whole
  once, before fn; each sum leaves laid out as its `sum_specs` entry (a reduce-scatter where that
  splits it). For a mesh where accumulates_per_device holds. `scope`: the jax.named_scope of the
  reductions (their ops' op_name)."""
  sizes = dict(mesh.shape)
  rows = _mesh_axes_for("batch", jax.tree.leaves(batch)[0].shape[1], sizes)
  is_spec = lambda x: isinstance(x, P)  # noqa: E731  (a PartitionSpec is a tuple: a leaf here)

  def local(weights, batch):
    whole = jax.tree.map(lambda spec, w: jax.tree.map(lambda x: _gather_whole(x, spec), w), weight_specs, weights,
                         is_leaf=is_spec)
    sums = fn(whole, batch)
    with jax.named_scope(scope):
      return jax.tree.map(lambda spec, s: jax.tree.map(lambda x: _sum_to_shard(x, spec, sizes), s),
                          sum_specs, sums, is_leaf=is_spec)

  return jax.shard_map(local, mesh=mesh, in_specs=(weight_specs, P(None, rows)), out_specs=sum_specs,
                       check_vma=False)(weights, batch)


def _axes_tuple(axes) -> tuple:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def sharded_fp8_matmul(x_MxK: jax.Array, w_KxN: jax.Array, rows: int, k_dim: tuple[str, int],
                       n_dim: tuple[str, int]) -> jax.Array:
  """lmtiny.kernels.fp8's matmul of x [M, K] (M = `rows` sequences x tokens) and a weight whose K
  and N sides start with the logical axes `k_dim` / `n_dim` (name, size), with every amax taken
  over one device's block: under a mesh it runs in `shard_map`, rows over the batch axes, K and N
  as the weight's and the activations' rules split them (Megatron's column- and row-parallel
  layers; the weight's FSDP split gathered inside, its gradient reduce-scattered). No collective
  waits on a scale: each device dequantizes its own partial product before any cross-device sum
  (the row-parallel output's psum, the partitioner's sums of dx over `tensor` and of dw over the
  batch axes), so a per-block scale is exact for every GEMM. Outside a mesh (and inside
  `sum_over_batch_shards`, where every array is one device's) it is the plain fp8 matmul."""
  mesh = traced_mesh()
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return fp8.fp8_matmul(x_MxK, w_KxN)
  sizes = dict(mesh.shape)
  w_k, w_n = (_axes_tuple(_mesh_axes_for(name, size, sizes)) for name, size in (k_dim, n_dim))
  act = lambda name: f"act_{name}" if f"act_{name}" in RULES else None  # noqa: E731  (the activation's rule)
  x_k, out_n = (_axes_tuple(_mesh_axes_for(act(name), size, sizes)) for name, size in (k_dim, n_dim))
  if not (set(x_k) <= set(w_k) and set(out_n) <= set(w_n)):  # the RULES split act_X within X
    raise ValueError(f"fp8 matmul: activations split unlike the weight ({x_k}, {out_n} vs {w_k}, {w_n})")
  gather_k, gather_n = tuple(a for a in w_k if a not in x_k), tuple(a for a in w_n if a not in out_n)
  spec = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes  # noqa: E731
  row_axes = _mesh_axes_for("batch", rows, sizes)
  body = functools.partial(fp8.fp8_matmul_shard, sum_axes=x_k, gather_k_axes=gather_k, gather_n_axes=gather_n)
  out_MxN = jax.shard_map(body, mesh=mesh, in_specs=(P(row_axes, spec(x_k)), P(spec(w_k), spec(w_n))),
                          out_specs=P(row_axes, spec(out_n)), check_vma=False)(x_MxK, w_KxN)
  return checkpoint_name(out_MxN, fp8.FP8_OUT)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """Pin an activation's sharding by logical names; a no-op outside a mesh (plain forward)."""
  mesh = traced_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def _matrix_batch_spec(sizes: dict, count: int, axes: tuple[str, ...]) -> P:
  """A batch of `count` matrices split over as many of `axes` (in order) as divide it."""
  used = []
  for axis in axes:
    if sizes.get(axis, 1) > 1 and count % (math.prod(sizes[a] for a in used) * sizes[axis]) == 0:
      used.append(axis)
  return P(tuple(used) if len(used) > 1 else (used[0] if used else None))


def spread_matrices(x_BxMxN: jax.Array, axes: tuple[str, ...] = RULES["matrix_batch"]) -> jax.Array:
  """Pin a batch of matrices so that each device holds whole matrices, the batch split over as
  many of `axes` (the "matrix_batch" mesh axes) as divide it: Muon then orthogonalises each matrix
  on one device rather than every device gathering every matrix (for a scanned d32 on fsdp=16: 75
  all-gathers of whole float32 layer stacks per step). A no-op outside a mesh."""
  mesh = traced_mesh()
  if mesh is None:
    return x_BxMxN
  spec = _matrix_batch_spec(dict(mesh.shape), x_BxMxN.shape[0], axes)
  return jax.lax.with_sharding_constraint(x_BxMxN, P(*spec, *([None] * (x_BxMxN.ndim - 1))))


def map_matrices(fn, x_BxMxN: jax.Array) -> jax.Array:
  """fn (a batch of whole matrices -> the same shape) of each matrix, each device running it on its
  share. The parameters' own axes (fsdp, tensor) split the batch through the partitioner
  (`spread_matrices`); the data axis, over which every parameter is replicated, splits each of
  those blocks by hand: every device slices its share and all-gathers the results over "data",
  once. Left to the partitioner, the way back from data shares to replicated weights is an
  all-reduce of zero-padded shares (twice an all-gather's link bytes) with all-to-alls and permutes
  around it: on a data-only mesh as much traffic again as the gradients' all-reduce for d24_2026,
  and on data x fsdp (d12_2026, data=2 x fsdp=4) 79 full rematerializations and 694 MiB of
  optimizer collectives a step, against 99 MiB on fsdp=8 (both counted at XLA:CPU's float32
  widths, before step_cost read the partitioner's dtypes). A block the data axis does not divide
  (pad the batch to `matrix_devices`) takes the partitioner's way."""
  mesh = traced_mesh()
  if mesh is None:
    return fn(x_BxMxN)
  sizes = dict(mesh.shape)
  model_axes = tuple(a for a in RULES["matrix_batch"] if a != "data")
  spec = _matrix_batch_spec(sizes, x_BxMxN.shape[0], model_axes)
  block = x_BxMxN.shape[0] // math.prod(sizes[a] for a in _spec_axes(spec))
  if sizes["data"] == 1 or block % sizes["data"]:
    return fn(spread_matrices(x_BxMxN))

  def share(x_BxMxN):
    count = x_BxMxN.shape[0] // sizes["data"]
    mine = jax.lax.dynamic_slice_in_dim(x_BxMxN, jax.lax.axis_index("data") * count, count)
    return jax.lax.all_gather(fn(mine), "data", tiled=True)

  return jax.shard_map(share, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(
      spread_matrices(x_BxMxN, model_axes))


def matrix_devices() -> int:
  """How many devices `spread_matrices` splits a batch over when their count divides it: the
  product of the "matrix_batch" mesh axes (1 outside a mesh)."""
  mesh = traced_mesh()
  if mesh is None:
    return 1
  sizes = dict(mesh.shape)
  return math.prod(sizes.get(a, 1) for a in RULES["matrix_batch"])


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble this process's rows of the batch into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
  """Indices of the rows of a [global_rows, ...] batch that this process feeds to
  `global_batch_from_local` (all of them on one process), in the order it expects them."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows, 1))
  starts = sorted({index[0].indices(global_rows)[:2] for index in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts])


def check_process_local_batches(mesh: Mesh, global_rows: int = 1 << 20) -> None:
  """Each process feeds only its own rows (`global_batch_from_local`), which is right only when
  every batch shard lives on the devices of one process. A model axis spanning hosts (tensor
  across processes, data x fsdp smaller than the process count) breaks that: refused in one line."""
  owners: dict = {}
  for device, index in batch_sharding(mesh).devices_indices_map((global_rows, 1)).items():
    owners.setdefault(index[0].indices(global_rows)[:2], set()).add(device.process_index)
  shared = [procs for procs in owners.values() if len(procs) > 1]
  if shared:
    raise ConfigError(f"config.mesh={dict(mesh.shape)}: a batch shard is held by devices of processes "
                      f"{sorted(shared[0])}; each process must hold whole batch shards (make "
                      f"data x fsdp a multiple of the {jax.process_count()} processes and keep model "
                      "axes within a host)")


def vocab_parallel_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] (float32) of vocab-sharded logits.

  With a `tensor` axis the logits arrive split over the vocab (Megatron's vocab-parallel
  lm_head). This is the one place lmtiny writes its collectives by hand, in `shard_map`: each
  device reduces its own vocab slice, and three scalar-per-token all-reduces (max, sum of exps,
  target logit) finish the softmax. Left to GSPMD, the target-logit gather over a sharded vocab
  all-gathers the [B, T, V] logits, the largest activation of a small model.
  """
  mesh = traced_mesh()
  vocab = logits_BxTxV.shape[-1]
  if mesh is None or mesh.shape.get("tensor", 1) == 1 or vocab % mesh.shape["tensor"]:
    return _cross_entropy_local(logits_BxTxV, targets_BxT)
  batch = _mesh_axes_for("batch", logits_BxTxV.shape[0], dict(mesh.shape))

  def vocab_parallel(logits_local, targets):
    v_local = logits_local.shape[-1]
    logits_local = logits_local.astype(jnp.float32)
    # The max only keeps exp() in range; it cancels out of the loss, so no gradient through it.
    top = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(logits_local), axis=-1), "tensor")
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits_local - top[..., None]), axis=-1), "tensor")
    local_target = targets - jax.lax.axis_index("tensor") * v_local
    in_slice = (local_target >= 0) & (local_target < v_local)
    picked = jnp.take_along_axis(logits_local, jnp.clip(local_target, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(in_slice, picked, 0.0), "tensor")
    return jnp.log(sum_exp) + top - target_logit

  return jax.shard_map(vocab_parallel, mesh=mesh, in_specs=(P(batch, None, "tensor"), P(batch, None)),
                       out_specs=P(batch, None))(logits_BxTxV, targets_BxT)


def _cross_entropy_local(logits_BxTxV, targets_BxT):
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_logit


# ---------------------------------------------------------------------------------------------
# Attention: q, k and v must split their heads alike (cuDNN's partitioner and shard_map demand it).


def _tensor_size(mesh_shape_: dict | None) -> int:
  if mesh_shape_ is None:
    mesh = traced_mesh()
    mesh_shape_ = {} if mesh is None else dict(mesh.shape)
  return mesh_shape_.get("tensor", 1)


def kv_head_repeats(num_heads: int, num_kv_heads: int, mesh_shape_: dict | None = None) -> int:
  """How many copies of each kv head attention makes so k/v shard over `tensor` like q does.

  The RULES shard q's H heads over `tensor` when it divides H, and replicate the K kv heads
  when it does not divide K (GQA/MQA with few kv heads): q would be split and k/v whole, which
  the cuDNN partitioner rejects and shard_map cannot express. Repeating each kv head
  r = tensor / gcd(K, tensor) times gives K * r heads that `tensor` divides, with query head h
  still reading a copy of kv head h // (H / K) (r divides H / K whenever `tensor` divides H).
  Each device then holds K * r / tensor <= K kv heads: no more than the replicated layout.
  1 (nothing to do) without a mesh, when `tensor` divides K, or when it does not divide H.
  `mesh_shape_` defaults to the mesh in context.
  """
  tensor = _tensor_size(mesh_shape_)
  if tensor == 1 or num_heads % tensor or num_kv_heads % tensor == 0:
    return 1
  return tensor // math.gcd(num_kv_heads, tensor)


def attention_specs(q_shape, kv_shape, mesh_shape_: dict) -> tuple[P, P, P]:
  """shard_map specs (q [B,T,H,Dh], k/v [B,S,K,Dh], segment ids [B,T]) for a fused attention
  kernel: batch over (data, fsdp), heads over tensor, sequence and head dim whole. kv_shape is
  after `kv_head_repeats`, so q and k/v split their heads the same way."""
  q_spec = logical_to_spec(("batch", "seq", "act_heads", None), q_shape, mesh_shape_)
  kv_spec = logical_to_spec(("batch", "seq", "act_kv_heads", None), kv_shape, mesh_shape_)
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"attention heads shard unlike: q {q_shape} as {q_spec}, k/v {kv_shape} as {kv_spec}")
  return q_spec, kv_spec, logical_to_spec(("batch", "seq"), q_shape[:2], mesh_shape_)


def sharded_fused_linear_cross_entropy(x_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array,
                               ce_weights_BxT: jax.Array, z_weights_BxT: jax.Array, *, softcap: float = 0.0,
                               chunk_tokens: int = 4096, impl: str = "xla",
                               fp8: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(objective, cross-entropy [B, T], logsumexp [B, T]) with objective = sum(ce_weights * ce) +
  sum(z_weights * lse^2), its gradient formed in the forward pass (lmtiny.kernels.cross_entropy's
  fused loss; `impl` as there). Sharded as `sharded_linear_cross_entropy`; each batch shard returns its
  own partial objective, summed here."""
  b, t, d = x_BxTxD.shape
  mesh = traced_mesh()

  def local(x_BxTxD, w_DxV, targets_BxT, ce_weights_BxT, z_weights_BxT, axis_name=None, gather_axes=None):
    start = 0 if axis_name is None else jax.lax.axis_index(axis_name) * w_DxV.shape[1]
    objective, ce_N, lse_N = loss_lib.fused_linear_cross_entropy(
        x_BxTxD.reshape(-1, d), w_DxV, targets_BxT.reshape(-1), ce_weights_BxT.reshape(-1),
        z_weights_BxT.reshape(-1), start, softcap, chunk_tokens, axis_name, gather_axes, impl, fp8)
    return objective[None], ce_N.reshape(targets_BxT.shape), lse_N.reshape(targets_BxT.shape)

  if mesh is None:
    objective, ce_BxT, lse_BxT = local(x_BxTxD, w_DxV, targets_BxT, ce_weights_BxT, z_weights_BxT)
    return objective[0], ce_BxT, lse_BxT
  batch, rows_axes, vocab = _loss_axes(b, w_DxV.shape, dict(mesh.shape))
  rows = P(batch, None)
  objectives, ce_BxT, lse_BxT = jax.shard_map(
      lambda x, w, tg, cw, zw: local(x, w, tg, cw, zw, vocab, rows_axes), mesh=mesh, check_vma=False,
      in_specs=(P(batch, None, None), P(rows_axes, vocab), rows, rows, rows),
      out_specs=(P(batch), rows, rows))(x_BxTxD, w_DxV, targets_BxT, ce_weights_BxT, z_weights_BxT)
  return jnp.sum(objectives), ce_BxT, lse_BxT


def _loss_axes(batch_size: int, w_shape, mesh_shape_: dict):
  """Mesh axes of the loss's shard_map: (token rows, the weight's D rows, its V columns). The
  weight enters as stored, its D rows split like the parameter's (FSDP), and the loss kernel
  gathers a compute-dtype copy inside and reduce-scatters dw in float32 (lmtiny.kernels.cross_entropy)."""
  return (_mesh_axes_for("batch", batch_size, mesh_shape_), _mesh_axes_for("embed", w_shape[0], mesh_shape_),
          _mesh_axes_for("vocab", w_shape[1], mesh_shape_))


def sharded_linear_cross_entropy(x_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, *,
                         softcap: float = 0.0, chunk_tokens: int = 4096,
                         fp8: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-token (cross-entropy, logsumexp) [B, T] float32 of logits x @ w, never materialising
  [B, T, V] (lmtiny.kernels.cross_entropy). Under a mesh it runs in `shard_map`: rows split over the batch axes,
  vocab columns over `tensor` (Megatron's vocab-parallel loss: three per-token all-reduces),
  chunks of `chunk_tokens` tokens per device. `fp8`: the lm_head GEMMs on fp8 operands, each
  scaled by its device's block (lmtiny.kernels.cross_entropy)."""
  b, t, d = x_BxTxD.shape
  mesh = traced_mesh()

  def local(x_BxTxD, w_DxV, targets_BxT, axis_name=None, gather_axes=None):
    start = 0 if axis_name is None else jax.lax.axis_index(axis_name) * w_DxV.shape[1]
    ce_N, lse_N = loss_lib.linear_cross_entropy(x_BxTxD.reshape(-1, d), w_DxV, targets_BxT.reshape(-1), start,
                                                softcap, chunk_tokens, axis_name, gather_axes, fp8)
    return ce_N.reshape(targets_BxT.shape), lse_N.reshape(targets_BxT.shape)

  if mesh is None:
    return local(x_BxTxD, w_DxV, targets_BxT)
  batch, rows_axes, vocab = _loss_axes(b, w_DxV.shape, dict(mesh.shape))
  return jax.shard_map(lambda x, w, tg: local(x, w, tg, vocab, rows_axes), mesh=mesh, check_vma=False,
                       in_specs=(P(batch, None, None), P(rows_axes, vocab), P(batch, None)),
                       out_specs=(P(batch, None), P(batch, None)))(x_BxTxD, w_DxV, targets_BxT)
