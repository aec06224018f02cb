//! Row moves between MEGALODON chunk caches, so a streaming batch can run some of its rows
//! on their own (a prompt prefill) and put them back.

use super::megalodon_attention::ChunkKvCache;
use super::Real;

/// Copy row `src_row` of `src` (keys, values, chunk position) into row `dst_row` of `dst`.
pub fn copy_row<F: Real>(
    dst: &mut ChunkKvCache<F>,
    dst_row: usize,
    src: &ChunkKvCache<F>,
    src_row: usize,
) {
    assert!(
        src_row < src.count.len() && dst_row < dst.count.len(),
        "chunk cache row out of range"
    );
    let k_row = row_width(src.k.len(), src.count.len());
    let v_row = row_width(src.v.len(), src.count.len());
    assert_eq!(
        k_row,
        row_width(dst.k.len(), dst.count.len()),
        "chunk caches differ in key width"
    );
    assert_eq!(
        v_row,
        row_width(dst.v.len(), dst.count.len()),
        "chunk caches differ in value width"
    );
    dst.k[dst_row * k_row..(dst_row + 1) * k_row]
        .copy_from_slice(&src.k[src_row * k_row..(src_row + 1) * k_row]);
    dst.v[dst_row * v_row..(dst_row + 1) * v_row]
        .copy_from_slice(&src.v[src_row * v_row..(src_row + 1) * v_row]);
    dst.count[dst_row] = src.count[src_row];
}

/// Elements per row of a `[rows, …]` buffer.
fn row_width(len: usize, rows: usize) -> usize {
    assert!(
        rows > 0 && len % rows == 0,
        "chunk cache buffer is not [rows, …]"
    );
    len / rows
}
