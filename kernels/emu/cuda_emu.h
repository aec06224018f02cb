// CUDA-on-CPU emulation header: lets g++ compile mega's kernel sources (kernels/*.cu) unchanged
// for the fiber emulator in cuemu_runtime.cpp. Written from the CUDA C++ Programming Guide's
// descriptions of each feature; see kernels/emu/README.md for the rules and what is not modelled.
//
// Force-included (`-include cuda_emu.h`) before every kernel TU; the stub headers in
// kernels/emu/include/ (cuda_runtime.h, cuda_bf16.h, mma.h, ...) just include it, so kernel
// files keep their usual #includes.
#pragma once
#ifndef CUEMU_CUDA_EMU_H
#define CUEMU_CUDA_EMU_H

// Every standard header comes first: the keyword macros below (__noinline__ in particular)
// would break libstdc++ if they were defined before it is parsed.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>

#include "cuemu_api.h"

#define CUEMU 1

// ---- keywords ------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// One OS thread runs all fibers of a block, so thread-local storage is exactly per-block
// storage. At block scope thread_local implies static, as __shared__ does.
#define __shared__ thread_local

// ---- vector types --------------------------------------------------------------------------

#define CUEMU_VEC1(T, N, A)                                                                   \
    struct __attribute__((aligned(A))) N##1 { T x; };                                         \
    inline N##1 make_##N##1(T x) { return N##1{x}; }
#define CUEMU_VEC2(T, N, A)                                                                   \
    struct __attribute__((aligned(A))) N##2 { T x, y; };                                      \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define CUEMU_VEC3(T, N, A)                                                                   \
    struct __attribute__((aligned(A))) N##3 { T x, y, z; };                                   \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define CUEMU_VEC4(T, N, A)                                                                   \
    struct __attribute__((aligned(A))) N##4 { T x, y, z, w; };                                \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
// Alignments as in CUDA's vector_types.h: 2- and 4-vectors are aligned to their full size
// (up to 16), 1- and 3-vectors to their element.
#define CUEMU_VECS(T, N)                                                                      \
    CUEMU_VEC1(T, N, sizeof(T))                                                               \
    CUEMU_VEC2(T, N, 2 * sizeof(T))                                                           \
    CUEMU_VEC3(T, N, sizeof(T))                                                               \
    CUEMU_VEC4(T, N, (4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)))
CUEMU_VECS(signed char, char)
CUEMU_VECS(unsigned char, uchar)
CUEMU_VECS(short, short)
CUEMU_VECS(unsigned short, ushort)
CUEMU_VECS(int, int)
CUEMU_VECS(unsigned int, uint)
CUEMU_VECS(long, long)
CUEMU_VECS(unsigned long, ulong)
CUEMU_VECS(long long, longlong)
CUEMU_VECS(unsigned long long, ulonglong)
CUEMU_VECS(float, float)
CUEMU_VECS(double, double)
#undef CUEMU_VECS
#undef CUEMU_VEC1
#undef CUEMU_VEC2
#undef CUEMU_VEC3
#undef CUEMU_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- built-in variables --------------------------------------------------------------------
//
// Per OS thread; the runtime rewrites threadIdx before resuming each fiber. Kernel code reloads
// them after every synchronization point because those are out-of-line calls.

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- runtime hooks (defined in cuemu_runtime.cpp) ------------------------------------------

namespace cuemu {

enum class BarrierKind : int { plain = 0, count = 1, all = 2, any = 3 };

enum class WarpOp : int {
    shfl_idx,
    shfl_up,
    shfl_down,
    shfl_xor,
    ballot,
    any,
    all,
    syncwarp,
    reduce_add,
    reduce_min_u,
    reduce_max_u,
    reduce_min_i,
    reduce_max_i,
    reduce_and,
    reduce_or,
    reduce_xor,
    match_any,
    match_all,
    // The warp-wide synchronization inside every nvcuda::wmma *_sync call: unlike __syncwarp,
    // all lanes must be at the same call.
    wmma,
};

// Waits at the block barrier; returns the count/and/or result for the predicate variants.
int block_barrier(BarrierKind kind, int predicate, const char* file, unsigned line);
// One lane's part of a warp collective; returns this lane's result bits. `arg` is the source
// lane, delta or xor mask of a shuffle; `pred_out` receives __match_all_sync's predicate.
std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, int arg, int width,
                              int* pred_out, const char* file, unsigned line);
