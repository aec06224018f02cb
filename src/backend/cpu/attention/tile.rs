//! The register-tile product at the heart of the CPU attention kernels.
//!
//! Each call computes an `R × W` block of `C = A·B` over a range of the inner index, holding
//! the block in `R·W` accumulators (for f32 under AVX2: `R` rows of `W/8` vector registers).
//! Per inner step it loads one contiguous `W`-wide row of `B` and broadcasts `R` scalars of
//! `A`, so `A` may be read through any strides (a transposed view costs nothing) while `B`
//! must be row-major.

use std::ops::Range;

use super::super::loss::vector_math::madd;
use super::super::Real;

/// Rows of `A` handled per tile.
pub(super) const ROWS: usize = 4;

/// A read-only strided view `A(i, k) = data[i·row_stride + k·col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a, F> {
    pub data: &'a [F],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `Σ_{k ∈ ks} A(i0 + r, k) · b[k·ldb + n0 + w]` for `r < ROWS`, `w < W`.
#[inline(always)]
pub(super) fn tile<F: Real, const W: usize, const FMA: bool>(
    a: Strided<'_, F>,
    i0: usize,
    b: &[F],
    ldb: usize,
    n0: usize,
    ks: Range<usize>,
) -> [[F; W]; ROWS] {
    let mut acc = [[F::zero(); W]; ROWS];
    if ks.is_empty() {
        return acc;
    }
    // One up-front bounds check for the whole walk, so the loop body carries none.
    let last_a = (i0 + ROWS - 1) * a.row_stride + (ks.end - 1) * a.col_stride;
    let first_a = i0 * a.row_stride + ks.start * a.col_stride;
    assert!(last_a < a.data.len() && first_a < a.data.len());
    assert!((ks.end - 1) * ldb + n0 + W <= b.len());
    for k in ks {
        // SAFETY: `k < ks.end`, so every index is at most the maxima checked above.
        let brow = unsafe { &*b.as_ptr().add(k * ldb + n0).cast::<[F; W]>() };
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: as above, `(i0 + r)·row_stride + k·col_stride <= last_a`.
            let av = unsafe {
                *a.data
                    .get_unchecked((i0 + r) * a.row_stride + k * a.col_stride)
            };
            for (acc, &bv) in acc_row.iter_mut().zip(brow) {
                *acc = madd::<F, FMA>(av, bv, *acc);
            }
        }
    }
    acc
}
