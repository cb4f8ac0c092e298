#!/usr/bin/env bash
# The whole pipeline on one host: tokenizer -> shards -> base -> midtrain -> SFT -> RL -> eval -> report
# (the d24 presets: nanochat HEAD's, without midtraining and RL).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/speedrun.sh PRESET [options] [-- --config.FIELD=VALUE ...]

Prints the run's plan (parameters, tokens, steps, FLOPs, time at 40% and 55% MFU: python -m lmtiny.arch
--brief), then runs every stage of the pipeline in order; a stage whose output is complete
(RUN/.stages/NAME.done) is skipped, so re-running the same command resumes where it stopped (each
training stage also resumes from its own checkpoints).

  tokenizer  python -m lmtiny.tokenizer.train  -> RUN/tokenizer
  shards     python -m lmtiny.data.prepare     -> RUN/shards
  base       python -m lmtiny.train            -> RUN            (pod presets: launch/tpu.sh train)
  mid        python -m lmtiny.sft --init RUN --workdir RUN/mid
  sft        python -m lmtiny.sft --init RUN/mid --workdir RUN/sft
  rl         python -m lmtiny.rl --init RUN/sft --workdir RUN/rl   (from the newest of sft, mid,
             base that is not skipped)
  eval       python -m lmtiny.eval: bpb (+ CORE) of the base model, GSM8K of the RL model
  report     python -m lmtiny.report --workdir RUN                -> RUN/report.md (always rebuilt)

presets:
  toy        CPU, minutes: configs/tiny_2026.py (nanochat's 2026 recipe at CPU size) on the embedded
             standard-library corpus; SFT (with the embedded chats), RL and GSM8K on the
             self-generated toy arithmetic set (no download)
  d24-8xh100 nanochat HEAD's runs/speedrun.sh: configs/d24_2026.py (data:param 8) in fp8 on ClimbMix
             (--source, default climbmix?shards=170, as many shards as nanochat downloads), tokenizer
             vocab 32,768 on its first 2B characters, 8 GPUs data parallel (mesh.data=8, 16
             sequences each, 4 accumulation steps to the 1M-token batch); base eval (bpb + CORE), SFT
             for one epoch of nanochat's mixture from the base run's optimizer state at 0.8 of its
             LRs and nanochat's SFT schedule, chat eval; no midtraining or RL
  d24-h100   the same on one H100 (32 accumulation steps to the same batch)
  d24-v5p8   the same in bf16 on a v5p-8 TPU VM (4 chips): mesh.fsdp=4, train.device_batch_size=16
             (XLA:TPU's own figure for the step: under 90% of a chip)
  d24-v6e8   the same in bf16 on a v6e-8 TPU VM (8 chips of 32 GiB): mesh.fsdp=8,
             train.device_batch_size=8 (XLA:TPU: 17.0 GiB a chip)
  d20-h100   configs/d20.py on one H100 (--source, default FineWeb-Edu from the hub)
  d20-v5e8   configs/d20.py on a v5e-8 TPU VM (run this script on the VM): mesh.fsdp=8,
             train.device_batch_size=8 (lmtiny.arch's plan for 16 GB chips; XLA:TPU: 11.71 GiB per chip)
  d26-pod    configs/d26.py / d32.py, base training on a TPU pod with launch/tpu.sh (--tpu-name,
  d32-pod    --zone, --workdir gs://..., --shards DIR that every worker reads); the script returns
             once training is launched: re-run it with --base-done when `launch/tpu.sh logs` shows
             the run finished, and the later stages run on this host. Training is FSDP over every
             chip (mesh.fsdp=-1) at the config's train.device_batch_size; `python -m lmtiny.arch`
             prints which sizes fit 16 GB chips

options:
  --workdir RUN            run directory (default runs/speedrun-PRESET)
  --source SPEC            pretraining text (lmtiny.corpus.sources spec; a local ClimbMix copy:
                           climbmix?data_dir=DIR); the d24 presets train the tokenizer on it too
  --eval-data DIR          holds the DCLM eval_bundle/; default: downloaded once into ~/.cache/lmtiny/eval_bundle (not toy)
  --skip a,b,...           stages not to run (e.g. mid,sft; the d24 presets have no mid and rl)
  --price-per-chip-hour P  for the report card's cost estimate
  --smoke                  a few steps per stage (the CI test)
  --python PY              interpreter (default python3)
  --tpu-name N --zone Z    pod presets
  --shards DIR             pod presets: prepared shards every worker can read (e.g. gs://...)
  --base-done              pod presets: base training has finished
  --dry-run                print the commands, run nothing
  -h, --help
  -- OVERRIDES             config overrides for base training (and its printed plan), after the
                           preset's own, e.g. the best plan of
                           python -m lmtiny.arch --config CONFIG --fit CHIP
EOF
}

PRESET=''
RUN_DIR=''
SOURCE=''
EVAL_DATA=''
SKIP=''
PRICE=''
SMOKE=0
PYTHON=python3
TPU_NAME=''
ZONE=''
BASE_DONE=0
POD_SHARDS=''
EXTRA_ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --)
      shift
      for a in "$@"; do
        [[ $a == --config.* ]] || die "after --: config overrides only (--config.FIELD=VALUE), got '$a'"
      done
      EXTRA_ARGS=("$@")
      break ;;
    --dry-run) DRY_RUN=1 ;;
    --smoke) SMOKE=1 ;;
    --base-done) BASE_DONE=1 ;;
    --workdir) need_value "$1" "${2-}"; RUN_DIR=$2; shift ;;
    --source) need_value "$1" "${2-}"; SOURCE=$2; shift ;;
    --eval-data) need_value "$1" "${2-}"; EVAL_DATA=$2; shift ;;
    --skip) need_value "$1" "${2-}"; SKIP=$2; shift ;;
    --price-per-chip-hour) need_value "$1" "${2-}"; [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--price-per-chip-hour '$2': must be a number"; PRICE=$2; shift ;;
    --python) need_value "$1" "${2-}"; PYTHON=$2; shift ;;
    --tpu-name) need_value "$1" "${2-}"; TPU_NAME=$2; shift ;;
    --zone) need_value "$1" "${2-}"; ZONE=$2; shift ;;
    --shards) need_value "$1" "${2-}"; POD_SHARDS=$2; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [[ -z $PRESET ]] || die "one preset, got '$PRESET' and '$1'"; PRESET=$1 ;;
  esac
  shift
