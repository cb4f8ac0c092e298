#!/usr/bin/env bash
# GPU hosts: one process per host drives all of its GPUs; several hosts join over the network.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [run | stop | logs] [options] [-- training args]

  One host, all its GPUs (foreground):
    launch/gpu.sh -- --config configs/d20.py --workdir runs/d20
  This host as process I of N (run the same on every host, I = 0..N-1; HOST0 runs process 0):
    launch/gpu.sh --coordinator HOST0:8476 --num-processes N --process-id I -- ARGS
  N hosts started from here over ssh (detached, one log per host in DIR/logs/):
    launch/gpu.sh --hosts h0,h1,h2,h3 [--coordinator ADDR:PORT] -- ARGS
    (the coordinator defaults to H0's ssh name and --port; give --coordinator when the other
    hosts reach H0 under another address, e.g. its cluster-network IP)
    launch/gpu.sh logs --hosts h0,h1,h2,h3 [--lines N]     launch/gpu.sh stop --hosts h0,h1,h2,h3
  A sweep (python -m lmtiny.sweep) instead of one run: --sweep; with --hosts each host trains
    its own share of the children (the sweep's arguments must include --part auto):
    launch/gpu.sh --sweep --hosts h0,h1 -- --config C --workdir /shared/sweep --grid ... --part auto
  Under Slurm, no script is needed: srun python -m lmtiny.train ARGS (jax reads SLURM_*).
    jax gives each Slurm task the GPU numbered SLURM_LOCALID, so start one task per GPU:
    srun --nodes=N --ntasks-per-node=GPUS_PER_NODE python -m lmtiny.train ARGS
    (one task per node would drive GPU 0 alone).
  Under mpirun: Open MPI 4 is detected; Open MPI 5 is not (jax reads no PMIx variables) and is
    refused: use --coordinator/--num-processes/--process-id, or srun.

options:
  --python PY          interpreter (default python3; the checkout's .venv/bin/python if it exists)
  --gpus 0,1,...       CUDA_VISIBLE_DEVICES for the run
  --env NAME=VALUE     extra environment for the run (repeatable)
  --hosts H0,H1,...    hosts to ssh to; H0 runs process 0 and the coordinator
  --port PORT          coordinator port on H0 (default 8476)
  --dir DIR            the checkout on every host (default: this checkout's path)
  --sweep              run python -m lmtiny.sweep instead of lmtiny.train
  --lines N            logs: lines per host (default 100)
  --dry-run            print the exact commands, run nothing
  -h, --help
EOF
}

VERB=run
case ${1-} in
  run | stop | logs) VERB=$1; shift ;;
  help) usage; exit 0 ;;
esac

PYTHON=''
GPUS=''
HOSTS=''
PORT=8476
DIR=$REPO_ROOT
COORDINATOR=''
NUM_PROCESSES=''
PROCESS_ID=''
LINES=100
MODULE=lmtiny.train
ENVS=()
ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --python) need_value "$1" "${2-}"; PYTHON=$2; shift ;;
    --gpus) need_value "$1" "${2-}"; [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus '$2': comma-separated GPU numbers"; GPUS=$2; shift ;;
    --env) need_value "$1" "${2-}"; check_env_assignment "$2"; ENVS+=("$2"); shift ;;
    --hosts) need_value "$1" "${2-}"; HOSTS=$2; shift ;;
    --port) need_value "$1" "${2-}"; check_int "$1" "$2"; PORT=$2; shift ;;
    --dir) need_value "$1" "${2-}"; DIR=$2; shift ;;
    --coordinator) need_value "$1" "${2-}"; COORDINATOR=$2; shift ;;
    --num-processes) need_value "$1" "${2-}"; check_int "$1" "$2"; NUM_PROCESSES=$2; shift ;;
    --process-id) need_value "$1" "${2-}"; check_int "$1" "$2"; PROCESS_ID=$2; shift ;;
    --lines) need_value "$1" "${2-}"; check_int "$1" "$2"; LINES=$2; shift ;;
    --sweep) MODULE=lmtiny.sweep ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown option '$1' (training arguments go after --; see --help)" ;;
  esac
  shift
done

((PORT > 0 && PORT < 65536)) || die "--port $PORT: must be 1..65535"
[[ -n $GPUS ]] && ENVS=("CUDA_VISIBLE_DEVICES=$GPUS" ${ENVS[@]+"${ENVS[@]}"})
if [[ -z $PYTHON ]]; then
  PYTHON=python3
  [[ -x $DIR/.venv/bin/python ]] && PYTHON=.venv/bin/python
