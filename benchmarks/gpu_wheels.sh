#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels a bare GPU box (no network) lacks for lmtiny's
# benchmarks; benchmarks/gpu_suite.sh installs them there with pip --no-index --no-deps.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu_wheels.sh [--dest DIR] [--python-version X.Y] [--dry-run]

Downloads into DIR (default: .whl/ in the repository root, ignored by git) the binary wheels
that lmtiny's import path needs beyond what the GPU image already holds (jax + CUDA plugin,
flax, optax, orbax-checkpoint, sentencepiece, numpy, absl-py, etils, cloudpickle, protobuf,
pyyaml: see the device machines' package list). Each is pinned to the version tested here;
their Requires-Dist were checked against that list:
  grain          needs array-record, portpicker (+ absl-py, cloudpickle, etils, numpy, protobuf)
  array-record   needs absl-py, etils
  ml-collections needs absl-py, pyyaml
  portpicker     pure Python; grain imports it at module level

Idempotent: wheels already present are kept; another version of a listed project is removed
(two versions of one project stop pip's install). Prints the total size, which travels with
the working tree (64 MiB limit together with the repository).

options:
  --dest DIR            where the wheels go (default: <repo>/.whl)
  --python-version X.Y  the target interpreter (default 3.12, the GPU image's; 3.11 for a local check)
  --dry-run             print the pip command, download nothing
  -h, --help
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYVER=3.12
DRY=0
# project==version, tested together in this repository (GUIDE section 3).
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0)

while (($#)); do
  case "$1" in
    --dest) DEST="${2:?--dest needs a directory}"; shift 2 ;;
    --python-version) PYVER="${2:?--python-version needs X.Y}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! "$PYVER" =~ ^3\.[0-9]+$ ]]; then
  echo "error: --python-version '$PYVER': expected X.Y, e.g. 3.12" >&2
  exit 2
fi

# pip matches each manylinux tag exactly: name every glibc level a wheel may be tagged with.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
CMD=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER"
     --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}")

if ((DRY)); then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi

mkdir -p "$DEST"
# Wheel file names spell the project with underscores, lower case.
wheel_name() { local n="${1%%==*}"; n="${n//-/_}"; echo "${n,,}"; }
for spec in "${WHEELS[@]}"; do
  name="$(wheel_name "$spec")"
  version="${spec#*==}"
  for f in "$DEST"/*.whl; do
    [[ -e "$f" ]] || continue
    base="$(basename "$f")"
    lower="${base,,}"
    if [[ "$lower" == "$name"-* && "$lower" != "$name-$version"-* ]]; then
      echo "removing $base (another version than $spec)"
      rm -f -- "$f"
    fi
  done
done

"${CMD[@]}"

missing=0
for spec in "${WHEELS[@]}"; do
  name="$(wheel_name "$spec")"
  version="${spec#*==}"
  found=""
  for f in "$DEST"/*.whl; do
    base="$(basename "$f")"
    lower="${base,,}"
    if [[ "$lower" == "$name-$version"-* ]]; then found="$base"; fi
  done
  if [[ -n "$found" ]]; then
    echo "ok  $found"
  else
    echo "error: no wheel for $spec in $DEST" >&2
    missing=1
  fi
done
echo "total: $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) in $DEST (carry it: it travels with the working tree)"
exit "$missing"
