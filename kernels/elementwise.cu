// Elementwise buffer ops and row moves of the backend seam's memory section. CPU twins:
// src/backend/cpu/memory.rs (add_assign, scale, scatter_rows), src/backend/cpu/elementwise.rs
// (mul, add_scalar), src/backend/cpu/kv_cache.rs (kv_append), each one operation per element,
// so the results are bit-identical to the CPU backend's.
//
//   add_assign_f32:  dst[i] += src[i]
//   scale_f32:       buf[i] *= s
//   mul_f32:         out[i] = a[i] · b[i]
//   add_scalar_f32:  out[i] = x[i] + s
//   fill_f32:        out[i] = value                       (ones vectors of the bias GEMMs)
//   rows_copy_f32:   dst[dst_rows[k]·width + j] = src[src_rows[k]·src_stride + src_col + j]
//
// rows_copy_f32 serves scatter_rows (src_stride = width, src_col = 0) and kv_append (the key
// and value thirds of each qkv row: src_stride = 3c, src_col = c or 2c). The host (which owns
// the index arrays) keeps only the last occurrence of each destination row, so no two rows of
// one launch write the same destination: the CPU's "last one wins" without a race. A
// destination row ≥ dst_rows_total is a caller bug the host rejects first; the kernel skips it
// rather than write out of bounds.
//
// Launch: the elementwise kernels take any 1-D shape (threads stride over the n elements);
// rows_copy_f32 takes block (32, rows per block) with grid.x blocks striding over the k rows,
// one warp per row (lanes over columns, coalesced), as the MEGABYTE gathers.
#include "common.cuh"

namespace mega_elementwise {

__device__ __forceinline__ long long first_index() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long index_stride() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

}  // namespace mega_elementwise

// A named namespace, not an anonymous one: nvcc names anonymous-namespace symbols after a hash
// of the source path, which would make the PTX differ between checkouts.
using namespace mega_elementwise;

extern "C" __global__ void add_assign_f32(
    float* __restrict__ dst, const float* __restrict__ src, long long n) {
    for (long long i = first_index(); i < n; i += index_stride()) dst[i] += src[i];
}

extern "C" __global__ void scale_f32(float* __restrict__ buf, float s, long long n) {
    for (long long i = first_index(); i < n; i += index_stride()) buf[i] *= s;
}

extern "C" __global__ void mul_f32(
    float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b,
    long long n) {
    for (long long i = first_index(); i < n; i += index_stride()) out[i] = a[i] * b[i];
}

extern "C" __global__ void add_scalar_f32(
    float* __restrict__ out, const float* __restrict__ x, float s, long long n) {
    for (long long i = first_index(); i < n; i += index_stride()) out[i] = x[i] + s;
}

extern "C" __global__ void fill_f32(float* __restrict__ out, float value, long long n) {
    for (long long i = first_index(); i < n; i += index_stride()) out[i] = value;
}

// dst [dst_rows_total, width]; src rows of src_stride elements; dst_rows, src_rows [n_rows].
extern "C" __global__ void rows_copy_f32(
    float* __restrict__ dst, const float* __restrict__ src,
    const unsigned int* __restrict__ dst_rows, const unsigned int* __restrict__ src_rows,
    int n_rows, int width, int dst_rows_total, long long src_stride, int src_col) {
    const int stride = gridDim.x * blockDim.y;
    for (int k = blockIdx.x * blockDim.y + threadIdx.y; k < n_rows; k += stride) {
        const unsigned int r = dst_rows[k];
        if (r >= static_cast<unsigned int>(dst_rows_total)) continue;
        float* o = dst + static_cast<size_t>(r) * width;
        const float* s = src + static_cast<size_t>(src_rows[k]) * src_stride + src_col;
        for (int j = threadIdx.x; j < width; j += blockDim.x) o[j] = s[j];
    }
}
