// nvcuda::wmma emulation (part of cuda_emu.h; include that instead).
//
// Every lane of a warp holds the whole tile in its fragment (the GPU spreads it over the lanes
// in an unspecified layout), so element-wise loops over `frag.x[i]` that treat all elements
// alike behave as on the GPU, but code relying on which lane holds which element does not.
// Each *_sync operation is a warp collective (__syncwarp over the full warp), as CUDA requires
// all lanes to call it; products accumulate in float in k order (tensor cores do not), and
// load/store check CUDA's 256-bit pointer alignment and ldm rules.
#pragma once

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <typename T>
struct storage {
    using type = T;
};
template <>
struct storage<precision::tf32> {
    using type = float;
};

template <typename Use, int M, int N, int K>
struct shape {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
};

inline void check_pointer(const void* p, unsigned ldm, std::size_t element_bytes, const char* what,
                          std::source_location loc) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
        cuemu::kernel_error((std::string(what) + ": pointer not 256-bit aligned").c_str(), loc.file_name(),
                            loc.line());
    }
    if ((ldm * element_bytes) % 16 != 0) {
        cuemu::kernel_error((std::string(what) + ": ldm is not a multiple of 16 bytes").c_str(), loc.file_name(),
                            loc.line());
    }
}
// The warp-collective part of every *_sync call.
inline void warp_sync(std::source_location loc) {
    cuemu::warp_collective(cuemu::WarpOp::wmma, 0xffffffffu, 0, 0, 32, nullptr, loc.file_name(), loc.line());
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    using element_type = typename detail::storage<T>::type;
    static constexpr int rows = detail::shape<Use, M, N, K>::rows;
    static constexpr int cols = detail::shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v,
                          std::source_location loc = std::source_location::current()) {
    detail::warp_sync(loc);
    using E = typename fragment<Use, M, N, K, T, Layout>::element_type;
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<E>(static_cast<float>(v));
}

// Matrix A or B from memory, in the fragment's own layout.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm,
                             std::source_location loc = std::source_location::current()) {
    static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
    detail::check_pointer(p, ldm, sizeof(P), "wmma::load_matrix_sync", loc);
    detail::warp_sync(loc);
    using F = fragment<Use, M, N, K, T, Layout>;
    for (int r = 0; r < F::rows; ++r) {
        for (int c = 0; c < F::cols; ++c) {
            const P& v = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
            f.x[r * F::cols + c] = static_cast<typename F::element_type>(v);
        }
    }
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                             std::source_location loc = std::source_location::current()) {
    detail::check_pointer(p, ldm, sizeof(T), "wmma::load_matrix_sync", loc);
    detail::warp_sync(loc);
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
    }
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              std::source_location loc = std::source_location::current()) {
    detail::check_pointer(p, ldm, sizeof(T), "wmma::store_matrix_sync", loc);
    detail::warp_sync(loc);
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) {
            (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
        }
    }
}

// d = a · b + c, accumulated in float in k order.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     std::source_location loc = std::source_location::current()) {
    detail::warp_sync(loc);
    TC out[M * N];
    for (int i = 0; i < M; ++i) {
        for (int j = 0; j < N; ++j) {
            float acc = static_cast<float>(c.x[i * N + j]);
            for (int k = 0; k < K; ++k) {
                acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
            }
            out[i * N + j] = static_cast<TC>(acc);
        }
    }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

// Rounds to TF32 (10 explicit mantissa bits, round to nearest even), kept in a float.
inline float __float_to_tf32(float x) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
    return std::bit_cast<float>(u);
}

}  // namespace wmma
}  // namespace nvcuda
