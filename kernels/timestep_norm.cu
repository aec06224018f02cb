// MEGALODON's TimestepNorm (spec/megalodon.md §5): a causal group norm whose statistics cover
// every scalar of a group at all timesteps so far, carried across calls. CPU twin:
// src/backend/cpu/timestep_norm.rs. Everything here is f32, with merge weights from f64 counts.
//
// Layout: x, y, dy, dx [b, l, d]; d channels in g groups of dg = d/g contiguous channels;
// saved_mean, saved_rstd [b, l, g]; carried state count [b] (an integer held as f32), mean and
// var [b, g] (population variance). A fresh sequence is count 0 (mean 0, var 1 unused).
//
// Forward (three launches):
//   1. tsn_group_moments_f32: per (b, t, group) the two-pass moments
//        ux = mean_j x_j,   vx = mean_j (x_j − ux)²
//      parked in saved_mean / saved_rstd (one warp per (row, group)).
//   2. tsn_scan_f32: per (b, group) the cumulative Welford merge over time, from the carried
//      state. Merging one timestep into n seen ones (§5.2): c1 = n/(n+1), c2 = 1/(n+1),
//        Δ = ux − μ,   μ' = c1·μ + c2·ux,   σ²' = c1·σ² + c2·vx + (c1·Δ)·(c2·Δ)
//      which is the two-state merge (n_a, μ_a, v_a) ⊕ (n_b, μ_b, v_b) with weights n_a/n, n_b/n
//      — associative, so the block scans it in parallel: each thread merges its TSN_SEG tokens,
//      a warp scan (shfl_up) and a pass over the warp totals in shared memory give each thread
//      its exclusive prefix, and each thread then re-merges its tokens one at a time with the
//      formula above (the CPU twin's exact operation order) to write μ_t and
//      rstd_t = 1/√(σ²_t + eps). Chunks of 256·TSN_SEG tokens follow each other with a carry.
//   3. tsn_normalize_f32: y = (x − μ_t)·rstd_t·(w + 1) + bias, elementwise.
//
// Backward (§5.5, four launches):
//   1. tsn_backward_group_sums_f32: per (b, t, group) ux, Sdb = Σ dy·ŵ, Sds = Σ dy·ŵ·(x − μ_t).
//   2. tsn_backward_scan_f32: the reverse-time adjoint of (μ, σ²). Per token it is the affine map
//        du = A_μ − rstd·Sdb,  dv = A_σ − ½·rstd³·Sds,  cross = 2·c1·c2·dv·(ux − μ_{t−1})
//        A_μ ← c1·du − cross,  A_σ ← c1·dv
//      i.e. (A_μ, A_σ) ↦ [[c1, −2c1c2e], [0, c1]]·(A_μ, A_σ) + v, upper-triangular 2×2 maps
//      that compose associatively: a suffix scan over time (mirror of the forward scan) gives
//      each thread the adjoint arriving at its last token, then it walks its tokens backwards
//      with the formulas above, writing dux = c2·du + cross and dvx = c2·dv. The adjoint left
//      after t = 0 is ∂L/∂(carried mean, var).
//   3. tsn_backward_dx_f32: dx = dy·ŵ·rstd + dux/dg + 2·dvx·(x − ux)/dg, plus per-chunk column
//      partial sums of dw (Σ dy·(x − μ)·rstd) and db (Σ dy).
//   4. tsn_backward_param_reduce_f32: dw, db += the partials in chunk order (deterministic).
//
// Decode: tsn_step_f32 merges one token per row into the state in place (one block per row).
//
// Launch shapes (src/cuda/launch.rs):
//   tsn_group_moments_f32, tsn_backward_group_sums_f32: block 256 (8 warps), warps stride
//     over the b·l·g (row, group) pairs
//   tsn_scan_f32, tsn_backward_scan_f32: grid (g, b), block 256, no dynamic smem
//   tsn_normalize_f32: any 1-D shape
//   tsn_backward_dx_f32: grid (⌈d/256⌉, chunks), block 256; rows_per_chunk rows per chunk
//   tsn_backward_param_reduce_f32: any 1-D shape
//   tsn_step_f32: grid (b), block 256
#include "common.cuh"

