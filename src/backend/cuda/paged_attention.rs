//! Decode attention over the paged KV cache on the device (`kernels/paged_attention.cu`):
//! [`crate::backend::Backend::attention_decode`] for [`CudaBackend`], and the launch shapes of
//! its two kernels.
//!
//! Each call launches the partition kernel (one block per 256-position partition × head ×
//! row, writing partial softmax sums to a pooled scratch buffer) and the combine kernel. The
//! per-call host arrays — `lens` and the block table — travel in one pooled buffer, so a
//! serving loop that decodes the same batch shape every step reuses the same device blocks
//! (for the scratch as well) instead of allocating.

use super::buffer::CudaBuf;
use super::CudaBackend;
use crate::cuda::launch::{LaunchShape, MAX_GRID_YZ};
use crate::emu::{DeviceApi, DeviceBuffer, ViewArg};

/// Positions per partition, as `PAGED_PARTITION` in the kernel and the CPU twin's
/// `KEYS_PER_TASK`: the same boundaries keep a row's result independent of paging and batch.
pub const PARTITION: usize = 256;
/// Threads per block of both kernels (`PAGED_THREADS`).
pub const THREADS: u32 = 128;

/// Partitions of the longest row: the partition kernel's `gridDim.x` and the scratch's
/// partition stride.
pub fn partitions(lens: &[u32]) -> usize {
    lens.iter()
        .map(|&l| (l as usize).div_ceil(PARTITION))
        .max()
        .unwrap_or(0)
}

