//! Appending keys and values to a KV cache.
//!
//! A cache is a flat list of entries of width `c`; callers address entries directly
//! (`block · block_size + offset` in a paged pool, `row · t_max + position` in a contiguous
//! cache), which also covers prefill (many positions of one row).

use super::Real;

/// For every row `r` of `qkv` (`[n, 3c]`), copy its key and value parts into entry
/// `entries[r]` of `k_cache` and `v_cache`.
pub fn append<F: Real>(k_cache: &mut [F], v_cache: &mut [F], qkv: &[F], entries: &[u32], c: usize) {
    assert_eq!(
        qkv.len(),
        entries.len() * 3 * c,
        "kv_append: qkv must be [n, 3c]"
    );
    assert_eq!(k_cache.len(), v_cache.len());
    for (r, &e) in entries.iter().enumerate() {
        let e = e as usize;
        assert!(
            (e + 1) * c <= k_cache.len(),
            "kv_append: entry {e} outside the cache"
        );
        let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
        k_cache[e * c..(e + 1) * c].copy_from_slice(&row[c..2 * c]);
        v_cache[e * c..(e + 1) * c].copy_from_slice(&row[2 * c..]);
    }
}
