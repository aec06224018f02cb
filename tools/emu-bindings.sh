#!/usr/bin/env bash
# Checks (default) or rewrites (--update) src/emu/bindings.rs, the committed bindgen output for
# the emulator's C ABI (kernels/emu/cuemu_api.h). Installs the pinned libclang wheel first
# (tools/install-libclang.sh); the regeneration itself runs inside build.rs.
#
# Usage: tools/emu-bindings.sh            fail if the committed bindings are stale
#        tools/emu-bindings.sh --update   rewrite them
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

mode=check
case "${1:-}" in
  "") ;;
  --update) mode=update ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

LIBCLANG_PATH="$(tools/install-libclang.sh)"
export LIBCLANG_PATH
echo "emu-bindings: LIBCLANG_PATH=$LIBCLANG_PATH ($mode)"
MEGA_EMU_BINDINGS="$mode" cargo check --lib --quiet
echo "emu-bindings: src/emu/bindings.rs is $( [[ $mode == update ]] && echo updated || echo fresh )"
