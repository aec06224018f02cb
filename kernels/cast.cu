// Precision casts between f32 and bf16 storage, elementwise. CPU twin: `half::bf16::from_f32`
// / `to_f32` (src/backend/cuda/matmul.rs uses these casts to feed bf16 GEMMs).
//
// f32 → bf16 rounds to nearest, ties to even (`__float2bfloat16` is `cvt.rn.bf16.f32`): the
// same bits as `half::bf16::from_f32` for every non-NaN input, overflow to ±inf included. A
// NaN input gives a NaN (the GPU returns the canonical 0x7fff; `half` keeps the payload).
// bf16 → f32 is exact (the bf16 bits become the upper half of the f32).
//
// Launch: any 1-D shape (src/cuda/launch.rs: elementwise); threads stride over the n elements.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(
    __nv_bfloat16* __restrict__ out, const float* __restrict__ in, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __float2bfloat16(in[i]);
    }
}

extern "C" __global__ void cast_bf16_to_f32(
    float* __restrict__ out, const __nv_bfloat16* __restrict__ in, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __bfloat162float(in[i]);
    }
}