namespace {

constexpr int TSN_THREADS = 256;
constexpr int TSN_WARPS = TSN_THREADS / mega::WARP_SIZE;
constexpr int TSN_SEG = 4;                         // tokens per thread per chunk
constexpr int TSN_CHUNK = TSN_THREADS * TSN_SEG;   // 1024 tokens

// Running statistics of n timesteps (n = 0: empty, the identity of merge).
struct Welford {
    double n;
    float mean;
    float var;
};

__device__ __forceinline__ Welford welford(double n, float mean, float var) {
    Welford w;
    w.n = n;
    w.mean = mean;
    w.var = var;
    return w;
}

// a ⊕ b, a before b in time. With b one timestep this is the §5.2 update, operation for
// operation: c1 = n_a/n, c2 = n_b/n.
__device__ __forceinline__ Welford merge(Welford a, Welford b) {
    if (b.n == 0.0) return a;
    if (a.n == 0.0) return b;
    const double n = a.n + b.n;
    const float c1 = static_cast<float>(a.n / n);
    const float c2 = static_cast<float>(b.n / n);
    const float delta = b.mean - a.mean;
    return welford(n, c1 * a.mean + c2 * b.mean,
                   c1 * a.var + c2 * b.var + (c1 * delta) * (c2 * delta));
}

// The §5.2 single-token update exactly as the CPU twin writes it (also from n = 0, where it
// ignores the starting mean and variance).
__device__ __forceinline__ Welford merge_token(Welford a, float ux, float vx) {
    const double n1 = a.n + 1.0;
    const float c1 = static_cast<float>(a.n / n1);
    const float c2 = static_cast<float>(1.0 / n1);
    const float delta = ux - a.mean;
    return welford(n1, c1 * a.mean + c2 * ux, c1 * a.var + c2 * vx + (c1 * delta) * (c2 * delta));
}

__device__ __forceinline__ Welford shfl_up(Welford w, int delta) {
    return welford(__shfl_up_sync(mega::FULL_WARP_MASK, w.n, delta),
                   __shfl_up_sync(mega::FULL_WARP_MASK, w.mean, delta),
                   __shfl_up_sync(mega::FULL_WARP_MASK, w.var, delta));
}

// The reverse-time adjoint map (A_μ, A_σ) ↦ (m·A_μ + m12·A_σ + v1, m·A_σ + v2).
struct AdjMap {
    float m, m12, v1, v2;
};

__device__ __forceinline__ AdjMap adj_map(float m, float m12, float v1, float v2) {
    AdjMap a;
    a.m = m;
    a.m12 = m12;
    a.v1 = v1;
    a.v2 = v2;
    return a;
}

__device__ __forceinline__ AdjMap adj_identity() { return adj_map(1.0f, 0.0f, 0.0f, 0.0f); }

// Apply `first`, then `then`.
__device__ __forceinline__ AdjMap adj_then(AdjMap first, AdjMap then) {
    return adj_map(then.m * first.m, then.m * first.m12 + then.m12 * first.m,
                   then.m * first.v1 + then.m12 * first.v2 + then.v1,
                   then.m * first.v2 + then.v2);
}

__device__ __forceinline__ void adj_apply(AdjMap a, float* mu, float* var) {
    const float nm = a.m * *mu + a.m12 * *var + a.v1;
    const float nv = a.m * *var + a.v2;
    *mu = nm;
    *var = nv;
}

__device__ __forceinline__ AdjMap shfl_down(AdjMap a, int delta) {
    return adj_map(__shfl_down_sync(mega::FULL_WARP_MASK, a.m, delta),
                   __shfl_down_sync(mega::FULL_WARP_MASK, a.m12, delta),
                   __shfl_down_sync(mega::FULL_WARP_MASK, a.v1, delta),
                   __shfl_down_sync(mega::FULL_WARP_MASK, a.v2, delta));
}

// Merge weights of token t of a row that started from n0 timesteps (CPU: merge_weights).
__device__ __forceinline__ void token_weights(double n0, int t, float* c1, float* c2) {
    const double n = n0 + t;
    *c1 = static_cast<float>(n / (n + 1.0));
    *c2 = static_cast<float>(1.0 / (n + 1.0));
}

}  // namespace

