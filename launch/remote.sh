#!/usr/bin/env bash
# Worker side of launch/tpu.sh and launch/gpu.sh: runs on each TPU worker / GPU host, from the
# copy of the code there. Standalone (cleanup ships it alone to workers that have no code yet).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/remote.sh VERB [options] [-- training args]

Runs on a worker (tpu.sh and gpu.sh call it over ssh). --dir defaults to the checkout holding
this script; logs and pid files go to DIR/logs/, one per host.

verbs:
  setup       [--python-version 3.11] [--extras tpu]   venv in DIR/.venv (via uv), pip install -e .[EXTRAS]
  check-idle                           exit 2 if a training run started here is still alive
  start       [--python PY] [--module lmtiny.sweep] [--env NAME=VALUE]... -- ARGS
                                       python -m lmtiny.train (or the --module) ARGS, detached
                                       (own session, nohup)
  stop        [--grace SECONDS]        SIGTERM the run's process group, SIGKILL after the grace (120)
  logs        [--lines N] [--follow]   tail this host's log
  cleanup     [--devices 'GLOB ...'] [--lockfile PATH]
                                       stop, then kill every process still holding the TPU
                                       (/dev/accel*, /dev/vfio/[0-9]*) and remove /tmp/libtpu_lockfile
common: --dir DIR, --dry-run (print what would run, change nothing), -h/--help
EOF
}

die() { printf 'error: %s\n' "$*" >&2; exit 2; }
say() { printf '%s: %s\n' "$HOST" "$*"; }

quote_words() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

run() {  # Runs a command; under --dry-run prints it instead.
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_words "$@")"
    return 0
  fi
  "$@"
}

alive() {  # alive PIDFILE: the process group it names still has members.
  [[ -s $1 ]] && kill -0 -- "-$(cat "$1")" 2>/dev/null
}

# ------------------------------------------------------------------------------------------------

verb_setup() {
  if ! command -v uv >/dev/null 2>&1 && [[ ! -x $HOME/.local/bin/uv ]]; then
    # pip where the image allows user installs, else uv's own installer (both put it in ~/.local/bin).
    run python3 -m pip install --user --quiet --upgrade uv \
      || run sh -c 'curl -LsSf https://astral.sh/uv/install.sh | sh'
  fi
  local uv=uv
  command -v uv >/dev/null 2>&1 || uv=$HOME/.local/bin/uv
  # uv fetches the Python the package needs (TPU images ship Ubuntu's older python3).
  [[ -x .venv/bin/python ]] || run "$uv" venv --python "$PYTHON_VERSION" .venv
  run "$uv" pip install --python .venv/bin/python -e ".[$EXTRAS]"
  run .venv/bin/python -c 'import jax, lmtiny; print("lmtiny", lmtiny.__version__, "jax", jax.__version__)'
}

verb_check_idle() {
  if alive "$PIDFILE"; then
    die "$HOST: a training run is still alive (process group $(cat "$PIDFILE"), log $DIR/$LOG); stop it first (the stop verb)"
  fi
  say "idle"
}

verb_start() {
  verb_check_idle >/dev/null
  [[ -x $PYTHON ]] || command -v "$PYTHON" >/dev/null 2>&1 || die "$HOST: python '$PYTHON' not found (run the setup verb first)"
  run mkdir -p logs
  # setsid: own session and process group, so stop can signal the run and its data workers;
  # the inner bash records its pid (= the group id) and execs the trainer with argv untouched.
  # shellcheck disable=SC2016  # $$ and $1 belong to the inner bash
  local cmd=(setsid nohup bash -c 'echo $$ > "$1"; shift; exec "$@"' lmtiny-train "$PIDFILE"
    env PYTHONUNBUFFERED=1 ${ENVS[@]+"${ENVS[@]}"} "$PYTHON" -m "$MODULE" ${ARGS[@]+"${ARGS[@]}"})
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s > %q 2>&1 < /dev/null &\n' "$(quote_words "${cmd[@]}")" "$LOG"
    return 0
  fi
  "${cmd[@]}" >"$LOG" 2>&1 </dev/null &
  local child=$!
  sleep "${LMTINY_START_CHECK_SECONDS:-3}"
  if ! kill -0 "$child" 2>/dev/null; then
    local rc=0
    wait "$child" || rc=$?
    if [[ $rc != 0 ]]; then
      tail -n 20 "$LOG" >&2 || true
      printf 'error: %s: training exited with status %s at start (log %s)\n' "$HOST" "$rc" "$DIR/$LOG" >&2
      exit 1
    fi
  fi
  say "started (log $DIR/$LOG)"
}

verb_stop() {
  if ! alive "$PIDFILE"; then
    say "no training run alive"
    [[ $DRY_RUN == 1 ]] || rm -f "$PIDFILE"
    return 0
  fi
  local pgid
  pgid=$(cat "$PIDFILE")
  say "stopping process group $pgid"
  run kill -TERM -- "-$pgid"
  [[ $DRY_RUN == 1 ]] && return 0
  local polls=0
  while alive "$PIDFILE" && ((polls < GRACE * 5)); do
    sleep 0.2
    polls=$((polls + 1))
  done
  if alive "$PIDFILE"; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
    say "killed process group $pgid after ${GRACE}s"
  fi
  rm -f "$PIDFILE"
}

