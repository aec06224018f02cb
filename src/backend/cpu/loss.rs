//! Softmax losses on the CPU: per-row cross-entropy, its gradient, and log-softmax.

pub(super) mod vector_math;

use rayon::prelude::*;

use self::vector_math::{exp_shifted_scaled, has_avx2_fma, row_max, sum_exp_shifted};
use super::Real;

/// Elements (rows × vocabulary) per rayon task: a few microseconds of exp work.
const TASK_ELEMS: usize = 1 << 14;

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

/// Runs `$body::<F, FMA>` with `FMA = true` under AVX2+FMA code generation when the CPU has
/// them, else with the baseline instruction set.
macro_rules! dispatch_fma {
    ($avx2:ident, $plain:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2<F: Real>($($arg: $ty),*) {
            $plain::<F, true>($($arg),*)
        }
    };
}

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
    let rows = rows_per_task(v);
    let fma = has_avx2_fma();
    losses
        .par_chunks_mut(rows)
        .zip(logits.par_chunks(rows * v))
        .zip(targets.par_chunks(rows))
        .for_each(|((losses, logits), targets)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
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
    let rows = rows_per_task(v);
    let fma = has_avx2_fma();
    dlogits
        .par_chunks_mut(rows * v)
        .zip(logits.par_chunks(rows * v))
        .zip(targets.par_chunks(rows))
        .for_each(|((dlogits, logits), targets)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
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
    let rows = rows_per_task(v);
    let fma = has_avx2_fma();
    out.par_chunks_mut(rows * v)
        .zip(logits.par_chunks(rows * v))
        .for_each(|(out, logits)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                return unsafe { log_softmax_rows_avx2(out, logits, v) };
            }
            let _ = fma;
            log_softmax_rows::<F, false>(out, logits, v)
        });
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