/// `paged_attention_partition_f32` for `b` rows of `h` heads whose longest row has `parts`
/// partitions: grid `(parts, h, b)`, [`THREADS`] threads, static shared memory only.
pub fn partition_shape(parts: usize, h: usize, b: usize) -> LaunchShape {
    assert!(
        h <= MAX_GRID_YZ && b <= MAX_GRID_YZ,
        "attention_decode: {h} heads × {b} rows exceed the grid"
    );
    LaunchShape {
        grid: (parts as u32, h as u32, b as u32),
        block: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `paged_attention_combine_f32`: grid `(h, b)`, [`THREADS`] threads.
pub fn combine_shape(h: usize, b: usize) -> LaunchShape {
    assert!(
        b <= MAX_GRID_YZ,
        "attention_decode: {b} rows exceed the grid"
    );
    LaunchShape {
        grid: (h as u32, b as u32, 1),
        block: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scratch sizes `(accumulators, stats)` in floats: `[b, parts, c]` and `[b, parts, h, 2]`.
pub fn scratch_len(b: usize, parts: usize, c: usize, h: usize) -> (usize, usize) {
    (b * parts * c, b * parts * h * 2)
}

/// Checks `lens` and the block table against the pools as the CPU backend does (an entry
/// outside the pool would be an out-of-bounds device read; these are internal shape errors,
/// so they panic). Returns `max_blocks`.
fn check_pages(lens: &[u32], block_table: &[u32], block_size: usize, n_blocks: usize) -> usize {
    let b = lens.len();
    assert_eq!(
        block_table.len() % b,
        0,
        "block table must be [b = {b}, max_blocks]"
    );
    let mb = block_table.len() / b;
    for (r, &len) in lens.iter().enumerate() {
        let len = len as usize;
        assert!(
            len >= 1 && len <= mb * block_size,
            "decode length {len} outside 1..={} (row {r})",
            mb * block_size
        );
        for &blk in &block_table[r * mb..][..len.div_ceil(block_size)] {
            assert!(
                (blk as usize) < n_blocks,
                "row {r}: block {blk} outside the pool of {n_blocks}"
            );
        }
    }
    mb
}

fn as_i32(what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("attention_decode: {what} = {x} exceeds i32"))
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// [`crate::backend::Backend::attention_decode`] on the device (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_decode_on_device(
        &self,
        out: &mut CudaBuf<D>,
        qkv: &CudaBuf<D>,
        k_cache: &CudaBuf<D>,
        v_cache: &CudaBuf<D>,
        lens: &[u32],
        block_table: &[u32],
        block_size: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        let b = lens.len();
        assert!(
            h > 0 && c % h == 0,
            "attention_decode: c = {c} not split into {h} heads"
        );
        assert!(block_size > 0, "block size must be positive");
        assert_eq!(qkv.len(), b * 3 * c, "qkv must be [b, 3c]");
        assert_eq!(out.len(), b * c, "out must be [b, c]");
        assert_eq!(
            k_cache.len(),
            v_cache.len(),
            "key and value pools differ in size"
        );
        assert_eq!(
            k_cache.len() % (block_size * c).max(1),
            0,
            "KV pool must be [n_blocks, block_size = {block_size}, c = {c}]"
        );
        if b == 0 || c == 0 {
            return;
        }
        let n_blocks = k_cache.len() / (block_size * c);
        let max_blocks = check_pages(lens, block_table, block_size, n_blocks);

        // lens then the table, as u32 bit patterns in one pooled f32 block (the pool holds
        // f32 allocations; the copy moves bits, and the kernels read the block as unsigned).
        let mut host: Vec<f32> = Vec::with_capacity(b + block_table.len());
        host.extend(lens.iter().chain(block_table).map(|&x| f32::from_bits(x)));
        let mut indices = self.alloc(host.len());
        self.write_host(&mut indices, &host);
        let capacity = indices.allocation().len();
        let base = indices.allocation_address();
        let view = |offset: usize, len: usize| {
            ViewArg::<u32>::new(base, capacity, indices.offset() + offset, len)
                .expect("the index views lie inside their block")
        };
        let (lens_arg, table_arg) = (view(0, b), view(b, block_table.len()));

        let parts = partitions(lens);
        let (acc_len, stats_len) = scratch_len(b, parts, c, h);
        let (part_acc, part_stats) = (self.alloc(acc_len), self.alloc(stats_len));
        let (mb, bs) = (
            as_i32("max_blocks", max_blocks),
            as_i32("block_size", block_size),
        );
        let (ci, hi, pi) = (as_i32("c", c), as_i32("h", h), as_i32("partitions", parts));
        // Pool entries are addressed in size_t by the kernel; the entry index must fit i32
        // only through `block_size`, checked above.
        self.run(
            "paged_attention_partition_f32",
            partition_shape(parts, h, b),
            &[
                part_acc.block(),
                part_stats.block(),
                qkv.block(),
                k_cache.block(),
                v_cache.block(),
                &lens_arg,
                &table_arg,
                &mb,
                &bs,
                &ci,
                &hi,
                &pi,
                &scale,
            ],
        );
        self.run(
            "paged_attention_combine_f32",
            combine_shape(h, b),
            &[
                out.block(),
                part_acc.block(),
                part_stats.block(),
                &lens_arg,
                &ci,
                &hi,
                &pi,
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `constexpr int NAME = value;` of kernels/paged_attention.cu.
    fn kernel_constant(name: &str) -> usize {
        let source = include_str!("../../../kernels/paged_attention.cu");
        let line = source
            .lines()
            .find(|l| l.contains(&format!("constexpr int {name} =")))
            .unwrap_or_else(|| panic!("{name} not in the kernel"));
        line.split('=')
            .nth(1)
            .unwrap()
            .trim()
            .trim_end_matches(';')
            .parse()
            .unwrap()
    }

    #[test]
    fn constants_match_the_kernel_and_the_cpu_twin() {
        assert_eq!(kernel_constant("PAGED_PARTITION"), PARTITION);
        assert_eq!(kernel_constant("PAGED_THREADS"), THREADS as usize);
        let twin = include_str!("../cpu/attention/chunked_decode.rs");
        assert!(
            twin.contains(&format!("const KEYS_PER_TASK: usize = {PARTITION};")),
            "partitions must fall where the CPU twin splits its tasks"
        );
    }

    #[test]
    fn partitions_cover_the_longest_row() {
        assert_eq!(partitions(&[1, 256]), 1);
        assert_eq!(partitions(&[257, 3]), 2);
        assert_eq!(partitions(&[521]), 3);
        let s = partition_shape(3, 4, 5);
        assert_eq!((s.grid, s.block), ((3, 4, 5), (THREADS, 1, 1)));
        assert_eq!(combine_shape(4, 5).grid, (4, 5, 1));
    }

    #[test]
    #[should_panic(expected = "outside the pool")]
    fn table_entries_outside_the_pool_are_rejected() {
        check_pages(&[5], &[0, 7], 4, 7);
    }

    #[test]
    fn table_entries_past_a_row_are_not_checked() {
        assert_eq!(check_pages(&[4, 1], &[0, 99, 1, u32::MAX], 4, 2), 2);
    }
}