verb_logs() {
  [[ -e $LOG ]] || die "$HOST: no training log $DIR/$LOG"
  local follow=()
  [[ $FOLLOW == 1 ]] && follow=(-F)
  run tail -n "$LINES" ${follow[@]+"${follow[@]}"} "$LOG"
}

device_holders() {  # pids of every process (but this one) with an open descriptor on a device file
  local patterns=() p pid
  set -f  # the globs are for find to match, not for this shell to expand
  for p in $DEVICES; do
    ((${#patterns[@]} == 0)) || patterns+=(-o)
    patterns+=(-lname "$p")
  done
  set +f
  # Processes come and go while find walks /proc: its complaints say nothing about the result.
  { find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/fd/*' \( "${patterns[@]}" \) 2>/dev/null || true; } \
    | cut -d/ -f3 | sort -un | while read -r pid; do
      # Any holder blocks libtpu (python, a debugger, a leftover shell): all of them go.
      if [[ $pid != "$$" && $pid != "$BASHPID" ]]; then echo "$pid"; fi
    done
}

verb_cleanup() {
  if [[ $(id -u) != 0 && $DRY_RUN == 0 ]] && sudo -n true 2>/dev/null; then
    # Stale processes may belong to another user (or root); the lockfile too.
    # By absolute path: this shell has cd'ed into DIR, where a relative $0 no longer resolves.
    exec sudo -n bash "$SELF" cleanup --dir "$DIR" --devices "$DEVICES" --lockfile "$LOCKFILE"
  fi
  if [[ $HAVE_DIR == 1 ]]; then verb_stop; fi
  local pids pid
  pids=$(device_holders | tr '\n' ' ')
  if [[ -n ${pids// /} ]]; then
    for pid in $pids; do say "killing pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)), it holds a TPU device"; done
    # shellcheck disable=SC2086  # one word per pid
    run kill -TERM $pids 2>/dev/null || true
    if [[ $DRY_RUN == 0 ]]; then
      local waited=0
      while [[ -n $(device_holders) ]] && ((waited < 10)); do sleep 1; waited=$((waited + 1)); done
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
  else
    say "no process holds a TPU device"
  fi
  if [[ -e $LOCKFILE ]]; then
    say "removing $LOCKFILE"
    run rm -f "$LOCKFILE"
  fi
}

# ------------------------------------------------------------------------------------------------

DRY_RUN=0
VERB=${1-}
case $VERB in
  -h | --help | help | '') usage; exit 0 ;;
  setup | check-idle | start | stop | logs | cleanup) shift ;;
  *) die "unknown verb '$VERB' (setup, check-idle, start, stop, logs, cleanup)" ;;
esac

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")  # before any cd: sudo re-executes it
DIR=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=.venv/bin/python
PYTHON_VERSION=3.11
EXTRAS=tpu
MODULE=lmtiny.train
GRACE=120
LINES=100
FOLLOW=0
DEVICES='/dev/accel* /dev/vfio/[0-9]*'
LOCKFILE=/tmp/libtpu_lockfile
ENVS=()
ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --dir) [[ -n ${2-} ]] || die "--dir needs a value"; DIR=$2; shift ;;
    --python) [[ -n ${2-} ]] || die "--python needs a value"; PYTHON=$2; shift ;;
    --python-version) [[ -n ${2-} ]] || die "--python-version needs a value"; PYTHON_VERSION=$2; shift ;;
    --extras) [[ -n ${2-} ]] || die "--extras needs a value"; EXTRAS=$2; shift ;;
    --module) [[ ${2-} == lmtiny.train || ${2-} == lmtiny.sweep ]] || die "--module '${2-}': lmtiny.train or lmtiny.sweep"
      MODULE=$2; shift ;;
    --env)
      [[ ${2-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '${2-}': must be NAME=VALUE"
      ENVS+=("$2"); shift ;;
    --grace) [[ ${2-} =~ ^[0-9]+$ ]] || die "--grace '${2-}': must be a number of seconds"; GRACE=$2; shift ;;
    --lines) [[ ${2-} =~ ^[0-9]+$ ]] || die "--lines '${2-}': must be a number"; LINES=$2; shift ;;
    --follow | -f) FOLLOW=1 ;;
    --devices) [[ -n ${2-} ]] || die "--devices needs a value"; DEVICES=$2; shift ;;
    --lockfile) [[ -n ${2-} ]] || die "--lockfile needs a value"; LOCKFILE=$2; shift ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "$VERB: unknown option '$1' (see --help)" ;;
  esac
  shift
done

HOST=$(hostname)
HAVE_DIR=1
if cd -- "$DIR" 2>/dev/null; then
  DIR=$(pwd)
elif [[ $VERB == cleanup ]]; then
  HAVE_DIR=0  # no code here yet: nothing of ours to stop, the chip may still be held
else
  die "$HOST: no directory $DIR (run the setup verb first)"
fi
LOG=logs/train-$HOST.log
PIDFILE=logs/train-$HOST.pid

case $VERB in
  setup) verb_setup ;;
  check-idle) verb_check_idle ;;
  start) verb_start ;;
  stop) verb_stop ;;
  logs) verb_logs ;;
  cleanup) verb_cleanup ;;
esac
