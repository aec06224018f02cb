//! When CPU ops fan out over the rayon pool, and in which pieces.
//!
//! Every parallel loop in the CPU backend splits its work into pieces of at least
//! [`MIN_TASK_ELEMS`] elements, so the small ops of a decode step run inline on the calling
//! thread instead of paying for a hand-off to the pool. Splits never change results: each
//! output element is always computed by the same sequence of operations, whichever thread
//! runs it, so every op is deterministic.

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
