// Pointwise nonlinearities and the SwiGLU gate, forward and backward. CPU twins:
// src/backend/cpu/activation.rs and src/backend/cpu/swiglu.rs (same formulas, same order).
//
//   act = 0 ReLU:  max(x, 0);                 slope 1 if x > 0 else 0
//   act = 1 GELU (tanh approximation, as GPT-2): u = √(2/π)·(x + 0.044715·x³)
//                  0.5·x·(1 + tanh u);        slope 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)
//   act = 2 SiLU:  x / (1 + e^{−x});           slope s·(1 + x·(1 − s)), s = σ(x)
//   activation_forward:  out = act(x)          activation_backward: dx += act'(x)·dout
//   swiglu_forward:  x [n, 2h] = [a | g] per row, out [n, h] = silu(a)·g
//   swiglu_backward: dx[a] += dout·g·silu'(a),  dx[g] += dout·silu(a)
//
// Storage f32 or bf16 (the `_bf16` entry points), arithmetic f32. The activation id is a
// launch argument (uniform across the grid), so one entry point serves all three.
//
// Launch: any 1-D shape; threads stride over the elements (activation) or the n·h outputs
// (SwiGLU). 256 threads × a few blocks per SM is a good default.
#include "common.cuh"

using mega::from_float;
using mega::to_float;

namespace {

constexpr int ACT_RELU = 0;
constexpr int ACT_GELU = 1;
constexpr int ACT_SILU = 2;

constexpr float GELU_K = 0.7978845608028654f;  // √(2/π)
constexpr float GELU_C = 0.044715f;

__device__ __forceinline__ float act_value(int act, float x) {
    if (act == ACT_RELU) return fmaxf(x, 0.0f);
    if (act == ACT_GELU) {
        const float u = GELU_K * (x + GELU_C * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    if (act == ACT_SILU) return x / (1.0f + expf(-x));
    return NAN;  // an unknown id is a caller bug: make it visible
}

__device__ __forceinline__ float act_slope(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
    if (act == ACT_GELU) {
        const float x2 = x * x;
        const float t = tanhf(GELU_K * (x + GELU_C * x2 * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * x2);
    }
    if (act == ACT_SILU) {
        const float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    return NAN;
}

__device__ __forceinline__ long long grid_start() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

template <typename T>
__device__ __forceinline__ void activation_forward(T* out, const T* x, long long n, int act) {
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        out[i] = from_float<T>(act_value(act, to_float(x[i])));
    }
}

template <typename T>
__device__ __forceinline__ void activation_backward(
    T* dx, const T* __restrict__ x, const T* __restrict__ dout, long long n, int act) {
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        dx[i] = from_float<T>(to_float(dx[i]) + act_slope(act, to_float(x[i])) * to_float(dout[i]));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_forward(T* __restrict__ out, const T* __restrict__ x, int n, int h) {
    const long long total = static_cast<long long>(n) * h;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long row = i / h;
        const long long j = i % h;
        const float a = to_float(x[row * 2 * h + j]);
        const float g = to_float(x[row * 2 * h + h + j]);
        const float s = 1.0f / (1.0f + expf(-a));
        out[i] = from_float<T>(a * s * g);
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_backward(
    T* __restrict__ dx, const T* __restrict__ x, const T* __restrict__ dout, int n, int h) {
    const long long total = static_cast<long long>(n) * h;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long row = i / h;
        const long long ia = row * 2 * h + i % h;
        const long long ig = ia + h;
        const float a = to_float(x[ia]);
        const float g = to_float(x[ig]);
        const float go = to_float(dout[i]);
        const float s = 1.0f / (1.0f + expf(-a));
        const float silu = a * s;
        const float dsilu = s * (1.0f + a * (1.0f - s));
        dx[ia] = from_float<T>(to_float(dx[ia]) + go * g * dsilu);
        dx[ig] = from_float<T>(to_float(dx[ig]) + go * silu);
    }
}

}  // namespace

// out may alias x (in place).
extern "C" __global__ void activation_forward_f32(float* out, const float* x, long long n, int act) {
    activation_forward(out, x, n, act);
}

extern "C" __global__ void activation_forward_bf16(
    __nv_bfloat16* out, const __nv_bfloat16* x, long long n, int act) {
    activation_forward(out, x, n, act);
}

extern "C" __global__ void activation_backward_f32(
    float* dx, const float* x, const float* dout, long long n, int act) {
    activation_backward(dx, x, dout, n, act);
}

extern "C" __global__ void activation_backward_bf16(
    __nv_bfloat16* dx, const __nv_bfloat16* x, const __nv_bfloat16* dout, long long n, int act) {
    activation_backward(dx, x, dout, n, act);
}

extern "C" __global__ void swiglu_forward_f32(float* out, const float* x, int n, int h) {
    swiglu_forward(out, x, n, h);
}

extern "C" __global__ void swiglu_forward_bf16(
    __nv_bfloat16* out, const __nv_bfloat16* x, int n, int h) {
    swiglu_forward(out, x, n, h);
}

extern "C" __global__ void swiglu_backward_f32(
    float* dx, const float* x, const float* dout, int n, int h) {
    swiglu_backward(dx, x, dout, n, h);
}

extern "C" __global__ void swiglu_backward_bf16(
    __nv_bfloat16* dx, const __nv_bfloat16* x, const __nv_bfloat16* dout, int n, int h) {
    swiglu_backward(dx, x, dout, n, h);
}
