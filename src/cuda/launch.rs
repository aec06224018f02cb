//! Launch shapes (grid, block, dynamic shared memory) of every kernel in `kernels/`, and the
//! sizes of the workspaces some of them need.
//!
//! Each function mirrors the "Launch" note in its kernel's header comment; the constants
//! here mirror the kernels' `constexpr`s (a test reads them back from the sources). Shapes
//! that a kernel cannot run (too much shared memory, too many rows for one grid dimension)
//! are errors, not panics: a model config can ask for them.

use std::fmt;

/// Dynamic shared memory a kernel may use without opting in to more (48 KiB on every GPU
/// since Volta).
pub const MAX_DEFAULT_SHARED_BYTES: usize = 48 * 1024;
/// Largest `gridDim.y` / `gridDim.z`.
pub const MAX_GRID_YZ: usize = 65_535;
/// Blocks a grid-stride kernel is given at most: a few waves on an H100 (132 SMs); more only
/// adds scheduling work.
pub const MAX_STRIDE_BLOCKS: usize = 4096;
/// Threads per block of the elementwise and grid-stride kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// One kernel launch: grid and block dimensions and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// `gridDim` (x, y, z).
    pub grid: (u32, u32, u32),
    /// `blockDim` (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub shared_mem_bytes: u32,
}

impl LaunchShape {
    fn new(grid: (usize, usize, usize), block: (u32, u32, u32), shared: usize) -> Self {
        // Callers bound every dimension first; these conversions cannot truncate.
        Self {
            grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block,
            shared_mem_bytes: shared as u32,
        }
    }

    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }

    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }
}

impl From<LaunchShape> for cudarc::driver::LaunchConfig {
    fn from(s: LaunchShape) -> Self {
        cudarc::driver::LaunchConfig {
            grid_dim: s.grid,
            block_dim: s.block,
            shared_mem_bytes: s.shared_mem_bytes,
        }
    }
}

/// A problem shape a kernel cannot launch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The kernel would need more dynamic shared memory than a launch gets by default.
    #[error(
        "{kernel}: needs {bytes} bytes of shared memory for {what}, above the {limit}-byte limit"
    )]
    SharedMemory {
        kernel: &'static str,
        what: String,
        bytes: usize,
        limit: usize,
    },
    /// A grid dimension past what CUDA allows.
    #[error("{kernel}: {what} = {value} exceeds the grid limit {limit}")]
    Grid {
        kernel: &'static str,
        what: &'static str,
        value: usize,
        limit: usize,
    },
    /// A shape the kernel's layout rules out.
    #[error("{kernel}: {reason}")]
    Shape {
        kernel: &'static str,
        reason: String,
    },
}

impl LaunchError {
    fn shape(kernel: &'static str, reason: impl fmt::Display) -> Self {
        Self::Shape {
            kernel,
            reason: reason.to_string(),
        }
    }
}

fn check_grid_yz(
    kernel: &'static str,
    what: &'static str,
    value: usize,
) -> Result<(), LaunchError> {
    if value > MAX_GRID_YZ {
        return Err(LaunchError::Grid {
            kernel,
            what,
            value,
            limit: MAX_GRID_YZ,
        });
    }
    Ok(())
}

fn check_shared(kernel: &'static str, what: String, bytes: usize) -> Result<(), LaunchError> {
    if bytes > MAX_DEFAULT_SHARED_BYTES {
        return Err(LaunchError::SharedMemory {
            kernel,
            what,
            bytes,
            limit: MAX_DEFAULT_SHARED_BYTES,
        });
    }
    Ok(())
}

/// A 1-D grid-stride launch over `work` items with `per_block` items per block (at least one
/// block, at most [`MAX_STRIDE_BLOCKS`]).
pub fn grid_stride(work: usize, per_block: usize, threads: u32) -> LaunchShape {
    let blocks = work.div_ceil(per_block.max(1)).clamp(1, MAX_STRIDE_BLOCKS);
    LaunchShape::new((blocks, 1, 1), (threads, 1, 1), 0)
}

/// An elementwise kernel over `n` elements (activations, AdamW, RoPE pairs, TimestepNorm
/// normalize, …): [`ELEMENTWISE_THREADS`] threads, one element per thread per pass.
pub fn elementwise(n: usize) -> LaunchShape {
    grid_stride(n, ELEMENTWISE_THREADS as usize, ELEMENTWISE_THREADS)
}

