// Rotary position embedding on adjacent pairs, as MEGALODON's attention applies it to Q and K
// (spec/megalodon.md §6.4; CPU: src/backend/cpu/megalodon_attention.rs, rope_inv_freqs and
// project_row). All f32 (spec §14: RoPE in fp32).
//
// For a row at position pos and each head's pair (2i, 2i+1), i < dz/2:
//   inv_i = 1 / base^(2i/dz),  a = pos·inv_i
//   forward:  y0 = x0·cos a − x1·sin a,   y1 = x0·sin a + x1·cos a
//   backward: dx0 = dy0·cos a + dy1·sin a,   dx1 = −dy0·sin a + dy1·cos a   (the transpose)
// Layout: x, y [rows, heads·dz]; positions [rows] (the caller's position of each row, e.g.
// t mod chunk for MEGALODON). y may alias x (in place).
//
// Launch: any 1-D shape; threads stride over the rows·heads·dz/2 pairs.
#include "common.cuh"

namespace {

// sign = +1 rotates by +a (forward), −1 by −a (backward, the transposed rotation).
__device__ __forceinline__ void rope_rotate(
    float* y, const float* x, const unsigned int* __restrict__ positions, int rows, int heads,
    int dz, float base, float sign) {
    const int half = dz / 2;
    const long long pairs = static_cast<long long>(rows) * heads * half;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += stride) {
        const int pi = static_cast<int>(i % half);
        const long long row = i / (static_cast<long long>(heads) * half);
        // Same f32 operations as the CPU's rope_inv_freqs and rope_table.
        const float inv = 1.0f / powf(base, static_cast<float>(2 * pi) / static_cast<float>(dz));
        const float a = static_cast<float>(positions[row]) * inv;
        const float c = cosf(a);
        const float s = sign * sinf(a);
        const long long at = 2 * i;  // pairs are contiguous: row, head, pair
        const float x0 = x[at];
        const float x1 = x[at + 1];
        y[at] = x0 * c - x1 * s;
        y[at + 1] = x0 * s + x1 * c;
    }
}

}  // namespace

extern "C" __global__ void rope_forward_f32(
    float* y, const float* x, const unsigned int* positions, int rows, int heads, int dz, float base) {
    rope_rotate(y, x, positions, rows, heads, dz, base, 1.0f);
}

extern "C" __global__ void rope_backward_f32(
    float* dx, const float* dy, const unsigned int* positions, int rows, int heads, int dz, float base) {
    rope_rotate(dx, dy, positions, rows, heads, dz, base, -1.0f);
}