fi

if [[ -n $HOSTS && -n $COORDINATOR ]]; then
  [[ -z $NUM_PROCESSES && -z $PROCESS_ID ]] || die "--hosts sets the process count and ids itself; drop --num-processes/--process-id"
  [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator '$COORDINATOR': must be HOST:PORT"
elif [[ -n $COORDINATOR || -n $NUM_PROCESSES || -n $PROCESS_ID ]]; then
  [[ -z $HOSTS ]] || die "--hosts sets the process count and ids itself; drop --num-processes/--process-id"
  [[ -n $COORDINATOR && -n $NUM_PROCESSES && -n $PROCESS_ID ]] \
    || die "--coordinator, --num-processes and --process-id go together"
  ((PROCESS_ID < NUM_PROCESSES)) || die "--process-id $PROCESS_ID: must be < --num-processes $NUM_PROCESSES"
  [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator '$COORDINATOR': must be HOST:PORT"
  ENVS=("LMTINY_COORDINATOR=$COORDINATOR" "LMTINY_NUM_PROCESSES=$NUM_PROCESSES"
    "LMTINY_PROCESS_ID=$PROCESS_ID" ${ENVS[@]+"${ENVS[@]}"})
fi

# --- this host, in the foreground ----------------------------------------------------------------

if [[ -z $HOSTS ]]; then
  [[ $VERB == run ]] || die "$VERB needs --hosts (a foreground run stops with Ctrl-C)"
  ((${#ARGS[@]})) || die "training arguments go after --, e.g. -- --config configs/d20.py --workdir runs/d20"
  [[ -d $DIR ]] || die "--dir $DIR: no such directory"
  run cd "$DIR"
  run env ${ENVS[@]+"${ENVS[@]}"} "$PYTHON" -m "$MODULE" "${ARGS[@]}"
  exit 0
fi

# --- several hosts, over ssh ---------------------------------------------------------------------

IFS=, read -r -a HOST_LIST <<<"$HOSTS"
for h in "${HOST_LIST[@]}"; do
  [[ $h =~ ^[A-Za-z0-9_.@-]+$ ]] || die "--hosts: bad host name '$h'"
done
N=${#HOST_LIST[@]}
REMOTE_DIR=$DIR
require_tool ssh "install an OpenSSH client"

host_run() {  # host_run HOST REMOTE_SH_ARGS...
  run ssh -o BatchMode=yes "$1" "$(remote_cmd "${@:2}")"
}

case $VERB in
  stop)
    for h in "${HOST_LIST[@]}"; do host_run "$h" stop || true; done
    exit 0 ;;
  logs)
    for h in "${HOST_LIST[@]}"; do host_run "$h" logs --lines "$LINES" || true; done
    exit 0 ;;
esac

((${#ARGS[@]})) || die "training arguments go after --, e.g. -- --config configs/d20.py --workdir runs/d20"
module_flags=()
if [[ $MODULE == lmtiny.sweep ]]; then
  part=0
  for a in "${ARGS[@]}"; do [[ $a == --part || $a == --part=* ]] && part=1; done
  ((part)) || die "--sweep --hosts: give the sweep --part auto, so that each host trains its own share of the children"
  module_flags=(--module "$MODULE")
fi
for h in "${HOST_LIST[@]}"; do host_run "$h" check-idle; done
started=()
for i in "${!HOST_LIST[@]}"; do
  h=${HOST_LIST[$i]}
  env_flags=()
  for e in "LMTINY_COORDINATOR=${COORDINATOR:-${HOST_LIST[0]#*@}:$PORT}" "LMTINY_NUM_PROCESSES=$N" "LMTINY_PROCESS_ID=$i" \
    ${ENVS[@]+"${ENVS[@]}"}; do
    env_flags+=(--env "$e")
  done
  if ! host_run "$h" start --python "$PYTHON" ${module_flags[@]+"${module_flags[@]}"} "${env_flags[@]}" -- "${ARGS[@]}"; then
    note "error: training did not start on $h; stopping it on ${started[*]-no other host}"
    for s in ${started[@]+"${started[@]}"}; do host_run "$s" stop || true; done
    exit 1
  fi
  started+=("$h")
done
[[ $DRY_RUN == 1 ]] || note "started on $N hosts; logs: launch/gpu.sh logs --hosts $HOSTS"
