// MEGABYTE's input embedders (spec/megabyte.md §2.1 and §2.3): table gathers with a learned pad
// vector wherever an id is the PAD_ID sentinel (0xffffffff), and their scatter-add backward.
// CPU twin: src/backend/cpu/megabyte_embed.rs.
//
//   patch_embed_forward: flat row i of out [n_ids, dg] (= [rows, p·dg]):
//       out[i] = ids[i] == PAD_ID ? pad[i mod p] : tok[ids[i]] + pos[positions[i]]     (=)
//   local_embed_forward: out[i] += (ids[i] == PAD_ID ? pad : tok[ids[i]]) + pos[slots[i]]  (+=)
//
// An id (other than PAD_ID) or a position past its table is a caller bug: the row is written
// as NaN instead of reading out of bounds.
//
// Backward: every gradient here is a row scatter-add dst[target(i)] += src[i]. The host (which
// owns the index arrays) groups the source rows by destination row in increasing source order
// (a CSR list: src/cuda/scatter_plan.rs), and rows_scatter_add_csr_* adds each destination
// row's sources in that order: no atomics, deterministic, and the same additions in the same
// order as the CPU twin's scatter_add_rows. The six scatters are:
//   patch: dtok ← ids (non-pad), dpos ← positions (non-pad), dpad ← i mod p (pad), width dg
//   local: dtok ← ids (non-pad), dpad ← 0 (pad), dpos ← slots (all), width d
//
// Launch: the forwards take block (32, rows per block) with grid.x blocks striding over the
// rows, one warp per row (lanes over columns, coalesced). rows_scatter_add_csr_*: block
// (32, rows per block), grid.x blocks striding over destination rows.
#include "common.cuh"

using mega::from_float;
using mega::to_float;

namespace {

constexpr unsigned int PAD_ID = 0xffffffffu;

__device__ __forceinline__ int row_start() { return blockIdx.x * blockDim.y + threadIdx.y; }
__device__ __forceinline__ int row_stride() { return gridDim.x * blockDim.y; }

template <typename T>
__device__ __forceinline__ void patch_embed_forward(
    T* __restrict__ out, const T* __restrict__ tok, const T* __restrict__ pos,
    const T* __restrict__ pad, const unsigned int* __restrict__ ids,
    const unsigned int* __restrict__ positions, int n_ids, int p, int dg, int tok_rows,
    int pos_rows) {
    for (int i = row_start(); i < n_ids; i += row_stride()) {
        const unsigned int id = ids[i];
        const unsigned int at = positions[i];
        T* o = out + static_cast<size_t>(i) * dg;
        if (id == PAD_ID) {
            const T* src = pad + static_cast<size_t>(i % p) * dg;
            for (int j = threadIdx.x; j < dg; j += blockDim.x) o[j] = src[j];
        } else if (id < static_cast<unsigned int>(tok_rows) && at < static_cast<unsigned int>(pos_rows)) {
            const T* t = tok + static_cast<size_t>(id) * dg;
            const T* e = pos + static_cast<size_t>(at) * dg;
            for (int j = threadIdx.x; j < dg; j += blockDim.x) {
                o[j] = from_float<T>(to_float(t[j]) + to_float(e[j]));
            }
        } else {
            for (int j = threadIdx.x; j < dg; j += blockDim.x) o[j] = from_float<T>(NAN);
        }
    }
}

template <typename T>
__device__ __forceinline__ void local_embed_forward(
    T* __restrict__ out, const T* __restrict__ tok, const T* __restrict__ pos,
    const T* __restrict__ pad, const unsigned int* __restrict__ ids,
    const unsigned int* __restrict__ slots, int n, int d, int tok_rows, int pos_rows) {
    for (int i = row_start(); i < n; i += row_stride()) {
        const unsigned int id = ids[i];
        const unsigned int slot = slots[i];
        T* o = out + static_cast<size_t>(i) * d;
        const bool id_ok = id == PAD_ID || id < static_cast<unsigned int>(tok_rows);
        if (id_ok && slot < static_cast<unsigned int>(pos_rows)) {
            const T* t = id == PAD_ID ? pad : tok + static_cast<size_t>(id) * d;
            const T* e = pos + static_cast<size_t>(slot) * d;
            for (int j = threadIdx.x; j < d; j += blockDim.x) {
                o[j] = from_float<T>(to_float(o[j]) + (to_float(t[j]) + to_float(e[j])));
            }
        } else {
            for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = from_float<T>(NAN);
        }
    }
}

template <typename T>
__device__ __forceinline__ void rows_scatter_add_csr(
    float* __restrict__ dst, const T* __restrict__ src, const unsigned int* __restrict__ offsets,
    const unsigned int* __restrict__ sources, int n_dst, int width) {
    for (int r = row_start(); r < n_dst; r += row_stride()) {
        const unsigned int k0 = offsets[r];
        const unsigned int k1 = offsets[r + 1];
        float* o = dst + static_cast<size_t>(r) * width;
        for (int j = threadIdx.x; j < width; j += blockDim.x) {
            float acc = o[j];
            for (unsigned int k = k0; k < k1; ++k) {
                acc += to_float(src[static_cast<size_t>(sources[k]) * width + j]);
            }
            o[j] = acc;
        }
    }
}

}  // namespace