done
PRESETS="toy, d20-h100, d20-v5e8, d26-pod, d32-pod, d24-8xh100, d24-h100, d24-v5p8, d24-v6e8"
[[ -n $PRESET ]] || die "a preset is required: $PRESETS (see --help)"
STAGES="tokenizer shards base mid sft rl eval report"
for s in ${SKIP//,/ }; do
  [[ " $STAGES " == *" $s "* ]] || die "--skip '$s': not a stage ($STAGES)"
done
RUN_DIR=${RUN_DIR:-runs/speedrun-$PRESET}

POD=0
OMIT=''          # stages a preset does not have (the d24 presets: nanochat HEAD runs no mid or RL)
TOK_FROM_SOURCE=0  # 1: the tokenizer trains on the pretraining source, not a mixture recipe
PLAN_CHIP=''; PLAN_CHIPS=1; REFERENCE=''
TOY_SFT_SOURCES=embedded_chat:1.0,toy_arithmetic:1.0
FINEWEB='hf:HuggingFaceFW/fineweb-edu?pattern=sample/10BT/*.parquet&column=text'
CLIMBMIX='climbmix?shards=170'
case $PRESET in
  toy)
    CONFIG=configs/tiny_2026.py; MIXTURE=tokenizer_data/embedded.py; VOCAB=4096; PLAN_CHIP=cpu
    SOURCE=${SOURCE:-embedded?max_chars=4000000}; TOK_CHARS=4000000
    BASE_ARGS=(--config.train.steps=300)
    MID_ARGS=("--config.sft.sources=embedded_chat:1.0,pretrain:0.3" --config.sft.steps=100)
    # SFT adds the toy arithmetic chats (calculator calls, `#### N`), so RL starts with some reward.
    SFT_ARGS=("--config.sft.sources=$TOY_SFT_SOURCES" --config.sft.steps=100)
    RL_ARGS=(--config.rl.data=toy --config.rl.steps=40 --config.rl.questions=4 --config.rl.samples=8
             --config.rl.max_new_tokens=48 --config.rl.eval_questions=64)
    CHAT_EVAL=(--tasks gsm8k --gsm8k-data toy --max-items 64 --max-new-tokens 48) ;;
  d24-8xh100 | d24-h100 | d24-v5p8 | d24-v6e8)
    CONFIG=configs/d24_2026.py; VOCAB=32768; TOK_FROM_SOURCE=1; OMIT=mid,rl
    SOURCE=${SOURCE:-$CLIMBMIX}; TOK_CHARS=2000000000
    MID_ARGS=(); RL_ARGS=()
    # nanochat's chat_sft.py: one epoch of its mixture from the base's optimizer state, its matrix LR
    # x 0.8 with no warmup, no weight decay, a linear decay to 0 over the second half, Muon's
    # momentum up to 0.95 over 300 steps (docs/chat.md)
    SFT_ARGS=(--config.sft.sources=nanochat --config.sft.load_optimizer=True --config.sft.init_lr_frac=0.8
              --config.sft.steps=0 --config.sft.lr=0.02 --config.sft.warmup_steps=0 --config.optim.weight_decay=0
              --config.optim.decay_fraction=0.5 --config.optim.min_lr_ratio=0 --config.optim.muon_momentum=0.95
              --config.optim.muon_momentum_warmup=300 --config.optim.muon_momentum_warmdown=0)
    CHAT_EVAL=(--chat)
    REFERENCE="nanochat reports: d24 in 99 min on 8 x H100 to CORE 0.2565 (runs/speedrun.sh, fp8); nanochat-jax: d24 in 7.33 h on a v6e-8 at ~24% MFU to CORE 0.274"
    case $PRESET in
      d24-8xh100) PLAN_CHIP=h100; PLAN_CHIPS=8
        BASE_ARGS=(--config.model.matmul_dtype=fp8 --config.mesh.data=8) ;;  # one process, the host's 8 GPUs
      d24-h100) PLAN_CHIP=h100
        BASE_ARGS=(--config.model.matmul_dtype=fp8 --config.mesh.data=1) ;;
      # 95 GiB chips at fsdp=4 x 16 sequences: XLA:TPU's own figure for the step is 34.3 GiB a
      # chip, lmtiny.plan.memory's estimate 36.1 (1.05x: tests/journeys/test_speedrun.py);
      # bf16 matmuls, as nanochat-jax ran.
      d24-v5p8) PLAN_CHIP=v5p; PLAN_CHIPS=4
        BASE_ARGS=(--config.mesh.data=1 --config.mesh.fsdp=4 --config.train.device_batch_size=16) ;;
      # 32 GiB chips: XLA:TPU's figure for the step is 17.0 GiB a chip with the config's remat
      # (dots_no_batch; lmtiny.plan.memory's estimate: 16.9 GiB, 0.99x), as nanochat-jax trained
      # d24 on a v6e-8.
      d24-v6e8) PLAN_CHIP=v6e; PLAN_CHIPS=8
        BASE_ARGS=(--config.mesh.data=1 --config.mesh.fsdp=8 --config.train.device_batch_size=8) ;;
    esac ;;
  d20-h100 | d20-v5e8 | d26-pod | d32-pod)
    CONFIG=configs/${PRESET%%-*}.py; MIXTURE=tokenizer_data/seed.py; VOCAB=65536
    SOURCE=${SOURCE:-$FINEWEB}; TOK_CHARS=2000000000
    BASE_ARGS=()
    MID_ARGS=("--config.sft.sources=embedded_chat:1.0,pretrain:0.3")
    SFT_ARGS=()
    RL_ARGS=(--config.rl.data=gsm8k)
    CHAT_EVAL=(--tasks gsm8k --max-items 400)
    # 16 GB chips: ZeRO-3 over the 8 chips at 8 sequences each (XLA:TPU: 11.71 GiB per chip; data
    # parallel at the config's 16 would need ~48). Midtraining, SFT and RL inherit the base run's mesh.
    [[ $PRESET == d20-h100 ]] && PLAN_CHIP=h100
    [[ $PRESET == d20-v5e8 ]] && { PLAN_CHIP=v5e; PLAN_CHIPS=8; }
    [[ $PRESET == d20-v5e8 ]] && BASE_ARGS=(--config.mesh.data=1 --config.mesh.fsdp=8 --config.train.device_batch_size=8)
    if [[ $PRESET == *-pod ]]; then
      POD=1
      # ZeRO-3 over the whole slice: data parallel alone would hold all of d26/d32's weights and
      # optimizer state on every chip (d32: ~56 GiB at its 4 sequences per chip).
      BASE_ARGS=(--config.mesh.data=1 --config.mesh.fsdp=-1)
    fi ;;
  *) die "unknown preset '$PRESET' ($PRESETS)" ;;