/// One warp per row, `per_block` rows (warps) per block of `(32, per_block)` threads, at
/// most [`MAX_STRIDE_BLOCKS`] blocks (the kernels grid-stride beyond).
fn warp_rows(rows: usize, per_block: u32) -> LaunchShape {
    let blocks = rows
        .div_ceil(per_block as usize)
        .clamp(1, MAX_STRIDE_BLOCKS);
    LaunchShape::new((blocks, 1, 1), (32, per_block, 1), 0)
}

/// `kernels/cema.cu`.
pub mod cema {
    use super::*;

    /// Channels per block (one warp each): `CEMA_WARPS`.
    pub const WARPS: usize = 8;
    /// Tokens per lane per chunk: `CEMA_SEG`.
    pub const SEG: usize = 8;
    /// Tokens per chunk: `CEMA_CHUNK`.
    pub const CHUNK: usize = 32 * SEG;
    /// Floats per channel row of a staged tile: `CEMA_TILE_STRIDE`.
    pub const TILE_STRIDE: usize = CHUNK + 4;
    /// Floats per (channel, k) coefficient record: `CEMA_COEF_FLOATS`.
    pub const COEF_FLOATS: usize = 16;
    /// f64 gradient sums per (channel, k): `CEMA_GRAD_SUMS`.
    pub const GRAD_SUMS: usize = 5;
    /// Floats per (channel, k) of the `cema_coefficients_f32` output.
    pub const STEP_COEF_FLOATS: usize = 5;
    const THREADS: u32 = (WARPS * 32) as u32;

    /// Chunks of a call of `l` tokens (0 for `l = 0`).
    pub fn chunks(l: usize) -> usize {
        l.div_ceil(CHUNK)
    }

    /// Floats of the `chunk_states` workspace `[b, ⌈l/256⌉, d, n, 2]` that
    /// `cema_forward_f32` fills for `cema_backward_f32`.
    pub fn chunk_states_len(b: usize, l: usize, d: usize, n: usize) -> usize {
        b * chunks(l) * d * n * 2
    }

    /// Dynamic shared memory of `cema_forward_f32`.
    pub fn forward_shared_bytes(n: usize) -> usize {
        4 * (WARPS * n * (COEF_FLOATS + 2) + WARPS * TILE_STRIDE)
    }

    /// Dynamic shared memory of `cema_backward_f32`.
    pub fn backward_shared_bytes(n: usize) -> usize {
        8 * (WARPS * n * GRAD_SUMS + WARPS)
            + 4 * (WARPS * n * (COEF_FLOATS + 2) + 2 * WARPS * TILE_STRIDE)
    }

    fn blocks_over_channels(
        kernel: &'static str,
        d: usize,
        n: usize,
    ) -> Result<usize, LaunchError> {
        if n == 0 {
            return Err(LaunchError::shape(kernel, "expansion N must be positive"));
        }
        Ok(d.div_ceil(WARPS).max(1))
    }

    /// `cema_forward_f32`: grid (⌈d/8⌉, b), 256 threads.
    pub fn forward(b: usize, d: usize, n: usize) -> Result<LaunchShape, LaunchError> {
        const K: &str = "cema_forward_f32";
        let blocks = blocks_over_channels(K, d, n)?;
        check_grid_yz(K, "batch rows", b)?;
        let shared = forward_shared_bytes(n);
        check_shared(K, format!("N = {n}"), shared)?;
        Ok(LaunchShape::new(
            (blocks, b.max(1), 1),
            (THREADS, 1, 1),
            shared,
        ))
    }

    /// `cema_backward_f32`: grid (⌈d/8⌉), 256 threads (each block walks every batch row).
    pub fn backward(d: usize, n: usize) -> Result<LaunchShape, LaunchError> {
        const K: &str = "cema_backward_f32";
        let blocks = blocks_over_channels(K, d, n)?;
        let shared = backward_shared_bytes(n);
        check_shared(K, format!("N = {n}"), shared)?;
        Ok(LaunchShape::new((blocks, 1, 1), (THREADS, 1, 1), shared))
    }

