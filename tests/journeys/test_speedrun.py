"""launch/speedrun.sh: the presets' commands (dry run) and bad input. The toy preset at smoke
scale runs every stage for real, and resumes, in tests/journeys/test_journey.py (the README's command)."""
import copy
import os
import subprocess
import sys

import pytest

from lm_fixtures import load_config_module, needs_libtpu, xla_flags, ROOT
from lmtiny import config as config_lib
from lmtiny.plan import counts, memory, recipe
from lmtiny.plan.units import duration

SPEEDRUN = os.path.join(ROOT, "launch", "speedrun.sh")
CLIMBMIX = "'climbmix?shards=170'"
D24_STAGES = ("tokenizer", "shards", "base", "sft", "eval")
# (preset, chip, chips, the base run's overrides): fp8 on the H100s; the TPU presets' mesh and
# per-chip batch from lmtiny.plan.memory's plan for their chips' HBM (checked below).
D24_PRESETS = [
    ("d24-8xh100", "h100", 8, ["--config.model.matmul_dtype=fp8", "--config.mesh.data=8"]),
    ("d24-h100", "h100", 1, ["--config.model.matmul_dtype=fp8", "--config.mesh.data=1"]),
    ("d24-v5p8", "v5p", 4, ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.device_batch_size=16"]),
    ("d24-v6e8", "v6e", 8, ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.device_batch_size=8"]),
]
# Where XLA:TPU's compiled step is checked against the chips' memory (the slow test below).
TPU_TOPOLOGIES = {"d24-v5p8": ("v5p:2x2x1", "v5p"), "d24-v6e8": ("v6e:2x4", "v6e")}

OVERRIDES = {preset: overrides for preset, _, _, overrides in D24_PRESETS}


def _env():
  # one device, as a user has; python3 is the interpreter running the suite (the plan runs lmtiny.arch)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  return env


def _run(*args, timeout=900):
  return subprocess.run(["bash", SPEEDRUN, *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_a_gpu_preset_names_every_stage():
  out = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--eval-data", "evals/")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[2].startswith("python3 -m lmtiny.train --config configs/d20.py --config.model.vocab_size=65536")
  assert ("python3 -m lmtiny.sft --init runs/x --workdir runs/x/mid "
          "--config.sft.sources=embedded_chat:1.0,pretrain:0.3") in lines  # midtraining keeps pretraining text
  assert "python3 -m lmtiny.sft --init runs/x/mid --workdir runs/x/sft" in lines
  assert "python3 -m lmtiny.rl --init runs/x/sft --workdir runs/x/rl --config.rl.data=gsm8k" in lines
  assert "python3 -m lmtiny.eval --workdir runs/x --tasks bpb,core --data-dir evals/" in lines
  assert lines[-1] == "python3 -m lmtiny.report --workdir runs/x"
  # A skipped stage is never a later one's start: sft then starts from the base, eval reads sft.
  skip = _run("d20-h100", "--dry-run", "--workdir", "runs/x", "--skip", "mid,rl").stdout.splitlines()
  assert "python3 -m lmtiny.sft --init runs/x --workdir runs/x/sft" in skip
  assert any(l.startswith("python3 -m lmtiny.eval --workdir runs/x/sft") for l in skip)
  v5e = _run("d20-v5e8", "--dry-run", "--workdir", "runs/v").stdout.splitlines()
  from lm_fixtures import load_config_module
  from lmtiny.plan import memory
  plan = next(p for p in memory.fsdp_plans(load_config_module("d20").get_config()) if p[0] == 8)
  # The preset trains at lmtiny.arch's plan for fsdp=8 on 16 GB chips.
  assert v5e[2].endswith(f"--config.mesh.data=1 --config.mesh.fsdp=8 --config.train.device_batch_size={plan[1]}")
  pod = _run("d32-pod", "--dry-run", "--tpu-name", "p", "--zone", "z", "--workdir", "gs://b/r", "--shards", "gs://b/s")
  assert pod.returncode == 0 and "tpu.sh train --name p --zone z -- --config configs/d32.py" in pod.stdout
  assert "--workdir gs://b/r --config.mesh.data=1 --config.mesh.fsdp=-1" in pod.stdout  # ZeRO-3 over the slice
  assert "--config.data.shards=gs://b/s" in pod.stdout and "lmtiny.tokenizer" not in pod.stdout
  assert "lmtiny.rl" not in pod.stdout  # the script returns once the pod trains


@pytest.mark.parametrize("args, message", [
    ([], "a preset is required"), (["huge"], "unknown preset 'huge'"), (["toy", "--skip", "nap"], "--skip 'nap'"),
    (["d26-pod"], "--tpu-name and --zone are required"), (["toy", "--price-per-chip-hour", "x"], "must be a number"),
    (["d24-h100", "--skip", "midtrain"], "--skip 'midtrain'"),
    (["d24-8xh100", "--python", "false"], "the plan: false -m lmtiny.arch failed"),
    (["toy", "--", "--workdir", "x"], "after --: config overrides only (--config.FIELD=VALUE), got '--workdir'"),
])
def test_bad_input_is_one_line_exit_2(args, message):
  out = _run(*args, "--dry-run")
  assert out.returncode == 2 and out.stdout == "" and message in out.stderr and out.stderr.count("\n") == 1


def test_overrides_after_dashes_reach_base_training_and_its_plan():
  """`-- --config...` (lmtiny.arch --fit's best plan): after the preset's own overrides in the base
  stage's command, so the last of a field wins there, and in the plan printed first."""
  plan = ["--config.train.device_batch_size=8", "--config.model.remat=minimal", "--config.mesh.data=1",
          "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
  out = _run("d24-8xh100", "--dry-run", "--workdir", "runs/x", "--", *plan)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[2].endswith(" ".join(OVERRIDES["d24-8xh100"] + plan))
  assert "on 8 x h100" in out.stderr  # the plan ran with them (mesh.data=1 is a field the plan does not read)
  sft = [l for l in out.stdout.splitlines() if "lmtiny.sft" in l]
  assert sft and "device_batch_size" not in sft[0]  # base training only


def _stage_lines(stderr: str) -> list[str]:
  return [l[3:] for l in stderr.splitlines() if l.startswith("== ") and not l.startswith("== plan")]


@pytest.mark.parametrize("preset, chip, chips, overrides", D24_PRESETS)
def test_d24_presets_run_nanochat_heads_pipeline(preset, chip, chips, overrides):
  """nanochat HEAD's runs/speedrun.sh: tokenizer (32,768 on 2B characters of ClimbMix), d24 at data:param 8,
  base eval, SFT on its mixture from the base's optimizer state at 0.8 of its LRs, chat eval; no mid, no RL."""
  out = _run(preset, "--dry-run", "--workdir", "runs/x")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == (f"python3 -m lmtiny.tokenizer.train --source {CLIMBMIX} --vocab-size 32768 "
                      "--total-chars 2000000000 --out runs/x/tokenizer --quiet")
  assert lines[1].startswith(f"python3 -m lmtiny.data.prepare --source {CLIMBMIX} --tokenizer runs/x/tokenizer")
  assert lines[2] == ("python3 -m lmtiny.train --config configs/d24_2026.py --config.model.vocab_size=32768 "
                      "--config.data.shards=runs/x/shards --workdir runs/x " + " ".join(overrides))
  assert lines[3:] == [
      "python3 -m lmtiny.sft --init runs/x --workdir runs/x/sft --config.sft.sources=nanochat "
      "--config.sft.load_optimizer=True --config.sft.init_lr_frac=0.8 --config.sft.steps=0 --config.sft.lr=0.02 "
      "--config.sft.warmup_steps=0 --config.optim.weight_decay=0 --config.optim.decay_fraction=0.5 "
      "--config.optim.min_lr_ratio=0 --config.optim.muon_momentum=0.95 --config.optim.muon_momentum_warmup=300 "
      "--config.optim.muon_momentum_warmdown=0",
      "python3 -m lmtiny.eval --workdir runs/x --tasks bpb,core",
      "python3 -m lmtiny.eval --workdir runs/x/sft --chat",
      "python3 -m lmtiny.report --workdir runs/x"]
  stages = _stage_lines(out.stderr)
  assert stages == ["tokenizer", "shards", "base", f"mid: not in the {preset} preset", "sft",
                    f"rl: not in the {preset} preset", "eval"]
  local = _run(preset, "--dry-run", "--workdir", "runs/x", "--source", "climbmix?data_dir=data/climbmix").stdout
  assert local.count("--source 'climbmix?data_dir=data/climbmix'") == 2  # the tokenizer's text and the shards'


@pytest.mark.parametrize("preset, chip_bytes, fsdp", [("d24-v5p8", counts.HBM_BYTES["v5p"], 4)])
def test_d24_tpu_presets_train_at_the_memory_plan_for_their_chips(preset, chip_bytes, fsdp):
  cfg = recipe.resolve(load_config_module("d24_2026").get_config())
  plan = next(p for p in memory.fsdp_plans(cfg, chip_bytes) if p[0] == fsdp)
  overrides = OVERRIDES[preset]
  assert overrides[1:] == [f"--config.mesh.fsdp={fsdp}", f"--config.train.device_batch_size={plan[1]}"]


def _expected_plan(config: str, chip: str, chips: int, **overrides) -> list[str]:
  """The plan's numbers, from the config and lmtiny.plan, not from the script."""
  cfg = load_config_module(config).get_config()
  for name, value in overrides.items():
    section, field = name.split("__")
    cfg[section][field] = value
  cfg = recipe.resolve(cfg)
  m, t = cfg.model, cfg.train
  steps = config_lib.total_steps(cfg, recipe.horizon_params(m, t))
  tokens = steps * t.batch_tokens
  params = counts.count_params(m)
  times = [duration(tokens * counts.train_flops_per_token(m, t.seq_len) / (chips * counts.PEAK_FLOPS[chip] * mfu))
           for mfu in (0.4, 0.55)]
  return [f"plan: {params:,} parameters", f"{tokens:,} tokens", f"= {steps:,} steps x {t.batch_tokens:,} tokens",
          f"training compute {tokens * counts.train_flops_per_token(m, t.seq_len):.3g} FLOPs",
          f"on {chips} x {chip} ", f"{times[0]} at 40% MFU; {times[1]} at 55% MFU"]


@pytest.mark.parametrize("preset, chip, chips, overrides", D24_PRESETS)
def test_each_preset_prints_its_plan_first(preset, chip, chips, overrides):
  out = _run(preset, "--dry-run", "--workdir", "runs/x")
  err = out.stderr.splitlines()
  assert err[0] == f"== plan: {preset}" and err[6] == "== tokenizer"
  plan = "\n".join(err[1:6])
  for expected in _expected_plan("d24_2026", chip, chips):
    assert expected in plan, (expected, plan)
  # d24 at 8 tokens per scaling parameter: 5,568 steps of 2**20 tokens (nanochat's batch rule), 1.4B parameters
  assert "5,568 steps x 1,048,576 tokens" in plan and "1,384,122,122 parameters" in plan
  assert err[5] == ("  nanochat reports: d24 in 99 min on 8 x H100 to CORE 0.2565 (runs/speedrun.sh, fp8); "
                    "nanochat-jax: d24 in 7.33 h on a v6e-8 at ~24% MFU to CORE 0.274")


def test_toy_runs_the_2026_recipe_at_cpu_size_and_prints_its_plan():
  out = _run("toy", "--dry-run", "--workdir", "runs/t")
  assert out.returncode == 0, out.stderr
  assert "python3 -m lmtiny.train --config configs/tiny_2026.py --config.model.vocab_size=4096" in out.stdout
  plan = "\n".join(out.stderr.splitlines()[:5])
  for expected in _expected_plan("tiny_2026", "cpu", 1, train__steps=300):
    assert expected in plan, (expected, plan)
  assert "nanochat" not in plan  # no reference figure for a CPU demo
  assert _stage_lines(out.stderr) == ["tokenizer", "shards", "base", "mid", "sft", "rl", "eval"]


def _config_with(name: str, overrides: list[str]):
  """configs/<name>.py with a preset's `--config.section.field=value` overrides applied."""
  cfg = load_config_module(name).get_config()
  for override in overrides:
    key, value = override.removeprefix("--config.").split("=")
    section, field = key.split(".")
    cfg[section][field] = int(value) if value.isdigit() else value
  return cfg


@pytest.mark.slow(seconds=60)
@needs_libtpu
def test_d20_v5e8_preset_fits_a_v5e_8_in_xla_tpu():
  """The d20-v5e8 preset's base training as the script types it (fsdp=8, 8 sequences a chip: the
  plan at 80% of a 16 GB chip) compiled by XLA:TPU for a v5e-8: 11.71 GiB a chip, 73% of it, and
  the estimate within 10% (12.30 GiB, 1.05x). At the old 60% the plan was 4 sequences (7.33 GiB)."""
  from lmtiny.training import benchmark as bench
  base = _run("d20-v5e8", "--dry-run", "--workdir", "runs/v").stdout.splitlines()[2]
  cfg = _config_with("d20", base.split(" --workdir runs/v ")[1].split())
  assert (cfg.mesh.fsdp, cfg.train.device_batch_size) == (8, 8)
  report = bench.compile_report(cfg, "v5e:2x4")
  assert report["xla_memory"]["peak"] < 0.85 * counts.HBM_BYTES["v5e"], report["xla_memory"]
  assert 0.9 <= report["estimate"]["total"] / report["xla_memory"]["peak"] <= 1.1, report


@pytest.mark.slow(seconds=270)
@needs_libtpu
@pytest.mark.parametrize("preset", sorted(TPU_TOPOLOGIES))
def test_d24_tpu_presets_fit_their_chips_in_xla_tpu(preset):
  """XLA:TPU's own memory figure for d24's whole train step (24 unscanned layers: 190 s to compile
  here for the v5p, 360 s for the v6e) at the preset's mesh, per-chip batch and remat, and
  lmtiny.plan.memory's estimate within 10% of it (v5p 32.37 / 31.88 GiB, 1.02x; v6e 16.89 / 17.04
  GiB, 0.99x; 1.13x and 1.11x while it counted the MLP's down-projection output, a layer's whole
  working set beside what it keeps, and the loss's logits beside both).
  (Before lmtiny's TPU options turned XLA's windowed einsum off for all-gathers, the v6e's
  step grew 2.3 GiB a layer past the chip.)"""
  from lmtiny.training import benchmark as bench
  topology, chip = TPU_TOPOLOGIES[preset]
  cfg = _config_with("d24_2026", OVERRIDES[preset])
  report = bench.compile_report(copy.deepcopy(cfg), topology)
  assert report["xla_memory"]["peak"] < 0.9 * counts.HBM_BYTES[chip], report["xla_memory"]
  assert 0.9 <= report["estimate"]["total"] / report["xla_memory"]["peak"] <= 1.1, report
