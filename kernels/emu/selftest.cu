// Self-test kernels of the CPU emulation harness (tests/emu_harness.rs). Compiled for the
// emulator only, never shipped as PTX, but kept valid CUDA (the same rules as kernels/*.cu).
//
// Some kernels carry deliberate bugs that the harness must keep detecting:
// - selftest_early_return:      `return` before a barrier        → deadlock reported with file:line
// - selftest_divergent_barrier: barriers at two call sites        → divergence reported
// - selftest_missing_barrier:   no barrier between write and read → wrong sums under greedy schedules
// - selftest_read_past_end:     a masked one-past-the-end load    → AddressSanitizer report
// - selftest_shared_overflow:   writes past shared_mem_bytes      → shared-overflow error
// - selftest_wmma_misaligned:   wmma load from a misaligned pointer → kernel error
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

extern __shared__ __align__(16) unsigned char smem[];

namespace {

constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL, v, offset);
    return v;
}

// Block sum of in[block's slice]; every thread writes the total it computed to out[global
// thread], so a thread that read an unwritten partial shows up wherever it sits in the block.
// Dynamic shared memory: one float per warp.
template <bool WithBarrier>
__device__ __forceinline__ void block_sum(float* out, const float* in, int n) {
    float* partials = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int n_warps = blockDim.x / 32;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? in[i] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) partials[warp] = v;
    if (WithBarrier) __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < n_warps; ++w) total += partials[w];
    if (i < n) out[i] = total;
}

}  // namespace

// Launch: block a multiple of 32 threads, grid ceil(n / block); smem 4·block/32 bytes.
extern "C" __global__ void selftest_block_sum(float* out, const float* in, int n) { block_sum<true>(out, in, n); }

// PLANTED BUG: no barrier between the warp partials' writes and their reads.
extern "C" __global__ void selftest_missing_barrier(float* out, const float* in, int n) {
    block_sum<false>(out, in, n);
}

// PLANTED BUG: threads past n return before the barrier the others wait at.
extern "C" __global__ void selftest_early_return(float* out, const float* in, int n) {
    __shared__ float staged[1024];
    const int t = threadIdx.x;
    if (t >= n) return;
    staged[t] = in[t];
    __syncthreads();
    out[t] = staged[(t + 1) % n];
}

// PLANTED BUG: odd and even threads wait at different __syncthreads.
extern "C" __global__ void selftest_divergent_barrier(float* out, int n) {
    const int t = threadIdx.x;
    if (t % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    if (t < n) out[t] = static_cast<float>(t);
}

// PLANTED BUG: every thread loads in[i + 1], also the last one, for which that is one past the
// end. The value is masked afterwards, so the output is right and only ASan can tell.
extern "C" __global__ void selftest_read_past_end(float* out, const float* in, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float next = in[i + 1];
        out[i] = in[i] + (i + 1 < n ? next : 0.0f);
    }
}

// PLANTED BUG: writes `extra` floats past the `n_floats` the launch reserved.
extern "C" __global__ void selftest_shared_overflow(float* out, int n_floats, int extra) {
    float* s = reinterpret_cast<float*>(smem);
    const int t = threadIdx.x;
    for (int k = t; k < n_floats + extra; k += blockDim.x) s[k] = 1.0f;
    __syncthreads();
    if (t == 0) out[blockIdx.x] = s[0];
}

// Reads this thread's word of dynamic shared memory before any write (it must be the 0xFF
// poison in every block), then writes it. out: one word per thread of the grid.
extern "C" __global__ void selftest_dyn_smem_poison(unsigned* out) {
    unsigned* s = reinterpret_cast<unsigned*>(smem);
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    out[block * threads + t] = s[t];
    s[t] = block;
}

// Warp and block collectives, one result row of WARP_OPS_COLUMNS words per thread:
//  0 __shfl_sync(v, 5)           1 __shfl_sync(v, lane+3, width 8)   2 __shfl_up_sync(v, 3, 16)
//  3 __shfl_down_sync(v, 5)      4 __shfl_xor_sync(v, 9, 16)          5 __ballot_sync(lane odd)
//  6 __any_sync(v == 7)          7 __all_sync(v < 1000)               8 __reduce_add_sync(v)
//  9 __reduce_max_sync(v)       10 __match_any_sync(v % 4)            11 __syncthreads_count(t % 3 == 0)
// 12 __syncthreads_and(t < 1000) 13 __syncthreads_or(t == 5)          14 threadIdx.x|y<<10|z<<20
// 15 blockIdx.x|y<<10|z<<20      16 __activemask() (at kernel start, before any lane exits)
// with v = in[global thread]. Lanes of a partial last warp take part with the lanes they have.
extern "C" __global__ void selftest_warp_ops(unsigned* out, const unsigned* in) {
    const unsigned active = __activemask();
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned g = block * threads + t;
    const unsigned lane = t % 32;
    const unsigned v = in[g];
    unsigned* row = out + static_cast<size_t>(g) * 17;
    row[0] = __shfl_sync(FULL, v, 5);
    row[1] = __shfl_sync(FULL, v, lane + 3, 8);
    row[2] = __shfl_up_sync(FULL, v, 3, 16);
    row[3] = __shfl_down_sync(FULL, v, 5);
    row[4] = __shfl_xor_sync(FULL, v, 9, 16);
    row[5] = __ballot_sync(FULL, lane % 2 == 1);
    row[6] = __any_sync(FULL, v == 7);
    row[7] = __all_sync(FULL, v < 1000);
    row[8] = __reduce_add_sync(FULL, v);
    row[9] = __reduce_max_sync(FULL, v);
    row[10] = __match_any_sync(FULL, v % 4);
    row[11] = __syncthreads_count(t % 3 == 0);
    row[12] = __syncthreads_and(t < 1000);
    row[13] = __syncthreads_or(t == 5);
    row[14] = threadIdx.x | (threadIdx.y << 10) | (threadIdx.z << 20);
    row[15] = blockIdx.x | (blockIdx.y << 10) | (blockIdx.z << 20);
    row[16] = active;
}

// c[m, n] = a[m, k] · b[k, n] (row-major, bf16 in, f32 out) with one warp per 16×16 tile of c.
// Launch: block 32, grid (n / 16, m / 16); m, n, k multiples of 16.
extern "C" __global__ void selftest_wmma_gemm(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, int m,
                                              int n, int k) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 sa[16 * 16];
    __shared__ __align__(32) __nv_bfloat16 sb[16 * 16];
    __shared__ __align__(32) float sc[16 * 16];
    const int lane = threadIdx.x;
    const int row0 = blockIdx.y * 16;
    const int col0 = blockIdx.x * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < k; k0 += 16) {
        for (int e = lane; e < 256; e += 32) {
            sa[e] = a[(row0 + e / 16) * k + k0 + e % 16];
            sb[e] = b[(k0 + e / 16) * n + col0 + e % 16];
        }
        __syncwarp();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, sa, 16);
        wmma::load_matrix_sync(fb, sb, 16);
        wmma::mma_sync(acc, fa, fb, acc);
        __syncwarp();
    }
    wmma::store_matrix_sync(sc, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) c[(row0 + e / 16) * n + col0 + e % 16] = sc[e];
    (void)m;
}

// PLANTED BUG: loads matrix A from a pointer that is not 256-bit aligned.
extern "C" __global__ void selftest_wmma_misaligned(float* c) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 sa[17 * 16];
    for (int e = threadIdx.x; e < 17 * 16; e += 32) sa[e] = __float2bfloat16(1.0f);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, sa + 1, 16);
    c[threadIdx.x] = __bfloat162float(fa.x[0]);
}
