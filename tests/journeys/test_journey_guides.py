"""The guides that start from a fresh checkout (no quick-start run): every command they tell a
user to type, verbatim and in order, from the root of a scratch copy (tests/journey.py has the
rules; tests/journeys/test_journey.py runs the README's chain beside this one)."""
import pytest

from journey import chains, journey_fixture, run_doc

journey = pytest.fixture(scope="module")(journey_fixture)

PROMISES = [
    ("docs/scale-out.md", "launch/speedrun.sh toy --smoke", [],
     [f"runs/speedrun-toy/.stages/{s}.done" for s in ("tokenizer", "shards", "base", "mid", "sft", "rl", "eval")]
     + [f"runs/speedrun-toy/report.md::{section}" for section in
        ("## Summary", "## Tokenizer", "## Base model", "## Midtraining", "## SFT", "## RL", "## Evaluation")]
     + ["runs/speedrun-toy/sft/config.json::toy_arithmetic"]),  # SFT sees the problems RL is rewarded on
    # The same command again (the last one typed is the one a promise reads): every stage is done.
    ("docs/scale-out.md", "launch/speedrun.sh toy --smoke", ["== tokenizer: done already", "== rl: done already"], []),
    ("docs/scale-out.md", "python -m lmtiny.arch --config configs/d12_2026.py --fit rtx4090",
     ["1 x RTX 4090 24 GB: 165.2 TFLOP/s dense bf16", "best plan: --config.train.device_batch_size=16 "
      "--config.model.remat=none --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1"], []),
    ("docs/scale-out.md", "python -m lmtiny.arch --config configs/d24_2026.py --fit h100 --chips 8",
     ["8 x H100 SXM 80 GB", "best plan: --config.train.device_batch_size="], []),
    ("docs/data.md", "python -m lmtiny.data.prepare", ["bytes/token"], ["data/stdlib/manifest.json"]),
    ("docs/data.md", "python -m lmtiny.train --config configs/tiny.py --workdir runs/tiny8k-mix",
     ["mixture: ", "stdlib 90% of tokens", "code 10% of tokens", "done: 4 steps"], []),
    ("docs/performance.md", "python -m lmtiny.bench --config configs/tiny.py", ["MFU"], ["runs/bench-tiny.json"]),
    ("docs/performance.md", "JAX_NUM_CPU_DEVICES=2 python -m lmtiny.train --config configs/tiny.py --workdir runs/tiny_profile",
     ["profile: step 2 on cpu: 2 devices", "share of device time: matmul ", "@ jit_train_step"],
     ["runs/tiny_profile/profile/summary.md::share of device time", "runs/tiny_profile/profile/summary.json"]),
    ("docs/training.md", "python -m lmtiny.train --config configs/tiny.py --workdir runs/tiny_wandb", [],
     ["runs/tiny_wandb/tracking.json::wandb_id", "runs/tiny_wandb/wandb"]),  # needs: wandb (skipped without)
    ("docs/performance.md", "python -m lmtiny.bench --config configs/d20.py --lower-for tpu --hlo-out",
     ["attention    splash (Mosaic)", "bf16 sums    0 reductions", "per token    ", "MFU bound    h100 <= "],
     ["runs/d20-tpu.stablehlo::func.func public @main"]),
    ("docs/performance.md", "python -m lmtiny.bench --config configs/d4_38m.py --lower-for tpu --config.model.loss_kernel=pallas",
     ["loss         pallas kernel: 0 lm_head GEMMs, loss_dw x1, loss_dx x1, loss_stats x1; largest float32 [.., V] "
      "512x24576xf32"], []),
    ("docs/training.md", "python -m lmtiny.train --config configs/tiny.py --workdir runs/budget",
     ["train.time_budget=1s reached after step", "ended by time_budget ("],
     ['runs/budget/metrics.jsonl::"ended_by": "time_budget"']),
    ("docs/training.md", "python -m lmtiny.lr_find", ["steepest descent at lr", "suggested peak LR"],
     ["runs/lr_find/lr_find.png", 'runs/lr_find/lr_find.json::"losses"']),
    ("docs/training.md", "python -m lmtiny.sweep --config configs/tiny.py --workdir runs/sweep",
     ["| num_layers-2_flops_budget-1.5e10 | 2 | 1.5e10 | done |", "frontier: not fitted: 2 frontier points"],
     ["runs/sweep/sweep.json", "runs/sweep/results.csv::num_layers-1_flops_budget-5e9", "runs/sweep/loss_vs_flops.png",
      "runs/sweep/frontier.png", "runs/sweep/report.md::N_opt ~ C^a: not fitted: 2 FLOPs budgets",
      "runs/sweep/num_layers-1_flops_budget-5e9/checkpoints/5",
      'runs/sweep/num_layers-1_flops_budget-5e9/config.json::"tracker_group": "sweep"']),
    ("docs/training.md", "python -m lmtiny.sweep --workdir runs/sweep --summarize", ["wrote runs/sweep/results.csv"], []),
    ("docs/training.md", "python -m lmtiny.bench --config configs/d4_38m.py --topology v5e:2x2",
     ["device       4 x TPU v5 lite, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}", "dtype bfloat16", "attention splash",
      "chip         fits: ", "reductions   "], []),
]


@pytest.mark.slow(seconds=260)
@pytest.mark.parametrize("doc", chains()[1])
def test_every_documented_command_runs_verbatim(journey, doc):
  run_doc(journey, doc, PROMISES)
