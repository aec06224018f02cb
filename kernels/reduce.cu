// Deterministic sums of a whole buffer, accumulated in f64: Σ x (loss reductions) and Σ x²
// (global-norm gradient clipping). CPU twin: src/backend/cpu/memory.rs (sum, sum_squares;
// also f64, in other chunks, so the two agree to f64 rounding, not bitwise).
//
// Two passes, no atomics, so the result depends only on n and the values, never on how
// blocks or warps were scheduled (tests/emu_kernels_elementwise.rs checks it bitwise under
// every emulator schedule):
//   1. sum_partials_f32: block b owns the contiguous range [b·chunk, min(n, (b+1)·chunk)),
//      chunk = ⌈n / gridDim.x⌉. Thread t adds elements t, t + blockDim.x, … of that range in
//      order into an f64; the block then adds the per-thread values in a fixed tree
//      (s[t] += s[t + w] for w = blockDim.x/2, …, 1) and writes partials[b].
//   2. sum_combine_f64: one block adds the gridDim.x partials the same way and writes out[0].
// `square` selects x² instead of x (the square is taken in f64, exactly).
//
// Launch: sum_partials_f32 with a grid that is a function of n only (src/cuda/launch.rs:
// reduce::partials), blockDim.x a power of two ≤ MAX_THREADS; sum_combine_f64 with one block
// of the same kind. The host picks both, so the chunking, and with it every rounding, is fixed.
#include "common.cuh"

namespace mega_reduce {

constexpr int MAX_THREADS = 1024;

// The block's values added in a fixed tree; thread 0 gets the total. Every thread of the
// block must call it (it contains __syncthreads).
__device__ __forceinline__ double block_tree_sum(double v) {
    __shared__ double s[MAX_THREADS];
    const unsigned int t = threadIdx.x;
    s[t] = v;
    __syncthreads();
    for (unsigned int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (t < w) s[t] += s[t + w];
        __syncthreads();
    }
    return s[0];
}

}  // namespace mega_reduce

// A named namespace, not an anonymous one: nvcc names anonymous-namespace symbols (here the
// shared array) after a hash of the source path, which would make the PTX path-dependent.
using namespace mega_reduce;

// partials [gridDim.x] = per-block Σ x (or Σ x²) over x [n].
extern "C" __global__ void sum_partials_f32(
    double* __restrict__ partials, const float* __restrict__ x, long long n, int square) {
    const long long chunk = (n + gridDim.x - 1) / gridDim.x;
    const long long begin = static_cast<long long>(blockIdx.x) * chunk;
    const long long end = begin + chunk < n ? begin + chunk : n;
    double acc = 0.0;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const double v = static_cast<double>(x[i]);
        acc += square ? v * v : v;
    }
    const double total = block_tree_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// out[0] = Σ partials[0..count), in the fixed order described above.
extern "C" __global__ void sum_combine_f64(
    double* __restrict__ out, const double* __restrict__ partials, int count) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    const double total = block_tree_sum(acc);
    if (threadIdx.x == 0) out[0] = total;
}
