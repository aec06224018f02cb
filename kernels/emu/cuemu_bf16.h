// bfloat16 and half types for the emulator (part of cuda_emu.h; include that instead).
//
// __nv_bfloat16: the upper 16 bits of an IEEE float, converted from float with
// round-to-nearest-even and every NaN mapped to the canonical 0x7fff, as NVIDIA's host
// conversion does. Arithmetic goes through float, one rounding per operation. Like CUDA's
// type it converts implicitly to and from float, so `bf16 * 2.0f` is ambiguous here too.
// __half: built on GCC's _Float16 (IEEE binary16, round-to-nearest-even).
#pragma once

namespace cuemu {
inline std::uint16_t float_to_bf16_bits_rn(float f) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding) >> 16);
}
inline std::uint16_t float_to_bf16_bits_rz(float f) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<std::uint16_t>(u >> 16);
}
inline float bf16_bits_to_float(std::uint16_t b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }
}  // namespace cuemu

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(cuemu::float_to_bf16_bits_rn(f)) {}
    __nv_bfloat16(double d) : __x(cuemu::float_to_bf16_bits_rn(static_cast<float>(d))) {}
    __nv_bfloat16(int i) : __x(cuemu::float_to_bf16_bits_rn(static_cast<float>(i))) {}
    __nv_bfloat16(unsigned i) : __x(cuemu::float_to_bf16_bits_rn(static_cast<float>(i))) {}
    operator float() const { return cuemu::bf16_bits_to_float(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    __nv_bfloat16& operator=(float f) { __x = cuemu::float_to_bf16_bits_rn(f); return *this; }
};

struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};

using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline __nv_bfloat16 __bf16_from_bits(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __bf16_from_bits(cuemu::float_to_bf16_bits_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __bf16_from_bits(cuemu::float_to_bf16_bits_rz(f)); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(static_cast<float>(d)); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16(static_cast<float>(i)); }
inline float __bfloat162float(__nv_bfloat16 b) { return cuemu::bf16_bits_to_float(b.__x); }
inline int __bfloat162int_rn(__nv_bfloat16 b) { return static_cast<int>(std::nearbyint(__bfloat162float(b))); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __bf16_from_bits(u); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __bf16_from_bits(static_cast<unsigned short>(s)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162(__float2bfloat16(a), __float2bfloat16(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }

#define CUEMU_BF16_BINARY(NAME, OP)                                                            \
    inline __nv_bfloat16 NAME(__nv_bfloat16 a, __nv_bfloat16 b) {                              \
        return __float2bfloat16(__bfloat162float(a) OP __bfloat162float(b));                   \
    }                                                                                          \
    inline __nv_bfloat162 NAME##2(__nv_bfloat162 a, __nv_bfloat162 b) {                        \
        return __nv_bfloat162(NAME(a.x, b.x), NAME(a.y, b.y));                                 \
    }
CUEMU_BF16_BINARY(__hadd, +)
CUEMU_BF16_BINARY(__hsub, -)
CUEMU_BF16_BINARY(__hmul, *)
CUEMU_BF16_BINARY(__hdiv, /)
#undef CUEMU_BF16_BINARY
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __float2bfloat16(std::fma(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c)));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return __nv_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return __bf16_from_bits(a.__x ^ 0x8000u); }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return __bf16_from_bits(a.__x & 0x7fffu); }
inline bool __hisnan(__nv_bfloat16 a) { return std::isnan(__bfloat162float(a)); }
inline bool __hisinf(__nv_bfloat16 a) { return std::isinf(__bfloat162float(a)); }
inline bool __heq(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) == __bfloat162float(b); }
inline bool __hne(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) != __bfloat162float(b); }
inline bool __hlt(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) < __bfloat162float(b); }
inline bool __hle(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) <= __bfloat162float(b); }
inline bool __hgt(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) > __bfloat162float(b); }
inline bool __hge(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) >= __bfloat162float(b); }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __float2bfloat16(std::fmax(__bfloat162float(a), __bfloat162float(b)));
}
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __float2bfloat16(std::fmin(__bfloat162float(a), __bfloat162float(b)));
}
#define CUEMU_BF16_OPERATOR(OP)                                                                \
    inline __nv_bfloat16 operator OP(__nv_bfloat16 a, __nv_bfloat16 b) {                       \
        return __float2bfloat16(__bfloat162float(a) OP __bfloat162float(b));                   \
    }                                                                                          \
    inline __nv_bfloat16& operator OP##=(__nv_bfloat16& a, __nv_bfloat16 b) { return a = a OP b; }
CUEMU_BF16_OPERATOR(+)
CUEMU_BF16_OPERATOR(-)
CUEMU_BF16_OPERATOR(*)
CUEMU_BF16_OPERATOR(/)
#undef CUEMU_BF16_OPERATOR
inline __nv_bfloat16 operator-(__nv_bfloat16 a) { return __hneg(a); }

inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
    return cuemu::atomic_update<__nv_bfloat16>(a, [](__nv_bfloat16 x, __nv_bfloat16 y) { return x + y; }, v);
}

// ---- half ----------------------------------------------------------------------------------

struct __half_raw {
    unsigned short x;
};

struct __align__(2) __half {
    _Float16 __v;
    __half() = default;
    __half(const __half_raw& r) : __v(std::bit_cast<_Float16>(r.x)) {}
    __half(float f) : __v(static_cast<_Float16>(f)) {}
    __half(double d) : __v(static_cast<_Float16>(d)) {}
    __half(int i) : __v(static_cast<_Float16>(i)) {}
    operator float() const { return static_cast<float>(__v); }
    operator __half_raw() const { return __half_raw{std::bit_cast<unsigned short>(__v)}; }
};

struct __align__(4) __half2 {
    __half x, y;
    __half2() = default;
    __half2(__half a, __half b) : x(a), y(b) {}
};

using half = __half;
using half2 = __half2;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h.__v); }
inline unsigned short __half_as_ushort(__half h) { return std::bit_cast<unsigned short>(h.__v); }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline __half __hadd(__half a, __half b) { return __half(__half2float(a) + __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __half(__half2float(a) * __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __half(__half2float(a) - __half2float(b)); }
inline __half __hfma(__half a, __half b, __half c) {
    return __half(std::fma(__half2float(a), __half2float(b), __half2float(c)));
}
inline bool __hisnan(__half a) { return std::isnan(__half2float(a)); }
#define CUEMU_HALF_OPERATOR(OP)                                                                \
    inline __half operator OP(__half a, __half b) { return __half(__half2float(a) OP __half2float(b)); } \
    inline __half& operator OP##=(__half& a, __half b) { return a = a OP b; }
CUEMU_HALF_OPERATOR(+)
CUEMU_HALF_OPERATOR(-)
CUEMU_HALF_OPERATOR(*)
CUEMU_HALF_OPERATOR(/)
#undef CUEMU_HALF_OPERATOR

inline __half atomicAdd(__half* a, __half v) {
    return cuemu::atomic_update<__half>(a, [](__half x, __half y) { return x + y; }, v);
}