    /// `cema_coefficients_f32`: one thread per (channel, k).
    pub fn coefficients(d: usize, n: usize) -> LaunchShape {
        elementwise(d * n)
    }

    /// `cema_step_f32`: one thread per (row, channel).
    pub fn step(b: usize, d: usize) -> LaunchShape {
        elementwise(b * d)
    }
}

/// `kernels/timestep_norm.cu`.
pub mod timestep_norm {
    use super::*;

    /// Threads of the scan and step blocks: `TSN_THREADS`.
    pub const THREADS: u32 = 256;
    /// Tokens per thread per scan chunk: `TSN_SEG`.
    pub const SEG: usize = 4;
    /// Tokens per scan chunk.
    pub const CHUNK: usize = THREADS as usize * SEG;
    const WARPS_PER_BLOCK: usize = THREADS as usize / 32;
    /// Columns per block of `tsn_backward_dx_f32`.
    pub const DX_COLUMNS: usize = 256;

    fn check_groups(kernel: &'static str, d: usize, g: usize) -> Result<(), LaunchError> {
        if g == 0 || d == 0 || d % g != 0 {
            return Err(LaunchError::shape(
                kernel,
                format!("d = {d} must be a positive multiple of g = {g}"),
            ));
        }
        Ok(())
    }

    /// `tsn_group_moments_f32` and `tsn_backward_group_sums_f32`: one warp per (row, group).
    pub fn group_pass(rows: usize, d: usize, g: usize) -> Result<LaunchShape, LaunchError> {
        check_groups("tsn_group_moments_f32", d, g)?;
        Ok(grid_stride(rows * g, WARPS_PER_BLOCK, THREADS))
    }

    /// `tsn_scan_f32` and `tsn_backward_scan_f32`: grid (g, b).
    pub fn scan(b: usize, g: usize) -> Result<LaunchShape, LaunchError> {
        const K: &str = "tsn_scan_f32";
        if g == 0 {
            return Err(LaunchError::shape(K, "need at least one group"));
        }
        check_grid_yz(K, "batch rows", b)?;
        Ok(LaunchShape::new((g, b.max(1), 1), (THREADS, 1, 1), 0))
    }

    /// `tsn_normalize_f32`.
    pub fn normalize(rows: usize, d: usize) -> LaunchShape {
        elementwise(rows * d)
    }

    /// Rows per chunk of `tsn_backward_dx_f32`: the CPU twin's rows per partial sum (at
    /// least 16384/d rows and at most 64 chunks), so both sum the same rows together.
    pub fn dx_rows_per_chunk(rows: usize, d: usize) -> usize {
        (16_384 / d.max(1)).max(1).max(rows.div_ceil(64)).max(1)
    }

    /// Row chunks of `tsn_backward_dx_f32` (the partials' leading dimension).
    pub fn dx_chunks(rows: usize, d: usize) -> usize {
        rows.div_ceil(dx_rows_per_chunk(rows, d)).max(1)
    }

    /// Floats of the `partials` workspace `[chunks, 2, d]`.
    pub fn dx_partials_len(rows: usize, d: usize) -> usize {
        dx_chunks(rows, d) * 2 * d
    }

    /// Floats of the backward's `sums` workspace `[rows, 3, g]`.
    pub fn sums_len(rows: usize, g: usize) -> usize {
        rows * 3 * g
    }

    /// `tsn_backward_dx_f32`: grid (⌈d/256⌉, chunks), 256 threads.
    pub fn backward_dx(rows: usize, d: usize) -> Result<LaunchShape, LaunchError> {
        let chunks = dx_chunks(rows, d);
        check_grid_yz("tsn_backward_dx_f32", "row chunks", chunks)?;
        Ok(LaunchShape::new(
            (d.div_ceil(DX_COLUMNS).max(1), chunks, 1),
            (DX_COLUMNS as u32, 1, 1),
            0,
        ))
    }

    /// `tsn_backward_param_reduce_f32`.
    pub fn param_reduce(d: usize) -> LaunchShape {
        elementwise(d)
    }

    /// `tsn_step_f32`: one block per batch row (one idle block when `b = 0`).
    pub fn step(b: usize) -> LaunchShape {
        LaunchShape::new((b.max(1), 1, 1), (THREADS, 1, 1), 0)
    }
}