esac
BASE_EVAL=(--tasks bpb)
if [[ -n $EVAL_DATA ]]; then
  BASE_EVAL=(--tasks "bpb,core" --data-dir "$EVAL_DATA")
elif [[ $PRESET != toy ]]; then
  BASE_EVAL=(--tasks "bpb,core")
fi
if [[ $SMOKE == 1 ]]; then
  VOCAB=1024; TOK_CHARS=400000; SOURCE='embedded?max_chars=400000'
  BASE_ARGS=(--config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=2
             --config.model.max_seq_len=128 --config.train.seq_len=128 --config.train.batch_tokens=1024
             --config.train.steps=4 --config.train.eval_every=4 --config.train.eval_batches=1
             --config.train.checkpoint_every=4 --config.train.sample_tokens=8
             --config.train.tokens_per_param=0 --config.train.auto_batch=False)  # the steps, not a horizon
  MID_ARGS=("--config.sft.sources=embedded_chat:1.0,pretrain:0.3" --config.sft.steps=2
            --config.train.eval_every=2 --config.train.eval_batches=1 --config.train.checkpoint_every=2
            --config.train.sample_tokens=8)
  SFT_ARGS=(--config.sft.steps=2 --config.train.eval_every=2 --config.train.eval_batches=1
            --config.train.checkpoint_every=2 --config.train.sample_tokens=8)
  if [[ $PRESET == toy ]]; then
    SFT_ARGS+=("--config.sft.sources=$TOY_SFT_SOURCES")
  fi
  RL_ARGS=(--config.rl.data=toy --config.rl.steps=2 --config.rl.questions=2 --config.rl.samples=2
           --config.rl.max_new_tokens=8 --config.rl.eval_questions=2)
  CHAT_EVAL=(--tasks gsm8k --gsm8k-data toy --max-items 2 --max-new-tokens 8)
  BASE_EVAL+=(--max-items 2 --eval-batches 1)
