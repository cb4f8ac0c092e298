"""lmtiny.plan.fit and `python -m lmtiny.arch --fit`: the plans respect the memory limit, the
search finds what a small card needs, the ranking follows the stated rule (checked by hand), the
recompute counts match the lowered step's matmuls, the pasted overrides pass lmtiny.train's
checks, XLA's own compile agrees with the chosen plan's estimate, and docs/scale-out.md's table
is what the command prints."""
import os
import re

import jax
import pytest

from lm_fixtures import ROOT, load_config_module, needs_libtpu, tiny_config
from lmtiny import arch as arch_cli, cli, config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.parallel import sharding
from lmtiny.plan import counts, fit, memory, recipe
from lmtiny.training import benchmark as bench, hlo_cost, lowering, step_cost
from lmtiny.training.resolved import resolve_run

GIB = 2 ** 30


def _config(name: str):
  return load_config_module(name).get_config()


def _tiny_at_4_layers():
  """The tiny demo's shape at 4 layers (it ships 2): the hand counts below were written for 4."""
  cfg = _config("tiny")
  cfg.model.num_layers = 4
  return cfg


def test_parse_memory_and_chip_names():
  assert fit.parse_memory("24GiB") == 24 * GIB and fit.parse_memory("10GB") == 10e9
  assert fit.parse_memory(" 1.5 tb ") == 1.5e12 and fit.parse_memory("512MiB") == 512 * 2 ** 20
  for bad in ("24", "GiB", "-3GB", "0GB", "24 parsecs", "1e3GB", ""):
    with pytest.raises(ConfigError, match="--memory="):
      fit.parse_memory(bad)
  assert fit.chip_key("RTX-4090") == fit.chip_key("4090") == "rtx4090" and fit.chip_key("A100_40") == "a100_40"
  c = fit.chip("3080")
  assert (c.memory, c.peak, c.attention) == (10e9, 59.5e12, "xla")  # the GA102 whitepaper's BF16, FP32 accumulate
  assert fit.chip("v5e", "24GiB").memory == 24 * GIB and fit.chip(None, "10GB", "a100").peak == 312e12
  with pytest.raises(ConfigError, match="unknown chip"):
    fit.chip("tpu9")


def test_attention_per_chip_is_what_auto_resolves_to():
  """The chip table's backend is lmtiny.model.attention's choice for packed training rows."""
  from lmtiny.model import attention as attn_lib
  capability = {"h100": (9, 0), "a100": (8, 0), "a100_40": (8, 0), "l4": (8, 9), "rtx4090": (8, 9),
                "rtx3090": (8, 6), "rtx3080": (8, 6)}
  for key, (_, backend) in fit.FIT_CHIPS.items():
    platform = "tpu" if key.startswith("v") else "gpu"
    assert attn_lib.resolve_impl("auto", "bfloat16", platform=platform, seq_len=2048, packed=True,
                                 gpu_capability=capability.get(key)) == backend, key


@pytest.mark.parametrize("name, chip, chips", [("d12_2026", "rtx4090", 1), ("d24_2026", "v5e", 8),
                                               ("d24_2026", "h100", 8), ("d20", "l4", 1)])
def test_every_plan_fits_and_is_the_largest_batch_that_does(name, chip, chips):
  cfg, c = _config(name), fit.chip(chip)
  plans, _ = fit.search(cfg, c, chips)
  assert plans
  resolved = recipe.resolve(cfg)
  sequences = config_lib.global_batch_size(resolved.train)
  for p in plans:
    shape = {"data": p.data, "fsdp": p.fsdp, "tensor": p.tensor}
    assert p.data * p.fsdp * p.tensor == chips
    trial = fit.with_plan(resolved, p)
    attention = fit.for_rows(c, cfg).attention
    on = fit.platform(c)
    assert memory.estimate(trial, shape, attention=attention, platform=on)["total"] == p.bytes <= memory.PLAN_HEADROOM[on] * c.memory
    assert p.accumulation * p.device_batch_size * p.data * p.fsdp == sequences  # the global batch kept
    per_device = sequences // (p.data * p.fsdp)
    larger = [d for d in range(p.device_batch_size + 1, per_device + 1) if per_device % d == 0]
    if larger:  # the next device batch up does not fit
      trial.train.device_batch_size = larger[0]
      assert memory.estimate(trial, shape, attention=c.attention, platform=on)["total"] > memory.PLAN_HEADROOM[on] * c.memory


