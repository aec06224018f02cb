// Row softmax kernels (f32) for attention through GEMMs — the unfused path, where the scores
// of each (batch, head) pair are a materialised [t, t] matrix in global memory — and the
// log-softmax of logits.
//
//   causal_softmax_forward_f32:  rows of [rows, t], row r holding the scores of query
//       i = r mod t against keys 0..t (the [b·h, t, t] layout of the attention probabilities):
//       p[r, j] = exp(scale·s[r, j] − m) / Σ_{j' ≤ i} exp(scale·s[r, j'] − m)  for j ≤ i,
//       p[r, j] = 0                                                            for j > i,
//       with m = max_{j ≤ i} scale·s[r, j] (numerically stable; scores above the diagonal are
//       never read, so they may hold anything).
//   causal_softmax_backward_f32: dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) over j ≤ i, 0 above the
//       diagonal (the gradient w.r.t. the unscaled scores of the forward).
//   log_softmax_f32: out[r, j] = x[r, j] − (max_j x[r, j] + log Σ_j exp(x[r, j] − max)).
//
// Launch (all three): one warp per row, block (32, SOFTMAX_ROWS_PER_BLOCK), grid.x blocks; a
// grid smaller than rows / SOFTMAX_ROWS_PER_BLOCK strides over the rows. No shared memory and
// no block barriers: each warp owns its rows, and its lanes take columns j ≡ lane (mod 32).
//
// In place: the output may alias an input (probabilities over the scores, dS over dP, log-
// probabilities over the logits). Every lane writes only the elements it read itself, after
// its reads of them, so neither pointer is __restrict__.
#include "common.cuh"

namespace mega_softmax {

constexpr int SOFTMAX_ROWS_PER_BLOCK = 8;
static_assert(SOFTMAX_ROWS_PER_BLOCK * mega::WARP_SIZE <= 1024, "a block holds at most 1024 threads");

}  // namespace mega_softmax

extern "C" __global__ void causal_softmax_forward_f32(
    float* probs,         // [rows, t], written (may alias scores)
    const float* scores,  // [rows, t], unscaled
    int rows,
    int t,
    float scale) {
    const int lane = threadIdx.x;
    for (long long row = mega::warp_first_row(); row < rows; row += mega::warp_row_step()) {
        const size_t offset = static_cast<size_t>(row) * t;
        const int keys = static_cast<int>(row % t) + 1;
        float m = -INFINITY;
        for (int j = lane; j < keys; j += mega::WARP_SIZE) {
            m = fmaxf(m, scores[offset + j] * scale);
        }
        m = mega::warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < keys; j += mega::WARP_SIZE) {
            sum += expf(scores[offset + j] * scale - m);
        }
        sum = mega::warp_sum(sum);
        for (int j = lane; j < t; j += mega::WARP_SIZE) {
            probs[offset + j] = j < keys ? expf(scores[offset + j] * scale - m) / sum : 0.0f;
        }
    }
}

extern "C" __global__ void causal_softmax_backward_f32(
    float* dscores,       // [rows, t], written (may alias dprobs)
    const float* probs,   // [rows, t], the forward's output
    const float* dprobs,  // [rows, t]
    int rows,
    int t,
    float scale) {
    const int lane = threadIdx.x;
    for (long long row = mega::warp_first_row(); row < rows; row += mega::warp_row_step()) {
        const size_t offset = static_cast<size_t>(row) * t;
        const int keys = static_cast<int>(row % t) + 1;
        float dot = 0.0f;
        for (int j = lane; j < keys; j += mega::WARP_SIZE) {
            dot += probs[offset + j] * dprobs[offset + j];
        }
        dot = mega::warp_sum(dot);
        for (int j = lane; j < t; j += mega::WARP_SIZE) {
            dscores[offset + j] =
                j < keys ? probs[offset + j] * (dprobs[offset + j] - dot) * scale : 0.0f;
        }
    }
}

extern "C" __global__ void log_softmax_f32(
    float* out,           // [rows, v], written (may alias logits)
    const float* logits,  // [rows, v]
    int rows,
    int v) {
    const int lane = threadIdx.x;
    for (long long row = mega::warp_first_row(); row < rows; row += mega::warp_row_step()) {
        const size_t offset = static_cast<size_t>(row) * v;
        float m = -INFINITY;
        for (int j = lane; j < v; j += mega::WARP_SIZE) m = fmaxf(m, logits[offset + j]);
        m = mega::warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < v; j += mega::WARP_SIZE) sum += expf(logits[offset + j] - m);
        const float lse = m + logf(mega::warp_sum(sum));
        for (int j = lane; j < v; j += mega::WARP_SIZE) out[offset + j] = logits[offset + j] - lse;
    }
}