// Lanes of the caller's warp that exist and have not exited.
unsigned live_lanes();
// Stops the launch with CUEMU_ERROR_KERNEL: kernel code broke a rule the emulator checks.
[[noreturn]] void kernel_error(const char* what, const char* file, unsigned line);
// A monotonically increasing per-OS-thread counter, for clock64().
long long clock_ticks();

template <typename T>
inline std::uint64_t to_bits(T v) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                  "warp collectives exchange scalars of at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(std::uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

}  // namespace cuemu

// ---- block synchronization -----------------------------------------------------------------

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
    cuemu::block_barrier(cuemu::BarrierKind::plain, 0, loc.file_name(), loc.line());
}
inline int __syncthreads_count(int predicate, std::source_location loc = std::source_location::current()) {
    return cuemu::block_barrier(cuemu::BarrierKind::count, predicate, loc.file_name(), loc.line());
}
inline int __syncthreads_and(int predicate, std::source_location loc = std::source_location::current()) {
    return cuemu::block_barrier(cuemu::BarrierKind::all, predicate, loc.file_name(), loc.line());
}
inline int __syncthreads_or(int predicate, std::source_location loc = std::source_location::current()) {
    return cuemu::block_barrier(cuemu::BarrierKind::any, predicate, loc.file_name(), loc.line());
}

// Fibers switch only at synchronization points and share one OS thread, so every access is
// already sequentially consistent; the fences only keep the compiler from reordering.
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap(std::source_location loc = std::source_location::current()) {
    cuemu::kernel_error("__trap()", loc.file_name(), loc.line());
}
inline long long clock64() { return cuemu::clock_ticks(); }

// ---- warp collectives ----------------------------------------------------------------------

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     std::source_location loc = std::source_location::current()) {
    return cuemu::from_bits<T>(cuemu::warp_collective(cuemu::WarpOp::shfl_idx, mask, cuemu::to_bits(var),
                                                      src_lane, width, nullptr, loc.file_name(), loc.line()));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location loc = std::source_location::current()) {
    return cuemu::from_bits<T>(cuemu::warp_collective(cuemu::WarpOp::shfl_up, mask, cuemu::to_bits(var),
                                                      static_cast<int>(delta), width, nullptr, loc.file_name(),
                                                      loc.line()));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location loc = std::source_location::current()) {
    return cuemu::from_bits<T>(cuemu::warp_collective(cuemu::WarpOp::shfl_down, mask, cuemu::to_bits(var),
                                                      static_cast<int>(delta), width, nullptr, loc.file_name(),
                                                      loc.line()));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         std::source_location loc = std::source_location::current()) {
    return cuemu::from_bits<T>(cuemu::warp_collective(cuemu::WarpOp::shfl_xor, mask, cuemu::to_bits(var),
                                                      lane_mask, width, nullptr, loc.file_name(), loc.line()));
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location loc = std::source_location::current()) {
    return static_cast<unsigned>(cuemu::warp_collective(cuemu::WarpOp::ballot, mask, predicate != 0, 0, warpSize,
                                                        nullptr, loc.file_name(), loc.line()));
}
inline int __any_sync(unsigned mask, int predicate, std::source_location loc = std::source_location::current()) {
    return static_cast<int>(cuemu::warp_collective(cuemu::WarpOp::any, mask, predicate != 0, 0, warpSize, nullptr,
                                                   loc.file_name(), loc.line()));
}
inline int __all_sync(unsigned mask, int predicate, std::source_location loc = std::source_location::current()) {
    return static_cast<int>(cuemu::warp_collective(cuemu::WarpOp::all, mask, predicate != 0, 0, warpSize, nullptr,
                                                   loc.file_name(), loc.line()));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
    cuemu::warp_collective(cuemu::WarpOp::syncwarp, mask, 0, 0, warpSize, nullptr, loc.file_name(), loc.line());
}
// The emulator cannot know which lanes a GPU would have converged; it answers with every
// lane that has not exited, the most a GPU could report.
inline unsigned __activemask() { return cuemu::live_lanes(); }

