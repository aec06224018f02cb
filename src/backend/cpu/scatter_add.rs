//! Deterministic row scatter-add, the backward of every table lookup.
//!
//! Parallelising over source rows would race (two ids hitting one table row) or, with
//! atomics, make the sum order depend on thread timing. Instead source rows are first
//! grouped by destination row, keeping source order within each group, and the pool then
//! splits over destination rows: each table row receives its contributions in increasing
//! source order, exactly as the sequential loop would add them.

use rayon::prelude::*;

use super::parallel::MIN_TASK_ELEMS;
use super::Real;

/// Source rows grouped by destination row, in increasing source order (CSR layout).
struct Groups {
    /// `sources[offsets[r]..offsets[r + 1]]` are the source rows landing on row `r`.
    offsets: Vec<usize>,
    sources: Vec<usize>,
}

impl Groups {
    fn new(n_dst: usize, n_src: usize, target: &impl Fn(usize) -> Option<usize>) -> Self {
        let mut offsets = vec![0usize; n_dst + 1];
        for i in 0..n_src {
            if let Some(r) = target(i) {
                assert!(
                    r < n_dst,
                    "scatter-add: destination row {r} out of range {n_dst}"
                );
                offsets[r + 1] += 1;
            }
        }
        for r in 0..n_dst {
            offsets[r + 1] += offsets[r];
        }
        let mut next = offsets[..n_dst].to_vec();
        let mut sources = vec![0usize; offsets[n_dst]];
        for i in 0..n_src {
            if let Some(r) = target(i) {
                sources[next[r]] = i;
                next[r] += 1;
            }
        }
        Self { offsets, sources }
    }

    fn of(&self, r: usize) -> &[usize] {
        &self.sources[self.offsets[r]..self.offsets[r + 1]]
    }
}

/// `dst[target(i)] += src[i]` for every source row `i` (rows of width `d`) whose target is
/// `Some`; `dst` is `[n_dst, d]`, `src` is `[n_src, d]`.
pub fn scatter_add_rows<F: Real>(
    dst: &mut [F],
    src: &[F],
    d: usize,
    target: impl Fn(usize) -> Option<usize>,
) {
    if d == 0 {
        return;
    }
    assert_eq!(
        dst.len() % d,
        0,
        "scatter-add: dst is not a whole number of rows"
    );
    assert_eq!(
        src.len() % d,
        0,
        "scatter-add: src is not a whole number of rows"
    );
    let (n_dst, n_src) = (dst.len() / d, src.len() / d);
    let groups = Groups::new(n_dst, n_src, &target);
    let add_group = |r: usize, row: &mut [F]| {
        for &i in groups.of(r) {
            let s = &src[i * d..(i + 1) * d];
            row.iter_mut().zip(s).for_each(|(o, &g)| *o = *o + g);
        }
    };
    if groups.sources.len() * d < 2 * MIN_TASK_ELEMS {
        dst.chunks_mut(d)
            .enumerate()
            .for_each(|(r, row)| add_group(r, row));
    } else {
        dst.par_chunks_mut(d)
            .enumerate()
            .for_each(|(r, row)| add_group(r, row));
    }
}
