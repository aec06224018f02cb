// LayerNorm and RMSNorm over the last dimension, forward and backward. CPU twins:
// src/backend/cpu/layernorm.rs and src/backend/cpu/rmsnorm.rs.
//
//   LayerNorm: μ = mean(x), σ² = mean((x − μ)²), rstd = 1/√(σ² + eps)
//              out = (x − μ)·rstd·w + b
//              with x̂ = (x − μ)·rstd, g = dout·w:
//              dx += rstd·(g − mean(g) − x̂·mean(g·x̂)),  dw += Σ_rows dout·x̂,  db += Σ_rows dout
//   RMSNorm:   rstd = 1/√(mean(x²) + eps),  out = x·rstd·w
//              with x̂ = x·rstd: dx += rstd·(g − x̂·mean(g·x̂)),  dw += Σ_rows dout·x̂
//
// Storage: x, out, dout, dx in f32 or bf16 (the `_bf16` entry points); weights, saved
// statistics (mean, rstd [n]) and weight gradients always f32; all arithmetic f32.
//
// Launch shapes (src/cuda/launch.rs):
//   *_forward_*:  block 256 (any multiple of 32 up to 1024), one block per row (grid.x blocks
//                 stride over rows); no dynamic smem.
//   *_backward_*: grid.x = row chunks (block c owns rows [c·⌈n/grid⌉, …)), block 256, dynamic
//                 smem 4·k·d bytes (k = 2 for LayerNorm, 1 for RMSNorm) for the block's column
//                 partials, written to `partials` [grid.x, k, d]; then *_param_reduce_f32
//                 (any 1-D shape) adds them into the weight gradients in chunk order, so the
//                 weight gradients are deterministic without atomics.
#include "common.cuh"

using mega::from_float;
using mega::to_float;

namespace mega_norms {

// Rows [*r0, *r1) of this block when n rows are split into gridDim.x contiguous chunks.
__device__ __forceinline__ void row_chunk(int n, int* r0, int* r1) {
    const int per = (n + gridDim.x - 1) / gridDim.x;
    *r0 = min(n, static_cast<int>(blockIdx.x) * per);
    *r1 = min(n, *r0 + per);
}

template <typename T>
__device__ void layernorm_forward(
    T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
    const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, int n,
    int d, float eps) {
    __shared__ float scratch[mega::MAX_WARPS_PER_BLOCK];
    const float inv_d = 1.0f / static_cast<float>(d);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + static_cast<size_t>(row) * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += to_float(xr[j]);
        const float mu = mega::block_sum(s, scratch) * inv_d;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float c = to_float(xr[j]) - mu;
            ss += c * c;
        }
        const float rs = 1.0f / sqrtf(mega::block_sum(ss, scratch) * inv_d + eps);
        T* o = out + static_cast<size_t>(row) * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            o[j] = from_float<T>((to_float(xr[j]) - mu) * rs * w[j] + b[j]);
        }
        if (threadIdx.x == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

template <typename T>
__device__ void layernorm_backward(
    float* acc, T* __restrict__ dx, float* __restrict__ partials, const T* __restrict__ dout,
    const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ mean,
    const float* __restrict__ rstd, int n, int d) {
    __shared__ float scratch[mega::MAX_WARPS_PER_BLOCK];
    const float inv_d = 1.0f / static_cast<float>(d);
    // Column j's partials live in acc[j] (dw) and acc[d + j] (db), touched only by the thread
    // that owns column j, so they need no barriers.
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        acc[j] = 0.0f;
        acc[d + j] = 0.0f;
    }
    int r0, r1;
    row_chunk(n, &r0, &r1);
    for (int row = r0; row < r1; ++row) {
        const size_t base = static_cast<size_t>(row) * d;
        const float mu = mean[row], rs = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = to_float(dout[base + j]) * w[j];
            sg += g;
            sgx += g * ((to_float(x[base + j]) - mu) * rs);
        }
        const float g_mean = mega::block_sum(sg, scratch) * inv_d;
        const float gx_mean = mega::block_sum(sgx, scratch) * inv_d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float go = to_float(dout[base + j]);
            const float xhat = (to_float(x[base + j]) - mu) * rs;
            dx[base + j] = from_float<T>(to_float(dx[base + j]) + rs * (go * w[j] - g_mean - xhat * gx_mean));
            acc[j] += go * xhat;
            acc[d + j] += go;
        }
    }
    float* out = partials + static_cast<size_t>(blockIdx.x) * 2 * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        out[j] = acc[j];
        out[d + j] = acc[d + j];
    }
}

template <typename T>
__device__ void rmsnorm_forward(
    T* __restrict__ out, float* __restrict__ rstd, const T* __restrict__ x,
    const float* __restrict__ w, int n, int d, float eps) {
    __shared__ float scratch[mega::MAX_WARPS_PER_BLOCK];
    const float inv_d = 1.0f / static_cast<float>(d);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + static_cast<size_t>(row) * d;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = to_float(xr[j]);
            ss += v * v;
        }
        const float rs = 1.0f / sqrtf(mega::block_sum(ss, scratch) * inv_d + eps);
        T* o = out + static_cast<size_t>(row) * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = from_float<T>(to_float(xr[j]) * rs * w[j]);
        if (threadIdx.x == 0) rstd[row] = rs;
    }
}