// Per-(row, group) two-pass moments: ux → ux_out, vx → vx_out, both [rows, g].
extern "C" __global__ void tsn_group_moments_f32(
    float* __restrict__ ux_out, float* __restrict__ vx_out, const float* __restrict__ x, int rows,
    int d, int g) {
    const int dg = d / g;
    const float inv_dg = 1.0f / static_cast<float>(dg);
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const long long pairs = static_cast<long long>(rows) * g;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / mega::WARP_SIZE);
    for (long long pair = blockIdx.x * (blockDim.x / mega::WARP_SIZE) + threadIdx.x / mega::WARP_SIZE;
         pair < pairs; pair += warps) {
        const float* xs = x + (pair / g) * d + (pair % g) * dg;
        float s = 0.0f;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) s += xs[j];
        const float ux = mega::warp_sum(s) * inv_dg;
        float ss = 0.0f;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) {
            const float c = xs[j] - ux;
            ss += c * c;
        }
        const float vx = mega::warp_sum(ss) * inv_dg;
        if (lane == 0) {
            ux_out[pair] = ux;
            vx_out[pair] = vx;
        }
    }
}

// The cumulative Welford scan. On entry saved_mean / saved_rstd hold the per-token moments
// (ux, vx) from tsn_group_moments_f32; on exit the cumulative mean and rstd. state_in_* may
// be null (fresh sequence); state_out_* may be null (not wanted), else they must not alias
// state_in_*. Block (group, row) = (blockIdx.x, blockIdx.y).
extern "C" __global__ void __launch_bounds__(TSN_THREADS) tsn_scan_f32(
    float* __restrict__ saved_mean, float* __restrict__ saved_rstd,
    float* __restrict__ count_out, float* __restrict__ mean_out, float* __restrict__ var_out,
    const float* __restrict__ count_in, const float* __restrict__ mean_in,
    const float* __restrict__ var_in, int b, int l, int g, float eps) {
    __shared__ Welford totals[TSN_WARPS];
    const int gi = blockIdx.x;
    const int bi = blockIdx.y;
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    if (bi >= b) return;  // the idle block of a b = 0 launch; uniform, before any barrier
    const double n0 = count_in != nullptr ? static_cast<double>(count_in[bi]) : 0.0;
    Welford carry = count_in != nullptr
                        ? welford(n0, mean_in[bi * g + gi], var_in[bi * g + gi])
                        : welford(0.0, 0.0f, 1.0f);
    const int n_chunks = (l + TSN_CHUNK - 1) / TSN_CHUNK;
    for (int c = 0; c < n_chunks; ++c) {
        const int t_first = c * TSN_CHUNK + threadIdx.x * TSN_SEG;
        float ux[TSN_SEG], vx[TSN_SEG];
        Welford local = welford(0.0, 0.0f, 0.0f);
#pragma unroll
        for (int s = 0; s < TSN_SEG; ++s) {
            const int t = t_first + s;
            const size_t at = (static_cast<size_t>(bi) * l + t) * g + gi;
            ux[s] = t < l ? saved_mean[at] : 0.0f;
            vx[s] = t < l ? saved_rstd[at] : 0.0f;
            if (t < l) local = merge(local, welford(1.0, ux[s], vx[s]));
        }
        Welford incl = local;
#pragma unroll
        for (int o = 1; o < mega::WARP_SIZE; o *= 2) {
            const Welford other = shfl_up(incl, o);
            if (lane >= o) incl = merge(other, incl);
        }
        Welford lane_prefix = shfl_up(incl, 1);
        __syncthreads();  // the previous chunk's readers of `totals` are done
        if (lane == mega::WARP_SIZE - 1) totals[warp] = incl;
        __syncthreads();
        // Every thread folds the warp totals in the same order: its warp's prefix, and the
        // carry into the next chunk.
        Welford prefix = carry;
        for (int w = 0; w < TSN_WARPS; ++w) {
            if (w == warp) {
                prefix = lane == 0 ? carry : merge(carry, lane_prefix);
            }
            carry = merge(carry, totals[w]);
        }
        Welford run = prefix;
#pragma unroll
        for (int s = 0; s < TSN_SEG; ++s) {
            const int t = t_first + s;
            if (t < l) {
                run = merge_token(run, ux[s], vx[s]);
                const size_t at = (static_cast<size_t>(bi) * l + t) * g + gi;
                saved_mean[at] = run.mean;
                saved_rstd[at] = 1.0f / sqrtf(run.var + eps);
            }
        }
    }
    if (threadIdx.x == 0) {
        if (mean_out != nullptr) {
            mean_out[bi * g + gi] = carry.mean;
            var_out[bi * g + gi] = carry.var;
        }
        if (count_out != nullptr && gi == 0) count_out[bi] = static_cast<float>(n0 + l);
    }
}

