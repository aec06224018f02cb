// MEGALODON's complex exponential moving average (CEMA), spec/megalodon.md §4, as a chunked
// associative scan over time. The CPU twin is src/backend/cpu/cema/ (same parameterization).
//
// Per batch row b, channel d and expansion index k (0-based; the angle index is k + 1):
//
//   a = σ(alpha[d,k]),  δ = σ(delta[d,k]),  φ = σ(theta[d])·2π·(k+1)/N
//   p = a,  q = (1 − a·δ)·e^{iφ},  γ̃ = (gamma[d,k,0] + i·gamma[d,k,1]) / √N
//   h_t = p·x_t + q·h_{t−1}            (h_{−1} = h0, or 0)
//   y_t = Re(Σ_k γ̃·h_t) + omega[d]·x_t
//
// Coefficients are computed in f64 once per block and rounded to f32 (like the CPU twin); the
// scan itself runs in f32.
//
// Scan structure (forward): a block owns CEMA_WARPS channels of one batch row, one warp per
// channel, and walks time in chunks of CEMA_CHUNK = 32 lanes × CEMA_SEG tokens. For each k,
// lane j first runs its CEMA_SEG tokens from zero (lane 0 from the chunk's carried state), then
// a Hillis–Steele warp scan composes the segments: every segment's map is h ↦ q^S·h + s_j, so
// step o adds q^{S·o}·s_{j−o} (powers precomputed in f64). Lane j's start state is lane j−1's
// inclusive value; lane 31's is the carry into the next chunk. A second pass over the segment
// from its true start state accumulates Re(γ̃·h) into the lane's outputs. The warps are
// independent (one channel each), so the only block barriers guard the x/y tiles, which are
// staged through shared memory so global loads and stores stay coalesced across channels.
//
// Backward (reverse-time adjoint, the CPU twin's reference form): with λ_t = ∂L/∂Re h_t +
// i·∂L/∂Im h_t and c = conj(q),
//
//   λ_t = conj(γ̃)·dy_t + c·λ_{t+1}     (the adjoint into the last token is dh_out)
//   dx_t = omega·dy_t + Σ_k p·Re λ_t
//   ∂p += x_t·Re λ_t,   ∂q += λ_t·conj(h_{t−1}),   ∂γ̃ += dy_t·conj(h_t),   ∂omega += dy_t·x_t
//   ∂h0 = c·λ_0
//
// then the chain rule through q = (1−aδ)e^{iφ} and the sigmoids (§4.6), in f64. A block owns
// CEMA_WARPS channels for every batch row and walks chunks backwards; per chunk and k it
// rebuilds h inside the chunk from the chunk's start state (saved by a forward launch with
// `chunk_states`), runs the mirror-image suffix scan for λ, and sums the gradients. Per-chunk
// sums are reduced over the warp in f32 and accumulated across chunks and rows in f64 shared
// memory, so parameter gradients need no atomics and are deterministic.
//
// Launch shapes (src/cuda/launch.rs computes them):
//   cema_forward_f32:      grid (⌈d/8⌉, b), block 256, dyn smem 4·(8·n·(16 + 2) + 8·260) bytes
//   cema_backward_f32:     grid (⌈d/8⌉), block 256, dyn smem 8·8·(5n + 1) + 4·(8·n·18 + 2·8·260)
//   cema_coefficients_f32: any 1-D shape covering d·n threads
//   cema_step_f32:         any 1-D shape covering b·d threads
#include "common.cuh"

