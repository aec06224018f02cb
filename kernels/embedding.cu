// Byte-embedding gather (forward) and scatter-add (backward).
//
//   forward:  out[i, :] (= or +=) table[ids[i], :]                 (f32 or bf16 storage)
//   backward: dtable[v, :] += Σ_{i : ids[i] = v} dout[i, :]          (f32 accumulation)
//
// With a 256-row byte table every row is hit about n/256 times, so a naive atomicAdd per
// element contends heavily (spec/megabyte.md §3.1). The backward instead accumulates a block's
// tokens into a [vocab × 32] tile of shared memory and then touches each table element once.
//
// An id ≥ vocab is a caller bug (e.g. a pad sentinel that should have gone to a pad kernel):
// the forward writes a NaN row and the backward ignores the token, so nothing reads or writes
// out of bounds and the mistake is visible in the loss.
#include "common.cuh"

namespace {

// ---- forward -------------------------------------------------------------------------------

// Launch: block (32, rows per block); grid.x blocks stride over the rows. One warp copies one
// row, lanes over columns, so any width ≥ 32 keeps every lane busy and loads coalesced.
template <typename T>
__device__ __forceinline__ void embedding_forward(
    T* __restrict__ out, const T* __restrict__ table, const unsigned int* __restrict__ ids,
    int n_tokens, int dim, int vocab, int accumulate) {
    const int stride = gridDim.x * blockDim.y;
    for (int i = blockIdx.x * blockDim.y + threadIdx.y; i < n_tokens; i += stride) {
        const unsigned int id = ids[i];
        T* dst = out + static_cast<size_t>(i) * dim;
        if (id < static_cast<unsigned int>(vocab)) {
            const T* src = table + static_cast<size_t>(id) * dim;
            for (int c = threadIdx.x; c < dim; c += blockDim.x) {
                dst[c] = accumulate ? mega::from_float<T>(mega::to_float(dst[c]) + mega::to_float(src[c]))
                                    : src[c];
            }
        } else {
            for (int c = threadIdx.x; c < dim; c += blockDim.x) {
                dst[c] = mega::from_float<T>(NAN);
            }
        }
    }
}

// ---- backward ------------------------------------------------------------------------------
//
// Launch: block EMB_BWD_THREADS (256) threads; grid (ceil(dim / 32), n_chunks); dynamic shared memory
// vocab · 32 · 4 bytes (32 KiB for the 256-byte vocabulary). Block (x, y) owns the 32 columns
// starting at 32·x (striding by 32·grid.x when the grid is narrower) and the y-th contiguous
// chunk of tokens.
//
// Determinism: inside a block every accumulator cell [v, lane] has exactly one writer, the
// lane `lane` of warp v % EMB_BWD_WARPS, which adds its tokens in token order. No shared-memory
// atomics and no barriers are needed, and the per-block result is bitwise reproducible.
// Across blocks: the `_atomic` kernels add each block's tile to dtable with one atomicAdd per
// touched element, which is deterministic only when grid.y == 1; the `_partials` kernels write
// each chunk's tile to a workspace that embedding_backward_reduce_f32 sums in chunk order.

constexpr int EMB_BWD_COLS = mega::WARP_SIZE;
constexpr int EMB_BWD_WARPS = 8;
constexpr int EMB_BWD_THREADS = EMB_BWD_WARPS * mega::WARP_SIZE;

// Index of the lowest set bit of a non-zero mask, via __clz (which the CPU emulator has).
__device__ __forceinline__ int lowest_set_bit(unsigned int mask) {
    return 31 - __clz(mask & (0u - mask));
}

// Sums dout[tok_begin..tok_end, col] into acc[v * 32 + lane] for the rows v this thread owns.
// `col` may be ≥ dim for the last tile's idle lanes: they still take part in the warp
// collectives but load nothing.
template <typename T>
__device__ __forceinline__ void accumulate_chunk(
    float* acc, const T* __restrict__ dout, const unsigned int* __restrict__ ids,
    int tok_begin, int tok_end, int dim, int vocab, int col) {
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const unsigned int warp = threadIdx.x / mega::WARP_SIZE;
    const bool col_valid = col < dim;
    for (int v = warp; v < vocab; v += EMB_BWD_WARPS) {
        acc[v * EMB_BWD_COLS + lane] = 0.0f;
    }
    for (int base = tok_begin; base < tok_end; base += mega::WARP_SIZE) {
        // Each lane reads one id; a ballot then tells the warp which of these 32 tokens land in
        // rows it owns, so it visits only those instead of all 32.
        const int t = base + lane;
        const unsigned int id = t < tok_end ? ids[t] : 0xffffffffu;
        const bool mine = id < static_cast<unsigned int>(vocab) && id % EMB_BWD_WARPS == warp;
        unsigned int owned = __ballot_sync(mega::FULL_WARP_MASK, mine);
        while (owned != 0u) {
            const int k = lowest_set_bit(owned);
            owned &= owned - 1u;
            const unsigned int v = __shfl_sync(mega::FULL_WARP_MASK, id, k);
            if (col_valid) {
                acc[v * EMB_BWD_COLS + lane] += mega::to_float(dout[static_cast<size_t>(base + k) * dim + col]);
            }
        }
    }
}

// The contiguous token range of chunk blockIdx.y when n_tokens are split over gridDim.y chunks.
__device__ __forceinline__ void chunk_range(int n_tokens, int* begin, int* end) {
    const int per_chunk = (n_tokens + gridDim.y - 1) / gridDim.y;
    *begin = min(n_tokens, static_cast<int>(blockIdx.y) * per_chunk);
    *end = min(n_tokens, *begin + per_chunk);
}

template <typename T>
__device__ __forceinline__ void embedding_backward_atomic(
    float* acc, float* dtable, const T* __restrict__ dout, const unsigned int* __restrict__ ids,
    int n_tokens, int dim, int vocab) {
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    int tok_begin, tok_end;
    chunk_range(n_tokens, &tok_begin, &tok_end);
    for (int tile = blockIdx.x; tile * EMB_BWD_COLS < dim; tile += gridDim.x) {
        const int col = tile * EMB_BWD_COLS + lane;
        accumulate_chunk(acc, dout, ids, tok_begin, tok_end, dim, vocab, col);
        if (col < dim) {
            for (int v = warp; v < vocab; v += EMB_BWD_WARPS) {
                const float sum = acc[v * EMB_BWD_COLS + lane];
                // Rows this chunk never touched hold exactly 0; skipping them saves most atomics
                // for short chunks and changes no value.
                if (sum != 0.0f) atomicAdd(&dtable[static_cast<size_t>(v) * dim + col], sum);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void embedding_backward_partials(
    float* acc, float* __restrict__ partials, const T* __restrict__ dout,
    const unsigned int* __restrict__ ids, int n_tokens, int dim, int vocab) {
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    int tok_begin, tok_end;
    chunk_range(n_tokens, &tok_begin, &tok_end);
    float* chunk_out = partials + static_cast<size_t>(blockIdx.y) * vocab * dim;
    for (int tile = blockIdx.x; tile * EMB_BWD_COLS < dim; tile += gridDim.x) {
        const int col = tile * EMB_BWD_COLS + lane;
        accumulate_chunk(acc, dout, ids, tok_begin, tok_end, dim, vocab, col);
        if (col < dim) {
            for (int v = warp; v < vocab; v += EMB_BWD_WARPS) {
                chunk_out[static_cast<size_t>(v) * dim + col] = acc[v * EMB_BWD_COLS + lane];
            }
        }
    }
}

}  // namespace

// The one dynamic shared-memory array of this file. It is declared at namespace scope, not in
// a helper inside a namespace, because the CPU emulator links it by its unmangled global name.
extern __shared__ __align__(16) unsigned char smem[];

extern "C" __global__ void embedding_forward_f32(
    float* out, const float* table, const unsigned int* ids, int n_tokens, int dim, int vocab,
    int accumulate) {
    embedding_forward(out, table, ids, n_tokens, dim, vocab, accumulate);
}

extern "C" __global__ void embedding_forward_bf16(
    __nv_bfloat16* out, const __nv_bfloat16* table, const unsigned int* ids, int n_tokens, int dim,
    int vocab, int accumulate) {
    embedding_forward(out, table, ids, n_tokens, dim, vocab, accumulate);
}

extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS) embedding_backward_atomic_f32(
    float* dtable, const float* dout, const unsigned int* ids, int n_tokens, int dim, int vocab) {
    embedding_backward_atomic(reinterpret_cast<float*>(smem), dtable, dout, ids, n_tokens, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS) embedding_backward_atomic_bf16(
    float* dtable, const __nv_bfloat16* dout, const unsigned int* ids, int n_tokens, int dim,
    int vocab) {
    embedding_backward_atomic(reinterpret_cast<float*>(smem), dtable, dout, ids, n_tokens, dim, vocab);
}

// partials: [grid.y, vocab, dim] workspace, fully overwritten.
extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS) embedding_backward_partials_f32(
    float* partials, const float* dout, const unsigned int* ids, int n_tokens, int dim, int vocab) {
    embedding_backward_partials(reinterpret_cast<float*>(smem), partials, dout, ids, n_tokens, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS) embedding_backward_partials_bf16(
    float* partials, const __nv_bfloat16* dout, const unsigned int* ids, int n_tokens, int dim,
    int vocab) {
    embedding_backward_partials(reinterpret_cast<float*>(smem), partials, dout, ids, n_tokens, dim, vocab);
}

// dtable[e] += Σ_c partials[c, e] for e < vocab · dim, summed in chunk order c = 0, 1, ...
// Launch: any 1-D shape; threads stride over the elements, one thread per element.
extern "C" __global__ void embedding_backward_reduce_f32(
    float* __restrict__ dtable, const float* __restrict__ partials, int n_chunks, int vocab, int dim) {
    const size_t n = static_cast<size_t>(vocab) * dim;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t e = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
        float sum = 0.0f;
        for (int c = 0; c < n_chunks; ++c) {
            sum += partials[static_cast<size_t>(c) * n + e];
        }
        dtable[e] += sum;
    }
}
