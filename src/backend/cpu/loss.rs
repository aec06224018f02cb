//! Softmax losses on the CPU: per-row cross-entropy, its gradient, and log-softmax.
//!
//! Rows are independent, so tasks are blocks of rows; each row is two passes (max, then a
//! fused shift-exp-sum), compiled for baseline x86-64 and for AVX2+FMA and picked at run time.
//! The `vector_math` submodule also serves the attention kernels' softmax.

pub(super) mod vector_math;

use rayon::prelude::*;

use self::vector_math::{exp_shifted_scaled, has_avx2_fma, row_max, sum_exp_shifted};
use super::Real;

/// Elements (rows × vocabulary) per rayon task: a few microseconds of exp work.
const TASK_ELEMS: usize = 1 << 14;

/// Rows per rayon task for rows of `v` logits.
fn rows_per_task(v: usize) -> usize {
    (TASK_ELEMS / v.max(1)).max(1)
}

fn check_rows<F>(logits: &[F], n: usize, v: usize) {
    assert!(v > 0, "vocabulary size must be positive");
    assert_eq!(logits.len(), n * v, "logits must be [n, v] = [{n}, {v}]");
}

/// `logsumexp` of one row, max-shifted so no term overflows.
#[inline(always)]
fn logsumexp<F: Real, const FMA: bool>(row: &[F]) -> F {
    let max = row_max(row);
    max + sum_exp_shifted::<F, FMA>(row, max).ln()
}

/// Defines `$avx2`: `$plain::<F, true>` compiled with AVX2 and FMA enabled (x86-64 only).
/// Callers may run it only once `has_avx2_fma()` has said yes.
macro_rules! dispatch_fma {
    ($avx2:ident, $plain:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2<F: Real>($($arg: $ty),*) {
            $plain::<F, true>($($arg),*)
        }
    };
}

/// Cross-entropy of consecutive rows.
#[inline(always)]
fn ce_forward_rows<F: Real, const FMA: bool>(
    losses: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
) {
    for ((loss, row), &tgt) in losses.iter_mut().zip(logits.chunks_exact(v)).zip(targets) {
        let tgt = tgt as usize;
        assert!(tgt < v, "target {tgt} outside vocabulary {v}");
        *loss = logsumexp::<F, FMA>(row) - row[tgt];
    }
}
dispatch_fma!(ce_forward_rows_avx2, ce_forward_rows, (losses: &mut [F], logits: &[F], targets: &[u32], v: usize));

/// Cross-entropy gradient of consecutive rows.
#[inline(always)]
fn ce_backward_rows<F: Real, const FMA: bool>(
    dlogits: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
    dloss: F,
) {
    for ((drow, row), &tgt) in dlogits
        .chunks_exact_mut(v)
        .zip(logits.chunks_exact(v))
        .zip(targets)
    {
        let tgt = tgt as usize;
        assert!(tgt < v, "target {tgt} outside vocabulary {v}");
        exp_shifted_scaled::<F, FMA>(drow, row, logsumexp::<F, FMA>(row), dloss);
        drow[tgt] = drow[tgt] - dloss;
    }
}
dispatch_fma!(ce_backward_rows_avx2, ce_backward_rows, (dlogits: &mut [F], logits: &[F], targets: &[u32], v: usize, dloss: F));

/// Log-softmax of consecutive rows.
#[inline(always)]
fn log_softmax_rows<F: Real, const FMA: bool>(out: &mut [F], logits: &[F], v: usize) {
    for (orow, row) in out.chunks_exact_mut(v).zip(logits.chunks_exact(v)) {
        let lse = logsumexp::<F, FMA>(row);
        for (o, &x) in orow.iter_mut().zip(row) {
            *o = x - lse;
        }
    }
}
dispatch_fma!(log_softmax_rows_avx2, log_softmax_rows, (out: &mut [F], logits: &[F], v: usize));

/// `losses[i] = logsumexp(logits[i]) − logits[i, targets[i]]` for `logits` `[n, v]`.
pub fn cross_entropy_forward<F: Real>(losses: &mut [F], logits: &[F], targets: &[u32], v: usize) {
    let n = targets.len();
    check_rows(logits, n, v);
    assert_eq!(losses.len(), n, "losses must be [n] = [{n}]");
    cross_entropy_forward_with(losses, logits, targets, v, has_avx2_fma());
}

/// [`cross_entropy_forward`] after validation, on the AVX2+FMA path when `fma`.
fn cross_entropy_forward_with<F: Real>(
    losses: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
    fma: bool,
) {
    let rows = rows_per_task(v);
    losses
        .par_chunks_mut(rows)
        .zip(logits.par_chunks(rows * v))
        .zip(targets.par_chunks(rows))
        .for_each(|((losses, logits), targets)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { ce_forward_rows_avx2(losses, logits, targets, v) };
            }
            let _ = fma;
            ce_forward_rows::<F, false>(losses, logits, targets, v)
        });
}

/// `dlogits = (softmax(logits) − onehot(targets)) · dloss` (overwrites).
pub fn cross_entropy_backward<F: Real>(
    dlogits: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
    dloss: F,
) {
    let n = targets.len();
    check_rows(logits, n, v);
    assert_eq!(dlogits.len(), n * v, "dlogits must be [n, v] = [{n}, {v}]");
    cross_entropy_backward_with(dlogits, logits, targets, v, dloss, has_avx2_fma());
}