/// `kernels/norms.cu`.
pub mod norms {
    use super::*;

    /// Threads per block of the norm kernels.
    pub const THREADS: u32 = 256;
    /// Row chunks of a backward at most: two blocks per SM of an H100, enough to fill it
    /// while keeping the partials small.
    pub const MAX_BACKWARD_CHUNKS: usize = 264;

    /// Which norm: LayerNorm keeps two partials per column (dw, db), RMSNorm one (dw).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Norm {
        /// `layernorm_*`.
        LayerNorm,
        /// `rmsnorm_*`.
        RmsNorm,
    }

    impl Norm {
        /// Partial sums per column.
        pub fn partials_per_column(self) -> usize {
            match self {
                Norm::LayerNorm => 2,
                Norm::RmsNorm => 1,
            }
        }
    }

    /// `*_forward_*`: one block per row (striding when rows exceed the grid).
    pub fn forward(n: usize) -> LaunchShape {
        grid_stride(n, 1, THREADS)
    }

    /// Row chunks of a backward over `n` rows.
    pub fn backward_chunks(n: usize) -> usize {
        n.clamp(1, MAX_BACKWARD_CHUNKS)
    }

    /// Floats of the `partials` workspace `[chunks, k, d]`.
    pub fn partials_len(norm: Norm, n: usize, d: usize) -> usize {
        backward_chunks(n) * norm.partials_per_column() * d
    }

    /// `*_backward_*`: one block per row chunk, shared memory for its column partials.
    pub fn backward(norm: Norm, n: usize, d: usize) -> Result<LaunchShape, LaunchError> {
        let shared = 4 * norm.partials_per_column() * d;
        check_shared("norm backward", format!("d = {d}"), shared)?;
        Ok(LaunchShape::new(
            (backward_chunks(n), 1, 1),
            (THREADS, 1, 1),
            shared,
        ))
    }

    /// `*_param_reduce_f32`.
    pub fn param_reduce(d: usize) -> LaunchShape {
        elementwise(d)
    }
}

/// `kernels/activations.cu`.
pub mod activations {
    use super::*;
    use crate::backend::Activation;

    /// The `act` argument of `activation_*` for an [`Activation`].
    pub fn act_id(act: Activation) -> i32 {
        match act {
            Activation::Relu => 0,
            Activation::Gelu => 1,
            Activation::Silu => 2,
        }
    }

    /// `activation_*` over `n` elements.
    pub fn activation(n: usize) -> LaunchShape {
        elementwise(n)
    }

    /// `swiglu_*` over `n` rows of `h` outputs.
    pub fn swiglu(n: usize, h: usize) -> LaunchShape {
        elementwise(n * h)
    }
}

/// `kernels/adamw.cu`.
pub mod adamw {
    use super::*;
    use crate::backend::AdamW;

    /// `adamw_step_*` over `n` parameters.
    pub fn step(n: usize) -> LaunchShape {
        elementwise(n)
    }

    /// The kernel's `inv_bc1`, `inv_bc2` arguments: `1/(1 − β1ᵗ)`, `1/(1 − β2ᵗ)` computed in
    /// f64 and rounded once, as the CPU backend does. Errors on step 0 (steps are 1-based).
    pub fn bias_corrections(hp: &AdamW) -> Result<(f32, f32), LaunchError> {
        if hp.step == 0 {
            return Err(LaunchError::shape(
                "adamw_step_f32",
                "step is 1-based, got 0",
            ));
        }
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
        Ok(((1.0 / bc1) as f32, (1.0 / bc2) as f32))
    }
}

/// `kernels/megabyte_gathers.cu`.
pub mod gathers {
    use super::*;

    /// Rows per block (warps of the `(32, ROWS_PER_BLOCK)` block).
    pub const ROWS_PER_BLOCK: u32 = 8;

    /// The embedder forwards and `rows_scatter_add_csr_*` over `rows` rows: one warp per row.
    pub fn rows(rows: usize) -> LaunchShape {
        warp_rows(rows, ROWS_PER_BLOCK)
    }
}

/// `kernels/rope.cu`.
pub mod rope {
    use super::*;