def test_a_small_card_needs_a_smaller_batch_and_remat():
  """d12 (2026) asks for 32 sequences per device keeping every activation; a 24 GB card holds 16
  of them, still keeping every activation (16.5 GiB counted; 20.1 while every layer's whole
  working set and a bf16 gradient of every weight were counted, when remat minimal was the plan).
  Its rows are causal sequences (no document mask), which cuDNN runs on these cards; with the mask
  they are packed, which pre-Hopper cards run in XLA with its [T, T] scores: a 24 GB card still
  holds 16, under remat minimal, and a 10 GB 3080 holds 4, remat saving the matmul outputs, or 1
  keeping everything; at 45% of it, none."""
  cfg = _config("d12_2026")
  assert (cfg.train.device_batch_size, cfg.model.remat) == (32, "none")
  c = fit.chip("rtx4090")
  assert fit.for_rows(c, cfg).attention == "cudnn" and c.attention == "xla"
  assert memory.estimate(cfg, attention="cudnn")["total"] > memory.PLAN_HEADROOM["gpu"] * c.memory  # as configured: no
  best = fit.search(cfg, c)[0][0]
  assert (best.device_batch_size, best.remat, best.accumulation) == (16, "none", 16)
  cfg.data.document_mask = True
  assert fit.for_rows(c, cfg).attention == "xla"
  best = fit.search(cfg, c)[0][0]
  assert (best.device_batch_size, best.remat, best.accumulation) == (16, "minimal", 16)
  plans, smallest = fit.search(cfg, fit.chip("3080"))  # the default 80% of a GPU
  assert smallest is None and plans[0].device_batch_size == 4 and plans[0].remat == "minimal"
  assert {p.device_batch_size for p in plans if p.remat == "none"} == {1}  # keeping every activation: 1 sequence
  plans, smallest = fit.search(cfg, fit.chip("3080"), usable=0.45)  # at 45%: nothing, and the nearest
  assert plans == [] and smallest.device_batch_size == 1 and smallest.remat == "full"


def test_recompute_counts_by_hand():
  """The tiny config at 4 layers: d 192, 3 heads of 64, relu2 MLP 768, QK-norm, T 256."""
  m = _tiny_at_4_layers().model
  qk, v, o, up = 2 * 192 * (192 + 192), 2 * 192 * 192, 2 * 192 * 192, 2 * 192 * 768
  attention = 4 * 128 * 192 * 4  # forward QK^T and AV over 128 keys (causal half of 256), 4 layers
  assert fit.recompute_flops_per_token(m, 256, "none") == fit.recompute_flops_per_token(m, 256, "minimal") == 0
  assert fit.recompute_flops_per_token(m, 256, "save_qkv") == 4 * (o + up + qk)
  assert fit.recompute_flops_per_token(m, 256, "save_attn_out") == 4 * (qk + v + o + up)
  assert fit.recompute_flops_per_token(m, 256, "full") == 4 * (qk + v + o + up) + attention
  assert fit.recompute_flops_per_token(m, 256, "minimal", "xla") == attention / 2
  assert fit.recompute_flops_per_token(m, 256, "dots", "xla") == 0


