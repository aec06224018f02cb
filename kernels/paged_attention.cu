// Decode attention over a paged KV cache (f32), FlashDecoding style: one query row per
// sequence, each row's cached positions split into partitions of PAGED_PARTITION positions
// that separate blocks compute, then a combine kernel merges the partitions' softmax sums.
//
//   K/V pools are [n_blocks, block_size, c]; head hi occupies columns hi·dh .. (hi+1)·dh with
//   dh = c / h. Row r's position p lives at pool entry
//   block_table[r·max_blocks + p / block_size]·block_size + p % block_size, and row r attends
//   to its positions 0 .. lens[r] (lens[r] ≥ 1, checked by the host).
//
//   paged_attention_partition_f32: for partition k of row r and head hi, the positions
//       P = 256k .. min(256(k+1), lens[r]):
//       s_j = scale · q·k_j,  m = max_P s_j,  l = Σ_P e^(s_j − m),  a = Σ_P e^(s_j − m) v_j
//       written as part_stats[(r·parts + k)·h + hi] = (m, l) and
//       part_acc[(r·parts + k)·c + hi·dh ..] = a. Partitions past a row's length write nothing.
//   paged_attention_combine_f32: out[r, head hi] = Σ_k e^(m_k − M) a_k / Σ_k e^(m_k − M) l_k
//       with M = max_k m_k, summed in partition order.
//
// Partitions start at every PAGED_PARTITION-th position, as the CPU twin's decode tasks
// (src/backend/cpu/attention/chunked_decode.rs, KEYS_PER_TASK), so a row's result depends
// only on its own positions: never on the block size, where its blocks sit in the pool, or
// the other rows of the batch. It is NOT bitwise equal to the twin: inside a partition the
// dot products, the exp sum and the value sum are reduced in other orders (warp butterflies,
// groups of positions), the twin's exp is its own polynomial and it may use FMA. The results
// agree within the f32 tolerance of tests/emu_kernels_paged_attention.rs.
//
// Only the table entries of a row's first ceil(lens[r] / block_size) blocks and the pool
// entries of its positions < lens[r] are read: unused blocks and table slots may hold
// anything.
//
// Launch (src/backend/cuda/paged_attention.rs):
//   partition: grid (parts, h, b), block PAGED_THREADS, no dynamic shared memory;
//              parts = ceil(max_r lens[r] / PAGED_PARTITION).
//   combine:   grid (h, b), block PAGED_THREADS.
#include "common.cuh"

namespace mega_paged {

constexpr int PAGED_PARTITION = 256;
constexpr int PAGED_THREADS = 128;
// Floats of the value-sum staging: each of `groups` thread groups holds one dh-wide partial,
// and groups · dh ≤ PAGED_THREADS · 4 (a group has dh / 4 threads on the float4 path).
constexpr int PAGED_STAGING = PAGED_THREADS * 4;
static_assert(PAGED_THREADS % mega::WARP_SIZE == 0, "blocks are whole warps");

// Block-wide max, the same two-barrier protocol as mega::block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    const int n_warps = (blockDim.x + mega::WARP_SIZE - 1) / mega::WARP_SIZE;
    v = mega::warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return mega::warp_max(lane < n_warps ? scratch[lane] : -INFINITY);
}

// Pool entry of position `pos` of a row whose block ids start at `table`.
__device__ __forceinline__ size_t pool_entry(const unsigned* table, int pos, int block_size) {
    return static_cast<size_t>(table[pos / block_size]) * block_size + pos % block_size;
}

__device__ __forceinline__ bool aligned16(const float* p) {
    return (reinterpret_cast<size_t>(p) & 15) == 0;
}

