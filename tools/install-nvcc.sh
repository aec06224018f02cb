#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, cicc/nvvm, ptxas, headers) from PyPI into
# tools/.venv-nvcc, without any system CUDA toolkit, and prints the nvcc path.
#
# Why 13.0 exactly: nvcc 13.0 emits PTX ISA 9.0, the newest a CUDA 13.0 driver (580) can JIT;
# newer wheels (13.5) emit ISA 9.5, which that driver rejects (spec/cuda-and-crates.md §2.2).
# Bump the pin only together with the target driver, and regenerate kernels/ptx/ afterwards.
#
# Idempotent: a second run with the pinned set already installed does no network work.
# Usage: tools/install-nvcc.sh            (prints the nvcc path on the last line of stdout)
#        PYTHON=python3.12 tools/install-nvcc.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tools/.venv-nvcc"
PYTHON="${PYTHON:-python3}"
WHEELS=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
)
# The release line nvcc must report; anything else means the venv holds the wrong wheels.
PINNED_RELEASE="release 13.0,"

find_nvcc() {
  local candidate
  for candidate in "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    if [[ -x "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

pinned_nvcc_ok() {
  local nvcc
  nvcc="$(find_nvcc)" || return 1
  "$nvcc" --version 2>/dev/null | grep -q "$PINNED_RELEASE" || return 1
  [[ -x "$(dirname "$nvcc")/ptxas" ]] || return 1
  # cicc lives in the nvvm wheel; without it nvcc starts but cannot compile.
  [[ -x "$(dirname "$nvcc")/../nvvm/bin/cicc" ]] || return 1
}

if pinned_nvcc_ok; then
  echo "install-nvcc: pinned nvcc 13.0 already present in $VENV" >&2
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "install-nvcc: creating virtualenv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "install-nvcc: installing ${WHEELS[*]}" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
  if ! pinned_nvcc_ok; then
    echo "install-nvcc: ERROR: after installation no working nvcc 13.0 was found under $VENV" >&2
    exit 1
  fi
fi

NVCC_PATH="$(find_nvcc)"
"$NVCC_PATH" --version | tail -n 2 >&2
echo "$NVCC_PATH"