def test_ranking_by_hand():
  """A chip that holds every plan at one micro-step: the speed is FLOPs only, so the order is
  none, minimal (equal: none recomputes nothing elementwise), then save_qkv, save_attn_out, full.
  Then a chip where none takes 4 micro-steps and full 2: which is faster turns on the memory
  bandwidth, by hand."""
  cfg = _tiny_at_4_layers()
  t = cfg.train
  flops = counts.train_flops_per_token(cfg.model, t.seq_len)
  assert flops == 6 * (4 * (4 * 192 * 192 + 2 * 192 * 768) + 192 * 4096) + 3 * 4 * 128 * 192 * 4
  big = fit.Chip("test", "test", 1e12, 1e12, 1e11, "splash")
  plans, _ = fit.search(cfg, big, mfu=0.5)
  assert [p.remat for p in plans] == ["none", "minimal", "save_qkv", "save_attn_out", "full"]
  assert all(p.accumulation == 1 for p in plans)
  assert plans[0].step_s == pytest.approx(t.batch_tokens * flops / (1e12 * 0.5))
  assert plans[-1].step_s == pytest.approx(t.batch_tokens * (flops + 4 * 2 * 192 * (384 + 192 + 192 + 768)
                                                            + 4 * 128 * 192 * 4) / 0.5e12)
  # Loss chunks of 256 tokens (one sequence), so the activations set the memory: the chip holds
  # none at 4 sequences (4 micro-steps) and full at 8 (2), not none at 8 nor full at 16.
  cfg.model.loss_chunk_tokens = 256
  def est(remat, dbs):  # as the planner counts for the test chip (a GPU: fit.platform)
    return memory.estimate(fit.with_plan(cfg, fit.Plan(1, 1, 1, dbs, remat, 0, 0, True, 0, 0, 0, 0)),
                           attention="splash", platform="gpu")["total"]
  limit = est("none", 4)
  assert est("full", 8) <= limit < min(est("none", 8), est("full", 16))
  n = counts.count_params(cfg.model)
  recompute = 4 * 2 * 192 * (384 + 192 + 192 + 768) + 4 * 128 * 192 * 4
  for bandwidth, winner in ((1e12, "none"), (1e9, "full")):
    c = fit.Chip("test", "test", limit, 1e12, bandwidth, "splash")
    plans, _ = fit.search(cfg, c, usable=1.0)
    by_policy = {p.remat: p for p in plans}
    micro_step = (4 * n + 10 * n) / bandwidth  # bf16 weights read twice, the float32 accumulator's update
    none_s = t.batch_tokens * flops / 0.4e12 + 3 * micro_step
    full_s = t.batch_tokens * (flops + recompute) / 0.4e12 + micro_step
    assert by_policy["none"].device_batch_size == 4 and by_policy["none"].step_s == pytest.approx(none_s)
    assert by_policy["full"].device_batch_size == 8 and by_policy["full"].step_s == pytest.approx(full_s)
    order = [p.remat for p in plans]
    assert (none_s < full_s) == (winner == "none") == (order.index("none") < order.index("full"))


