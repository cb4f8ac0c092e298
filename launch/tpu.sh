#!/usr/bin/env bash
# Cloud TPU VMs and pod slices with gcloud: create, set up, train on every worker, watch, delete.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh VERB --name NAME --zone ZONE [--project PROJECT] [options] [-- training args]

verbs:
  create   --accelerator TYPE [--runtime-version V] [--spot | --reserved | --preemptible]
           [--no-queued] [--no-wait] [--timeout SECONDS] [--autocheckpoint]
           A queued resource (default; polls until ACTIVE) or, with --no-queued, a TPU VM.
           TYPE: v4-N, v5p-N (N = 2 x chips: 8 16 32 64, then multiples of 128, the slice shapes
           AxBxC with every side a multiple of 4), v5litepod-N, v6e-N (N in 1 4 8 16 ... 256).
           Spot/preemptible TPUs are stopped WITHOUT a SIGTERM to the trainer: a preemption
           loses the steps since the last checkpoint (train.checkpoint_every bounds the loss).
           --autocheckpoint (gcloud alpha, v2-v5e only) asks Cloud TPU to SIGTERM the trainer
           before maintenance events, which lmtiny answers by saving a checkpoint.
           Runtime by family: v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
  setup    [--repo URL [--ref REF]] [--python-version 3.11] [--extras tpu]
           Copy this checkout (tracked + untracked, not ignored files) to ~/lmtiny on every worker,
           or git clone URL there; then a venv with pip install -e ".[tpu]" (libtpu from PyPI).
  train    [--env NAME=VALUE]... -- ARGS
           python -m lmtiny.train ARGS on all workers at once, detached, one log per worker
           (~/lmtiny/logs/train-HOST.log). Every ARG reaches the workers as one word, unchanged.
           Re-running the same command after a preemption resumes from the last checkpoint.
  logs     [--worker N|all] [--lines N] [--follow]     tail the logs (default worker 0)
  stop                                                  stop the training run on all workers
  cleanup  stop, then free a busy TPU on all workers: kill python processes still holding
           /dev/accel* or /dev/vfio/*, remove /tmp/libtpu_lockfile
  fetch    --from gs://BUCKET/PATH | --from REMOTE_PATH  [--to LOCAL_DIR]
           gcloud storage rsync from GCS, or scp -r from worker 0 (REMOTE_PATH relative to ~)
  status   describe the queued resource (or, with --no-queued, the TPU VM)
  delete   [--no-queued] [--yes]   delete the queued resource and its TPU VM (or the TPU VM)

common options: --name (or $LMTINY_TPU_NAME), --zone ($LMTINY_TPU_ZONE), --project
($LMTINY_TPU_PROJECT, else gcloud's default), --dry-run (print the exact commands, run nothing),
--internal-ip (ssh/scp over internal IPs: projects without external IPs), --gcloud-arg ARG
(repeatable: passed to every gcloud ssh/scp call), -h/--help.
--worker=all opens one ssh connection per worker at once: load your key into ssh-agent first
(ssh-add ~/.ssh/google_compute_engine) or each one asks for the passphrase.
The --workdir of a multi-host run must be shared by all workers (gs://BUCKET/...): lmtiny
refuses a local directory the other workers cannot see.

example (v5e-8):
  launch/tpu.sh create --name lm --zone us-west4-a --accelerator v5litepod-8 --spot
  launch/tpu.sh setup  --name lm --zone us-west4-a
  launch/tpu.sh train  --name lm --zone us-west4-a -- --config configs/d12.py --workdir gs://B/d12
  launch/tpu.sh logs   --name lm --zone us-west4-a --follow
EOF
}

runtime_for() {  # The TPU software version each family boots (Google's TPU docs).
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

check_accelerator() {
  local family=${1%-*} n=${1##*-} ok=0
  if [[ $1 == *-* && $n =~ ^[0-9]+$ ]]; then
    case $family in
      # The suffix counts TensorCores, 2 per chip. Slices of 4-32 chips, or AxBxC with every side
      # a multiple of 4 (so a multiple of 64 chips): v4-24 or v5p-96 do not exist.
      v4 | v5p) case $n in 8 | 16 | 32 | 64) ok=1 ;; *) ((n % 128 == 0 && n > 0)) && ok=1 ;; esac ;;
      v5litepod | v6e) case $n in 1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ok=1 ;; esac ;;
    esac
  fi
  ((ok)) || die "unknown accelerator type '$1' (known: v4-N and v5p-N with N in 8 16 32 64 or a multiple of 128; v5litepod-N and v6e-N with N in 1 4 8 16 32 64 128 256; v5e is v5litepod)"
}

# --- options -------------------------------------------------------------------------------------

VERB=${1-}
case $VERB in
  -h | --help | help | '') usage; exit 0 ;;
  create | setup | train | logs | stop | cleanup | fetch | status | delete) shift ;;
  *) die "unknown verb '$VERB' (create, setup, train, logs, stop, cleanup, fetch, status, delete)" ;;
esac

NAME=${LMTINY_TPU_NAME-}
ZONE=${LMTINY_TPU_ZONE-}
PROJECT=${LMTINY_TPU_PROJECT-}
ACCELERATOR=''
RUNTIME=''
CAPACITY=''  # --spot | --reserved | --preemptible
QUEUED=1
WAIT=1
TIMEOUT=0
REPO=''
REF=''
PYTHON_VERSION=3.11
EXTRAS=tpu
WORKER=''
LINES=100
FOLLOW=0
FROM=''
TO=''
YES=0
AUTOCHECKPOINT=0
GCLOUD_ARGS=()
ENVS=()
ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$1" "${2-}"; NAME=$2; shift ;;
    --zone) need_value "$1" "${2-}"; ZONE=$2; shift ;;
    --project) need_value "$1" "${2-}"; PROJECT=$2; shift ;;
    --accelerator | --accelerator-type) need_value "$1" "${2-}"; ACCELERATOR=$2; shift ;;
    --runtime-version) need_value "$1" "${2-}"; RUNTIME=$2; shift ;;
    --spot | --reserved | --preemptible)
      [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "$CAPACITY and $1 exclude each other"
      CAPACITY=$1 ;;
    --no-queued) QUEUED=0 ;;
    --autocheckpoint) AUTOCHECKPOINT=1 ;;
    --internal-ip) GCLOUD_ARGS+=(--internal-ip) ;;
    --gcloud-arg) need_value "$1" "${2-}"; GCLOUD_ARGS+=("$2"); shift ;;
    --gcloud-arg=*) GCLOUD_ARGS+=("${1#--gcloud-arg=}") ;;
    --no-wait) WAIT=0 ;;
    --timeout) need_value "$1" "${2-}"; check_int "$1" "$2"; TIMEOUT=$2; shift ;;
    --repo) need_value "$1" "${2-}"; REPO=$2; shift ;;
    --ref) need_value "$1" "${2-}"; REF=$2; shift ;;
    --python-version) need_value "$1" "${2-}"; PYTHON_VERSION=$2; shift ;;
    --extras) need_value "$1" "${2-}"; EXTRAS=$2; shift ;;
    --env) need_value "$1" "${2-}"; check_env_assignment "$2"; ENVS+=("$2"); shift ;;
    --worker) need_value "$1" "${2-}"; WORKER=$2; shift ;;
    --worker=*) WORKER=${1#--worker=} ;;
    --lines) need_value "$1" "${2-}"; check_int "$1" "$2"; LINES=$2; shift ;;
    --follow | -f) FOLLOW=1 ;;
    --from) need_value "$1" "${2-}"; FROM=$2; shift ;;
    --to) need_value "$1" "${2-}"; TO=$2; shift ;;
    --yes | -y) YES=1 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "$VERB: unknown option '$1' (training arguments go after --; see --help)" ;;
  esac
  shift
done

[[ -n $NAME ]] || die "--name is required (or set LMTINY_TPU_NAME)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and dashes, starting with a letter"
[[ -n $ZONE ]] || die "--zone is required (or set LMTINY_TPU_ZONE)"
if ((${#ARGS[@]})) && [[ $VERB != train ]]; then die "$VERB takes no training arguments after --"; fi
if [[ -n $WORKER && ! $WORKER =~ ^([0-9]+|all)$ ]]; then die "--worker '$WORKER': a worker number or all"; fi
require_tool gcloud "install the Google Cloud SDK: https://cloud.google.com/sdk/docs/install"

LOC=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOC+=(--project="$PROJECT")

tpu_ssh() {  # tpu_ssh WORKER COMMAND: one shell command line on the given worker(s).
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" ${GCLOUD_ARGS[@]+"${GCLOUD_ARGS[@]}"} \
    --command="$2"
}

tpu_scp() {  # tpu_scp ARGS...: gcloud compute tpus tpu-vm scp with the passthrough flags.
  run gcloud compute tpus tpu-vm scp "$@" ${GCLOUD_ARGS[@]+"${GCLOUD_ARGS[@]}"}
}

qr_state() {
  gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
}

# --- verbs ---------------------------------------------------------------------------------------

verb_create() {
  [[ -n $ACCELERATOR ]] || die "create needs --accelerator (e.g. v5litepod-8, v4-32, v6e-8)"
  check_accelerator "$ACCELERATOR"
  [[ -n $RUNTIME ]] || RUNTIME=$(runtime_for "$ACCELERATOR")
  local capacity=() track=()
  [[ -n $CAPACITY ]] && capacity=("$CAPACITY")
  if ((AUTOCHECKPOINT)); then
    case $ACCELERATOR in v4-* | v5litepod-*) ;; *) die "--autocheckpoint: Cloud TPU offers it on v2-v5e only, not $ACCELERATOR" ;; esac
    capacity+=(--autocheckpoint-enabled)
    track=(alpha)  # a preview feature: gcloud alpha
  fi
  if ((!QUEUED)); then
    run gcloud ${track[@]+"${track[@]}"} compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
    return 0
  fi
  [[ $CAPACITY != --preemptible ]] || die "--preemptible needs --no-queued (queued resources take --spot)"
  run gcloud ${track[@]+"${track[@]}"} compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
  ((WAIT)) || return 0
  if [[ $DRY_RUN == 1 ]]; then
    echo "# then, every ${LMTINY_POLL_SECONDS:-30}s until ACTIVE:"
    display_words gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    echo
    return 0
  fi
  local start=$SECONDS state failures=0
  while :; do
    # A transient describe failure (network, API quota) is retried; 5 in a row end the wait.
    if ! state=$(qr_state); then
      failures=$((failures + 1))
      ((failures < ${LMTINY_POLL_RETRIES:-5})) || die "could not describe queued resource $NAME in $ZONE ($failures tries in a row)"
      note "describe failed ($failures in a row); retrying"
      sleep "${LMTINY_POLL_SECONDS:-30}"
      continue
    fi
    failures=0
    case $state in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED)
        note "error: queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
        exit 1 ;;
    esac
    if ((TIMEOUT && SECONDS - start >= TIMEOUT)); then
      note "error: queued resource $NAME still $state after ${TIMEOUT}s (the request stays queued; delete it to cancel)"
      exit 1
    fi
    note "queued resource $NAME: $state (waited $((SECONDS - start))s)"
    sleep "${LMTINY_POLL_SECONDS:-30}"
  done
}

verb_setup() {
  local install
  install=$(remote_cmd setup --python-version "$PYTHON_VERSION" --extras "$EXTRAS")
  if [[ -n $REPO ]]; then
    # A branch, tag or commit; a branch is taken from origin so a re-run picks up new commits.
    local d r
    d=$(quote_words "$REMOTE_DIR")
    r=$(quote_words "${REF:-HEAD}")
    tpu_ssh all "{ [ -d $d/.git ] || git clone --quiet $(quote_words "$REPO") $d; } && git -C $d fetch --quiet --tags origin && { git -C $d checkout --quiet --detach origin/$r 2>/dev/null || git -C $d checkout --quiet --detach $r; } && $install"
    return 0
  fi
  [[ -z $REF ]] || die "--ref needs --repo"
  local files=() f archive=${TMPDIR:-/tmp}/lmtiny-code-$$.tgz
  while IFS= read -r -d '' f; do files+=("$f"); done < <(code_files)
  ((${#files[@]})) || die "no files to copy in $REPO_ROOT"
  # shellcheck disable=SC2064  # the name is fixed now; the local is gone by exit time
  [[ $DRY_RUN == 1 ]] || trap "rm -f $(quote_words "$archive")" EXIT
  run tar -czf "$archive" -C "$REPO_ROOT" -- "${files[@]}"
  tpu_scp "$archive" "$NAME:lmtiny-code.tgz" "${LOC[@]}" --worker=all
  local q_dir
  q_dir=$(quote_words "$REMOTE_DIR")
  tpu_ssh all "mkdir -p $q_dir && tar -xzf lmtiny-code.tgz -C $q_dir && rm -f lmtiny-code.tgz && $install"
}

verb_train() {
  ((${#ARGS[@]})) || die "train needs training arguments after --, e.g. -- --config configs/d12.py --workdir gs://BUCKET/run"
  local env_flags=() e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do env_flags+=(--env "$e"); done
  tpu_ssh all "$(remote_cmd check-idle)"
  if ! tpu_ssh all "$(remote_cmd start ${env_flags[@]+"${env_flags[@]}"} -- "${ARGS[@]}")"; then
    note "error: training did not start on every worker; stopping it everywhere"
    tpu_ssh all "$(remote_cmd stop)" || true
    exit 1
  fi
  [[ $DRY_RUN == 1 ]] || note "started on all workers; follow with: launch/tpu.sh logs --name $NAME --zone $ZONE --follow"
}

verb_logs() {
  local worker=${WORKER:-0} follow=()
  if ((FOLLOW)); then
    [[ $worker != all ]] || die "--follow needs one worker (--worker N): output from --worker=all arrives only when the command ends"
    follow=(--follow)
  fi
  tpu_ssh "$worker" "$(remote_cmd logs --lines "$LINES" ${follow[@]+"${follow[@]}"})"
}

verb_cleanup() {
  # Shipped on its own: cleanup must work on workers where setup never ran.
  tpu_scp "$LAUNCH_DIR/remote.sh" "$NAME:lmtiny-remote.sh" "${LOC[@]}" --worker=all
  tpu_ssh all "bash lmtiny-remote.sh cleanup --dir $(quote_words "$REMOTE_DIR")"
}

verb_fetch() {
  [[ -n $FROM ]] || die "fetch needs --from gs://BUCKET/PATH (or a path on worker 0)"
  local to=${TO:-runs/$(basename "$FROM")}
  run mkdir -p "$to"
  if [[ $FROM == gs://* ]]; then
    run gcloud storage rsync --recursive "$FROM" "$to"
  else
    tpu_scp --recurse "$NAME:$FROM" "$to" "${LOC[@]}" --worker="${WORKER:-0}"
  fi
}

verb_status() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
  fi
}

verb_delete() {
  local quiet=()
  ((YES)) && quiet=(--quiet)
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force ${quiet[@]+"${quiet[@]}"}
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" ${quiet[@]+"${quiet[@]}"}
  fi
}

case $VERB in
  create) verb_create ;;
  setup) verb_setup ;;
  train) verb_train ;;
  logs) verb_logs ;;
  stop) tpu_ssh all "$(remote_cmd stop)" ;;
  cleanup) verb_cleanup ;;
  fetch) verb_fetch ;;
  status) verb_status ;;
  delete) verb_delete ;;
esac
