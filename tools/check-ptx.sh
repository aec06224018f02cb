#!/usr/bin/env bash
# Checks the committed PTX and the kernels' register budget.
#
# 1. Regenerates kernels/ptx/*.ptx from kernels/*.cu with the pinned nvcc 13.0 (same flags and
#    working directory as build.rs) into a temp dir, and fails with a diff summary if anything
#    differs from the committed copy (or a .cu has no committed PTX, or a PTX has no .cu).
# 2. Runs `ptxas -v` on every PTX for sm_80 and sm_90, prints registers / spills / shared memory
#    per kernel, and fails if any kernel in HOT_KERNELS spills.
#
# Usage: tools/check-ptx.sh            check (non-zero exit on any failure)
#        tools/check-ptx.sh --update   rewrite kernels/ptx/ from the sources, then check
# nvcc: $NVCC, else the venv from tools/install-nvcc.sh (run that first).
set -euo pipefail

# Kernels on the training/inference hot path: a register spill in any of them fails the check.
HOT_KERNELS=(
  cross_entropy_forward_f32
  cross_entropy_backward_f32
  embedding_forward_f32
  embedding_forward_bf16
  embedding_backward_atomic_f32
  embedding_backward_atomic_bf16
  embedding_backward_partials_f32
  embedding_backward_partials_bf16
  embedding_backward_reduce_f32
  cema_forward_f32
  cema_backward_f32
  cema_step_f32
  tsn_group_moments_f32
  tsn_scan_f32
  tsn_normalize_f32
  tsn_backward_group_sums_f32
  tsn_backward_scan_f32
  tsn_backward_dx_f32
  tsn_step_f32
  layernorm_forward_f32
  layernorm_forward_bf16
  layernorm_backward_f32
  layernorm_backward_bf16
  rmsnorm_forward_f32
  rmsnorm_forward_bf16
  rmsnorm_backward_f32
  rmsnorm_backward_bf16
  activation_forward_bf16
  activation_backward_bf16
  swiglu_forward_bf16
  swiglu_backward_bf16
  adamw_step_f32
  adamw_step_f32_bf16_copy
  add_assign_f32
  scale_f32
  sum_partials_f32
  rope_forward_f32
  rope_backward_f32
  causal_softmax_forward_f32
  causal_softmax_backward_f32
  mega_attn_project_forward_f32
  mega_attn_project_backward_f32
  log_softmax_f32
  paged_attention_partition_f32
  paged_attention_combine_f32
)
# Must match NVCC_FLAGS in build.rs.
NVCC_FLAGS=(-ptx -O3 -arch=sm_80 -std=c++17)
PTXAS_ARCHS=(sm_80 sm_90)
PINNED_RELEASE="release 13.0,"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KERNELS="$ROOT/kernels"
COMMITTED="$KERNELS/ptx"

update=0
case "${1:-}" in
  "") ;;
  --update) update=1 ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for candidate in "$ROOT"/tools/.venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [[ -x "$candidate" ]] && nvcc="$candidate"
  done
fi
if [[ -z "$nvcc" ]] || ! "$nvcc" --version >/dev/null 2>&1; then
  echo "check-ptx: no working nvcc (set NVCC or run tools/install-nvcc.sh)" >&2
  exit 1
fi
if ! "$nvcc" --version | grep -q "$PINNED_RELEASE"; then
  echo "check-ptx: $nvcc is not the pinned nvcc 13.0:" >&2
  "$nvcc" --version >&2
  exit 1
