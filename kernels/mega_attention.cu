// MEGALODON's chunk attention on the device, unfused (spec/megalodon.md §6; CPU twin:
// src/backend/cpu/megalodon_attention.rs): these kernels do everything but the products and the
// softmax, which are strided-batched GEMMs and kernels/softmax.cu (src/backend/cuda/
// mega_attention.rs). All f32 (spec §14: normalisation statistics and RoPE in f32).
//
//   mega_attn_project_forward_f32: per (token, head) row of z [b, l, H·dz]
//       rs = 1/√(mean(z²) + eps), ẑ = z·rs,
//       Q = ẑ·(γ[0]+1)/√dz + β[0],  K = ẑ·(γ[1]+1)/√dz + β[1],
//       both rotated by RoPE at the position inside the row's chunk (t mod span), adjacent
//       pairs, inv_i = 1/base^(2i/dz) — the same f32 operations as the CPU's rope_inv_freqs.
//       Writes Q and K head-major, [b, H, lpad, dz] (lpad = chunks·span ≥ l: whole chunks, so
//       every chunk is one equally strided matrix; the padding rows are the caller's, zeroed),
//       and rs [b·l·H].
//   mega_attn_project_backward_f32: from dQ, dK (head-major, as the forward wrote Q, K):
//       undoes the rotation (its transpose), then per channel
//       dẑ = dQ'·gq + dK'·gk,  dz = rs·(dẑ − ẑ·mean(dẑ ⊙ ẑ))   (overwrites dz [b, l, H·dz]),
//       and the per-token contributions to the affine's gradients, summed over tokens by the
//       caller (a ones-vector GEMM, deterministic):
//       gsum[token, 0|1, c] = dQ'|dK' · ẑ/√dz,  bsum[token, 0|1, c] = dQ'|dK'.
//   mega_attn_to_heads_f32 / mega_attn_from_heads_f32: [b, l, H·d] ↔ [b, H, lpad, d]
//       (the values, the output and their gradients); padding rows are neither read nor written.
//   mega_attn_cached_softmax_f32: the streaming path's causal softmax, query i of batch row bi
//       seeing the keys 0 ..= offsets[bi] + i of its cached chunk.
//
// Streaming (MEGALODON's chunk cache): the forward projection and to_heads take per-row
// offsets (null in training): row bi's tokens sit at chunk positions offsets[bi] + t, Q is
// written compact ([b, H, l, dz]) and K (and V through to_heads) appended into the cache
// ([b, H, chunk, ·]) at rows offsets[bi] + t.
//
// Launch: the project kernels take one warp per (token, head) row, block
// (32, MEGA_ATTN_ROWS_PER_BLOCK), grid-stride over rows; lanes take pairs p ≡ lane (mod 32).
// No shared memory, no block barriers. The layout kernels take any 1-D shape.
#include "common.cuh"

namespace mega_attn {

constexpr int MEGA_ATTN_ROWS_PER_BLOCK = 8;
static_assert(MEGA_ATTN_ROWS_PER_BLOCK * mega::WARP_SIZE <= 1024, "a block holds at most 1024 threads");

// Where row r = (token, head) of the [b, l, H] rows lands in a head-major [b, H, rows, d]:
// at row ti + offsets[bi] (offsets may be null: 0).
__device__ __forceinline__ size_t head_major(
    long long r, int l, int heads, int rows, int d, const unsigned int* offsets) {
    const long long hi = r % heads;
    const long long token = r / heads;
    const long long ti = token % l;
    const long long bi = token / l;
    const long long row = ti + (offsets != nullptr ? offsets[bi] : 0u);
    return (static_cast<size_t>(bi * heads + hi) * rows + row) * d;
}

// The chunk position of row r's token: (ti + offsets[bi]) mod span.
__device__ __forceinline__ int chunk_position(
    long long r, int l, int heads, int span, const unsigned int* offsets) {
    const long long token = r / heads;
    const long long ti = token % l;
    const long long off = offsets != nullptr ? offsets[token / l] : 0u;
    return static_cast<int>((ti + off) % span);
}

// cos and sin of the RoPE angle of pair p at position pos (as rope.cu and the CPU table).
__device__ __forceinline__ void rope_angle(int pos, int p, int dz, float base, float* c, float* s) {
    const float inv = 1.0f / powf(base, static_cast<float>(2 * p) / static_cast<float>(dz));
    const float a = static_cast<float>(pos) * inv;
    *c = cosf(a);
    *s = sinf(a);
}

}  // namespace mega_attn

