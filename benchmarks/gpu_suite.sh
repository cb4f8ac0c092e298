#!/usr/bin/env bash
# lmtiny's GPU figures (attention kernels, train-step throughput and MFU, a nanochat-style
# PyTorch baseline of the same train step, and inference speed) in one command, made for
# a bare, offline GPU box reached for a few minutes at a time: every run has its own time limit
# inside one overall budget, a failure never stops the next run, and a summary is rewritten
# after every run, so whatever happens $OUT holds the figures so far.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu_suite.sh [PART ...] [--dry-run]

PARTs (default: all), run in the order given:
  attention   python benchmarks/attention.py at its GPU defaults (B=8 T=2048 H=16 K=4 Dh=128 bf16):
              xla and cudnn; causal, packed and packed1 (one run per packed row); time, TFLOP/s, memory, cuDNN in HLO, diffs vs xla
  bench-d4    python -m lmtiny.bench, configs/d4_38m.py at seq 2048 (device_batch_size 32: its 64
              was sized for seq 1024), bf16, 10 steps after 2 warmup, once per backend
  bench-d20   the same for configs/d20.py (seq 2048, its full 524,288-token batch), 5 steps after 1
  bench       bench-d4 then bench-d20
  torch-d4    python benchmarks/torch_reference.py --only torch: the same model, batch and micro-batches
              as bench-d4 in PyTorch the way nanochat's base_train runs it (torch.compile, bf16 autocast
              over float32 weights, SDPA flash attention, gradient accumulation; AdamW), 10 steps after 2
  torch-d20   the same as bench-d20 (d20 at 16 sequences per micro-step), 5 steps after 2
  torch       torch-d4 then torch-d20
  all         attention, bench-d4, bench-d20, torch-d4, torch-d20
  bench-d12_2026  python -m lmtiny.bench, configs/d12_2026.py as configured (seq 2048, 524,288-token batch,
              32 sequences per micro-step, sliding windows), attention auto, bf16 then fp8 GEMMs
              (model.matmul_dtype=fp8), 8 steps after 2 warmup
  nanochat-d12_2026  python benchmarks/nanochat_train.py: nanochat's own scripts/base_train.py from the
              checkout in $NANOCHAT at the same shape (--depth 12, the same batch, micro-batch and
              windows), bf16 then --fp8, 8 steps after 2 (its first compiles); figures from its step lines
  bench-d24_2026, nanochat-d24_2026   the same for configs/d24_2026.py (1,048,576 tokens a step, 16
              sequences per micro-step as runs/speedrun.sh), 4 steps after 1 / 2
  2026        bench-d12_2026 nanochat-d12_2026 bench-d24_2026 nanochat-d24_2026: nanochat's 2026 recipe,
              lmtiny beside nanochat HEAD on the same GPU
  infer       python benchmarks/infer.py (not in all: all's logs and summary already fill the 8 files
              a device call brings back): time to first token, decode tokens/s per request and in
              total, memory-bandwidth utilisation against the chip's HBM figure; d4_38m then d20 at
              random weights, batch 1 8 32 128, prompt 16 and 512, 128 new tokens, median of 3
Backends per bench-d4/bench-d20 run: cudnn, auto (on a GPU in bf16 lmtiny picks cudnn; the summary records
whether the compiled step really calls cuDNN), xla. The summary divides lmtiny's best tokens/s
(over backends) by PyTorch's for each config both ran, and each 2026 lmtiny run by nanochat's run
of the same config and GEMM dtype. Every lmtiny.bench run (bench-* parts) also traces one step after its
timed ones (--profile into the scratch dir), so its log ends with where that step's device time went:
shares in matmul, attention, collectives, elementwise and idle, and the top operations.

First, if $WHEELS holds wheels (benchmarks/gpu_wheels.sh fetches them), installs them with
pip --no-index --no-deps into $SITE and puts that on PYTHONPATH; prints nvidia-smi, versions,
devices and the MFU peak. Writes to $OUT (at most 8 files, what a device call brings back):
env.log, one log per part, and summary.md + summary.json (rewritten after every run; summary.md
is also printed at the end).
Exit status: 0 when every run succeeded, 1 when any failed, timed out or was skipped, 2 for
bad arguments.