// q·key over dh values, by one warp (every lane gets the sum). VEC = 4 reads float4s.
template <int VEC>
__device__ __forceinline__ float warp_dot(const float* q, const float* key, int dh) {
    const int lane = threadIdx.x % mega::WARP_SIZE;
    float acc = 0.0f;
    if (VEC == 4) {
        const float4* q4 = reinterpret_cast<const float4*>(q);
        const float4* k4 = reinterpret_cast<const float4*>(key);
        for (int u = lane; u < dh / 4; u += mega::WARP_SIZE) {
            const float4 a = q4[u];
            const float4 b = k4[u];
            acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        for (int d = lane; d < dh; d += mega::WARP_SIZE) acc += q[d] * key[d];
    }
    return mega::warp_sum(acc);
}

// One partition of one (row, head): scores into `scores`, then the softmax stats and the
// weighted value sum (see the file header). VEC (1 or 4) is the load width; the float4 path
// needs dh % 4 == 0 and 16-byte aligned rows, which the caller checked.
template <int VEC>
__device__ __forceinline__ void partition_body(
    float* __restrict__ part_acc, float* __restrict__ part_stats, const float* __restrict__ q,
    const float* __restrict__ k_pool, const float* __restrict__ v_pool,
    const unsigned* __restrict__ table, int from, int n, int block_size, int c, int dh,
    float scale, size_t stats_at, size_t acc_at, float* scores, float* staging, float* scratch) {
    const int warp = threadIdx.x / mega::WARP_SIZE;
    const int n_warps = blockDim.x / mega::WARP_SIZE;

    // Scores: one warp per position, its lanes across the head's dh values (coalesced).
    for (int j = warp; j < n; j += n_warps) {
        const float* key = k_pool + pool_entry(table, from + j, block_size) * c;
        const float dot = warp_dot<VEC>(q, key, dh);
        if (threadIdx.x % mega::WARP_SIZE == 0) scores[j] = dot * scale;
    }
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(scores[j] - m);
        scores[j] = e;
        l += e;
    }
    // block_sum's barriers also publish the weights written above.
    l = mega::block_sum(l, scratch);

    // Weighted value sum: `groups` groups of `units` threads; thread u of group g adds the
    // VEC columns u·VEC.. of positions j ≡ g (mod groups). Heads wider than a block's VEC·
    // threads use one group whose threads loop over the units.
    const int units = dh / VEC;
    const int groups = units >= static_cast<int>(blockDim.x) ? 1 : blockDim.x / units;
    const int g = groups == 1 ? 0 : threadIdx.x / units;
    const int unit_step = groups == 1 ? blockDim.x : units;
    for (int u = groups == 1 ? threadIdx.x : threadIdx.x % units; g < groups && u < units;
         u += unit_step) {
        float acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
        for (int j = g; j < n; j += groups) {
            const float w = scores[j];
            const float* value = v_pool + pool_entry(table, from + j, block_size) * c;
            if (VEC == 4) {
                const float4 v4 = reinterpret_cast<const float4*>(value)[u];
                acc[0] += w * v4.x;
                acc[1] += w * v4.y;
                acc[2] += w * v4.z;
                acc[3] += w * v4.w;
            } else {
                acc[0] += w * value[u];
            }
        }
        float* dst = groups == 1 ? part_acc + acc_at : staging + g * dh;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[u * VEC + e] = acc[e];
    }
    if (groups > 1) {
        __syncthreads();
        for (int d = threadIdx.x; d < dh; d += blockDim.x) {
            float a = 0.0f;
            for (int gg = 0; gg < groups; ++gg) a += staging[gg * dh + d];
            part_acc[acc_at + d] = a;
        }
    }
    if (threadIdx.x == 0) {
        part_stats[stats_at] = m;
        part_stats[stats_at + 1] = l;
    }
}

}  // namespace mega_paged