#define CUEMU_WARP_REDUCE(NAME, T, OP)                                                           \
    inline T NAME(unsigned mask, T value, std::source_location loc = std::source_location::current()) { \
        return static_cast<T>(cuemu::warp_collective(cuemu::WarpOp::OP, mask,                   \
                                                     static_cast<std::uint32_t>(value), 0, warpSize, \
                                                     nullptr, loc.file_name(), loc.line()));    \
    }
CUEMU_WARP_REDUCE(__reduce_add_sync, unsigned, reduce_add)
CUEMU_WARP_REDUCE(__reduce_add_sync, int, reduce_add)
CUEMU_WARP_REDUCE(__reduce_min_sync, unsigned, reduce_min_u)
CUEMU_WARP_REDUCE(__reduce_max_sync, unsigned, reduce_max_u)
CUEMU_WARP_REDUCE(__reduce_min_sync, int, reduce_min_i)
CUEMU_WARP_REDUCE(__reduce_max_sync, int, reduce_max_i)
CUEMU_WARP_REDUCE(__reduce_and_sync, unsigned, reduce_and)
CUEMU_WARP_REDUCE(__reduce_or_sync, unsigned, reduce_or)
CUEMU_WARP_REDUCE(__reduce_xor_sync, unsigned, reduce_xor)
#undef CUEMU_WARP_REDUCE

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, std::source_location loc = std::source_location::current()) {
    return static_cast<unsigned>(cuemu::warp_collective(cuemu::WarpOp::match_any, mask, cuemu::to_bits(value),
                                                        sizeof(T), warpSize, nullptr, loc.file_name(), loc.line()));
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred,
                                 std::source_location loc = std::source_location::current()) {
    return static_cast<unsigned>(cuemu::warp_collective(cuemu::WarpOp::match_all, mask, cuemu::to_bits(value),
                                                        sizeof(T), warpSize, pred, loc.file_name(), loc.line()));
}

// ---- integer and bit intrinsics ------------------------------------------------------------

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
           __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned sel = (s >> (4 * i)) & 7u;
        r |= static_cast<unsigned>((bytes >> (8 * sel)) & 0xffu) << (8 * i);
    }
    return r;
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __sad(int a, int b, unsigned c) { return c + static_cast<unsigned>(a > b ? a - b : b - a); }
inline unsigned __usad(unsigned a, unsigned b, unsigned c) { return c + (a > b ? a - b : b - a); }

// ---- float reinterpretation ----------------------------------------------------------------

inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __double2hiint(double x) { return static_cast<int>(std::bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(std::bit_cast<unsigned long long>(x)); }

// ---- math ----------------------------------------------------------------------------------
//
// The fast intrinsics are computed exactly (the GPU's are approximate): compare kernels to
// references with tolerances, never bitwise to a GPU.

inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __saturatef(float x) { return std::isnan(x) ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline void sincospif(float x, float* s, float* c) {
    *s = std::sin(static_cast<float>(M_PI) * x);
    *c = std::cos(static_cast<float>(M_PI) * x);
}
inline float sinpif(float x) { return std::sin(static_cast<float>(M_PI) * x); }
inline float cospif(float x) { return std::cos(static_cast<float>(M_PI) * x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * static_cast<float>(M_SQRT1_2)); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

// CUDA's integer min/max overloads accept mixed signedness and widths; these cover the
// combinations kernels write (min(int, unsigned) as in CUDA converts to unsigned).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }

// Read-only cache loads are plain loads here.
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }

// ---- atomics -------------------------------------------------------------------------------
//
// std::atomic_ref keeps them correct even if blocks ever run on several OS threads; within a
// block fibers never interleave inside one call anyway.

namespace cuemu {
template <typename T>
inline T atomic_update(T* address, T (*update)(T, T), T operand) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomics on 2, 4 or 8 bytes");
    using Bits = std::conditional_t<sizeof(T) == 2, std::uint16_t,
                                    std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>;
    std::atomic_ref<Bits> ref(*reinterpret_cast<Bits*>(address));
    Bits old_bits = ref.load(std::memory_order_relaxed);
    for (;;) {
        const T old_value = std::bit_cast<T>(old_bits);
        const Bits new_bits = std::bit_cast<Bits>(update(old_value, operand));
        if (ref.compare_exchange_weak(old_bits, new_bits, std::memory_order_relaxed)) return old_value;
    }
}
}  // namespace cuemu

inline int atomicAdd(int* a, int v) { return std::atomic_ref<int>(*a).fetch_add(v, std::memory_order_relaxed); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    return std::atomic_ref<unsigned>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicAdd(float* a, float v) {
    return std::atomic_ref<float>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* a, double v) {
    return std::atomic_ref<double>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline float2 atomicAdd(float2* a, float2 v) {
    return float2{atomicAdd(&a->x, v.x), atomicAdd(&a->y, v.y)};
}
inline int atomicSub(int* a, int v) { return std::atomic_ref<int>(*a).fetch_sub(v, std::memory_order_relaxed); }
inline unsigned atomicSub(unsigned* a, unsigned v) {
    return std::atomic_ref<unsigned>(*a).fetch_sub(v, std::memory_order_relaxed);
}
#define CUEMU_ATOMIC_EXCH(T)                                                                   \
    inline T atomicExch(T* a, T v) { return std::atomic_ref<T>(*a).exchange(v, std::memory_order_relaxed); }
CUEMU_ATOMIC_EXCH(int)
CUEMU_ATOMIC_EXCH(unsigned)
CUEMU_ATOMIC_EXCH(unsigned long long)
CUEMU_ATOMIC_EXCH(float)
#undef CUEMU_ATOMIC_EXCH
#define CUEMU_ATOMIC_CAS(T)                                                                    \
    inline T atomicCAS(T* a, T compare, T v) {                                                 \
        std::atomic_ref<T>(*a).compare_exchange_strong(compare, v, std::memory_order_relaxed); \
        return compare;                                                                        \
    }
CUEMU_ATOMIC_CAS(int)
CUEMU_ATOMIC_CAS(unsigned)
CUEMU_ATOMIC_CAS(unsigned long long)
CUEMU_ATOMIC_CAS(unsigned short)
#undef CUEMU_ATOMIC_CAS
#define CUEMU_ATOMIC_BINARY(NAME, T, EXPR)                                                     \
    inline T NAME(T* a, T v) {                                                                 \
        return cuemu::atomic_update<T>(a, [](T x, T y) -> T { return EXPR; }, v);             \
    }
CUEMU_ATOMIC_BINARY(atomicMax, int, x > y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMax, unsigned, x > y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMax, long long, x > y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMax, unsigned long long, x > y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMin, int, x < y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMin, unsigned, x < y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMin, long long, x < y ? x : y)
CUEMU_ATOMIC_BINARY(atomicMin, unsigned long long, x < y ? x : y)
CUEMU_ATOMIC_BINARY(atomicAnd, int, x & y)
CUEMU_ATOMIC_BINARY(atomicAnd, unsigned, x & y)
CUEMU_ATOMIC_BINARY(atomicAnd, unsigned long long, x & y)
CUEMU_ATOMIC_BINARY(atomicOr, int, x | y)
CUEMU_ATOMIC_BINARY(atomicOr, unsigned, x | y)
CUEMU_ATOMIC_BINARY(atomicOr, unsigned long long, x | y)
CUEMU_ATOMIC_BINARY(atomicXor, int, x ^ y)
CUEMU_ATOMIC_BINARY(atomicXor, unsigned, x ^ y)
CUEMU_ATOMIC_BINARY(atomicXor, unsigned long long, x ^ y)
CUEMU_ATOMIC_BINARY(atomicInc, unsigned, x >= y ? 0u : x + 1u)
CUEMU_ATOMIC_BINARY(atomicDec, unsigned, (x == 0u || x > y) ? y : x - 1u)
#undef CUEMU_ATOMIC_BINARY
#define CUEMU_ATOMIC_BLOCK_VARIANTS(NAME)                                                      \
    template <typename... A>                                                                   \
    inline auto NAME##_block(A... a) { return NAME(a...); }                                   \
    template <typename... A>                                                                   \
    inline auto NAME##_system(A... a) { return NAME(a...); }
CUEMU_ATOMIC_BLOCK_VARIANTS(atomicAdd)
CUEMU_ATOMIC_BLOCK_VARIANTS(atomicMax)
CUEMU_ATOMIC_BLOCK_VARIANTS(atomicMin)
CUEMU_ATOMIC_BLOCK_VARIANTS(atomicCAS)
CUEMU_ATOMIC_BLOCK_VARIANTS(atomicExch)
#undef CUEMU_ATOMIC_BLOCK_VARIANTS

// ---- 16-bit floats -------------------------------------------------------------------------

#include "cuemu_bf16.h"

// ---- tensor-core fragments -----------------------------------------------------------------

#include "cuemu_wmma.h"

// ---- kernel export (C ABI for the Rust launcher) -------------------------------------------

namespace cuemu {

template <typename U>
constexpr std::uint32_t arg_kind() {
    if constexpr (std::is_pointer_v<U>) {
        return CUEMU_ARG_POINTER;
    } else if constexpr (std::is_floating_point_v<U>) {
        return CUEMU_ARG_FLOAT;
    } else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) {
        return CUEMU_ARG_SIGNED;
    } else if constexpr (std::is_integral_v<U>) {
        return CUEMU_ARG_UNSIGNED;
    } else {
        return CUEMU_ARG_OTHER;
    }
}

template <typename T>
constexpr cuemu_arg_info arg_info() {
    using U = std::remove_cvref_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using E = std::remove_cv_t<std::remove_pointer_t<U>>;
        // Read-only parameters are `const T*`: the stream hazard checker counts every other
        // pointer as written (src/emu/hazards.rs).
        constexpr std::uint32_t read_only = std::is_const_v<std::remove_pointer_t<U>> ? 1u : 0u;
        if constexpr (std::is_void_v<E>) {
            return cuemu_arg_info{sizeof(U), CUEMU_ARG_POINTER, 0, CUEMU_ARG_OTHER, read_only};
        } else {
            return cuemu_arg_info{sizeof(U), CUEMU_ARG_POINTER, static_cast<std::uint32_t>(sizeof(E)), arg_kind<E>(),
                                  read_only};
        }
    } else {
        return cuemu_arg_info{static_cast<std::uint32_t>(sizeof(U)), arg_kind<U>(), 0, CUEMU_ARG_OTHER, 0};
    }
}

template <typename... Args>
struct KernelSignature {
    // One extra entry so a kernel without parameters still has a valid array.
    static constexpr cuemu_arg_info infos[sizeof...(Args) + 1] = {arg_info<Args>()..., cuemu_arg_info{0, 0, 0, 0, 0}};
    static constexpr cuemu_kernel_signature value{static_cast<std::uint32_t>(sizeof...(Args)), infos};
};

template <typename... Args>
constexpr const cuemu_kernel_signature* signature_of(void (*)(Args...)) {
    return &KernelSignature<Args...>::value;
}

template <typename... Args, std::size_t... I>
inline void invoke_unpacked(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cvref_t<Args>*>(params[I])...);
}

template <typename... Args>
inline void invoke_kernel(void (*kernel)(Args...), void** params) {
    invoke_unpacked(kernel, params, std::index_sequence_for<Args...>{});
}

}  // namespace cuemu

// Exports kernel `name` as `cuemu_thunk_<name>(void** params)` (cuLaunchKernel-style argument
// pointers) and `cuemu_signature_<name>()` (its parameter list, for argument checks).
#define CUEMU_EXPORT_KERNEL(name)                                                             \
    extern "C" void cuemu_thunk_##name(void** params) { ::cuemu::invoke_kernel(&name, params); } \
    extern "C" const cuemu_kernel_signature* cuemu_signature_##name() { return ::cuemu::signature_of(&name); }

// Defines a dynamic shared-memory name (`extern __shared__ T name[]` in kernels) as an alias of
// the one per-OS-thread storage array; used once per name in the runtime TU.
#define CUEMU_DEFINE_DYN_SMEM(name)                                                            \
    extern thread_local __attribute__((aligned(16))) unsigned char name[CUEMU_MAX_DYN_SMEM_BYTES] \
        __attribute__((alias("cuemu_dyn_smem_storage")));

#define CUEMU_MAX_DYN_SMEM_BYTES (227 * 1024)

#endif  // CUEMU_CUDA_EMU_H