template <typename T>
__device__ void rmsnorm_backward(
    float* acc, T* __restrict__ dx, float* __restrict__ partials, const T* __restrict__ dout,
    const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd, int n,
    int d) {
    __shared__ float scratch[mega::MAX_WARPS_PER_BLOCK];
    const float inv_d = 1.0f / static_cast<float>(d);
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc[j] = 0.0f;
    int r0, r1;
    row_chunk(n, &r0, &r1);
    for (int row = r0; row < r1; ++row) {
        const size_t base = static_cast<size_t>(row) * d;
        const float rs = rstd[row];
        float sgx = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            sgx += to_float(dout[base + j]) * w[j] * (to_float(x[base + j]) * rs);
        }
        const float gx_mean = mega::block_sum(sgx, scratch) * inv_d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float go = to_float(dout[base + j]);
            const float xhat = to_float(x[base + j]) * rs;
            dx[base + j] = from_float<T>(to_float(dx[base + j]) + rs * (go * w[j] - xhat * gx_mean));
            acc[j] += go * xhat;
        }
    }
    float* out = partials + static_cast<size_t>(blockIdx.x) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[j] = acc[j];
}

}  // namespace mega_norms

// A named namespace, not an anonymous one: nvcc mangles anonymous-namespace names with a hash
// of the source path, which would make the committed PTX depend on where it was compiled.
using namespace mega_norms;

// The one dynamic shared-memory array of this file (see common.cuh).
extern __shared__ __align__(16) unsigned char smem[];

extern "C" __global__ void __launch_bounds__(1024) layernorm_forward_f32(
    float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int n,
    int d, float eps) {
    layernorm_forward(out, mean, rstd, x, w, b, n, d, eps);
}

extern "C" __global__ void __launch_bounds__(1024) layernorm_forward_bf16(
    __nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* x, const float* w,
    const float* b, int n, int d, float eps) {
    layernorm_forward(out, mean, rstd, x, w, b, n, d, eps);
}

// dx [n, d] +=; partials [grid.x, 2, d] (dw | db per row chunk) overwritten.
extern "C" __global__ void __launch_bounds__(1024) layernorm_backward_f32(
    float* dx, float* partials, const float* dout, const float* x, const float* w,
    const float* mean, const float* rstd, int n, int d) {
    layernorm_backward(reinterpret_cast<float*>(smem), dx, partials, dout, x, w, mean, rstd, n, d);
}

extern "C" __global__ void __launch_bounds__(1024) layernorm_backward_bf16(
    __nv_bfloat16* dx, float* partials, const __nv_bfloat16* dout, const __nv_bfloat16* x,
    const float* w, const float* mean, const float* rstd, int n, int d) {
    layernorm_backward(reinterpret_cast<float*>(smem), dx, partials, dout, x, w, mean, rstd, n, d);
}

// dw, db [d] += Σ_chunk partials[chunk][0 | 1].
extern "C" __global__ void layernorm_param_reduce_f32(
    float* __restrict__ dw, float* __restrict__ db, const float* __restrict__ partials,
    int n_chunks, int d) {
    mega::add_column_partials(dw, partials, n_chunks, d, 2LL * d);
    mega::add_column_partials(db, partials + d, n_chunks, d, 2LL * d);
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_forward_f32(
    float* out, float* rstd, const float* x, const float* w, int n, int d, float eps) {
    rmsnorm_forward(out, rstd, x, w, n, d, eps);
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_forward_bf16(
    __nv_bfloat16* out, float* rstd, const __nv_bfloat16* x, const float* w, int n, int d,
    float eps) {
    rmsnorm_forward(out, rstd, x, w, n, d, eps);
}

// dx [n, d] +=; partials [grid.x, d] (dw per row chunk) overwritten.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_backward_f32(
    float* dx, float* partials, const float* dout, const float* x, const float* w,
    const float* rstd, int n, int d) {
    rmsnorm_backward(reinterpret_cast<float*>(smem), dx, partials, dout, x, w, rstd, n, d);
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_backward_bf16(
    __nv_bfloat16* dx, float* partials, const __nv_bfloat16* dout, const __nv_bfloat16* x,
    const float* w, const float* rstd, int n, int d) {
    rmsnorm_backward(reinterpret_cast<float*>(smem), dx, partials, dout, x, w, rstd, n, d);
}

// dw [d] += Σ_chunk partials[chunk].
extern "C" __global__ void rmsnorm_param_reduce_f32(
    float* __restrict__ dw, const float* __restrict__ partials, int n_chunks, int d) {
    mega::add_column_partials(dw, partials, n_chunks, d, d);
}
