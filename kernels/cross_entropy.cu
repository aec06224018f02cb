// Fused softmax cross-entropy over rows of logits (f32), the loss of the byte-level models.
//
//   forward:  losses[r]    = logsumexp(logits[r, :]) − logits[r, targets[r]]        (nats)
//   backward: dlogits[r, j] = (softmax(logits[r, :])_j − [j == targets[r]]) · dloss
//
// Launch: one block per row (grid.x = rows; a smaller grid strides over the rows), block.x a
// multiple of 32 up to 1024 (256 is a good default for byte vocabularies). No dynamic shared
// memory. Each block reads its row once for the online-softmax statistics; the backward reads
// it a second time (from L1/L2) to write the gradient.
//
// A target ≥ vocab is a caller bug: its loss and its gradient row are NaN, so it shows up in
// the loss instead of faulting on an out-of-bounds read.
#include "common.cuh"

using mega::SoftmaxStats;

// Row statistics of `x[0..vocab)`, identical in every thread of the block.
// Contains barriers: every thread of the block must call it.
__device__ __forceinline__ SoftmaxStats row_softmax_stats(const float* x, int vocab, SoftmaxStats* scratch) {
    SoftmaxStats s = mega::softmax_stats_empty();
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        s = mega::softmax_stats_push(s, x[j]);
    }
    return mega::block_softmax_stats(s, scratch);
}

extern "C" __global__ void cross_entropy_forward_f32(
    float* __restrict__ losses,            // [n_rows]
    const float* __restrict__ logits,      // [n_rows, vocab]
    const unsigned int* __restrict__ targets,  // [n_rows]
    int n_rows,
    int vocab) {
    __shared__ SoftmaxStats scratch[mega::MAX_WARPS_PER_BLOCK];
    // The loop bound is the same for every thread of the block, so the barriers inside
    // block_softmax_stats are reached uniformly.
    for (int row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float* x = logits + static_cast<size_t>(row) * vocab;
        const SoftmaxStats s = row_softmax_stats(x, vocab, scratch);
        if (threadIdx.x == 0) {
            const unsigned int t = targets[row];
            // log(sum) + (max − x_t) keeps the two large terms from cancelling late.
            losses[row] = t < static_cast<unsigned int>(vocab) ? logf(s.sum) + (s.max - x[t]) : NAN;
        }
    }
}

// `dlogits` may alias `logits` (in-place gradient): all reads for the statistics finish
// before the block barrier, and afterwards each thread reads and then writes only its own
// elements. That is why neither pointer is __restrict__.
extern "C" __global__ void cross_entropy_backward_f32(
    float* dlogits,                        // [n_rows, vocab], overwritten
    const float* logits,                   // [n_rows, vocab]
    const unsigned int* __restrict__ targets,  // [n_rows]
    float dloss,                           // d(total loss)/d(losses[r]), the same for every row
    int n_rows,
    int vocab) {
    __shared__ SoftmaxStats scratch[mega::MAX_WARPS_PER_BLOCK];
    for (int row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const size_t offset = static_cast<size_t>(row) * vocab;
        const SoftmaxStats s = row_softmax_stats(logits + offset, vocab, scratch);
        const unsigned int t = targets[row];
        const bool valid = t < static_cast<unsigned int>(vocab);
        const float inv_sum = 1.0f / s.sum;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float p = expf(logits[offset + j] - s.max) * inv_sum;
            const float onehot = static_cast<unsigned int>(j) == t ? 1.0f : 0.0f;
            dlogits[offset + j] = valid ? (p - onehot) * dloss : NAN;
        }
    }
}
