//! When CPU ops fan out over the rayon pool, and in which pieces.
//!
//! Every parallel loop in the CPU backend splits its work into pieces of at least
//! [`MIN_TASK_ELEMS`] elements, so the small ops of a decode step run inline on the calling
//! thread instead of paying for a hand-off to the pool. Splits never change results: each
//! output element is always computed by the same sequence of operations, whichever thread
//! runs it, so every op is deterministic.

use rayon::prelude::*;

use super::Real;

/// Smallest piece of work (in elements touched) worth handing to another thread: a few
/// microseconds of streaming arithmetic, comfortably above rayon's per-task overhead.
pub const MIN_TASK_ELEMS: usize = 1 << 14;

/// Fixed chunk length for flat elementwise loops.
pub const ELEMWISE_CHUNK: usize = 1 << 13;

/// How many rows of width `d` make one parallel task.
pub fn min_rows(d: usize) -> usize {
    (MIN_TASK_ELEMS / d.max(1)).max(1)
}

/// Column-block width for reductions over rows (`Σ_i x[i, j]`): wide enough that each row
/// segment fills whole cache lines, narrow enough to leave a block per thread.
pub fn column_block(n_rows: usize, d: usize) -> usize {
    const LINE: usize = 16;
    if n_rows.saturating_mul(d) < 2 * MIN_TASK_ELEMS {
        return d.max(1);
    }
    let threads = rayon::current_num_threads().max(1);
    let per_thread = d.div_ceil(threads);
    per_thread.div_ceil(LINE).max(1) * LINE
}

/// Rows per block when a row-parallel pass also sums over rows (the weight gradients of the
/// norms). Fixed rather than derived from the thread count, so the summation order, and so
/// the result, never depends on the pool.
pub const REDUCE_BLOCK_ROWS: usize = 32;

/// Runs `f(first_row, block, partial)` over consecutive blocks of [`REDUCE_BLOCK_ROWS`] rows
/// of `rows` (width `d`), in parallel, each block with its own zeroed `partial` of `width`
/// elements to accumulate column sums into; returns the partials added in block order.
pub fn rows_with_column_sums<F: Real>(
    rows: &mut [F],
    d: usize,
    width: usize,
    f: impl Fn(usize, &mut [F], &mut [F]) + Sync + Send,
) -> Vec<F> {
    assert!(
        d > 0 && rows.len() % d == 0,
        "rows_with_column_sums: ragged rows"
    );
    let n = rows.len() / d;
    let blocks = n.div_ceil(REDUCE_BLOCK_ROWS);
    let mut partials = vec![F::zero(); blocks * width];
    let min_blocks = (MIN_TASK_ELEMS / (REDUCE_BLOCK_ROWS * d)).max(1);
    rows.par_chunks_mut(REDUCE_BLOCK_ROWS * d)
        .zip(partials.par_chunks_mut(width.max(1)))
        .enumerate()
        .with_min_len(min_blocks)
        .for_each(|(bi, (block, partial))| f(bi * REDUCE_BLOCK_ROWS, block, partial));
    let mut total = vec![F::zero(); width];
    for partial in partials.chunks_exact(width.max(1)) {
        total
            .iter_mut()
            .zip(partial)
            .for_each(|(t, &p)| *t = *t + p);
    }
    total
}
