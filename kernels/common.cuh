// Shared device helpers for mega's kernels.
//
// Every kernel file in this directory follows the rules of spec/cuda-emulation.md §3–§4 so the
// same source also runs on the CPU emulator:
// - entry points are `extern "C" __global__`, launched only from Rust (no `<<<>>>` here);
// - no inline PTX, cooperative groups, textures or `__CUDA_ARCH__` branches;
// - no early `return` in a kernel that reaches a `__syncthreads` (use a `valid` flag);
// - dynamic shared memory is always `extern __shared__ __align__(16) unsigned char smem[]`,
//   declared at global namespace scope (the emulator links it by its unmangled name), one
//   name for every file, reinterpreted per kernel;
// - warp collectives are called by all 32 lanes of a warp (blocks are multiples of 32 threads).
#pragma once

#include <cuda_bf16.h>

namespace mega {

constexpr unsigned FULL_WARP_MASK = 0xffffffffu;
constexpr int WARP_SIZE = 32;
// Largest block any kernel here is launched with; sizes the per-warp scratch arrays.
constexpr int MAX_WARPS_PER_BLOCK = 32;

// A running softmax normaliser: `sum` is Σ exp(x − max) over the values seen so far.
struct SoftmaxStats {
    float max;
    float sum;
};

__device__ __forceinline__ SoftmaxStats softmax_stats_empty() {
    SoftmaxStats s;
    s.max = -INFINITY;
    s.sum = 0.0f;
    return s;
}

// Folds one value into running stats (the online-softmax update).
__device__ __forceinline__ SoftmaxStats softmax_stats_push(SoftmaxStats s, float x) {
    if (x > s.max) {
        // exp(−inf) = 0 rescales the empty sum on the first value.
        s.sum = s.sum * expf(s.max - x) + 1.0f;
        s.max = x;
    } else if (x != -INFINITY) {
        // A −inf logit contributes exactly 0; skipping it avoids exp(−inf + inf) = NaN while
        // the running max is still −inf. NaN logits reach the expf and poison the sum.
        s.sum += expf(x - s.max);
    }
    return s;
}

// Merges two partial stats. An empty side (max = −inf, sum = 0) is an identity; it is tested
// explicitly because exp(−inf − (−inf)) would be NaN.
__device__ __forceinline__ SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
    if (a.sum == 0.0f) return b;
    if (b.sum == 0.0f) return a;
    SoftmaxStats r;
    r.max = fmaxf(a.max, b.max);
    r.sum = a.sum * expf(a.max - r.max) + b.sum * expf(b.max - r.max);
    return r;
}

__device__ __forceinline__ SoftmaxStats warp_softmax_stats(SoftmaxStats s) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        SoftmaxStats other;
        other.max = __shfl_xor_sync(FULL_WARP_MASK, s.max, offset);
        other.sum = __shfl_xor_sync(FULL_WARP_MASK, s.sum, offset);
        s = softmax_stats_merge(s, other);
    }
    return s;
}

// Block-wide softmax stats; every thread of the block gets the same result.
//
// `scratch` must hold MAX_WARPS_PER_BLOCK entries and be shared by the block. Two barriers:
// the first makes sure every thread has finished reading `scratch` from a previous call
// before it is overwritten; the second publishes the warp partials. Each warp then reduces
// all partials itself (in the same order), so no third barrier or broadcast is needed.
// Must be reached by every thread of the block (it contains `__syncthreads`).
__device__ __forceinline__ SoftmaxStats block_softmax_stats(SoftmaxStats s, SoftmaxStats* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = (blockDim.x + WARP_SIZE - 1) / WARP_SIZE;
    s = warp_softmax_stats(s);
    __syncthreads();
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    SoftmaxStats partial = lane < n_warps ? scratch[lane] : softmax_stats_empty();
    return warp_softmax_stats(partial);
}

// Element conversions used by templated kernels, so one body serves f32 and bf16 storage.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}


// ---- sums ----------------------------------------------------------------------------------

// Sum over the 32 lanes of a warp; every lane gets the result. The butterfly adds in the same
// pattern on every lane, so all lanes hold the bitwise same value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(FULL_WARP_MASK, v, offset);
    }
    return v;
}

// Max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(FULL_WARP_MASK, v, offset));
    }
    return v;
}

// Row loops of the one-warp-per-row kernels (block (32, rows per block), grid-stride): this
// warp's first row and the distance to its next. The row depends only on threadIdx.y, so the
// loop bound is uniform across the warp and its collectives are reached by all 32 lanes.
__device__ __forceinline__ long long warp_first_row() {
    return static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ long long warp_row_step() {
    return static_cast<long long>(gridDim.x) * blockDim.y;
}

// Block-wide sum; every thread of the block gets the same value. `scratch` holds
// MAX_WARPS_PER_BLOCK floats of block-shared memory. The same two-barrier protocol as
// block_softmax_stats: the first barrier retires readers of a previous call, the second
// publishes the warp partials. Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = (blockDim.x + WARP_SIZE - 1) / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < n_warps ? scratch[lane] : 0.0f);
}

// dst[j] += Σ_c partials[c·stride + j] for j < width, summed in chunk order c = 0, 1, ...
// The deterministic second half of a column reduction whose first half wrote one row of
// partial sums per block of rows. Threads stride over the columns (any 1-D launch).
__device__ __forceinline__ void add_column_partials(
    float* __restrict__ dst, const float* __restrict__ partials, int n_chunks, int width,
    long long stride) {
    const int step = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < width; j += step) {
        float sum = 0.0f;
        for (int c = 0; c < n_chunks; ++c) sum += partials[c * stride + j];
        dst[j] += sum;
    }
}

}  // namespace mega
