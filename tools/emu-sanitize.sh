#!/usr/bin/env bash
# Runs the CPU-emulator tests (tests/emu_harness.rs, tests/emu_kernels*.rs) with the emulator
# runtime and every kernel compiled under AddressSanitizer + UBSan (MEGA_EMU_SANITIZE=1 in
# build.rs: -fsanitize=address,undefined -fno-sanitize-recover=all), host buffers sized exactly.
#
# Passes only if the real kernels run clean AND the planted one-past-the-end read of
# kernels/emu/selftest.cu is reported (the test read_past_end_is_caught_by_address_sanitizer,
# compiled only in this build, runs it in a child process and expects the ASan report with its
# source line).
#
# Uses the release profile of the normal target dir, so after `cargo test --release` only the
# mega crate is rebuilt; the next normal build rebuilds it again (build.rs watches the variable).
# Usage: tools/emu-sanitize.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export MEGA_EMU_SANITIZE=1
# Leak checking would flag the Rust test harness's own intentional leaks, not kernel bugs.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --test emu_harness --test emu_kernels --test emu_device --test emu_kernels_megalodon --test emu_kernels_ops --test emu_kernels_cast --test emu_kernels_softmax --test emu_kernels_elementwise --test emu_kernels_adamw --test emu_kernels_mega_attention --test emu_kernels_paged_attention 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if (( status != 0 )); then
  echo "emu-sanitize: FAIL: emulator tests failed under ASan/UBSan (see above)"
  exit 1
fi
if ! grep -q "^test read_past_end_is_caught_by_address_sanitizer ... ok" "$log"; then
  echo "emu-sanitize: FAIL: the planted out-of-bounds read test did not run (is MEGA_EMU_SANITIZE honoured by build.rs?)"
  exit 1
fi
echo "emu-sanitize: OK (real kernels clean under ASan+UBSan; planted one-past-the-end read reported)"