extern "C" __global__ void mega_attn_project_forward_f32(
    float* __restrict__ q,            // [b, H, q_rows, dz], rows < l written
    float* __restrict__ k,            // [b, H, k_rows, dz], rows off .. off + l written
    float* __restrict__ rstd,         // [b·l·H]
    const float* __restrict__ z,      // [b, l, H·dz]
    const float* __restrict__ gamma,  // [2, H·dz]
    const float* __restrict__ beta,   // [2, H·dz]
    const unsigned int* __restrict__ offsets,  // [b] or null: each row's first chunk position
    int b, int l, int heads, int dz, int span, int q_rows, int k_rows, float eps,
    float inv_sqrt_dz, float base) {
    using namespace mega_attn;
    const int lane = threadIdx.x;
    const int half = dz / 2;
    const int zdim = heads * dz;
    const long long rows = static_cast<long long>(b) * l * heads;
    for (long long r = mega::warp_first_row(); r < rows; r += mega::warp_row_step()) {
        const float* zr = z + r * dz;
        float ss = 0.0f;
        for (int j = lane; j < dz; j += mega::WARP_SIZE) ss += zr[j] * zr[j];
        ss = mega::warp_sum(ss);
        const float rs = 1.0f / sqrtf(ss / static_cast<float>(dz) + eps);
        if (lane == 0) rstd[r] = rs;
        const size_t qat = head_major(r, l, heads, q_rows, dz, nullptr);
        const size_t kat = head_major(r, l, heads, k_rows, dz, offsets);
        const int hi = static_cast<int>(r % heads);
        const int pos = chunk_position(r, l, heads, span, offsets);
        for (int p = lane; p < half; p += mega::WARP_SIZE) {
            const int j0 = 2 * p;
            const int c0 = hi * dz + j0;
            const float z0 = zr[j0] * rs;
            const float z1 = zr[j0 + 1] * rs;
            float cs, sn;
            rope_angle(pos, p, dz, base, &cs, &sn);
            const float q0 = z0 * ((gamma[c0] + 1.0f) * inv_sqrt_dz) + beta[c0];
            const float q1 = z1 * ((gamma[c0 + 1] + 1.0f) * inv_sqrt_dz) + beta[c0 + 1];
            q[qat + j0] = q0 * cs - q1 * sn;
            q[qat + j0 + 1] = q0 * sn + q1 * cs;
            const float k0 = z0 * ((gamma[zdim + c0] + 1.0f) * inv_sqrt_dz) + beta[zdim + c0];
            const float k1 = z1 * ((gamma[zdim + c0 + 1] + 1.0f) * inv_sqrt_dz) + beta[zdim + c0 + 1];
            k[kat + j0] = k0 * cs - k1 * sn;
            k[kat + j0 + 1] = k0 * sn + k1 * cs;
        }
    }
}