fi
ptxas="$(dirname "$(command -v "$nvcc")")/ptxas"
[[ -x "$ptxas" ]] || { echo "check-ptx: no ptxas next to $nvcc" >&2; exit 1; }
echo "check-ptx: $("$nvcc" --version | grep "$PINNED_RELEASE")"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---- 1. regenerate and compare -----------------------------------------------------------
shopt -s nullglob
sources=("$KERNELS"/*.cu)
(( ${#sources[@]} > 0 )) || { echo "check-ptx: no kernels/*.cu" >&2; exit 1; }
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  # Relative input from inside kernels/, exactly as build.rs does.
  (cd "$KERNELS" && "$nvcc" "${NVCC_FLAGS[@]}" "$name.cu" -o "$tmp/$name.ptx")
done

if (( update )); then
  mkdir -p "$COMMITTED"
  rm -f "$COMMITTED"/*.ptx
  cp "$tmp"/*.ptx "$COMMITTED"/
  echo "check-ptx: updated $COMMITTED"
fi

stale=0
# nvcc names anonymous-namespace symbols after a hash of the source's absolute path, so such
# names make the PTX differ between checkouts: kernels use named namespaces instead.
for fresh in "$tmp"/*.ptx; do
  if grep -q '_INTERNAL_' "$fresh"; then
    echo "STALE: $(basename "$fresh") holds path-dependent _INTERNAL_ names (an anonymous namespace around a kernel helper with static shared memory); use a named namespace"
    stale=1
  fi
done
for fresh in "$tmp"/*.ptx; do
  name="$(basename "$fresh")"
  committed="$COMMITTED/$name"
  if [[ ! -f "$committed" ]]; then
    echo "STALE: kernels/ptx/$name is missing (a .cu without committed PTX)"
    stale=1
  elif ! cmp -s "$fresh" "$committed"; then
    echo "STALE: kernels/ptx/$name differs from a fresh compile of kernels/${name%.ptx}.cu:"
    changed=$(diff "$committed" "$fresh" | grep -c '^[<>]' || true)
    echo "  $changed changed lines; first differences:"
    diff -u --label "committed/$name" --label "fresh/$name" "$committed" "$fresh" | sed -n '1,20p' | sed 's/^/    /'
    stale=1
  fi
done
for committed in "$COMMITTED"/*.ptx; do
  name="$(basename "$committed" .ptx)"
  if [[ ! -f "$KERNELS/$name.cu" ]]; then
    echo "STALE: kernels/ptx/$name.ptx has no kernels/$name.cu"
    stale=1
  fi
done
if (( stale )); then
  echo "check-ptx: FAIL: committed PTX is out of date; run tools/check-ptx.sh --update and commit kernels/ptx/"
  exit 1
fi
echo "check-ptx: committed PTX matches the sources (${#sources[@]} modules)"

# ---- 2. ptxas register / spill report ----------------------------------------------------
is_hot() {
  local kernel="$1" hot
  for hot in "${HOT_KERNELS[@]}"; do [[ "$hot" == "$kernel" ]] && return 0; done
  return 1
}

spilled=0
printf '\n%-36s %-6s %5s %8s %8s %6s %8s\n' kernel arch regs spill_st spill_ld stack smem
for arch in "${PTXAS_ARCHS[@]}"; do
  for ptx in "$COMMITTED"/*.ptx; do
    report="$tmp/$(basename "$ptx" .ptx).$arch.txt"
    "$ptxas" -v -arch="$arch" "$ptx" -o "$tmp/out.cubin" 2>"$report"
    # ptxas prints per kernel: "Compiling entry function 'K' for 'sm_XX'", then
    # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers, ...".
    while IFS='|' read -r kernel regs stores loads stack smem; do
      printf '%-36s %-6s %5s %8s %8s %6s %8s\n' "$kernel" "$arch" "$regs" "$stores" "$loads" "$stack" "$smem"
      if is_hot "$kernel" && (( stores > 0 || loads > 0 )); then
        echo "SPILL: hot kernel $kernel spills on $arch ($stores bytes stored, $loads bytes loaded)"
        spilled=1
      fi
    done < <(awk '
      /Compiling entry function/ { match($0, /\047[^\047]+\047/); kernel = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { stack = $1; stores = $5; loads = $9 }
      /Used [0-9]+ registers/ {
        regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
        smem = "0"; if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
        print kernel "|" regs "|" stores "|" loads "|" stack "|" smem
      }' "$report")
  done
done

missing=0
for hot in "${HOT_KERNELS[@]}"; do
  if ! grep -q "^\.visible \.entry $hot(" "$COMMITTED"/*.ptx; then
    echo "check-ptx: hot kernel $hot (listed in HOT_KERNELS) is not in any PTX module"
    missing=1
  fi
done
if (( spilled || missing )); then
  echo "check-ptx: FAIL"
  exit 1
fi
echo "check-ptx: OK (no spills in ${#HOT_KERNELS[@]} hot kernels on ${PTXAS_ARCHS[*]})"