// y = (x − mean)·rstd·(w + 1) + bias over rows of d channels, stats [rows, g].
extern "C" __global__ void tsn_normalize_f32(
    float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, const float* __restrict__ mean, const float* __restrict__ rstd,
    int rows, int d, int g) {
    const int dg = d / g;
    const long long total = static_cast<long long>(rows) * d;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long row = i / d;
        const int j = static_cast<int>(i % d);
        const long long s = row * g + j / dg;
        y[i] = (x[i] - mean[s]) * rstd[s] * (w[j] + 1.0f) + bias[j];
    }
}

// sums [rows, 3, g]: ux, Sdb = Σ dy·ŵ, Sds = Σ dy·ŵ·(x − μ_t) per (row, group).
extern "C" __global__ void tsn_backward_group_sums_f32(
    float* __restrict__ sums, const float* __restrict__ dy, const float* __restrict__ x,
    const float* __restrict__ w, const float* __restrict__ saved_mean, int rows, int d, int g) {
    const int dg = d / g;
    const float inv_dg = 1.0f / static_cast<float>(dg);
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const long long pairs = static_cast<long long>(rows) * g;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / mega::WARP_SIZE);
    for (long long pair = blockIdx.x * (blockDim.x / mega::WARP_SIZE) + threadIdx.x / mega::WARP_SIZE;
         pair < pairs; pair += warps) {
        const long long row = pair / g;
        const int gi = static_cast<int>(pair % g);
        const long long base = row * d + gi * dg;
        const float mu = saved_mean[pair];
        float sx = 0.0f, sdb = 0.0f, sds = 0.0f;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) {
            const float xv = x[base + j];
            const float gw = dy[base + j] * (w[gi * dg + j] + 1.0f);
            sx += xv;
            sdb += gw;
            sds += gw * (xv - mu);
        }
        sx = mega::warp_sum(sx);
        sdb = mega::warp_sum(sdb);
        sds = mega::warp_sum(sds);
        if (lane == 0) {
            float* s = sums + row * 3 * g;
            s[gi] = sx * inv_dg;
            s[g + gi] = sdb;
            s[2 * g + gi] = sds;
        }
    }
}