extern "C" __global__ void paged_attention_partition_f32(
    float* __restrict__ part_acc,        // [b, parts, c], written for partitions < a row's count
    float* __restrict__ part_stats,      // [b, parts, h, 2] (max, sum), same
    const float* __restrict__ qkv,       // [b, 3c], the q part read
    const float* __restrict__ k_pool,    // [n_blocks, block_size, c]
    const float* __restrict__ v_pool,    // [n_blocks, block_size, c]
    const unsigned* __restrict__ lens,   // [b]
    const unsigned* __restrict__ block_table,  // [b, max_blocks]
    int max_blocks,
    int block_size,
    int c,
    int h,
    int parts,
    float scale) {
    __shared__ float scores[mega_paged::PAGED_PARTITION];
    __shared__ __align__(16) float staging[mega_paged::PAGED_STAGING];
    __shared__ float scratch[mega::MAX_WARPS_PER_BLOCK];
    const int part = blockIdx.x;
    const int hi = blockIdx.y;
    const int r = blockIdx.z;
    const int len = static_cast<int>(lens[r]);
    const int from = part * mega_paged::PAGED_PARTITION;
    // The condition is the same for every thread of the block, so returning before the
    // barriers below is not a divergent exit.
    if (from >= len) return;
    const int n = min(mega_paged::PAGED_PARTITION, len - from);
    const int dh = c / h;
    const float* q = qkv + static_cast<size_t>(r) * 3 * c + static_cast<size_t>(hi) * dh;
    const float* k_head = k_pool + static_cast<size_t>(hi) * dh;
    const float* v_head = v_pool + static_cast<size_t>(hi) * dh;
    const unsigned* table = block_table + static_cast<size_t>(r) * max_blocks;
    const size_t stats_at = ((static_cast<size_t>(r) * parts + part) * h + hi) * 2;
    const size_t acc_at = (static_cast<size_t>(r) * parts + part) * c + static_cast<size_t>(hi) * dh;
    // float4 loads need every row start 16-byte aligned: dh and c multiples of 4 and aligned
    // bases (arena views may start anywhere). Uniform over the block.
    const bool vec4 = dh % 4 == 0 && c % 4 == 0 && mega_paged::aligned16(q) &&
                      mega_paged::aligned16(k_head) && mega_paged::aligned16(v_head) &&
                      mega_paged::aligned16(part_acc + acc_at);
    if (vec4) {
        mega_paged::partition_body<4>(part_acc, part_stats, q, k_head, v_head, table, from, n,
                                      block_size, c, dh, scale, stats_at, acc_at, scores,
                                      staging, scratch);
    } else {
        mega_paged::partition_body<1>(part_acc, part_stats, q, k_head, v_head, table, from, n,
                                      block_size, c, dh, scale, stats_at, acc_at, scores,
                                      staging, scratch);
    }
}

extern "C" __global__ void paged_attention_combine_f32(
    float* __restrict__ out,               // [b, c]
    const float* __restrict__ part_acc,    // [b, parts, c]
    const float* __restrict__ part_stats,  // [b, parts, h, 2]
    const unsigned* __restrict__ lens,     // [b]
    int c,
    int h,
    int parts) {
    const int hi = blockIdx.x;
    const int r = blockIdx.y;
    const int dh = c / h;
    const int n_parts = (static_cast<int>(lens[r]) + mega_paged::PAGED_PARTITION - 1) /
                        mega_paged::PAGED_PARTITION;
    const float* stats = part_stats + (static_cast<size_t>(r) * parts * h + hi) * 2;
    const size_t stats_step = static_cast<size_t>(h) * 2;
    float m = -INFINITY;
    for (int k = 0; k < n_parts; ++k) m = fmaxf(m, stats[k * stats_step]);
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        const float* acc = part_acc + static_cast<size_t>(r) * parts * c + static_cast<size_t>(hi) * dh + d;
        float total = 0.0f;
        float o = 0.0f;
        for (int k = 0; k < n_parts; ++k) {
            const float w = expf(stats[k * stats_step] - m);
            total += stats[k * stats_step + 1] * w;
            o += acc[static_cast<size_t>(k) * c] * w;
        }
        out[static_cast<size_t>(r) * c + static_cast<size_t>(hi) * dh + d] = o * (1.0f / total);
    }
}