environment:
  OUT=DIR             where the logs and summary go (default runs/gpu-suite-DATE; SMOKE: a temp dir)
  BUDGET_S=570        the whole command's budget in seconds (a device call allows 600); each run's
                      limit is cut to what is left, and a run that would get under 45 s is skipped
  BACKENDS="cudnn auto xla"   bench backends, in order
  STEPS=N WARMUP=N    timed / untimed steps for every bench and torch run (defaults: d4 10/2, d20 5/1,
                      torch-d20 5/2: its first step compiles)
  D20_BATCH_TOKENS=N  d20's batch in tokens (default its config's 524288)
  LIMIT_S=N           cap every run's time limit (defaults: attention 240, d4 150, d20 300,
                      torch-d4 180, torch-d20 300, infer d4_38m 120 and d20 300 s)
  EXTRA_BENCH_FLAGS   more flags for every bench run, e.g. "--config.model.remat=full"
  EXTRA_TORCH_FLAGS   more flags for every torch run, e.g. "--set train.device_batch_size=32"
                      (nanochat's own d20 micro-batch; the last --set wins)
  NANOCHAT=.nanochat  a nanochat checkout (git clone https://github.com/karpathy/nanochat; carry it to
                      the GPU box): the nanochat-* parts run its scripts/base_train.py
  WINDOW_PATTERN=P    the 2026 parts' window pattern for both sides (default: the config's SSSL); nanochat
                      without Flash Attention 3 (fetched from the Hugging Face hub, so absent offline)
                      runs S layers through SDPA with a mask: WINDOW_PATTERN=L compares full attention
  EXTRA_INFER_FLAGS   more flags for every infer run, e.g. "--new-tokens 256" (the last one wins)
  PYTHON=python3      the interpreter; WHEELS=.whl (empty: install nothing); SITE=/tmp/site
  SMOKE=1             the same code paths on CPU in seconds: JAX_PLATFORMS=cpu, attention.py at
                      its CPU sizes with xla only, every bench run a 1-layer configs/tiny.py at
                      seq 64 for 1 step, backend xla; every torch run the same model on CPU in
                      float32, eager; the infer run configs/tiny.py at batch 1 and 2, prompt 8, 4 new tokens
options:
  --dry-run   print the commands, run nothing
  -h, --help
EOF
}

die() { echo "error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
PARTS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    all) PARTS+=(attention bench-d4 bench-d20 torch-d4 torch-d20) ;;
    bench) PARTS+=(bench-d4 bench-d20) ;;
    torch) PARTS+=(torch-d4 torch-d20) ;;
    2026) PARTS+=(bench-d12_2026 nanochat-d12_2026 bench-d24_2026 nanochat-d24_2026) ;;
    attention|bench-d4|bench-d20|torch-d4|torch-d20|infer) PARTS+=("$1") ;;
    bench-d12_2026|nanochat-d12_2026|bench-d24_2026|nanochat-d24_2026) PARTS+=("$1") ;;
    *) die "unknown part or option '$1' (parts: attention bench-d4 bench-d20 bench torch-d4 torch-d20 torch all" \
         "bench-d12_2026 nanochat-d12_2026 bench-d24_2026 nanochat-d24_2026 2026 infer;" \
         "see --help)" ;;
  esac
  shift
