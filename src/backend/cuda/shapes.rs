//! Launch shapes of the kernels whose shape helpers are not in [`crate::cuda::launch`] yet
//! (cross-entropy, embedding gather), following the "Launch" notes of their sources.

use crate::cuda::launch::{LaunchShape, MAX_STRIDE_BLOCKS};

/// Threads per block of the cross-entropy kernels (a good default for 256-byte vocabularies,
/// `kernels/cross_entropy.cu`).
pub const CROSS_ENTROPY_THREADS: u32 = 256;

/// `cross_entropy_*_f32`: one block per row, striding when rows exceed the grid.
pub fn cross_entropy(rows: usize) -> LaunchShape {
    LaunchShape {
        grid: (rows.clamp(1, MAX_STRIDE_BLOCKS) as u32, 1, 1),
        block: (CROSS_ENTROPY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `embedding_forward_f32`: one warp per row, block (32, 8), grid-stride over the rows (the
/// gathers' shape, [`crate::cuda::launch::gathers::rows`]).
pub fn embedding_forward(rows: usize) -> LaunchShape {
    crate::cuda::launch::gathers::rows(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_every_row_within_grid_limits() {
        assert_eq!(cross_entropy(0).grid, (1, 1, 1));
        assert_eq!(cross_entropy(7).grid, (7, 1, 1));
        assert_eq!(cross_entropy(1 << 20).grid.0 as usize, MAX_STRIDE_BLOCKS);
        assert_eq!(cross_entropy(3).block.0 % 32, 0);
        let e = embedding_forward(17);
        assert_eq!(e.block, (32, 8, 1));
        assert!(e.grid.0 * e.block.1 >= 17);
    }
}
