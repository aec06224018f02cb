//! Vectorizable row math shared by the softmax-style ops (attention and the losses): row max,
//! a polynomial `exp` for f32 (f64, used for gradient checks, keeps the library `exp`), fused
//! shift-exp-sum loops, dot products, and the runtime choice of the x86 instruction set.
//!
//! Every helper is `#[inline(always)]` and generic over `FMA`, so a caller compiled with
//! `#[target_feature(enable = "avx2,fma")]` gets 8-wide fused multiply-adds in these loops and
//! a plain caller gets baseline SSE2 code. Sums use independent lane accumulators because a
//! single running sum is a serial chain the compiler may neither reorder nor vectorize.

use std::any::TypeId;

use super::super::Real;

/// Width of the partial-sum lane arrays.
const LANES: usize = 8;

/// True when the running CPU has AVX2 and FMA, so kernels compiled for them may run.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a·b + c`, fused when `FMA` (only instantiate `FMA = true` inside FMA-enabled code, where
/// it is one instruction; elsewhere it would be a slow library call).
#[inline(always)]
pub(crate) fn madd<F: Real, const FMA: bool>(a: F, b: F, c: F) -> F {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The slice viewed as f32 when `F` is f32.
#[inline(always)]
fn as_f32<F: Real>(xs: &[F]) -> Option<&[f32]> {
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        // SAFETY: F is f32, so the memory is exactly `xs.len()` f32 values.
        Some(unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<f32>(), xs.len()) })
    } else {
        None
    }
}

/// The slice viewed as mutable f32 when `F` is f32.
#[inline(always)]
fn as_f32_mut<F: Real>(xs: &mut [F]) -> Option<&mut [f32]> {
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        // SAFETY: F is f32, so the memory is exactly `xs.len()` f32 values.
        Some(unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<f32>(), xs.len()) })
    } else {
        None
    }
}

/// `F` viewed as f32 when it is one (the scalar companion of [`as_f32`]).
#[inline(always)]
fn scalar_f32<F: Real>(x: F) -> f32 {
    x.to_f32().unwrap_or(f32::NAN)
}

/// `e^x` for f32 in straight-line arithmetic, so loops over it vectorize (the library `expf`
/// is an opaque call). Range reduction `x = n·ln2 + r`, `|r| ≤ ln2/2`, then a degree-7
/// polynomial for `e^r` (Cephes coefficients) and `2^n` built in the exponent bits. Relative
/// error about 1e-7. Inputs are clamped to `[-87, 88]`, so results below `e^-87 ≈ 1.6e-38`
/// read as that value instead of a denormal or zero, which no sum of softmax terms notices.
#[inline(always)]
pub(crate) fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const SHIFTER_BITS: i32 = 0x4B40_0000;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let shifted = madd::<f32, FMA>(x, std::f32::consts::LOG2_E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = madd::<f32, FMA>(-n, LN2_LO, madd::<f32, FMA>(-n, LN2_HI, x));
    let mut p = 1.987_569_2e-4_f32;
    p = madd::<f32, FMA>(p, r, 1.398_2e-3);
    p = madd::<f32, FMA>(p, r, 8.333_452e-3);
    p = madd::<f32, FMA>(p, r, 4.166_579_6e-2);
    p = madd::<f32, FMA>(p, r, 0.166_666_65);
    p = madd::<f32, FMA>(p, r, 0.5);
    let er = madd::<f32, FMA>(p, r * r, r) + 1.0;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(SHIFTER_BITS);
    let two_n = f32::from_bits(((n_int + 127) << 23) as u32);
    er * two_n
}

/// `max_i xs[i]` (`-inf` for an empty slice).
#[inline(always)]
pub(crate) fn row_max<F: Real>(xs: &[F]) -> F {
    let mut lanes = [F::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            // A compare-select (not `max`) so it maps to one vector max instruction.
            *m = if x > *m { x } else { *m };
        }
    }
    let mut m = F::neg_infinity();
    for &x in lanes.iter().chain(chunks.remainder()) {
        m = if x > m { x } else { m };
    }
    m
}

