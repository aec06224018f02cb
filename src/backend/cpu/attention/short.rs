//! Attention for short sequences (the MEGABYTE local model: thousands of independent rows
//! of a few positions). One task handles whole sequences, all heads at once: each sequence's
//! `[t, 3c]` block is copied into a local buffer (a linear copy the hardware prefetchers
//! follow), the heads read `q`, `k`, `v` from it in place, and the sequence's contiguous
//! output slice is assembled locally and copied out. At these sizes the tiled kernel's
//! per-head gathers and tile padding cost more than the arithmetic.
//!
//! Scores are dot products (no transposed copy of `k`); weighted sums of rows are
//! multiply-add sweeps over L1-resident rows.

use rayon::prelude::*;

use super::TASK_MACS;
use crate::backend::cpu::loss::vector_math::{dot, exp_shifted_in_place, madd, row_max};
use crate::backend::cpu::Real;

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
fn forward_sequence<F: Real, const FMA: bool>(
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
fn backward_sequence<F: Real, const FMA: bool>(
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

/// The short-sequence forward over all sequences, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    let n = sequences_per_task(t, c);
    out.par_chunks_mut(n * t * c)
        .zip(att.par_chunks_mut(n * h * t * t))
        .zip(qkv.par_chunks(n * t * 3 * c))
        .for_each(|((out, att), qkv)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { forward_sequences_avx2(out, att, qkv, t, c, h, scale) };
            }
            let _ = fma;
            forward_sequences::<F, false>(out, att, qkv, t, c, h, scale)
        });
}

/// Sequences per rayon task for the short-sequence kernels.
fn sequences_per_task(t: usize, c: usize) -> usize {
    (TASK_MACS / (t * t * c).max(1)).max(1)
}

/// Runs the short-sequence forward kernel over consecutive sequences. Each sequence's
/// `[t, 3c]` input is first copied into a local buffer and its output assembled in another:
/// working in place, the kernel hops between short head segments of rows `3c` apart, which
/// leaves the hardware prefetchers idle, while a straight copy streams (measured: 2.3×
/// faster on the local model once its buffers outgrow the last-level cache; software
/// prefetching of the next sequence gained nothing).
#[inline(always)]
fn forward_sequences<F: Real, const FMA: bool>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let mut x_local = vec![F::zero(); t * 3 * c];
    let mut out_local = vec![F::zero(); t * c];
    let seqs = out
        .chunks_exact_mut(t * c)
        .zip(att.chunks_exact_mut(h * t * t));
    for ((out, att), x) in seqs.zip(qkv.chunks_exact(t * 3 * c)) {
        x_local.copy_from_slice(x);
        forward_sequence::<F, FMA>(&mut out_local, att, &x_local, t, c, h, scale);
        out.copy_from_slice(&out_local);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn forward_sequences_avx2<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    forward_sequences::<F, true>(out, att, qkv, t, c, h, scale)
}

/// The short-sequence backward over all sequences, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    let n = sequences_per_task(t, c);
    dqkv.par_chunks_mut(n * t * 3 * c)
        .zip(dout.par_chunks(n * t * c))
        .zip(
            qkv.par_chunks(n * t * 3 * c)
                .zip(att.par_chunks(n * h * t * t)),
        )
        .for_each(|((dqkv, dout), (qkv, att))| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { backward_sequences_avx2(dqkv, dout, qkv, att, t, c, h, scale) };
            }
            let _ = fma;
            backward_sequences::<F, false>(dqkv, dout, qkv, att, t, c, h, scale)
        });
}

/// Runs the short-sequence backward kernel over consecutive sequences, staging each
/// sequence's blocks in local buffers as [`forward_sequences`] does.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_sequences<F: Real, const FMA: bool>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let mut ds = vec![F::zero(); t];
    let mut x_local = vec![F::zero(); t * 3 * c];
    let mut dx_local = vec![F::zero(); t * 3 * c];
    let mut dout_local = vec![F::zero(); t * c];
    let seqs = dqkv
        .chunks_exact_mut(t * 3 * c)
        .zip(dout.chunks_exact(t * c));
    let inputs = qkv.chunks_exact(t * 3 * c).zip(att.chunks_exact(h * t * t));
    for ((dx, dout), (x, att)) in seqs.zip(inputs) {
        x_local.copy_from_slice(x);
        dx_local.copy_from_slice(dx);
        dout_local.copy_from_slice(dout);
        backward_sequence::<F, FMA>(
            &mut dx_local,
            &dout_local,
            &x_local,
            att,
            &mut ds,
            t,
            c,
            h,
            scale,
        );
        dx.copy_from_slice(&dx_local);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn backward_sequences_avx2<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    backward_sequences::<F, true>(dqkv, dout, qkv, att, t, c, h, scale)
}