extern "C" __global__ void mega_attn_project_backward_f32(
    float* __restrict__ dz_out,       // [b, l, H·dz], overwritten
    float* __restrict__ gsum,         // [b·l, 2, H·dz], overwritten
    float* __restrict__ bsum,         // [b·l, 2, H·dz], overwritten
    const float* __restrict__ dq,     // [b, H, lpad, dz]
    const float* __restrict__ dk,     // [b, H, lpad, dz]
    const float* __restrict__ z,      // [b, l, H·dz]
    const float* __restrict__ rstd,   // [b·l·H], the forward's
    const float* __restrict__ gamma,  // [2, H·dz]
    int b, int l, int heads, int dz, int span, int lpad, float inv_sqrt_dz, float base) {
    using namespace mega_attn;
    const int lane = threadIdx.x;
    const int half = dz / 2;
    const int zdim = heads * dz;
    const long long rows = static_cast<long long>(b) * l * heads;
    for (long long r = mega::warp_first_row(); r < rows; r += mega::warp_row_step()) {
        const float* zr = z + r * dz;
        float* dzr = dz_out + r * dz;
        const float rs = rstd[r];
        const size_t at = head_major(r, l, heads, lpad, dz, nullptr);
        const int hi = static_cast<int>(r % heads);
        const long long token = r / heads;
        const int pos = chunk_position(r, l, heads, span, nullptr);
        float* gq = gsum + token * 2 * zdim;
        float* bq = bsum + token * 2 * zdim;
        float dot = 0.0f;
        for (int p = lane; p < half; p += mega::WARP_SIZE) {
            const int j0 = 2 * p;
            const int c0 = hi * dz + j0;
            float cs, sn;
            rope_angle(pos, p, dz, base, &cs, &sn);
            // The transposed rotation: the gradient before RoPE.
            const float dq0 = dq[at + j0] * cs + dq[at + j0 + 1] * sn;
            const float dq1 = -dq[at + j0] * sn + dq[at + j0 + 1] * cs;
            const float dk0 = dk[at + j0] * cs + dk[at + j0 + 1] * sn;
            const float dk1 = -dk[at + j0] * sn + dk[at + j0 + 1] * cs;
            const float z0 = zr[j0] * rs;
            const float z1 = zr[j0 + 1] * rs;
            gq[c0] = dq0 * z0 * inv_sqrt_dz;
            gq[c0 + 1] = dq1 * z1 * inv_sqrt_dz;
            gq[zdim + c0] = dk0 * z0 * inv_sqrt_dz;
            gq[zdim + c0 + 1] = dk1 * z1 * inv_sqrt_dz;
            bq[c0] = dq0;
            bq[c0 + 1] = dq1;
            bq[zdim + c0] = dk0;
            bq[zdim + c0 + 1] = dk1;
            const float dh0 = dq0 * ((gamma[c0] + 1.0f) * inv_sqrt_dz) +
                              dk0 * ((gamma[zdim + c0] + 1.0f) * inv_sqrt_dz);
            const float dh1 = dq1 * ((gamma[c0 + 1] + 1.0f) * inv_sqrt_dz) +
                              dk1 * ((gamma[zdim + c0 + 1] + 1.0f) * inv_sqrt_dz);
            // Kept in dz until the row's dot product is known; this lane rewrites only these.
            dzr[j0] = dh0;
            dzr[j0 + 1] = dh1;
            dot += dh0 * z0 + dh1 * z1;
        }
        dot = mega::warp_sum(dot) / static_cast<float>(dz);
        for (int p = lane; p < half; p += mega::WARP_SIZE) {
            const int j0 = 2 * p;
            dzr[j0] = rs * (dzr[j0] - zr[j0] * rs * dot);
            dzr[j0 + 1] = rs * (dzr[j0 + 1] - zr[j0 + 1] * rs * dot);
        }
    }
}

extern "C" __global__ void mega_attn_to_heads_f32(
    float* __restrict__ dst,        // [b, H, lpad, d], rows off .. off + l written
    const float* __restrict__ src,  // [b, l, H·d]
    const unsigned int* __restrict__ offsets,  // [b] or null (0)
    int b, int l, int heads, int d, int lpad) {
    const long long n = static_cast<long long>(b) * l * heads * d;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long r = i / d;
        dst[mega_attn::head_major(r, l, heads, lpad, d, offsets) + i % d] = src[i];
    }
}

extern "C" __global__ void mega_attn_from_heads_f32(
    float* __restrict__ dst,        // [b, l, H·d], overwritten
    const float* __restrict__ src,  // [b, H, lpad, d]
    int b, int l, int heads, int d, int lpad) {
    const long long n = static_cast<long long>(b) * l * heads * d;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long r = i / d;
        dst[i] = src[mega_attn::head_major(r, l, heads, lpad, d, nullptr) + i % d];
    }
}

// The causal softmax of the streaming path: row r of [b·H·l, t] holds query i = r mod l of
// batch row bi = r / (H·l), which sees the keys 0 ..= offsets[bi] + i of its cached chunk;
// later entries are written 0 and never read (they may hold anything, NaN included).
// Launch as the project kernels: one warp per row.
extern "C" __global__ void mega_attn_cached_softmax_f32(
    float* probs,          // [rows, t], written (may alias scores)
    const float* scores,   // [rows, t]
    const unsigned int* __restrict__ offsets,  // [b]
    int rows, int t, int l, int heads) {
    using namespace mega_attn;
    const int lane = threadIdx.x;
    for (long long row = mega::warp_first_row(); row < rows; row += mega::warp_row_step()) {
        const size_t at = static_cast<size_t>(row) * t;
        const long long bi = row / (static_cast<long long>(heads) * l);
        const int keys = min(static_cast<int>(offsets[bi] + row % l) + 1, t);
        float m = -INFINITY;
        for (int j = lane; j < keys; j += mega::WARP_SIZE) m = fmaxf(m, scores[at + j]);
        m = mega::warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < keys; j += mega::WARP_SIZE) sum += expf(scores[at + j] - m);
        sum = mega::warp_sum(sum);
        for (int j = lane; j < t; j += mega::WARP_SIZE) {
            probs[at + j] = j < keys ? expf(scores[at + j] - m) / sum : 0.0f;
        }
    }
}

