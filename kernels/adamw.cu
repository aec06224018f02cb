// One AdamW step (decoupled weight decay, bias-corrected moments), elementwise. CPU twin:
// src/backend/cpu/adamw.rs (its fast path, operation for operation):
//
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   p ← p − lr·(m·inv_bc1 / (√(v·inv_bc2) + eps) + wd·p)
//
// inv_bc1 = 1/(1 − β1ᵗ) and inv_bc2 = 1/(1 − β2ᵗ) come from the host, computed in f64 and
// rounded once (src/cuda/launch.rs: adamw_bias_corrections), as the CPU twin does.
// Parameters, gradients and moments are f32 (master weights). The `_bf16_copy` variant also
// writes the updated parameters rounded to bf16: the weights' working copy, which the bf16
// GEMMs read (src/backend/cuda/shadow.rs), refreshed in the same pass that reads and writes
// the master, so keeping it costs 2 bytes written per parameter and no extra launch.
//
// Rounding: to nearest, ties to even (`__float2bfloat16`), bit-exact with
// `half::bf16::from_f32` and with kernels/cast.cu, so the copy equals what a per-call cast of
// the master would give. Not stochastic rounding (llm.c's choice): llm.c's bf16 parameters
// are the only copy, and an update below half a bf16 ulp would vanish under nearest
// rounding, so it rounds up or down at random to keep the update in expectation. Here the f32
// master keeps every update; the bf16 copy is re-derived from it each step, so small updates
// accumulate in the master and show up in the copy once they cross a rounding boundary. The
// copy is then the best bf16 approximation of the master, and the step stays deterministic
// (no seed, the same bits on every run and on the emulator).
//
// Launch: any 1-D shape; threads stride over the n elements.
#include "common.cuh"

namespace {

__device__ __forceinline__ float adamw_update(
    float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
    float* __restrict__ v, long long i, float lr, float beta1, float beta2, float eps, float wd,
    float inv_bc1, float inv_bc2) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi * inv_bc1;
    const float v_hat = vi * inv_bc2;
    const float p = param[i];
    const float next = p - lr * (m_hat / (sqrtf(v_hat) + eps) + wd * p);
    param[i] = next;
    return next;
}

}  // namespace

extern "C" __global__ void adamw_step_f32(
    float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
    float* __restrict__ v, long long n, float lr, float beta1, float beta2, float eps, float wd,
    float inv_bc1, float inv_bc2) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        adamw_update(param, grad, m, v, i, lr, beta1, beta2, eps, wd, inv_bc1, inv_bc2);
    }
}

// As adamw_step_f32, and param_bf16[i] = bf16(param[i]) after the update.
extern "C" __global__ void adamw_step_f32_bf16_copy(
    float* __restrict__ param, __nv_bfloat16* __restrict__ param_bf16,
    const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v, long long n,
    float lr, float beta1, float beta2, float eps, float wd, float inv_bc1, float inv_bc2) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        param_bf16[i] = __float2bfloat16(
            adamw_update(param, grad, m, v, i, lr, beta1, beta2, eps, wd, inv_bc1, inv_bc2));
    }
}
