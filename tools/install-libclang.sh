#!/usr/bin/env bash
# Installs the pinned libclang shared library from PyPI (the `libclang` wheel, which bundles
# libclang.so and needs no system LLVM) into tools/.venv-libclang, and prints the directory
# holding libclang.so: use it as LIBCLANG_PATH, which makes build.rs regenerate
# src/emu/bindings.rs with bindgen (see tools/emu-bindings.sh).
#
# Idempotent: a second run with the pinned wheel already installed does no network work.
# Usage: tools/install-libclang.sh            (prints the directory on the last line of stdout)
#        PYTHON=python3.12 tools/install-libclang.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tools/.venv-libclang"
PYTHON="${PYTHON:-python3}"
# Bump together with a regeneration of src/emu/bindings.rs (the output may change with it).
WHEEL="libclang==18.1.1"

find_libclang_dir() {
  local candidate
  for candidate in "$VENV"/lib/python3*/site-packages/clang/native/libclang.so; do
    if [[ -f "$candidate" ]]; then
      dirname "$candidate"
      return 0
    fi
  done
  return 1
}

installed_version() {
  # Captured first: `grep -q` closing the pipe early would fail the pipeline under pipefail.
  local info
  info="$("$VENV/bin/python" -m pip show libclang 2>/dev/null)" || return 1
  sed -n 's/^Version: //p' <<<"$info"
}

if find_libclang_dir >/dev/null && [[ "$(installed_version)" == "${WHEEL#*==}" ]]; then
  echo "install-libclang: pinned $WHEEL already present in $VENV" >&2
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "install-libclang: creating virtualenv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "install-libclang: installing $WHEEL" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"
  if ! find_libclang_dir >/dev/null; then
    echo "install-libclang: ERROR: no libclang.so under $VENV after installation" >&2
    exit 1
  fi
fi

find_libclang_dir