done
((${#PARTS[@]})) || PARTS=(attention bench-d4 bench-d20 torch-d4 torch-d20)

SMOKE="${SMOKE:-0}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS-.whl}"
SITE="${SITE:-/tmp/site}"
NANOCHAT="${NANOCHAT:-.nanochat}"
BUDGET_S="${BUDGET_S:-570}"
MIN_RUN_S=45   # a run with less than this cannot even compile d20: skip it and say so
RESERVE_S=15   # kept back for the last summary
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || die "BUDGET_S='$BUDGET_S': expected whole seconds"
for v in STEPS WARMUP D20_BATCH_TOKENS LIMIT_S; do
  [[ -z "${!v:-}" || "${!v}" =~ ^[0-9]+$ ]] || die "$v='${!v}': expected a whole number"
done
if [[ "$SMOKE" == 1 ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  BACKENDS="${BACKENDS:-xla}"
  ((DRY)) || OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-smoke.XXXXXX")}"
else
  BACKENDS="${BACKENDS:-cudnn auto xla}"
  OUT="${OUT:-runs/gpu-suite-$(date +%Y%m%d-%H%M%S)}"
fi
read -r -a BACKEND_LIST <<<"$BACKENDS"
for b in "${BACKEND_LIST[@]}"; do
  case "$b" in xla|cudnn|auto|splash) ;; *) die "BACKENDS: '$b' is not one of xla cudnn auto splash" ;; esac
done
read -r -a EXTRA <<<"${EXTRA_BENCH_FLAGS:-}"
read -r -a EXTRA_TORCH <<<"${EXTRA_TORCH_FLAGS:-}"
read -r -a EXTRA_INFER <<<"${EXTRA_INFER_FLAGS:-}"

if ((DRY)); then  # create nothing
  OUT="${OUT:-OUT}" WORK="WORK"
else
  mkdir -p "$OUT"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-work.XXXXXX")"  # per-run JSONs: $OUT takes only 8 files
fi
export PYTHONUNBUFFERED=1 SUITE_BUDGET_S="$BUDGET_S" SMOKE
# One persistent compilation cache for the whole command: `auto` compiles the program `cudnn`
# just compiled, so it costs seconds instead of a second full compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$WORK/jax-cache}"
# jax preallocates 75% of the GPU (60 GB of an 80 GB H100) and cannot grow past it; the nanochat
# configs were sized for the whole card.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
START=$SECONDS
FAILED=0

# log NAME WORDS...: print, and append to $OUT/NAME.log (not in a dry run).
log() {
  local name=$1
  shift
  if ((DRY)); then echo "$*"; else echo "$*" | tee -a "$OUT/$name.log"; fi
}

write_summary() {
  ((DRY)) && return 0
  if ! SUITE_WALL_S=$((SECONDS - START)) "$PYTHON" benchmarks/gpu_suite.py summary "$WORK" "$OUT"; then
    # The plain fallback: the run table as the shell saw it.
    { echo "# lmtiny GPU suite (summary script failed; raw run table)"; echo
      echo "part run rc seconds limit result"; cat "$WORK/runs.tsv" 2>/dev/null || true; } >"$OUT/summary.md"
  fi
}
# However the command ends (an error, a signal), the summary is rewritten and the scratch removed.
finish() {
  write_summary
  ((DRY)) || rm -rf "$WORK"
}
trap finish EXIT

# step PART RUN LIMIT_S RESULT_JSON CMD...: one run under its own time limit, logged to $OUT/PART.log.
step() {
  local part=$1 name=$2 limit=$3 result=$4
  shift 4
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S)) rc=0 t0=$SECONDS last
  if ((left < MIN_RUN_S && !DRY)); then
    log "$part" "=== $part/$name: skipped, ${left}s of the budget left"
    printf '%s\t%s\tskip\t0\t0\t\n' "$part" "$name" >>"$WORK/runs.tsv"
    FAILED=1
    write_summary
    return 0
  fi
  ((limit <= left || DRY)) || limit=$left
  [[ -z "${LIMIT_S:-}" ]] || ((limit <= LIMIT_S)) || limit=$LIMIT_S
  log "$part" "=== $part/$name (limit ${limit}s, $((SECONDS - START))s into the suite):" \
    "timeout $limit $(printf '%q ' "$@")"
  ((DRY)) && return 0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$part.log" || rc=$?
  # The run's last line of output: on a failure, usually the one-line reason.
  last="$({ grep -v '^===' "$OUT/$part.log" || true; } | tail -n 1 | tr '\t' ' ' | cut -c1-200)"
  log "$part" "=== $part/$name: exit $rc after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$name" "$rc" "$((SECONDS - t0))" "$limit" "$result" "$last" \
    >>"$WORK/runs.tsv"
  ((rc == 0)) || FAILED=1
  write_summary
}

setup() {
  log env "=== gpu_suite: parts ${PARTS[*]}; backends ${BACKEND_LIST[*]}; budget ${BUDGET_S}s; OUT=$OUT; SMOKE=$SMOKE"
  local wheels=()
  if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
  fi
  if ((${#wheels[@]})); then
    local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
               --target "$SITE" "${wheels[@]}")
    log env "=== wheels: $(printf '%q ' "${pip[@]}")"
    if ((!DRY)); then
      if "${pip[@]}" 2>&1 | tee -a "$OUT/env.log"; then
        export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
      else
        log env "=== wheels: pip failed; going on with the interpreter's own packages"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
      fi
    fi
  else
    log env "=== wheels: none in '${WHEELS}' (benchmarks/gpu_wheels.sh fetches them); using the interpreter's packages"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ((DRY)); then
    log env "=== env: nvidia-smi; timeout 120 $PYTHON benchmarks/gpu_suite.py env WORK/env.json"
    return 0
  fi
  { if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "nvidia-smi: not found"; fi; } 2>&1 \
    | tee -a "$OUT/env.log"
  timeout --kill-after=10 120 "$PYTHON" benchmarks/gpu_suite.py env "$WORK/env.json" 2>&1 | tee -a "$OUT/env.log" \
    || log env "=== env probe failed (exit $?); going on"
  write_summary
}

part_attention() {
  local args=(--json "$WORK/attention.json" --layouts causal packed packed1)
  [[ "$SMOKE" == 1 ]] && args+=(--backends xla)
  # Exit 1 is a fused backend that MISMATCHes xla: recorded as failed, and the suite goes on.
  step attention attention 240 "$WORK/attention.json" "$PYTHON" benchmarks/attention.py "${args[@]}"
}

# bench_part PART CONFIG_NAME LIMIT_S STEPS WARMUP FLAGS...
bench_part() {
  local part=$1 name=$2 limit=$3 steps=${STEPS:-$4} warmup=${WARMUP:-$5}
  shift 5
  local flags=("$@")
  if [[ "$SMOKE" == 1 ]]; then  # the same flags' shape, at a size a 2-core CPU runs in seconds
    flags=(--config configs/tiny.py --config.model.num_layers=1 --config.train.seq_len=64
           --config.train.batch_tokens=512 --config.train.device_batch_size=0)  # one micro-batch, as the parts
    steps=1 warmup=0 limit=120 name=tiny
  fi
  for b in "${BACKEND_LIST[@]}"; do
    local result="$WORK/$part-$b.json"
    step "$part" "$name-$b" "$limit" "$result" "$PYTHON" -m lmtiny.bench "${flags[@]}" --config.model.dtype=bfloat16 \
      "--config.model.attention=$b" --steps "$steps" --warmup "$warmup" --json "$result" \
      --profile "$WORK/profile-$part-$b" ${EXTRA[@]+"${EXTRA[@]}"}
  done
}

part_bench_d4() {
  [[ "$SMOKE" == 1 ]] || log bench-d4 "note: d4_38m runs at seq 2048 with train.device_batch_size=32" \
    "(its config's 64 was sized for seq 1024; 64 x 2048 needs ~81 GiB by XLA's count with xla attention)," \
    "batch_tokens 262144 as configured"
  bench_part bench-d4 d4_38m 150 10 2 --config configs/d4_38m.py --config.train.seq_len=2048 \
    --config.train.device_batch_size=32
}

part_bench_d20() {
  local flags=(--config configs/d20.py)
  if [[ -n "${D20_BATCH_TOKENS:-}" ]]; then
    flags+=("--config.train.batch_tokens=$D20_BATCH_TOKENS")
    log bench-d20 "note: d20 batch_tokens reduced to $D20_BATCH_TOKENS (config: 524288); per-token figures" \
      "still compare, but the optimizer update weighs more per token"
  fi
  [[ "$SMOKE" == 1 ]] || log bench-d20 "note: d20 (seq 2048, 16 sequences per micro-step) times 5 steps" \
    "after 1 warmup by default: a full 524,288-token step takes seconds"
  bench_part bench-d20 d20 300 5 1 "${flags[@]}"
}

# recipe_bench CONFIG LIMIT_S STEPS WARMUP: lmtiny.bench on configs/CONFIG.py as configured, attention
# auto, once with bf16 GEMMs and once with fp8 (runs CONFIG-bf16, CONFIG-fp8 of part bench-CONFIG).
recipe_bench() {
  local config=$1 limit=$2 steps=${STEPS:-$3} warmup=${WARMUP:-$4}
  local flags=(--config "configs/$config.py") variants=(bf16 fp8)
  [[ -z "${WINDOW_PATTERN+x}" ]] || flags+=("--config.model.window_pattern=$WINDOW_PATTERN")
  if [[ "$SMOKE" == 1 ]]; then  # the 2026 recipe's toy model, one micro-batch, bf16 only (no fp8 on CPU)
    flags=(--config configs/tiny_2026.py --config.model.num_layers=2 --config.train.seq_len=64
           --config.train.batch_tokens=512 --config.train.device_batch_size=0)
    variants=(bf16) steps=1 warmup=0 limit=120
  fi
  local v gemm
  for v in "${variants[@]}"; do
    gemm=()
    [[ "$v" == fp8 ]] && gemm=(--config.model.matmul_dtype=fp8)
    step "bench-$config" "$config-$v" "$limit" "$WORK/bench-$config-$v.json" "$PYTHON" -m lmtiny.bench "${flags[@]}" \
      --config.model.dtype=bfloat16 --config.model.attention=auto ${gemm[@]+"${gemm[@]}"} --steps "$steps" \
      --warmup "$warmup" --json "$WORK/bench-$config-$v.json" --profile "$WORK/profile-bench-$config-$v" \
      ${EXTRA[@]+"${EXTRA[@]}"}
  done
}

# recipe_nanochat CONFIG DEPTH DEVICE_BATCH BATCH_TOKENS LIMIT_S STEPS WARMUP: nanochat's scripts/base_train.py
# from $NANOCHAT at the same shape as lmtiny.bench's run of CONFIG (BATCH_TOKENS: the batch lmtiny's
# recipe resolves for it), bf16 then --fp8 (runs CONFIG-nanochat-bf16, -fp8 of part nanochat-CONFIG).
recipe_nanochat() {
  local config=$1 depth=$2 batch=$3 tokens=$4 limit=$5 steps=${STEPS:-$6} warmup=${WARMUP:-$7}
  local part="nanochat-$config" flags variants=(bf16 fp8) v
  flags=(--depth "$depth" --device-batch-size "$batch" --total-batch-size "$tokens"
         --window-pattern "${WINDOW_PATTERN:-SSSL}")
  if [[ "$SMOKE" == 1 ]]; then  # the bench smoke's shape on CPU, float32 (nanochat's CPU dtype)
    flags=(--depth 2 --device-batch-size 8 --max-seq-len 64 --total-batch-size 512 --vocab-size 4096
           --device-type cpu) variants=(bf16) steps=1 warmup=1 limit=120
  fi
  if [[ ! -f "$NANOCHAT/scripts/base_train.py" ]]; then
    log "$part" "=== $part: failed: no nanochat checkout at NANOCHAT=$NANOCHAT" \
      "(git clone https://github.com/karpathy/nanochat $NANOCHAT)"
    ((DRY)) || printf '%s\t%s\t1\t0\t0\t\tno nanochat checkout at NANOCHAT=%s\n' "$part" "$config-nanochat" "$NANOCHAT" \
      >>"$WORK/runs.tsv"
    FAILED=1
    write_summary
    return 0
  fi
  for v in "${variants[@]}"; do
    local fp8=()
    [[ "$v" == fp8 ]] && fp8=(--fp8)
    step "$part" "$config-nanochat-$v" "$limit" "$WORK/$part-$v.json" "$PYTHON" benchmarks/nanochat_train.py \
      --nanochat "$NANOCHAT" "${flags[@]}" ${fp8[@]+"${fp8[@]}"} --steps "$steps" --warmup "$warmup" \
      --json "$WORK/$part-$v.json"
  done
}

# torch_part PART CONFIG_NAME LIMIT_S STEPS WARMUP FLAGS...: the PyTorch side alone (--only torch;
# lmtiny's figure for the same config comes from the bench part), written to $WORK/PART.json.
torch_part() {
  local part=$1 name=$2 limit=$3 steps=${STEPS:-$4} warmup=${WARMUP:-$5}
  shift 5
  local flags=("$@" --device cuda --dtype bfloat16 --compile)
  if [[ "$SMOKE" == 1 ]]; then  # the bench smoke's model and batch, on CPU in float32, eager
    flags=(--config configs/tiny.py --set model.num_layers=1 --set train.seq_len=64 --set train.batch_tokens=512
           --set train.device_batch_size=0 --device cpu --dtype float32)
    steps=1 warmup=0 limit=120 name=tiny
  fi
  local result="$WORK/$part.json"
  step "$part" "$name-torch" "$limit" "$result" "$PYTHON" benchmarks/torch_reference.py "${flags[@]}" --only torch \
    --steps "$steps" --warmup "$warmup" --json "$result" ${EXTRA_TORCH[@]+"${EXTRA_TORCH[@]}"}
}

part_torch_d4() {
  torch_part torch-d4 d4_38m 180 10 2 --config configs/d4_38m.py --set train.seq_len=2048 \
    --set train.device_batch_size=32
}

part_torch_d20() {
  local flags=(--config configs/d20.py)
  [[ -z "${D20_BATCH_TOKENS:-}" ]] || flags+=(--set "train.batch_tokens=$D20_BATCH_TOKENS")
  [[ "$SMOKE" == 1 ]] || log torch-d20 "note: torch.compile of d20 takes a minute or two in the first step" \
    "(untimed); AdamW on every parameter where lmtiny's d20 runs Muon on the block matrices"
  torch_part torch-d20 d20 300 5 2 "${flags[@]}"
}

# infer_run NAME LIMIT_S FLAGS...: one benchmarks/infer.py run, its figures in $WORK/infer-NAME.json
# (rewritten after every point, so a run cut off at its limit keeps the points so far).
infer_run() {
  local name=$1 limit=$2
  shift 2
  local result="$WORK/infer-$name.json"
  step infer "$name" "$limit" "$result" "$PYTHON" benchmarks/infer.py "$@" --json "$result" \
    ${EXTRA_INFER[@]+"${EXTRA_INFER[@]}"}
}

part_infer() {
  if [[ "$SMOKE" == 1 ]]; then
    infer_run tiny 120 --configs tiny --batch-sizes 1 2 --prompt-lens 8 --new-tokens 4 --repeats 1
    return 0
  fi
  local sweep=(--batch-sizes 1 8 32 128 --prompt-lens 16 512 --new-tokens 128 --repeats 3)
  infer_run d4_38m 120 --configs d4_38m "${sweep[@]}"
  infer_run d20 300 --configs d20 "${sweep[@]}"
}

setup
for part in "${PARTS[@]}"; do
  case "$part" in
    attention) part_attention ;;
    bench-d4) part_bench_d4 ;;
    bench-d20) part_bench_d20 ;;
    torch-d4) part_torch_d4 ;;
    torch-d20) part_torch_d20 ;;
    bench-d12_2026) recipe_bench d12_2026 240 8 2 ;;
    nanochat-d12_2026) recipe_nanochat d12_2026 12 32 524288 300 8 2 ;;
    bench-d24_2026) recipe_bench d24_2026 300 4 1 ;;
    nanochat-d24_2026) recipe_nanochat d24_2026 24 16 1048576 360 4 2 ;;
    infer) part_infer ;;
  esac
done
trap - EXIT
finish
((DRY)) && exit 0
echo "=== gpu_suite: done in $((SECONDS - START))s of a ${BUDGET_S}s budget; files in $OUT:"
ls -1 "$OUT"
echo
cat "$OUT/summary.md" 2>/dev/null || echo "(no summary.md)"
exit "$FAILED"