// The reverse adjoint scan. On entry sums holds [ux, Sdb, Sds]; on exit [ux, dux, dvx].
// dmean_out / dvar_out: the gradient at the returned state (null: zero); dmean_in / dvar_in:
// overwritten with the gradient of the carried-in mean and var (null: not wanted).
// count_in / mean_in: the state the forward started from (null: fresh).
// Block (group, row) = (blockIdx.x, blockIdx.y).
extern "C" __global__ void __launch_bounds__(TSN_THREADS) tsn_backward_scan_f32(
    float* __restrict__ sums, float* __restrict__ dmean_in, float* __restrict__ dvar_in,
    const float* __restrict__ dmean_out, const float* __restrict__ dvar_out,
    const float* __restrict__ saved_mean, const float* __restrict__ saved_rstd,
    const float* __restrict__ count_in, const float* __restrict__ mean_in, int b, int l, int g) {
    __shared__ AdjMap totals[TSN_WARPS];
    const int gi = blockIdx.x;
    const int bi = blockIdx.y;
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    if (bi >= b) return;  // the idle block of a b = 0 launch; uniform, before any barrier
    const double n0 = count_in != nullptr ? static_cast<double>(count_in[bi]) : 0.0;
    const float mean0 = mean_in != nullptr ? mean_in[bi * g + gi] : 0.0f;
    float acc_mu = dmean_out != nullptr ? dmean_out[bi * g + gi] : 0.0f;
    float acc_var = dvar_out != nullptr ? dvar_out[bi * g + gi] : 0.0f;
    const int n_chunks = (l + TSN_CHUNK - 1) / TSN_CHUNK;
    for (int c = n_chunks - 1; c >= 0; --c) {
        const int t_first = c * TSN_CHUNK + threadIdx.x * TSN_SEG;
        // e = ux − μ_{t−1}, the only form in which ux and the previous mean are needed.
        float e[TSN_SEG], sdb[TSN_SEG], sds[TSN_SEG], rs[TSN_SEG];
        AdjMap local = adj_identity();
#pragma unroll
        for (int s = TSN_SEG - 1; s >= 0; --s) {
            const int t = t_first + s;
            if (t < l) {
                const size_t row = static_cast<size_t>(bi) * l + t;
                const float* sm = sums + row * 3 * g;
                sdb[s] = sm[g + gi];
                sds[s] = sm[2 * g + gi];
                rs[s] = saved_rstd[row * g + gi];
                e[s] = sm[gi] - (t > 0 ? saved_mean[(row - 1) * g + gi] : mean0);
                float c1, c2;
                token_weights(n0, t, &c1, &c2);
                const float duc = -(rs[s] * sdb[s]);
                const float dvc = -(0.5f * rs[s] * rs[s] * rs[s] * sds[s]);
                const float k = 2.0f * c1 * c2 * e[s];
                local = adj_then(local, adj_map(c1, -k, c1 * duc - k * dvc, c1 * dvc));
            } else {
                e[s] = sdb[s] = sds[s] = rs[s] = 0.0f;
            }
        }
        // Suffix scan: incl = this thread's map after every later thread's in the warp.
        AdjMap incl = local;
#pragma unroll
        for (int o = 1; o < mega::WARP_SIZE; o *= 2) {
            const AdjMap later = shfl_down(incl, o);
            if (lane + o < mega::WARP_SIZE) incl = adj_then(later, incl);
        }
        AdjMap after_me = shfl_down(incl, 1);
        if (lane == mega::WARP_SIZE - 1) after_me = adj_identity();
        __syncthreads();  // the previous chunk's readers of `totals` are done
        if (lane == 0) totals[warp] = incl;
        __syncthreads();
        // The adjoint arriving at this warp's last token: the chunk carry through every later
        // warp; then the carry into the previous chunk through all of them.
        float wmu = acc_mu, wvar = acc_var;
        for (int w = TSN_WARPS - 1; w > warp; --w) adj_apply(totals[w], &wmu, &wvar);
        for (int w = TSN_WARPS - 1; w >= 0; --w) adj_apply(totals[w], &acc_mu, &acc_var);
        float amu = wmu, avar = wvar;
        adj_apply(after_me, &amu, &avar);
#pragma unroll
        for (int s = TSN_SEG - 1; s >= 0; --s) {
            const int t = t_first + s;
            if (t < l) {
                float c1, c2;
                token_weights(n0, t, &c1, &c2);
                const float du = amu - rs[s] * sdb[s];
                const float dv = avar - 0.5f * rs[s] * rs[s] * rs[s] * sds[s];
                const float cross = 2.0f * c1 * c2 * dv * e[s];
                float* sm = sums + (static_cast<size_t>(bi) * l + t) * 3 * g;
                sm[g + gi] = c2 * du + cross;
                sm[2 * g + gi] = c2 * dv;
                amu = c1 * du - cross;
                avar = c1 * dv;
            }
        }
    }
    if (threadIdx.x == 0 && dmean_in != nullptr) {
        dmean_in[bi * g + gi] = acc_mu;
        dvar_in[bi * g + gi] = acc_var;
    }
}

