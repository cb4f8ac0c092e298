# Shared by launch/tpu.sh and launch/gpu.sh (sourced, never run). Runs on the user's machine,
# so it keeps to bash 3.2 (macOS): no mapfile, no associative arrays, guarded empty arrays.
# shellcheck shell=bash

DRY_RUN=0
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# Where the code lives on a worker, relative to the login directory.
REMOTE_DIR=lmtiny

die() {  # Bad input or a missing tool: one line, exit status 2, nothing started.
  printf 'error: %s\n' "$*" >&2
  exit 2
}

note() { printf '%s\n' "$*" >&2; }

# One shell-quoted line for a command: what --dry-run prints and what a shell would re-read.
quote_words() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

# The same words for people: plain when safe, else in single quotes ($'..' for control chars).
display_words() {
  local w out='' q="'" sq="'\\''"
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=" $w"
    elif [[ $w == *[[:cntrl:]]* ]]; then
      out+=" $(printf '%q' "$w")"
    else
      out+=" '${w//$q/$sq}'"
    fi
  done
  printf '%s' "${out# }"
}

# Runs a command, echoing it to stderr; under --dry-run prints it to stdout and runs nothing.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(display_words "$@")"
    return 0
  fi
  note "+ $(display_words "$@")"
  "$@"
}

need_value() {  # need_value FLAG "${2-}": the flag's value must follow it.
  [[ -n ${2-} ]] || die "$1 needs a value"
}

check_env_assignment() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$1': must be NAME=VALUE"
}

check_int() {  # check_int FLAG VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 '$2': must be a non-negative integer"
}

require_tool() {  # require_tool NAME HINT; a dry run needs no tools.
  [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH ($2)"
}

# The remote command that runs launch/remote.sh VERB ARGS... inside the code directory on a
# worker. Every word is quoted, so user arguments reach the worker's shell as single words.
remote_cmd() {
  printf 'cd -- %s && bash launch/remote.sh %s' "$(quote_words "$REMOTE_DIR")" "$(quote_words "$@")"
}

# The files a copy of this checkout carries: tracked and untracked-but-not-ignored ones that exist,
# less any virtual environment made inside it (`python -m venv venv`): that is this machine's
# Python, thousands of files, and each worker builds its own.
code_files() {
  local f excludes=()
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$REPO_ROOT is not a git checkout; use --repo URL to clone the code on the workers instead"
  while IFS= read -r -d '' f; do
    [[ $f == */pyvenv.cfg ]] && excludes+=("--exclude=/${f%/pyvenv.cfg}/")
  done < <(git -C "$REPO_ROOT" ls-files -z --others --exclude-standard -- ':(glob)**/pyvenv.cfg')
  while IFS= read -r -d '' f; do
    [[ -e $REPO_ROOT/$f ]] && printf '%s\0' "$f"
  done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard ${excludes[@]+"${excludes[@]}"})
}
