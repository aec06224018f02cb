//! Softmax losses on the CPU: per-row cross-entropy, its gradient, and log-softmax.

use super::Real;

/// `losses[i] = logsumexp(logits[i]) − logits[i, targets[i]]` for `logits` `[n, v]`.
pub fn cross_entropy_forward<F: Real>(losses: &mut [F], logits: &[F], targets: &[u32], v: usize) {
    reference::cross_entropy_forward(losses, logits, targets, v)
}

/// `dlogits = (softmax(logits) − onehot(targets)) · dloss` (overwrites).
pub fn cross_entropy_backward<F: Real>(
    dlogits: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
    dloss: F,
) {
    reference::cross_entropy_backward(dlogits, logits, targets, v, dloss)
}

/// Row-wise `out = logits − logsumexp(logits)`.
pub fn log_softmax<F: Real>(out: &mut [F], logits: &[F], v: usize) {
    reference::log_softmax(out, logits, v)
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