// dx = dy·ŵ·rstd + dux/dg + 2·dvx·(x − ux)/dg (overwritten), and the column partials
// partials[chunk][0][j] = Σ dy·(x − μ)·rstd, partials[chunk][1][j] = Σ dy over the chunk's
// rows. Block (column tile, row chunk); one thread per column, rows in order.
extern "C" __global__ void tsn_backward_dx_f32(
    float* __restrict__ dx, float* __restrict__ partials, const float* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ saved_mean,
    const float* __restrict__ saved_rstd, const float* __restrict__ sums, int rows, int d, int g,
    int rows_per_chunk) {
    const int dg = d / g;
    const float inv_dg = 1.0f / static_cast<float>(dg);
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;  // no barriers in this kernel
    const int gi = j / dg;
    const float w_hat = w[j] + 1.0f;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(rows, r0 + rows_per_chunk);
    float pw = 0.0f, pb = 0.0f;
    for (int r = r0; r < r1; ++r) {
        const size_t at = static_cast<size_t>(r) * d + j;
        const float* s = sums + static_cast<size_t>(r) * 3 * g;
        const float mu = saved_mean[static_cast<size_t>(r) * g + gi];
        const float rs = saved_rstd[static_cast<size_t>(r) * g + gi];
        const float ux = s[gi];
        const float a = s[g + gi] * inv_dg;
        const float bc = 2.0f * s[2 * g + gi] * inv_dg;
        const float gv = dy[at];
        const float xv = x[at];
        dx[at] = gv * w_hat * rs + a + bc * (xv - ux);
        pw += gv * (xv - mu) * rs;
        pb += gv;
    }
    float* out = partials + static_cast<size_t>(blockIdx.y) * 2 * d;
    out[j] = pw;
    out[d + j] = pb;
}

// dw, db [d] += Σ_chunk partials[chunk][0 | 1] in chunk order.
extern "C" __global__ void tsn_backward_param_reduce_f32(
    float* __restrict__ dw, float* __restrict__ db, const float* __restrict__ partials,
    int n_chunks, int d) {
    mega::add_column_partials(dw, partials, n_chunks, d, 2LL * d);
    mega::add_column_partials(db, partials + d, n_chunks, d, 2LL * d);
}

// One token per batch row: x, y [b, d]; the state (count [b], mean, var [b, g]) merged in
// place. One block per row, one warp per group (striding over the groups).
extern "C" __global__ void __launch_bounds__(TSN_THREADS) tsn_step_f32(
    float* __restrict__ y, float* __restrict__ count, float* __restrict__ mean,
    float* __restrict__ var, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, int b, int d, int g, float eps) {
    const int bi = blockIdx.x;
    if (bi >= b) return;  // the idle block of a b = 0 launch; uniform, before any barrier
    const int dg = d / g;
    const float inv_dg = 1.0f / static_cast<float>(dg);
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int warp = threadIdx.x / mega::WARP_SIZE;
    const int n_warps = blockDim.x / mega::WARP_SIZE;
    const double n = static_cast<double>(count[bi]);
    for (int gi = warp; gi < g; gi += n_warps) {
        const float* xs = x + static_cast<size_t>(bi) * d + gi * dg;
        float s = 0.0f;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) s += xs[j];
        const float ux = mega::warp_sum(s) * inv_dg;
        float ss = 0.0f;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) {
            const float c = xs[j] - ux;
            ss += c * c;
        }
        const float vx = mega::warp_sum(ss) * inv_dg;
        const int si = bi * g + gi;
        const Welford next = merge_token(welford(n, mean[si], var[si]), ux, vx);
        const float rs = 1.0f / sqrtf(next.var + eps);
        float* ys = y + static_cast<size_t>(bi) * d + gi * dg;
        for (int j = lane; j < dg; j += mega::WARP_SIZE) {
            const int c = gi * dg + j;
            ys[j] = (xs[j] - next.mean) * rs * (w[c] + 1.0f) + bias[c];
        }
        __syncwarp();  // every lane has read mean[si], var[si]
        if (lane == 0) {
            mean[si] = next.mean;
            var[si] = next.var;
        }
    }
    __syncthreads();  // every warp has read count[bi]
    if (threadIdx.x == 0) count[bi] = static_cast<float>(n + 1.0);
}