/// Sums the lane partial sums. Deliberately left to right: a pairwise tree here leads the
/// compiler's vectorizer to split the lane loop that feeds it into 2-wide pieces.
#[inline(always)]
fn fold_lanes<F: Real>(lanes: [F; LANES]) -> F {
    lanes.iter().fold(F::zero(), |s, &x| s + x)
}

/// `Σ_i e^(xs[i] − shift)`.
#[inline(always)]
pub(crate) fn sum_exp_shifted<F: Real, const FMA: bool>(xs: &[F], shift: F) -> F {
    if let Some(xs) = as_f32(xs) {
        let shift = scalar_f32(shift);
        let mut lanes = [0.0f32; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (s, &x) in lanes.iter_mut().zip(chunk) {
                *s += exp_f32::<FMA>(x - shift);
            }
        }
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|&x| exp_f32::<FMA>(x - shift))
            .sum();
        return F::from_f32(fold_lanes(lanes) + tail).unwrap_or_else(F::nan);
    }
    xs.iter().map(|&x| (x - shift).exp()).sum()
}

/// `xs[i] = e^(xs[i] − shift)`; returns the sum of the new values.
#[inline(always)]
pub(crate) fn exp_shifted_in_place<F: Real, const FMA: bool>(xs: &mut [F], shift: F) -> F {
    if let Some(xs) = as_f32_mut(xs) {
        let shift = scalar_f32(shift);
        let mut lanes = [0.0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in lanes.iter_mut().zip(chunk) {
                *x = exp_f32::<FMA>(*x - shift);
                *s += *x;
            }
        }
        let mut tail = 0.0f32;
        for x in chunks.into_remainder() {
            *x = exp_f32::<FMA>(*x - shift);
            tail += *x;
        }
        return F::from_f32(fold_lanes(lanes) + tail).unwrap_or_else(F::nan);
    }
    let mut sum = F::zero();
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        sum = sum + *x;
    }
    sum
}

/// `dst[i] = e^(src[i] − shift) · mul`.
#[inline(always)]
pub(crate) fn exp_shifted_scaled<F: Real, const FMA: bool>(
    dst: &mut [F],
    src: &[F],
    shift: F,
    mul: F,
) {
    debug_assert_eq!(dst.len(), src.len());
    if let (Some(src), Some(dst)) = (as_f32(src), as_f32_mut(dst)) {
        let (shift, mul) = (scalar_f32(shift), scalar_f32(mul));
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = exp_f32::<FMA>(x - shift) * mul;
        }
        return;
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = (x - shift).exp() * mul;
    }
}

/// `Σ_i a[i]·b[i]` in lane accumulators.
#[inline(always)]
pub(crate) fn dot<F: Real, const FMA: bool>(a: &[F], b: &[F]) -> F {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let full = n - n % LANES;
    let mut lanes = [F::zero(); LANES];
    let mut i = 0;
    while i < full {
        // Fixed-size views: the compiler then emits one full-width vector per step (with
        // plain slice chunks it has been seen to split the lanes into 2-wide pieces).
        let x: &[F; LANES] = a[i..i + LANES].try_into().unwrap();
        let y: &[F; LANES] = b[i..i + LANES].try_into().unwrap();
        for l in 0..LANES {
            lanes[l] = madd::<F, FMA>(x[l], y[l], lanes[l]);
        }
        i += LANES;
    }
    let mut tail = F::zero();
    for j in full..n {
        tail = madd::<F, FMA>(a[j], b[j], tail);
    }
    fold_lanes(lanes) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_exp_matches_library_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            for y in [exp_f32::<false>(x), exp_f32::<true>(x)] {
                let exact = (x as f64).exp();
                worst = worst.max(((y as f64) - exact).abs() / exact);
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn row_helpers_match_plain_loops() {
        let xs: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
            .collect();
        let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row_max(&xs), max);
        let naive: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let fast = sum_exp_shifted::<f32, false>(&xs, max) as f64;
        assert!((fast - naive).abs() < 1e-6 * naive);
        let mut ys = xs.clone();
        let s = exp_shifted_in_place::<f32, false>(&mut ys, max) as f64;
        assert!((s - naive).abs() < 1e-6 * naive);
        let d = dot::<f32, false>(&xs, &ys) as f64;
        let dn: f64 = xs.iter().zip(&ys).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((d - dn).abs() < 1e-5 * dn.abs().max(1.0));
    }
}
