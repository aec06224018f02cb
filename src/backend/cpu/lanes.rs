//! Row reductions written with independent accumulators.
//!
//! A single running sum is a serial dependency chain the compiler may not reorder, so it
//! neither vectorizes nor pipelines; eight independent partial sums do both. The result
//! differs from a left-to-right sum only by rounding.

use super::Real;

const LANES: usize = 8;

/// `Σ f(i)` for `i in 0..len`, in eight interleaved partial sums.
#[inline(always)]
pub fn sum_by<F: Real>(len: usize, f: impl Fn(usize) -> F) -> F {
    let mut acc = [F::zero(); LANES];
    let full = len - len % LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *a + f(i + l);
        }
        i += LANES;
    }
    let mut tail = F::zero();
    for j in full..len {
        tail = tail + f(j);
    }
    let half = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (half[0] + half[2]) + (half[1] + half[3]) + tail
}