fi
BASE_ARGS+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})  # after the preset's: the last of a field wins
SHARDS=$RUN_DIR/shards
MARKS=$RUN_DIR/.stages
if [[ $POD == 1 ]]; then
  [[ -n $TPU_NAME && -n $ZONE ]] || die "$PRESET: --tpu-name and --zone are required"
  [[ $RUN_DIR == gs://* ]] || die "$PRESET: --workdir must be gs://... (every worker writes there)"
  [[ -n $POD_SHARDS ]] || die "$PRESET: --shards is required (shards every worker can read, from lmtiny.data.prepare)"
  SHARDS=$POD_SHARDS
  MARKS=runs/speedrun-$PRESET/.stages  # stage markers stay on this host
  SKIP="tokenizer,shards${SKIP:+,$SKIP}"
fi

omitted() { [[ ",$OMIT," == *",$1,"* ]]; }
skipped() { [[ ",$SKIP," == *",$1,"* ]] || omitted "$1"; }
done_marker() { printf '%s/%s.done' "$MARKS" "$1"; }

# wanted NAME: true unless the stage is skipped or already done (says which on stderr).
wanted() {
  if omitted "$1"; then
    note "== $1: not in the $PRESET preset"
    return 1
  fi
  if skipped "$1"; then
    note "== $1: skipped (--skip)"
    return 1
  fi
  if [[ $DRY_RUN == 0 && -e $(done_marker "$1") ]]; then
    note "== $1: done already ($(done_marker "$1"))"
    return 1
  fi
  note "== $1"
}

mark_done() {
  if [[ $DRY_RUN == 0 ]]; then
    mkdir -p "$MARKS"
    : >"$(done_marker "$1")"
  fi
}

# stage NAME COMMAND...: runs the command unless the stage is skipped or already done.
stage() {
  local name=$1
  shift
  if wanted "$name"; then
    run "$@"
    mark_done "$name"
  fi
}

# newest_run STAGE...: RUN_DIR/STAGE for the first of the stages that is not skipped, else RUN_DIR
# (the base run): the model a later stage starts from.
newest_run() {
  local s
  for s in "$@"; do
    if ! skipped "$s"; then
      printf '%s/%s' "$RUN_DIR" "$s"
      return 0
    fi
  done
  printf '%s' "$RUN_DIR"
}

TRAIN_ARGS=(--config "$CONFIG" "--config.model.vocab_size=$VOCAB" "--config.data.shards=$SHARDS"
            --workdir "$RUN_DIR" ${BASE_ARGS[@]+"${BASE_ARGS[@]}"})
if [[ $TOK_FROM_SOURCE == 1 ]]; then
  TOK_TEXT=(--source "$SOURCE")  # nanochat trains its tokenizer on the head of the pretraining text
else
  TOK_TEXT=(--mixture "$MIXTURE")
fi

# print_plan: the base run's plan (python -m lmtiny.arch --brief, on the config and overrides the
# base stage trains) and nanochat's figures for the same run, on stderr, before any stage.
print_plan() {
  local plan
  if ! plan=$("$PYTHON" -m lmtiny.arch --brief --config "$CONFIG" "--config.model.vocab_size=$VOCAB" \
      ${BASE_ARGS[@]+"${BASE_ARGS[@]}"} --chip "$PLAN_CHIP" --chips "$PLAN_CHIPS" --mfu 0.4 --mfu 0.55 2>&1); then
    die "the plan: $PYTHON -m lmtiny.arch failed: ${plan##*$'\n'} (is lmtiny installed for it? --python PY)"
  fi
  note "== plan: $PRESET"
  note "$plan"
  [[ -z $REFERENCE ]] || note "  $REFERENCE"
}

cd "$REPO_ROOT"
if [[ -n $PLAN_CHIP ]]; then
  print_plan
fi
stage tokenizer "$PYTHON" -m lmtiny.tokenizer.train "${TOK_TEXT[@]}" --vocab-size "$VOCAB" \
  --total-chars "$TOK_CHARS" --out "$RUN_DIR/tokenizer" --quiet
stage shards "$PYTHON" -m lmtiny.data.prepare --source "$SOURCE" --tokenizer "$RUN_DIR/tokenizer" \
  --out "$RUN_DIR/shards" --no-progress
if [[ $POD == 1 && $BASE_DONE == 0 ]] && ! skipped base; then
  run "$LAUNCH_DIR/tpu.sh" train --name "$TPU_NAME" --zone "$ZONE" -- "${TRAIN_ARGS[@]}"
  if [[ $DRY_RUN == 0 ]]; then
    note "base training launched on $TPU_NAME; when it has finished, re-run with --base-done"
  fi
  exit 0
fi
if [[ $POD == 1 ]]; then
  stage base true  # trained on the pod (--base-done)
else
  stage base "$PYTHON" -m lmtiny.train "${TRAIN_ARGS[@]}"
fi
stage mid "$PYTHON" -m lmtiny.sft --init "$RUN_DIR" --workdir "$RUN_DIR/mid" ${MID_ARGS[@]+"${MID_ARGS[@]}"}
stage sft "$PYTHON" -m lmtiny.sft --init "$(newest_run mid)" --workdir "$RUN_DIR/sft" ${SFT_ARGS[@]+"${SFT_ARGS[@]}"}
stage rl "$PYTHON" -m lmtiny.rl --init "$(newest_run sft mid)" --workdir "$RUN_DIR/rl" ${RL_ARGS[@]+"${RL_ARGS[@]}"}
if wanted eval; then
  run "$PYTHON" -m lmtiny.eval --workdir "$RUN_DIR" "${BASE_EVAL[@]}"
  CHAT_MODEL=$(newest_run rl sft mid)
  run "$PYTHON" -m lmtiny.eval --workdir "$CHAT_MODEL" "${CHAT_EVAL[@]}"
  mark_done eval
fi
REPORT_ARGS=(--workdir "$RUN_DIR")
if [[ -n $PRICE ]]; then
  REPORT_ARGS+=(--price-per-chip-hour "$PRICE")
fi
if ! skipped report; then
  run "$PYTHON" -m lmtiny.report "${REPORT_ARGS[@]}"
fi