/// [`cross_entropy_backward`] after validation, on the AVX2+FMA path when `fma`.
fn cross_entropy_backward_with<F: Real>(
    dlogits: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
    dloss: F,
    fma: bool,
) {
    let rows = rows_per_task(v);
    dlogits
        .par_chunks_mut(rows * v)
        .zip(logits.par_chunks(rows * v))
        .zip(targets.par_chunks(rows))
        .for_each(|((dlogits, logits), targets)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { ce_backward_rows_avx2(dlogits, logits, targets, v, dloss) };
            }
            let _ = fma;
            ce_backward_rows::<F, false>(dlogits, logits, targets, v, dloss)
        });
}

/// Row-wise `out = logits − logsumexp(logits)`.
pub fn log_softmax<F: Real>(out: &mut [F], logits: &[F], v: usize) {
    assert!(v > 0, "vocabulary size must be positive");
    assert_eq!(
        logits.len() % v,
        0,
        "logits length must be a multiple of v = {v}"
    );
    assert_eq!(out.len(), logits.len(), "out must match logits");
    log_softmax_with(out, logits, v, has_avx2_fma());
}

/// [`log_softmax`] after validation, on the AVX2+FMA path when `fma`.
fn log_softmax_with<F: Real>(out: &mut [F], logits: &[F], v: usize, fma: bool) {
    let rows = rows_per_task(v);
    out.par_chunks_mut(rows * v)
        .zip(logits.par_chunks(rows * v))
        .for_each(|(out, logits)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { log_softmax_rows_avx2(out, logits, v) };
            }
            let _ = fma;
            log_softmax_rows::<F, false>(out, logits, v)
        });
}

#[cfg(test)]
mod tests {
    //! The fast paths on every instruction set this CPU offers (the public functions take
    //! only the best one).

    use super::*;

    #[test]
    fn every_instruction_set_matches_reference() {
        let sets = if has_avx2_fma() {
            vec![false, true]
        } else {
            vec![false]
        };
        for v in [1usize, 5, 256, 259] {
            let n = 7;
            let logits: Vec<f32> = (0..n * v)
                .map(|i| ((i * 7919) % 263) as f32 * 0.05 - 6.0)
                .collect();
            let targets: Vec<u32> = (0..n).map(|i| ((i * 31) % v) as u32).collect();
            let (mut l_ref, mut d_ref, mut s_ref) =
                (vec![0.0; n], vec![0.0; n * v], vec![0.0; n * v]);
            reference::cross_entropy_forward(&mut l_ref, &logits, &targets, v);
            reference::cross_entropy_backward(&mut d_ref, &logits, &targets, v, 0.25);
            reference::log_softmax(&mut s_ref, &logits, v);
            for fma in sets.iter().copied() {
                let (mut l, mut d, mut s) = (
                    vec![f32::NAN; n],
                    vec![f32::NAN; n * v],
                    vec![f32::NAN; n * v],
                );
                cross_entropy_forward_with(&mut l, &logits, &targets, v, fma);
                cross_entropy_backward_with(&mut d, &logits, &targets, v, 0.25, fma);
                log_softmax_with(&mut s, &logits, v, fma);
                for (got, want) in [(&l, &l_ref), (&d, &d_ref), (&s, &s_ref)] {
                    for (g, w) in got.iter().zip(want.iter()) {
                        assert!(
                            (g - w).abs() <= 2e-6 * (1.0 + w.abs()),
                            "v={v} fma={fma}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    fn logsumexp<F: Real>(row: &[F]) -> F {
        let max = row.iter().fold(F::neg_infinity(), |m, &x| m.max(x));
        let sum: F = row.iter().map(|&x| (x - max).exp()).sum();
        max + sum.ln()
    }

    /// Reference of [`super::cross_entropy_forward`].
    pub fn cross_entropy_forward<F: Real>(
        losses: &mut [F],
        logits: &[F],
        targets: &[u32],
        v: usize,
    ) {
        let n = targets.len();
        assert_eq!(losses.len(), n);
        assert_eq!(logits.len(), n * v);
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let tgt = targets[i] as usize;
            assert!(tgt < v, "target {tgt} outside vocabulary {v}");
            losses[i] = logsumexp(row) - row[tgt];
        }
    }

    /// Reference of [`super::cross_entropy_backward`].
    pub fn cross_entropy_backward<F: Real>(
        dlogits: &mut [F],
        logits: &[F],
        targets: &[u32],
        v: usize,
        dloss: F,
    ) {
        let n = targets.len();
        assert_eq!(dlogits.len(), n * v);
        assert_eq!(logits.len(), n * v);
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let lse = logsumexp(row);
            let tgt = targets[i] as usize;
            assert!(tgt < v, "target {tgt} outside vocabulary {v}");
            for j in 0..v {
                let onehot = if j == tgt { F::one() } else { F::zero() };
                dlogits[i * v + j] = ((row[j] - lse).exp() - onehot) * dloss;
            }
        }
    }

    /// Reference of [`super::log_softmax`].
    pub fn log_softmax<F: Real>(out: &mut [F], logits: &[F], v: usize) {
        assert_eq!(out.len(), logits.len());
        assert_eq!(logits.len() % v, 0);
        for (orow, row) in out.chunks_mut(v).zip(logits.chunks(v)) {
            let lse = logsumexp(row);
            for (o, &x) in orow.iter_mut().zip(row) {
                *o = x - lse;
            }
        }
    }
}