    /// `rope_*` over `rows` rows of `heads` heads of width `dz` (even).
    pub fn rotate(rows: usize, heads: usize, dz: usize) -> Result<LaunchShape, LaunchError> {
        if dz % 2 != 0 {
            return Err(LaunchError::shape(
                "rope_forward_f32",
                format!("dz = {dz} must be even"),
            ));
        }
        Ok(elementwise(rows * heads * dz / 2))
    }
}

/// `kernels/softmax.cu`.
pub mod softmax {
    use super::*;

    /// Rows per block (warps of the `(32, ROWS_PER_BLOCK)` block).
    pub const ROWS_PER_BLOCK: u32 = 8;

    /// `causal_softmax_*_f32` and `log_softmax_f32` over `rows` rows: one warp per row,
    /// grid-stride beyond [`MAX_STRIDE_BLOCKS`] blocks.
    pub fn rows(rows: usize) -> LaunchShape {
        warp_rows(rows, ROWS_PER_BLOCK)
    }
}

/// `kernels/mega_attention.cu`.
pub mod mega_attention {
    use super::*;

    /// Rows (warps) per block of the project kernels (`MEGA_ATTN_ROWS_PER_BLOCK`).
    pub const ROWS_PER_BLOCK: u32 = 8;

    /// `mega_attn_project_*_f32` over `rows` (token, head) rows: one warp per row,
    /// grid-stride beyond [`MAX_STRIDE_BLOCKS`] blocks.
    pub fn rows(rows: usize) -> LaunchShape {
        warp_rows(rows, ROWS_PER_BLOCK)
    }
}

/// `kernels/elementwise.cu`.
pub mod elementwise_ops {
    use super::*;

    /// `add_assign_f32`, `scale_f32`, `mul_f32`, `add_scalar_f32`, `fill_f32` over `n`
    /// elements.
    pub fn pointwise(n: usize) -> LaunchShape {
        elementwise(n)
    }

    /// `rows_copy_f32` over `rows` rows: one warp per row, as the MEGABYTE gathers.
    pub fn rows_copy(rows: usize) -> LaunchShape {
        gathers::rows(rows)
    }
}

/// `kernels/reduce.cu`: the two passes of the deterministic f64 sums.
pub mod reduce {
    use super::*;

    /// Threads per block of both passes (a power of two, as the kernels' tree needs).
    pub const THREADS: u32 = 256;
    /// Elements a partials block covers at least: 16 per thread, so small buffers take few
    /// blocks and the combine pass stays short.
    pub const MIN_ELEMS_PER_BLOCK: usize = 16 * THREADS as usize;
    /// Most partial sums (blocks of the first pass); the combine pass adds them in one block.
    pub const MAX_PARTIALS: usize = 1024;

    /// Blocks of `sum_partials_f32` for `n` elements: a function of `n` only, so the chunking
    /// (and every rounding) is the same on any device and under any schedule.
    pub fn partial_blocks(n: usize) -> usize {
        n.div_ceil(MIN_ELEMS_PER_BLOCK).clamp(1, MAX_PARTIALS)
    }

    /// `sum_partials_f32` over `n` elements.
    pub fn partials(n: usize) -> LaunchShape {
        LaunchShape::new((partial_blocks(n), 1, 1), (THREADS, 1, 1), 0)
    }

