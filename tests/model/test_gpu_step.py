"""What XLA:GPU makes of the model's bf16 training step: d12_2026 cut to 2 layers and 4 micro-steps
of 8 x 2,048 tokens, compiled for an H100 on this host (jax's CUDA plugin; skipped without it,
as in CI). Each test counts kernels of the compiled module and fails on the code before its fix.
"""
import re

import pytest

from lm_fixtures import needs_cuda_plugin
from lmtiny import config as config_lib
from lmtiny.training import kernel_roofline, lowering

pytestmark = needs_cuda_plugin
ROWS = 8


@pytest.fixture(scope="module")
def step():
  """(the compiled module's computations, kernel_roofline.parse's, the config compiled)."""
  cfg = config_lib.load_file("configs/d12_2026.py")
  cfg.model.num_layers = 2
  cfg.train.update(auto_batch=False, batch_tokens=4 * ROWS * cfg.train.seq_len, device_batch_size=ROWS)
  compiled, _, cfg, _ = lowering.compile_for_topology(cfg, "h100:1")
  assert cfg.model.dtype == "bfloat16" and config_lib.accumulation_steps(config_lib.resolve_batch(cfg, 1).train) == 4
  return kernel_roofline.parse(compiled.as_text())[0], cfg


def _kernels(computations: dict):
  """The instructions that launch work (fusions and custom calls) outside fusions' bodies, and
  the shape of every instruction by name."""
  shapes = {i.name: i.shape for body in computations.values() for i in body}
  bodies = {name for body in computations.values() for i in body if i.op == "fusion"
            for name in re.findall(r"calls=%([\w.\-]+)", i.attributes)}
  return [i for name, body in computations.items() if name not in bodies for i in body
          if i.op in ("fusion", "custom-call")], shapes


def test_no_kernel_reads_the_embedded_rows_in_float32(step):
  """The layers read x0 (the embedding after its norm and smear) in bf16. Before it was formed
  once, every residual mix and its gradient re-read the float32 rows: 20 kernels here."""
  computations, cfg = step
  rows_f32 = f"f32[{ROWS},{cfg.train.seq_len},{cfg.model.d_model}]"
  kernels, shapes = _kernels(computations)
  assert [k.name for k in kernels if any(shapes.get(o, "").startswith(rows_f32) for o in k.operands)] == []


def test_weight_gradients_are_added_to_their_sums_inside_their_gemms(step):
  """Each micro-step's float32 gradient of the MLP's matrices (2 a layer) and of the lm_head is
  added to its sum by the GEMM that forms it (at d24_2026's shape the attention projections' too:
  6 a layer). Behind the barrier a TPU needs (lmtiny.model.transformer.tpu_scheduling_barrier)
  only the lm_head's was: a separate kernel read both float32 arrays and wrote each other sum."""
  computations, cfg = step
  adding = []  # GEMMs whose float32 product is added to a sum of its shape (a loop's copies once)
  for name, body in computations.items():
    products = {i.shape for i in body if i.op == "dot" and i.shape.startswith("f32[")}
    if ".clone" not in name and any(i.op == "add" and i.shape in products for i in body):
      adding.append(name)
  assert len(adding) == 2 * cfg.model.num_layers + 1, adding


def test_relu2s_backward_rounds_the_root_of_its_output_to_bf16(step):
  """relu²'s backward (lmtiny.model.transformer.relu2) reads the bf16 output y and rounds
  sqrt(y) to bf16, which is relu(x) exactly, before the multiply: nanochat's bf16 gradient. The
  float32 product it had before used the root unrounded; written in bf16, XLA rewrote sqrt(r * r)
  to r and kept relu's output alive beside y (no root at all)."""
  computations, cfg = step
  hidden = f"f32[{ROWS * cfg.train.seq_len},{config_lib.mlp_dim(cfg.model)}]"
  rounded = []
  for body in computations.values():
    for root in (i for i in body if i.op == "sqrt" and i.shape.startswith(hidden)):
      users = [i for i in body if root.name in i.operands]
      assert [(i.op, i.shape.split("[")[0]) for i in users] == [("convert", "bf16")], users
      rounded.append(root.name)
  assert len(rounded) >= cfg.model.num_layers, rounded  # each layer's (a loop's copies aside)