namespace {

constexpr int CEMA_WARPS = 8;                          // channels per block, one warp each
constexpr int CEMA_THREADS = CEMA_WARPS * mega::WARP_SIZE;
constexpr int CEMA_SEG = 8;                            // tokens per lane per chunk
constexpr int CEMA_CHUNK = mega::WARP_SIZE * CEMA_SEG;  // 256 tokens
// Floats per channel row of a staged tile: +4 spreads the tile-load writes over all 32 banks
// and keeps each lane's 8-token segment 16-byte aligned.
constexpr int CEMA_TILE_STRIDE = CEMA_CHUNK + 4;
constexpr int CEMA_SCAN_STEPS = 5;                     // log2(32)
// Per (channel, k) coefficient record in shared memory: p, qr, qi, gr, gi, then the powers
// q^{S·2^j} (re, im) for j < 5, then one float of padding.
constexpr int CEMA_COEF_FLOATS = 16;
constexpr int COEF_P = 0, COEF_QR = 1, COEF_QI = 2, COEF_GR = 3, COEF_GI = 4, COEF_POW = 5;
// Coefficient-gradient sums per (channel, k): ∂p, ∂q (re, im), ∂γ̃ (re, im).
constexpr int CEMA_GRAD_SUMS = 5;

constexpr double CEMA_PI = 3.14159265358979323846;

struct Cplx {
    float re;
    float im;
};

__device__ __forceinline__ Cplx cplx(float re, float im) {
    Cplx c;
    c.re = re;
    c.im = im;
    return c;
}

// a·b + c
__device__ __forceinline__ Cplx cmul_add(Cplx a, Cplx b, Cplx c) {
    return cplx(a.re * b.re - a.im * b.im + c.re, a.re * b.im + a.im * b.re + c.im);
}

// conj(a)·b + c
__device__ __forceinline__ Cplx cmul_conj_add(Cplx a, Cplx b, Cplx c) {
    return cplx(a.re * b.re + a.im * b.im + c.re, a.re * b.im - a.im * b.re + c.im);
}

__device__ __forceinline__ Cplx shfl_up(Cplx v, int delta) {
    return cplx(__shfl_up_sync(mega::FULL_WARP_MASK, v.re, delta),
                __shfl_up_sync(mega::FULL_WARP_MASK, v.im, delta));
}

__device__ __forceinline__ Cplx shfl_down(Cplx v, int delta) {
    return cplx(__shfl_down_sync(mega::FULL_WARP_MASK, v.re, delta),
                __shfl_down_sync(mega::FULL_WARP_MASK, v.im, delta));
}

__device__ __forceinline__ Cplx shfl_from(Cplx v, int lane) {
    return cplx(__shfl_sync(mega::FULL_WARP_MASK, v.re, lane),
                __shfl_sync(mega::FULL_WARP_MASK, v.im, lane));
}

__device__ __forceinline__ double sigmoid_f64(double v) { return 1.0 / (1.0 + exp(-v)); }

// The coefficients of one (channel, k) in f64 (spec §4.2).
struct CoefF64 {
    double a, delta, sig_theta, cos_phi, sin_phi, qr, qi, gr, gi;
};

__device__ __forceinline__ CoefF64 coef_f64(
    const float* __restrict__ alpha, const float* __restrict__ delta,
    const float* __restrict__ theta, const float* __restrict__ gamma, int ch, int k, int n) {
    CoefF64 c;
    const int i = ch * n + k;
    c.a = sigmoid_f64(alpha[i]);
    c.delta = sigmoid_f64(delta[i]);
    c.sig_theta = sigmoid_f64(theta[ch]);
    const double phi = c.sig_theta * (2.0 * CEMA_PI / n) * (k + 1);
    c.cos_phi = cos(phi);
    c.sin_phi = sin(phi);
    const double r = 1.0 - c.a * c.delta;
    c.qr = r * c.cos_phi;
    c.qi = r * c.sin_phi;
    const double scale = 1.0 / sqrt(static_cast<double>(n));
    c.gr = gamma[2 * i] * scale;
    c.gi = gamma[2 * i + 1] * scale;
    return c;
}

// Fills the block's coefficient records `coef` [CEMA_WARPS][n][CEMA_COEF_FLOATS] for channels
// d0.. (zeros past d). Every thread of the block must call it; a barrier must follow.
__device__ void load_coefficients(
    float* coef, const float* __restrict__ alpha, const float* __restrict__ delta,
    const float* __restrict__ theta, const float* __restrict__ gamma, int d0, int d, int n) {
    for (int i = threadIdx.x; i < CEMA_WARPS * n; i += blockDim.x) {
        const int ch = d0 + i / n;
        const int k = i % n;
        float* rec = coef + i * CEMA_COEF_FLOATS;
        for (int f = 0; f < CEMA_COEF_FLOATS; ++f) rec[f] = 0.0f;
        if (ch < d) {
            const CoefF64 c = coef_f64(alpha, delta, theta, gamma, ch, k, n);
            rec[COEF_P] = static_cast<float>(c.a);
            rec[COEF_QR] = static_cast<float>(c.qr);
            rec[COEF_QI] = static_cast<float>(c.qi);
            rec[COEF_GR] = static_cast<float>(c.gr);
            rec[COEF_GI] = static_cast<float>(c.gi);
            // q^S by squaring (S = 8 = 2³), then q^{2S}, q^{4S}, ... by further squaring.
            double pr = c.qr, pi = c.qi;
            for (int s = 1; s < CEMA_SEG; s *= 2) {
                const double t = pr * pr - pi * pi;
                pi = 2.0 * pr * pi;
                pr = t;
            }
            for (int j = 0; j < CEMA_SCAN_STEPS; ++j) {
                rec[COEF_POW + 2 * j] = static_cast<float>(pr);
                rec[COEF_POW + 2 * j + 1] = static_cast<float>(pi);
                const double t = pr * pr - pi * pi;
                pi = 2.0 * pr * pi;
                pr = t;
            }
        }
    }
}

__device__ __forceinline__ Cplx coef_pow(const float* rec, int j) {
    return cplx(rec[COEF_POW + 2 * j], rec[COEF_POW + 2 * j + 1]);
}

// Stages tokens t0.. of channels d0.. of `src` [b, l, d] (row bi) into `tile`
// [CEMA_WARPS][CEMA_TILE_STRIDE], zero outside the call. Consecutive threads read consecutive
// channels, so each token's channels come in one or two sectors. store_tile uses the same
// element → thread map, which the kernels rely on to skip a barrier between the two.
__device__ __forceinline__ void load_tile(
    float* tile, const float* __restrict__ src, int bi, int t0, int d0, int l, int d) {
    for (int i = threadIdx.x; i < CEMA_WARPS * CEMA_CHUNK; i += blockDim.x) {
        const int tt = i / CEMA_WARPS;
        const int cc = i % CEMA_WARPS;
        const int t = t0 + tt;
        const int ch = d0 + cc;
        tile[cc * CEMA_TILE_STRIDE + tt] =
            (t < l && ch < d) ? src[(static_cast<size_t>(bi) * l + t) * d + ch] : 0.0f;
    }
}

// The inverse of load_tile for the tokens and channels inside the call.
__device__ __forceinline__ void store_tile(
    float* __restrict__ dst, const float* tile, int bi, int t0, int d0, int l, int d) {
    for (int i = threadIdx.x; i < CEMA_WARPS * CEMA_CHUNK; i += blockDim.x) {
        const int tt = i / CEMA_WARPS;
        const int cc = i % CEMA_WARPS;
        const int t = t0 + tt;
        const int ch = d0 + cc;
        if (t < l && ch < d) dst[(static_cast<size_t>(bi) * l + t) * d + ch] = tile[cc * CEMA_TILE_STRIDE + tt];
    }
}

__device__ __forceinline__ void read_segment(float (&v)[CEMA_SEG], const float* row, int lane) {
    const float4* src = reinterpret_cast<const float4*>(row + lane * CEMA_SEG);
#pragma unroll
    for (int i = 0; i < CEMA_SEG / 4; ++i) {
        const float4 f = src[i];
        v[4 * i] = f.x;
        v[4 * i + 1] = f.y;
        v[4 * i + 2] = f.z;
        v[4 * i + 3] = f.w;
    }
}

__device__ __forceinline__ void write_segment(float* row, const float (&v)[CEMA_SEG], int lane) {
    float4* dst = reinterpret_cast<float4*>(row + lane * CEMA_SEG);
#pragma unroll
    for (int i = 0; i < CEMA_SEG / 4; ++i) {
        dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
}

// Inclusive warp scan of segment end states: lane j ends with Σ_{i≤j} q^{S·(j−i)}·s_i.
__device__ __forceinline__ Cplx scan_forward(Cplx e, const float* rec, int lane) {
#pragma unroll
    for (int j = 0; j < CEMA_SCAN_STEPS; ++j) {
        const int offset = 1 << j;
        const Cplx other = shfl_up(e, offset);
        if (lane >= offset) e = cmul_add(coef_pow(rec, j), other, e);
    }
    return e;
}

// Inclusive suffix scan for the adjoint: lane j ends with Σ_{i≥j} conj(q)^{S·(i−j)}·s_i.
__device__ __forceinline__ Cplx scan_reverse(Cplx e, const float* rec, int lane) {
#pragma unroll
    for (int j = 0; j < CEMA_SCAN_STEPS; ++j) {
        const int offset = 1 << j;
        const Cplx other = shfl_down(e, offset);
        if (lane + offset < mega::WARP_SIZE) e = cmul_conj_add(coef_pow(rec, j), other, e);
    }
    return e;
}

__device__ __forceinline__ size_t state_index(int bi, int ch, int k, int d, int n) {
    return ((static_cast<size_t>(bi) * d + ch) * n + k) * 2;
}

}  // namespace

// The one dynamic shared-memory array of this file (see common.cuh).
extern __shared__ __align__(16) unsigned char smem[];

// Forward over a call of l tokens.
//   y            [b, l, d]      written when non-null
//   h_out        [b, d, n, 2]   state after the last token (h0, or 0, when l = 0); may be null
//   chunk_states [b, ⌈l/256⌉, d, n, 2]  the state before every chunk, for the backward; may be null
//   x            [b, l, d];  alpha, delta [d, n];  theta, omega [d];  gamma [d, n, 2]
//   h0           [b, d, n, 2]   carried-in state, null for zeros
extern "C" __global__ void __launch_bounds__(CEMA_THREADS) cema_forward_f32(
    float* __restrict__ y, float* __restrict__ h_out, float* __restrict__ chunk_states,
    const float* __restrict__ x, const float* __restrict__ alpha, const float* __restrict__ delta,
    const float* __restrict__ theta, const float* __restrict__ gamma,
    const float* __restrict__ omega, const float* __restrict__ h0, int b, int l, int d, int n) {
    const int warp = threadIdx.x / mega::WARP_SIZE;
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int d0 = blockIdx.x * CEMA_WARPS;
    const int bi = blockIdx.y;
    const int ch = d0 + warp;
    const bool ch_valid = ch < d;
    if (bi >= b) return;  // the idle block of a b = 0 launch; uniform, before any barrier

    float* coef = reinterpret_cast<float*>(smem);
    float* carry = coef + CEMA_WARPS * n * CEMA_COEF_FLOATS;  // [CEMA_WARPS][n] complex
    float* tile = carry + CEMA_WARPS * n * 2;                 // [CEMA_WARPS][CEMA_TILE_STRIDE]

    load_coefficients(coef, alpha, delta, theta, gamma, d0, d, n);
    for (int i = threadIdx.x; i < CEMA_WARPS * n; i += blockDim.x) {
        const int c = d0 + i / n;
        const int k = i % n;
        const bool given = h0 != nullptr && c < d;
        carry[2 * i] = given ? h0[state_index(bi, c, k, d, n)] : 0.0f;
        carry[2 * i + 1] = given ? h0[state_index(bi, c, k, d, n) + 1] : 0.0f;
    }
    __syncthreads();

    const float om = ch_valid ? omega[ch] : 0.0f;
    const bool rescan = y != nullptr || h_out != nullptr;
    const int n_chunks = (l + CEMA_CHUNK - 1) / CEMA_CHUNK;
    float* my_carry = carry + warp * n * 2;
    float* my_row = tile + warp * CEMA_TILE_STRIDE;

    for (int c = 0; c < n_chunks; ++c) {
        const int t0 = c * CEMA_CHUNK;
        if (chunk_states != nullptr && ch_valid) {
            for (int k = lane; k < n; k += mega::WARP_SIZE) {
                const size_t at = (((static_cast<size_t>(bi) * n_chunks + c) * d + ch) * n + k) * 2;
                chunk_states[at] = my_carry[2 * k];
                chunk_states[at + 1] = my_carry[2 * k + 1];
            }
        }
        // No barrier before the load: store_tile and load_tile give each element to the same
        // thread, so this thread's loads follow its own stores of the previous chunk.
        load_tile(tile, x, bi, t0, d0, l, d);
        __syncthreads();

        float xs[CEMA_SEG];
        float acc[CEMA_SEG];
        read_segment(xs, my_row, lane);
#pragma unroll
        for (int s = 0; s < CEMA_SEG; ++s) acc[s] = 0.0f;
        const int seg_t0 = t0 + lane * CEMA_SEG;

        for (int k = 0; k < n; ++k) {
            const float* rec = coef + (warp * n + k) * CEMA_COEF_FLOATS;
            const float p = rec[COEF_P];
            const Cplx q = cplx(rec[COEF_QR], rec[COEF_QI]);
            // Only lane 0 reads the carry, and only lane 0 writes it (below).
            Cplx cin = cplx(0.0f, 0.0f);
            if (lane == 0) cin = cplx(my_carry[2 * k], my_carry[2 * k + 1]);
            Cplx h = cin;
#pragma unroll
            for (int s = 0; s < CEMA_SEG; ++s) h = cmul_add(q, h, cplx(p * xs[s], 0.0f));
            const Cplx incl = scan_forward(h, rec, lane);
            Cplx start = shfl_up(incl, 1);
            if (lane == 0) start = cin;
            const Cplx cout = shfl_from(incl, mega::WARP_SIZE - 1);
            if (rescan) {
                const float gr = rec[COEF_GR];
                const float gi = rec[COEF_GI];
                h = start;
#pragma unroll
                for (int s = 0; s < CEMA_SEG; ++s) {
                    h = cmul_add(q, h, cplx(p * xs[s], 0.0f));
                    acc[s] += gr * h.re - gi * h.im;
                    if (h_out != nullptr && ch_valid && seg_t0 + s == l - 1) {
                        const size_t at = state_index(bi, ch, k, d, n);
                        h_out[at] = h.re;
                        h_out[at + 1] = h.im;
                    }
                }
            }
            if (lane == 0) {
                my_carry[2 * k] = cout.re;
                my_carry[2 * k + 1] = cout.im;
            }
        }
        if (y != nullptr) {
            float out[CEMA_SEG];
#pragma unroll
            for (int s = 0; s < CEMA_SEG; ++s) out[s] = acc[s] + om * xs[s];
            write_segment(my_row, out, lane);
        }
        __syncthreads();
        if (y != nullptr) store_tile(y, tile, bi, t0, d0, l, d);
    }
    if (l == 0 && h_out != nullptr && ch_valid) {
        for (int k = lane; k < n; k += mega::WARP_SIZE) {
            const size_t at = state_index(bi, ch, k, d, n);
            h_out[at] = my_carry[2 * k];
            h_out[at + 1] = my_carry[2 * k + 1];
        }
    }
}

// Backward of cema_forward_f32.
//   dx           [b, l, d]      overwritten
//   dalpha, ddelta [d, n]; dtheta, domega [d]; dgamma [d, n, 2]   accumulated (+=)
//   dh0          [b, d, n, 2]   overwritten with ∂L/∂h0 when non-null
//   dy           [b, l, d];  dh_out [b, d, n, 2] (null: zero)
//   chunk_states the forward's chunk start states for the same x, parameters and h0
extern "C" __global__ void __launch_bounds__(CEMA_THREADS) cema_backward_f32(
    float* __restrict__ dx, float* __restrict__ dalpha, float* __restrict__ ddelta,
    float* __restrict__ dtheta, float* __restrict__ dgamma, float* __restrict__ domega,
    float* __restrict__ dh0, const float* __restrict__ dy, const float* __restrict__ dh_out,
    const float* __restrict__ x, const float* __restrict__ alpha, const float* __restrict__ delta,
    const float* __restrict__ theta, const float* __restrict__ gamma,
    const float* __restrict__ omega, const float* __restrict__ chunk_states, int b, int l, int d,
    int n) {
    const int warp = threadIdx.x / mega::WARP_SIZE;
    const int lane = threadIdx.x % mega::WARP_SIZE;
    const int d0 = blockIdx.x * CEMA_WARPS;
    const int ch = d0 + warp;
    const bool ch_valid = ch < d;

    double* sums = reinterpret_cast<double*>(smem);                   // [CEMA_WARPS][n][5]
    double* omega_sum = sums + CEMA_WARPS * n * CEMA_GRAD_SUMS;        // [CEMA_WARPS]
    float* coef = reinterpret_cast<float*>(omega_sum + CEMA_WARPS);    // [CEMA_WARPS][n][16]
    float* carry = coef + CEMA_WARPS * n * CEMA_COEF_FLOATS;           // [CEMA_WARPS][n] complex
    float* xtile = carry + CEMA_WARPS * n * 2;
    float* gtile = xtile + CEMA_WARPS * CEMA_TILE_STRIDE;

    load_coefficients(coef, alpha, delta, theta, gamma, d0, d, n);
    for (int i = threadIdx.x; i < CEMA_WARPS * n * CEMA_GRAD_SUMS; i += blockDim.x) sums[i] = 0.0;
    if (threadIdx.x < CEMA_WARPS) omega_sum[threadIdx.x] = 0.0;

    const float om = ch_valid ? omega[ch] : 0.0f;
    const int n_chunks = (l + CEMA_CHUNK - 1) / CEMA_CHUNK;
    float* my_carry = carry + warp * n * 2;
    float* my_x = xtile + warp * CEMA_TILE_STRIDE;
    float* my_g = gtile + warp * CEMA_TILE_STRIDE;
    double* my_sums = sums + warp * n * CEMA_GRAD_SUMS;

    for (int bi = 0; bi < b; ++bi) {
        __syncthreads();  // coefficients ready; the previous row's carries have been read
        for (int i = threadIdx.x; i < CEMA_WARPS * n; i += blockDim.x) {
            const int c = d0 + i / n;
            const int k = i % n;
            const bool given = dh_out != nullptr && c < d;
            carry[2 * i] = given ? dh_out[state_index(bi, c, k, d, n)] : 0.0f;
            carry[2 * i + 1] = given ? dh_out[state_index(bi, c, k, d, n) + 1] : 0.0f;
        }
        for (int c = n_chunks - 1; c >= 0; --c) {
            const int t0 = c * CEMA_CHUNK;
            // No barrier before the loads (see cema_forward_f32); the one after them also
            // publishes the carries initialised above.
            load_tile(xtile, x, bi, t0, d0, l, d);
            load_tile(gtile, dy, bi, t0, d0, l, d);
            __syncthreads();

            float xs[CEMA_SEG];
            float gs[CEMA_SEG];
            float dxs[CEMA_SEG];
            read_segment(xs, my_x, lane);
            read_segment(gs, my_g, lane);
            float gx = 0.0f;
#pragma unroll
            for (int s = 0; s < CEMA_SEG; ++s) {
                dxs[s] = 0.0f;
                gx += gs[s] * xs[s];
            }
            gx = mega::warp_sum(gx);
            if (lane == 0) omega_sum[warp] += gx;
            const int seg_t0 = t0 + lane * CEMA_SEG;
            // The last token of the call in this chunk: where the carried adjoint enters.
            const int t_inject = min(t0 + CEMA_CHUNK, l) - 1;

            for (int k = 0; k < n; ++k) {
                const float* rec = coef + (warp * n + k) * CEMA_COEF_FLOATS;
                const float p = rec[COEF_P];
                const Cplx q = cplx(rec[COEF_QR], rec[COEF_QI]);
                const float gr = rec[COEF_GR];
                const float gi = rec[COEF_GI];
                const Cplx lam_in = cplx(my_carry[2 * k], my_carry[2 * k + 1]);
                Cplx hstart = cplx(0.0f, 0.0f);
                if (ch_valid) {
                    const size_t at = (((static_cast<size_t>(bi) * n_chunks + c) * d + ch) * n + k) * 2;
                    hstart = cplx(chunk_states[at], chunk_states[at + 1]);
                }
                // Forward: the state before each lane's first token.
                Cplx h = lane == 0 ? hstart : cplx(0.0f, 0.0f);
#pragma unroll
                for (int s = 0; s < CEMA_SEG; ++s) h = cmul_add(q, h, cplx(p * xs[s], 0.0f));
                const Cplx fincl = scan_forward(h, rec, lane);
                Cplx start = shfl_up(fincl, 1);
                if (lane == 0) start = hstart;

                // Reverse: f = conj(q)·λ at each segment's first token, from zero beyond it.
                Cplx f = cplx(0.0f, 0.0f);
#pragma unroll
                for (int s = CEMA_SEG - 1; s >= 0; --s) {
                    if (seg_t0 + s == t_inject) f = cplx(f.re + lam_in.re, f.im + lam_in.im);
                    const Cplx lam = cplx(gr * gs[s] + f.re, f.im - gi * gs[s]);
                    f = cmul_conj_add(q, lam, cplx(0.0f, 0.0f));
                }
                const Cplx rincl = scan_reverse(f, rec, lane);
                Cplx fut = shfl_down(rincl, 1);
                if (lane == mega::WARP_SIZE - 1) fut = cplx(0.0f, 0.0f);
                const Cplx lam_out = shfl_from(rincl, 0);

                // Gradients over the segment: h forwards into registers, then λ backwards.
                Cplx hs[CEMA_SEG];
                h = start;
#pragma unroll
                for (int s = 0; s < CEMA_SEG; ++s) {
                    h = cmul_add(q, h, cplx(p * xs[s], 0.0f));
                    hs[s] = h;
                }
                float dp = 0.0f, dqr = 0.0f, dqi = 0.0f, dgr = 0.0f, dgi = 0.0f;
                f = fut;
#pragma unroll
                for (int s = CEMA_SEG - 1; s >= 0; --s) {
                    if (seg_t0 + s == t_inject) f = cplx(f.re + lam_in.re, f.im + lam_in.im);
                    const float lr = gr * gs[s] + f.re;
                    const float li = f.im - gi * gs[s];
                    const Cplx prev = s > 0 ? hs[s - 1] : start;
                    dxs[s] += p * lr;
                    dp += xs[s] * lr;
                    dqr += lr * prev.re + li * prev.im;
                    dqi += li * prev.re - lr * prev.im;
                    dgr += gs[s] * hs[s].re;
                    dgi -= gs[s] * hs[s].im;
                    f = cmul_conj_add(q, cplx(lr, li), cplx(0.0f, 0.0f));
                }
                dp = mega::warp_sum(dp);
                dqr = mega::warp_sum(dqr);
                dqi = mega::warp_sum(dqi);
                dgr = mega::warp_sum(dgr);
                dgi = mega::warp_sum(dgi);
                // Every lane read its carry above; order those reads before lane 0's write.
                __syncwarp();
                if (lane == 0) {
                    double* acc = my_sums + k * CEMA_GRAD_SUMS;
                    acc[0] += dp;
                    acc[1] += dqr;
                    acc[2] += dqi;
                    acc[3] += dgr;
                    acc[4] += dgi;
                    my_carry[2 * k] = lam_out.re;
                    my_carry[2 * k + 1] = lam_out.im;
                }
                __syncwarp();
            }
            float out[CEMA_SEG];
#pragma unroll
            for (int s = 0; s < CEMA_SEG; ++s) out[s] = om * gs[s] + dxs[s];
            write_segment(my_g, out, lane);
            __syncthreads();
            store_tile(dx, gtile, bi, t0, d0, l, d);
        }
        // The carry is now conj(q)·λ_0 = ∂L/∂h0 (dh_out itself when l = 0).
        __syncthreads();
        if (dh0 != nullptr && ch_valid) {
            for (int k = lane; k < n; k += mega::WARP_SIZE) {
                const size_t at = state_index(bi, ch, k, d, n);
                dh0[at] = my_carry[2 * k];
                dh0[at + 1] = my_carry[2 * k + 1];
            }
        }
    }
    __syncthreads();

    // Chain rule (spec §4.6) in f64, one thread per channel of the block.
    if (threadIdx.x < CEMA_WARPS && d0 + static_cast<int>(threadIdx.x) < d) {
        const int w = threadIdx.x;
        const int c = d0 + w;
        const double scale = 1.0 / sqrt(static_cast<double>(n));
        double dsig_theta = 0.0;
        double st = 0.0;
        for (int k = 0; k < n; ++k) {
            const CoefF64 cf = coef_f64(alpha, delta, theta, gamma, c, k, n);
            st = cf.sig_theta;
            const double* s = sums + (w * n + k) * CEMA_GRAD_SUMS;
            // q = r·e^{iφ}: ∂L/∂r = Re(G·e^{−iφ}), ∂L/∂φ = Im(G·conj q).
            const double dr = s[1] * cf.cos_phi + s[2] * cf.sin_phi;
            const double dphi = s[2] * cf.qr - s[1] * cf.qi;
            const double da = s[0] - cf.delta * dr;
            const double dd = -cf.a * dr;
            const int i = c * n + k;
            dalpha[i] += static_cast<float>(da * cf.a * (1.0 - cf.a));
            ddelta[i] += static_cast<float>(dd * cf.delta * (1.0 - cf.delta));
            dsig_theta += dphi * (2.0 * CEMA_PI / n) * (k + 1);
            dgamma[2 * i] += static_cast<float>(s[3] * scale);
            dgamma[2 * i + 1] += static_cast<float>(s[4] * scale);
        }
        if (n > 0) dtheta[c] += static_cast<float>(dsig_theta * st * (1.0 - st));
        domega[c] += static_cast<float>(omega_sum[w]);
    }
}

// coef [d, n, 5]: p, Re q, Im q, Re γ̃, Im γ̃ in f32 (rounded from f64), for cema_step_f32.
// Computed once per parameter update by a decoder, not once per token.
extern "C" __global__ void cema_coefficients_f32(
    float* __restrict__ coef, const float* __restrict__ alpha, const float* __restrict__ delta,
    const float* __restrict__ theta, const float* __restrict__ gamma, int d, int n) {
    const int total = d * n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const CoefF64 c = coef_f64(alpha, delta, theta, gamma, i / n, i % n, n);
        coef[5 * i] = static_cast<float>(c.a);
        coef[5 * i + 1] = static_cast<float>(c.qr);
        coef[5 * i + 2] = static_cast<float>(c.qi);
        coef[5 * i + 3] = static_cast<float>(c.gr);
        coef[5 * i + 4] = static_cast<float>(c.gi);
    }
}

// One token per batch row (decoding): x, y [b, d]; h [b, d, n, 2] advanced in place.
// y = Re(Σ_k γ̃·h) + omega·x with the terms summed in k order, as the CPU twin's step.
// One thread per (row, channel).
extern "C" __global__ void cema_step_f32(
    float* __restrict__ y, float* __restrict__ h, const float* __restrict__ x,
    const float* __restrict__ coef, const float* __restrict__ omega, int b, int d, int n) {
    const int total = b * d;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int ch = i % d;
        const float xv = x[i];
        float* hs = h + static_cast<size_t>(i) * n * 2;
        const float* cs = coef + static_cast<size_t>(ch) * n * 5;
        float acc = 0.0f;
        for (int k = 0; k < n; ++k) {
            const float p = cs[5 * k], qr = cs[5 * k + 1], qi = cs[5 * k + 2];
            const float hr = hs[2 * k], hi = hs[2 * k + 1];
            const float nr = p * xv + (qr * hr - qi * hi);
            const float ni = qr * hi + qi * hr;
            hs[2 * k] = nr;
            hs[2 * k + 1] = ni;
            acc += cs[5 * k + 3] * nr - cs[5 * k + 4] * ni;
        }
        y[i] = acc + omega[ch] * xv;
    }
}