    /// `sum_combine_f64`: one block.
    pub fn combine() -> LaunchShape {
        LaunchShape::new((1, 1, 1), (THREADS, 1, 1), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The value of `constexpr int NAME = <integer literal>;` in a kernel source.
    fn kernel_constant(file: &str, name: &str) -> usize {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("kernels")
            .join(file);
        let src = std::fs::read_to_string(&path).expect("kernel source readable");
        let prefix = format!("constexpr int {name} = ");
        let line = src
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{file}: no `{prefix}…`"));
        let value = line.split(';').next().unwrap().trim();
        value
            .parse()
            .unwrap_or_else(|_| panic!("{file}: {name} = {value:?} is not a literal"))
    }

    #[test]
    fn constants_match_the_kernel_sources() {
        assert_eq!(kernel_constant("cema.cu", "CEMA_WARPS"), cema::WARPS);
        assert_eq!(kernel_constant("cema.cu", "CEMA_SEG"), cema::SEG);
        assert_eq!(
            kernel_constant("cema.cu", "CEMA_COEF_FLOATS"),
            cema::COEF_FLOATS
        );
        assert_eq!(
            kernel_constant("cema.cu", "CEMA_GRAD_SUMS"),
            cema::GRAD_SUMS
        );
        assert_eq!(
            kernel_constant("timestep_norm.cu", "TSN_THREADS"),
            timestep_norm::THREADS as usize
        );
        assert_eq!(
            kernel_constant("timestep_norm.cu", "TSN_SEG"),
            timestep_norm::SEG
        );
    }

    #[test]
    fn cema_shapes_cover_every_channel_and_row() {
        for (b, d) in [(1, 1), (1, 7), (2, 8), (3, 9), (1, 4096)] {
            let s = cema::forward(b, d, 16).unwrap();
            assert_eq!(s.grid, (d.div_ceil(8) as u32, b as u32, 1));
            assert_eq!(s.block, (256, 1, 1));
            assert!(s.grid.0 as usize * cema::WARPS >= d);
            let bw = cema::backward(d, 16).unwrap();
            assert_eq!(bw.grid, (d.div_ceil(8) as u32, 1, 1));
        }
        // N = 16: forward 4·(8·16·18 + 8·260) bytes; backward adds f64 sums and a second tile.
        assert_eq!(cema::forward_shared_bytes(16), 4 * (2304 + 2080));
        assert_eq!(
            cema::backward_shared_bytes(16),
            8 * (640 + 8) + 4 * (2304 + 4160)
        );
        assert_eq!(cema::chunks(0), 0);
        assert_eq!(cema::chunks(256), 1);
        assert_eq!(cema::chunks(257), 2);
        assert_eq!(cema::chunk_states_len(2, 300, 5, 16), 2 * 2 * 5 * 16 * 2);
    }

    #[test]
    fn cema_rejects_what_it_cannot_run() {
        assert!(matches!(
            cema::forward(1, 8, 0),
            Err(LaunchError::Shape { .. })
        ));
        let err = cema::backward(8, 64).unwrap_err();
        assert!(matches!(err, LaunchError::SharedMemory { .. }), "{err}");
        assert!(err.to_string().contains("N = 64"));
        assert!(matches!(
            cema::forward(70_000, 8, 16),
            Err(LaunchError::Grid { value: 70_000, .. })
        ));
        // The largest N each kernel takes without opting in to more shared memory.
        assert!(cema::forward(1, 8, 70).is_ok() && cema::forward(1, 8, 71).is_err());
        assert!(cema::backward(8, 36).is_ok() && cema::backward(8, 37).is_err());
    }

    #[test]
    fn timestep_norm_shapes() {
        assert_eq!(timestep_norm::scan(3, 4).unwrap().grid, (4, 3, 1));
        assert!(timestep_norm::scan(1, 0).is_err());
        assert!(timestep_norm::group_pass(2, 10, 4).is_err());
        // One warp per (row, group): 8 pairs per block.
        assert_eq!(timestep_norm::group_pass(5, 32, 4).unwrap().grid, (3, 1, 1));
        // 7B: 16K rows of 4096 → 64 chunks of 256 rows, 16 column tiles.
        assert_eq!(timestep_norm::dx_rows_per_chunk(16_384, 4096), 256);
        assert_eq!(
            timestep_norm::backward_dx(16_384, 4096).unwrap().grid,
            (16, 64, 1)
        );
        // Small calls: at least 16384/d rows per chunk, so one chunk.
        assert_eq!(timestep_norm::dx_chunks(7, 32), 1);
        assert_eq!(timestep_norm::dx_partials_len(7, 32), 64);
        // Every row is in exactly one chunk.
        for rows in [1, 63, 64, 65, 1000, 4097] {
            let per = timestep_norm::dx_rows_per_chunk(rows, 8);
            let chunks = timestep_norm::dx_chunks(rows, 8);
            assert!(
                per * chunks >= rows && per * (chunks - 1) < rows,
                "rows {rows}"
            );
        }
    }

    #[test]
    fn norm_backward_shapes_and_limits() {
        use norms::Norm;
        let s = norms::backward(Norm::LayerNorm, 1000, 512).unwrap();
        assert_eq!(s.grid, (264, 1, 1));
        assert_eq!(s.shared_mem_bytes, 2 * 4 * 512);
        assert_eq!(
            norms::backward(Norm::RmsNorm, 3, 100).unwrap().grid,
            (3, 1, 1)
        );
        assert_eq!(norms::partials_len(Norm::LayerNorm, 3, 100), 600);
        assert!(norms::backward(Norm::LayerNorm, 8, 6144).is_ok());
        assert!(norms::backward(Norm::LayerNorm, 8, 6145).is_err());
        assert!(norms::backward(Norm::RmsNorm, 8, 12_288).is_ok());
    }

    #[test]
    fn grid_stride_shapes_stay_in_bounds() {
        assert_eq!(elementwise(0).grid, (1, 1, 1));
        assert_eq!(elementwise(256).grid, (1, 1, 1));
        assert_eq!(elementwise(257).grid, (2, 1, 1));
        assert_eq!(
            elementwise(usize::MAX / 2).grid.0 as usize,
            MAX_STRIDE_BLOCKS
        );
        assert_eq!(gathers::rows(17).grid, (3, 1, 1));
        assert_eq!(gathers::rows(17).block, (32, 8, 1));
        assert!(rope::rotate(4, 2, 7).is_err());
        assert_eq!(rope::rotate(4, 2, 8).unwrap(), elementwise(32));
        let cfg: cudarc::driver::LaunchConfig = cema::forward(2, 9, 16).unwrap().into();
        assert_eq!(cfg.grid_dim, (2, 2, 1));
        assert_eq!(cfg.shared_mem_bytes, cema::forward_shared_bytes(16) as u32);
    }

    #[test]
    fn adamw_bias_corrections_match_the_definition() {
        let hp = crate::backend::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
        };
        let (c1, c2) = adamw::bias_corrections(&hp).unwrap();
        let b1 = 0.9f32 as f64;
        let b2 = 0.95f32 as f64;
        assert_eq!(c1, (1.0 / (1.0 - b1 * b1 * b1)) as f32);
        assert_eq!(c2, (1.0 / (1.0 - b2 * b2 * b2)) as f32);
        assert!(adamw::bias_corrections(&crate::backend::AdamW { step: 0, ..hp }).is_err());
    }

    #[test]
    fn activation_ids_match_the_kernel() {
        use crate::backend::Activation;
        assert_eq!(
            activations::act_id(Activation::Relu),
            kernel_constant("activations.cu", "ACT_RELU") as i32
        );
        assert_eq!(
            activations::act_id(Activation::Gelu),
            kernel_constant("activations.cu", "ACT_GELU") as i32
        );
        assert_eq!(
            activations::act_id(Activation::Silu),
            kernel_constant("activations.cu", "ACT_SILU") as i32
        );
    }

    #[test]
    fn mega_attention_rows_match_the_source_and_cover_every_row() {
        assert_eq!(
            kernel_constant("mega_attention.cu", "MEGA_ATTN_ROWS_PER_BLOCK"),
            mega_attention::ROWS_PER_BLOCK as usize
        );
        for rows in [1, 7, 8, 9, 1000] {
            let s = mega_attention::rows(rows);
            assert_eq!(s.block, (32, mega_attention::ROWS_PER_BLOCK, 1));
            assert!(s.grid.0 as usize * mega_attention::ROWS_PER_BLOCK as usize >= rows);
        }
        assert_eq!(
            mega_attention::rows(1 << 30).grid.0 as usize,
            MAX_STRIDE_BLOCKS
        );
    }

    #[test]
    fn softmax_rows_match_the_source_and_cover_every_row() {
        assert_eq!(
            kernel_constant("softmax.cu", "SOFTMAX_ROWS_PER_BLOCK"),
            softmax::ROWS_PER_BLOCK as usize
        );
        for rows in [0usize, 1, 7, 8, 9, 1000] {
            let s = softmax::rows(rows);
            assert_eq!(s.block, (32, softmax::ROWS_PER_BLOCK, 1));
            assert!(s.grid.0 as usize * softmax::ROWS_PER_BLOCK as usize >= rows.max(1));
        }
        assert_eq!(softmax::rows(1 << 30).grid.0 as usize, MAX_STRIDE_BLOCKS);
    }
}