@pytest.mark.slow(seconds=8)
def test_recompute_matches_the_lowered_steps_matmuls():
  """The matmul FLOPs (weights and the splash kernels) the lowered TPU step adds over remat none
  are the planner's recompute, per token, exactly; and on the xla path minimal reruns Q K^T."""
  def matmuls(cfg, platform):
    text, _, resolved = lowering.lower_train_step(cfg, platform, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    cost = hlo_cost.count(text, step_cost.keys_fraction(resolved.model, cfg.train.seq_len))
    return cost.work["flops_gemm"] + cost.work["flops_attention"]

  def config(remat, **model):
    cfg = tiny_config(seq_len=128, batch_tokens=128 * 2)
    cfg.model.update(max_seq_len=128, remat=remat, dtype="bfloat16", **model)
    cfg.mesh.update(data=1)
    return cfg

  base = matmuls(config("none"), "tpu")
  for remat in ("minimal", "save_qkv", "full"):  # full = save_attn_out + the attention forward
    cfg = config(remat)
    assert matmuls(cfg, "tpu") - base == 256 * fit.recompute_flops_per_token(cfg.model, 128, remat), remat
  # The xla path (a GPU's before Hopper; attention=xla lowers it for cuda too): scores in causal blocks, (blocks + 1) / (2 blocks) of the square.
  cfg = config("minimal", attention="xla")
  blocks = config_lib.attention_query_blocks(128)
  qk_t = 2 * 256 * 2 * 64 * 128 * (blocks + 1) / (2 * blocks)  # 2 layers x 2 FLOPs x q x keys, H x Dh = 64
  assert matmuls(cfg, "cuda") - matmuls(config("none", attention="xla"), "cuda") == qk_t
  assert fit.recompute_flops_per_token(cfg.model, 128, "minimal", "xla") * 256 == 2 * 256 * 2 * 64 * 64


def _overrides_cfg(name: str, plan: fit.Plan):
  """The config lmtiny.train parses from `--config configs/NAME.py <the plan's overrides>`."""
  argv = ["train", "--config", os.path.join(ROOT, "configs", f"{name}.py")] + plan.overrides().split()
  _, cfg = cli.parse_flags(argv, lambda fv: {}, "")
  return cfg


def test_pasted_overrides_pass_the_trainers_checks():
  """The best plan's overrides, parsed as lmtiny.train parses them, resolve on a mesh of that
  many devices (8 emulated CPUs here) to the plan's micro-batch and accumulation."""
  for name, chip, chips in (("d24_2026", "h100", 8), ("d12_2026", "rtx4090", 1), ("d24_2026", "v5e", 8)):
    plan = fit.search(_config(name), fit.chip(chip), chips)[0][0]
    run = resolve_run(_overrides_cfg(name, plan), devices=jax.devices()[:chips])
    assert dict(run.mesh.shape) == {"data": plan.data, "fsdp": plan.fsdp, "tensor": plan.tensor}
    assert run.micro_batch == plan.device_batch_size * plan.data * plan.fsdp
    assert run.cfg.model.remat == plan.remat
    assert config_lib.global_batch_size(run.cfg.train) // run.micro_batch == plan.accumulation


def test_cli_fit_prints_plans_and_exit_statuses(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert arch_cli.main(["arch", "--config", "configs/d12_2026.py", "--fit", "4090", "--top", "3"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("1 x RTX 4090 24 GB: 165.2 TFLOP/s") and len(out) == 3 + 3 + 1
  assert out[-1] == ("best plan: --config.train.device_batch_size=16 --config.model.remat=none "
                     "--config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1")
  assert arch_cli.main(["arch", "--config", "configs/d24_2026.py", "--fit", "3080"]) == 1  # an answer: none fits
  captured = capsys.readouterr()
  assert captured.err == "" and "no plan fits: the smallest, --config.train.device_batch_size=1" in captured.out
  assert arch_cli.main(["arch", "--config", "configs/d24_2026.py", "--fit", "h100,3080"]) == 0  # one fits
  assert capsys.readouterr().out.count("best plan:") == 1


def test_the_documented_d24_h100_overrides_are_the_plan_fit_prints_for_it(capsys, monkeypatch):
  """docs/scale-out.md passes d24 on one H100 the plan `--fit h100` prints for it after
  `launch/speedrun.sh d24-h100 --`; a change to the estimate or the headroom that moves the plan
  must move the documented command too (it said 8 sequences while the planner said 16)."""
  monkeypatch.chdir(ROOT)
  with open("docs/scale-out.md") as f:
    documented = re.search(r"^launch/speedrun\.sh d24-h100 -- (.*?)\s+# needs: GPU$", f.read(), re.M).group(1)
  assert arch_cli.main(["arch", "--config", "configs/d24_2026.py", "--fit", "h100"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == f"best plan: {documented}"


@pytest.mark.parametrize("argv, message", [
    (["--memory", "24"], "--memory='24': expected a positive size with a unit"),
    (["--fit", "gtx970"], "--fit='gtx970': unknown chip"),
    (["--fit", "h100", "--chips", "0"], "--chips=0"),
    (["--fit", "h100", "--mfu", "1.5"], "--mfu=1.5"),
    (["--fit", "h100", "--usable", "0"], "--usable=0.0"),
    (["--fit", "h100", "--check"], "--check compiles with XLA:TPU"),
    (["--fit", "v5e,v6e", "--check"], "give one --fit chip"),
])
def test_cli_fit_bad_input_one_line_exit_2(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert arch_cli.main(["arch", "--config", "configs/tiny.py"] + argv) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
  assert captured.err.count("\n") == 1


def test_docs_consumer_gpu_table_is_what_the_command_prints():
  with open(os.path.join(ROOT, "docs", "scale-out.md"), encoding="utf-8") as f:
    text = f.read()
  commands = re.findall(r"^python -m lmtiny\.arch --config (configs/\w+\.py) --fit ([\w,]+) --markdown$", text, re.M)
  assert len(commands) == 4
  expected = [fit.PRESET_HEADER]
  for path, chips in commands:
    expected += fit.preset_rows(path, config_lib.load_file(os.path.join(ROOT, path)), chips.split(","))
  assert "\n".join(expected) in text


@pytest.mark.slow(seconds=8)
def test_xla_cpu_compile_of_the_chosen_plan_agrees_with_its_estimate():
  """A scaled-down model (bf16, scanned layers, xla attention as on pre-Hopper GPUs) on a chip
  whose usable memory admits remat minimal at 4 sequences: the estimate the planner ranked it by
  is 0.7x-1.25x XLA:CPU's own figure for that plan's step (0.75x measured, 25.6 MiB against 34.1;
  0.81x while GPU plans counted a whole bf16 gradient of every weight). XLA:CPU emulates bf16 with
  float32 copies and keeps the [T, T] scores it need not."""
  cfg = tiny_config(seq_len=128, batch_tokens=128 * 16)
  cfg.model.update(vocab_size=512, num_layers=4, d_model=128, num_heads=4, max_seq_len=128, dtype="bfloat16",
                   scan_layers=True, attention="xla", remat="none")
  cfg.mesh.update(data=1)
  c = fit.Chip("test", "test", 27 * 2 ** 20, 1e12, 1e9, "xla")
  best = fit.search(cfg, c, usable=1.0)[0][0]
  assert (best.remat, best.device_batch_size) == ("minimal", 4)
  compiled = lowering.compile_train_step(fit.with_plan(cfg, best), devices=jax.devices()[:1])[0]
  xla = bench.memory_analysis(compiled, "cpu")["peak"]
  assert 0.7 <= best.bytes / xla <= 1.25, (best.bytes, xla)


@pytest.mark.slow(seconds=75)
@needs_libtpu
def test_xla_tpu_agrees_with_the_plan_for_one_v5e_chip(capsys, monkeypatch):
  """`--fit v5e --check` on a two-layer d12 (nanochat's widths, vocab 65,536) at 16 x 256 tokens a
  step, with 3.5 GiB per chip: XLA:TPU's own figure for the best plan's step (v5e:1x1; 8 sequences,
  2 micro-steps, 78% of the chip planned) is within 10% of the estimate (1.05x measured) and under
  the chip's memory. (With 4 GiB it plans all 16 sequences in one micro-step, 1.25x: two layers
  and two vocab matrices, whose step peaks in the loss, before any gradient exists, while the
  estimate counts the gradients beside it.)"""
  monkeypatch.chdir(ROOT)
  argv = ["arch", "--config", "configs/d12.py", "--config.model.num_layers=2", "--config.train.seq_len=256",
          "--config.train.batch_tokens=4096", "--fit", "v5e", "--memory", "3.5GiB", "--check"]
  assert arch_cli.main(argv) == 0
  out = capsys.readouterr().out
  m = re.search(r"check: XLA:TPU \(v5e:1x1, .*\): ([\d.]+) GiB per chip, (\d+)% of the chip; the estimate ([\d.]+) GiB "
                r"\(([\d.]+)x XLA's\)", out)
  assert m, out
  assert 0.9 <= float(m.group(4)) <= 1.1 and int(m.group(2)) < 100
