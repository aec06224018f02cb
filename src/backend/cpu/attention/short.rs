//! Attention for short sequences (the MEGABYTE local model: thousands of independent rows
//! of a few positions). One task handles whole sequences, all heads, reading `q`, `k`, `v`
//! in place from `qkv` and writing its sequence's contiguous slice of the outputs: at these
//! sizes the tiled kernel's gathers and padding cost more than the arithmetic, and streaming
//! each sequence's `[t, 3c]` block once keeps the memory traffic at its minimum.
//!
//! Scores are dot products (no transposed copy of `k`); weighted sums of rows are
//! multiply-add sweeps over L1-resident rows.

use super::super::loss::vector_math::{dot, exp_shifted_in_place, madd, row_max};
use super::super::Real;

/// `dst (= or +=) a·x`, elementwise.
#[inline(always)]
fn axpy<F: Real, const FMA: bool>(dst: &mut [F], a: F, x: &[F], overwrite: bool) {
    if overwrite {
        for (d, &x) in dst.iter_mut().zip(x) {
            *d = a * x;
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(x) {
            *d = madd::<F, FMA>(a, x, *d);
        }
    }
}

/// Normalises `row[..=i]` into softmax probabilities and zeros `row[i+1..]`.
#[inline(always)]
fn causal_softmax_row<F: Real, const FMA: bool>(row: &mut [F], i: usize) {
    let (live, masked) = row.split_at_mut(i + 1);
    let max = row_max(live);
    let inv = F::one() / exp_shifted_in_place::<F, FMA>(live, max);
    for p in live.iter_mut() {
        *p = *p * inv;
    }
    masked.fill(F::zero());
}

/// Forward pass of one sequence: `x` `[t, 3c]`, `out` `[t, c]`, `att` `[h, t, t]`.
#[inline(always)]
pub(super) fn forward_sequence<F: Real, const FMA: bool>(
    out: &mut [F],
    att: &mut [F],
    x: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let hs = c / h;
    let row = |i: usize, part: usize, hi: usize| &x[i * 3 * c + part * c + hi * hs..][..hs];
    for hi in 0..h {
        for i in 0..t {
            let probs = &mut att[(hi * t + i) * t..][..t];
            let q = row(i, 0, hi);
            for (j, s) in probs.iter_mut().enumerate().take(i + 1) {
                *s = dot::<F, FMA>(q, row(j, 1, hi)) * scale;
            }
            causal_softmax_row::<F, FMA>(probs, i);
            let o = &mut out[i * c + hi * hs..][..hs];
            for (j, &p) in probs.iter().enumerate().take(i + 1) {
                axpy::<F, FMA>(o, p, row(j, 2, hi), j == 0);
            }
        }
    }
}

/// Backward pass of one sequence: `dx += …` for `dx`, `x` `[t, 3c]`, given `dout` `[t, c]`,
/// the saved `att` `[h, t, t]`, and a `t`-long scratch row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_sequence<F: Real, const FMA: bool>(
    dx: &mut [F],
    dout: &[F],
    x: &[F],
    att: &[F],
    ds: &mut [F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let hs = c / h;
    let at = |i: usize, part: usize, hi: usize| i * 3 * c + part * c + hi * hs;
    for hi in 0..h {
        for i in 0..t {
            let probs = &att[(hi * t + i) * t..][..i + 1];
            let dout_i = &dout[i * c + hi * hs..][..hs];
            let ds = &mut ds[..i + 1];
            // dP[j] = dout_i · v_j, then the softmax Jacobian: dS = P ⊙ (dP − P·dP)·scale.
            for (j, d) in ds.iter_mut().enumerate() {
                *d = dot::<F, FMA>(dout_i, &x[at(j, 2, hi)..][..hs]);
            }
            let centre = dot::<F, FMA>(probs, ds);
            for (d, &p) in ds.iter_mut().zip(probs) {
                *d = p * (*d - centre) * scale;
            }
            for j in 0..=i {
                axpy::<F, FMA>(&mut dx[at(j, 2, hi)..][..hs], probs[j], dout_i, false);
                axpy::<F, FMA>(
                    &mut dx[at(j, 1, hi)..][..hs],
                    ds[j],
                    &x[at(i, 0, hi)..][..hs],
                    false,
                );
            }
            let dq = &mut dx[at(i, 0, hi)..][..hs];
            for (j, &d) in ds.iter().enumerate() {
                axpy::<F, FMA>(dq, d, &x[at(j, 1, hi)..][..hs], false);
            }
        }
    }
}