// out [n_ids, dg]; tok [tok_rows, dg]; pos [pos_rows, dg]; pad [p, dg]; ids, positions [n_ids].
extern "C" __global__ void patch_embed_forward_f32(
    float* out, const float* tok, const float* pos, const float* pad, const unsigned int* ids,
    const unsigned int* positions, int n_ids, int p, int dg, int tok_rows, int pos_rows) {
    patch_embed_forward(out, tok, pos, pad, ids, positions, n_ids, p, dg, tok_rows, pos_rows);
}

extern "C" __global__ void patch_embed_forward_bf16(
    __nv_bfloat16* out, const __nv_bfloat16* tok, const __nv_bfloat16* pos,
    const __nv_bfloat16* pad, const unsigned int* ids, const unsigned int* positions, int n_ids,
    int p, int dg, int tok_rows, int pos_rows) {
    patch_embed_forward(out, tok, pos, pad, ids, positions, n_ids, p, dg, tok_rows, pos_rows);
}

// out [n, d] +=; tok [tok_rows, d]; pos [pos_rows, d]; pad [d]; ids, slots [n].
extern "C" __global__ void local_embed_forward_f32(
    float* out, const float* tok, const float* pos, const float* pad, const unsigned int* ids,
    const unsigned int* slots, int n, int d, int tok_rows, int pos_rows) {
    local_embed_forward(out, tok, pos, pad, ids, slots, n, d, tok_rows, pos_rows);
}

extern "C" __global__ void local_embed_forward_bf16(
    __nv_bfloat16* out, const __nv_bfloat16* tok, const __nv_bfloat16* pos,
    const __nv_bfloat16* pad, const unsigned int* ids, const unsigned int* slots, int n, int d,
    int tok_rows, int pos_rows) {
    local_embed_forward(out, tok, pos, pad, ids, slots, n, d, tok_rows, pos_rows);
}

// dst [n_dst, width] += Σ_{k ∈ offsets[r]..offsets[r+1]} src[sources[k]], in k order.
extern "C" __global__ void rows_scatter_add_csr_f32(
    float* dst, const float* src, const unsigned int* offsets, const unsigned int* sources,
    int n_dst, int width) {
    rows_scatter_add_csr(dst, src, offsets, sources, n_dst, width);
}

extern "C" __global__ void rows_scatter_add_csr_bf16(
    float* dst, const __nv_bfloat16* src, const unsigned int* offsets,
    const unsigned int* sources, int n_dst, int width) {
    rows_scatter_add_csr(dst, src, offsets, sources, n_dst, width);
}
