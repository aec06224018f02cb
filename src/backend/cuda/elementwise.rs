//! The memory-side ops of the backend seam on the device: copies and zero fills through the
//! device API (cuMemcpyDtoDAsync, cuMemsetD8Async), elementwise ops and row moves through
//! `kernels/elementwise.cu`, whole-buffer sums through the two-pass f64 reduction of
//! `kernels/reduce.cu`. The `Backend` methods in `mod.rs` delegate here.

use super::buffer::CudaBuf;
use super::{fail, CudaBackend};
use crate::cuda::launch::{elementwise_ops, reduce};
use crate::emu::{DeviceApi, KernelArg};

/// The pairs `(destination row, source index)` of a row scatter `dst[rows[i]] = src[i]`,
/// keeping only the last source of each destination row, in source order: the CPU's
/// sequential "last one wins" as a set of writes no two of which touch the same row, so the
/// kernel runs them in any order without a race.
pub fn last_writer_rows(rows: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut last = std::collections::HashMap::with_capacity(rows.len());
    for (i, &r) in rows.iter().enumerate() {
        last.insert(r, i);
    }
    let (mut dst, mut src) = (
        Vec::with_capacity(last.len()),
        Vec::with_capacity(last.len()),
    );
    for (i, &r) in rows.iter().enumerate() {
        if last[&r] == i {
            dst.push(r);
            src.push(i as u32);
        }
    }
    (dst, src)
}

/// The kernel's `int` for a count or width the caller bounds (shapes of one model tensor).
fn as_i32(what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("CUDA backend: {what} = {x} exceeds i32"))
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// `dst = src` as one device-to-device copy.
    pub(super) fn copy_on_device(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>) {
        assert_eq!(dst.len(), src.len(), "copy: length mismatch");
        dst.invalidate_shadow();
        self.device
            .copy_dtod(dst.at(), src.at(), src.len())
            .unwrap_or_else(|e| fail("copy", e));
    }

    /// `buf = 0` as one device memset.
    pub(super) fn fill_zero_on_device(&self, buf: &mut CudaBuf<D>) {
        buf.invalidate_shadow();
        self.device
            .memset_zero(buf.at(), buf.len())
            .unwrap_or_else(|e| fail("fill_zero", e));
    }

    /// One launch of a pointwise kernel of `kernels/elementwise.cu` over `n` elements; `args`
    /// come before the trailing element count.
    fn pointwise(&self, kernel: &str, n: usize, args: &[&dyn KernelArg]) {
        let count = n as i64;
        let mut all: Vec<&dyn KernelArg> = args.to_vec();
        all.push(&count);
        self.run(kernel, elementwise_ops::pointwise(n), &all);
    }

    /// `buf = value` (`fill_f32`).
    pub(super) fn fill_on_device(&self, buf: &mut CudaBuf<D>, value: f32) {
        buf.invalidate_shadow();
        self.pointwise("fill_f32", buf.len(), &[buf.block(), &value]);
    }

    /// `dst += src` (`add_assign_f32`).
    pub(super) fn add_assign_on_device(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>) {
        assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
        dst.invalidate_shadow();
        self.pointwise("add_assign_f32", dst.len(), &[dst.block(), src.block()]);
    }

    /// `buf *= s` (`scale_f32`).
    pub(super) fn scale_on_device(&self, buf: &mut CudaBuf<D>, s: f32) {
        buf.invalidate_shadow();
        self.pointwise("scale_f32", buf.len(), &[buf.block(), &s]);
    }

    /// `out = a ⊙ b` (`mul_f32`).
    pub(super) fn mul_on_device(&self, out: &mut CudaBuf<D>, a: &CudaBuf<D>, b: &CudaBuf<D>) {
        assert_eq!(out.len(), a.len(), "mul: out and a differ in length");
        assert_eq!(a.len(), b.len(), "mul: a and b differ in length");
        out.invalidate_shadow();
        self.pointwise("mul_f32", out.len(), &[out.block(), a.block(), b.block()]);
    }

    /// `out = x + s` (`add_scalar_f32`).
    pub(super) fn add_scalar_on_device(&self, out: &mut CudaBuf<D>, x: &CudaBuf<D>, s: f32) {
        assert_eq!(out.len(), x.len(), "add_scalar: out and x differ in length");
        out.invalidate_shadow();
        self.pointwise("add_scalar_f32", out.len(), &[out.block(), x.block(), &s]);
    }

    /// `Σ buf` or `Σ buf²` in f64 (`sum_partials_f32`, then `sum_combine_f64` when the buffer
    /// spans more than one block): the same value on every run and under every schedule. The
    /// total and the partials live in cached scratch (no allocation once warm); the total's
    /// buffer is exactly one element, since it is downloaded whole.
    pub(super) fn sum_on_device(&self, buf: &CudaBuf<D>, square: bool) -> f64 {
        let n = buf.len();
        let blocks = reduce::partial_blocks(n);
        let out = self
            .scratch
            .take_exact::<f64>(&self.device, 1)
            .unwrap_or_else(|e| fail("reduction scratch", e));
        let (count, sq) = (n as i64, i32::from(square));
        if blocks == 1 {
            // One block's partial is the total.
            self.run(
                "sum_partials_f32",
                reduce::partials(n),
                &[&out, buf.block(), &count, &sq],
            );
        } else {
            let partials = self
                .scratch
                .take::<f64>(&self.device, blocks)
                .unwrap_or_else(|e| fail("reduction scratch", e));
            self.run(
                "sum_partials_f32",
                reduce::partials(n),
                &[&partials, buf.block(), &count, &sq],
            );
            let k = as_i32("partials", blocks);
            self.run("sum_combine_f64", reduce::combine(), &[&out, &partials, &k]);
        }
        let host = self
            .device
            .download(&*out)
            .unwrap_or_else(|e| fail("reduction download", e));
        host[0]
    }

    /// `dst[dst_rows[k]] = src[src_rows[k]·src_stride + src_col ..][..width]` for every k
    /// (`rows_copy_f32`); destination rows must be distinct (see [`last_writer_rows`]).
    #[allow(clippy::too_many_arguments)]
    fn launch_rows_copy(
        &self,
        dst: &mut CudaBuf<D>,
        src: &CudaBuf<D>,
        dst_rows: &[u32],
        src_rows: &[u32],
        width: usize,
        src_stride: usize,
        src_col: usize,
    ) {
        debug_assert_eq!(dst_rows.len(), src_rows.len());
        if dst_rows.is_empty() || width == 0 {
            return;
        }
        let (db, sb) = (self.indices(dst_rows), self.indices(src_rows));
        let n = as_i32("rows", dst_rows.len());
        let (w, total) = (as_i32("width", width), as_i32("rows", dst.len() / width));
        let (stride, col) = (src_stride as i64, as_i32("column", src_col));
        self.run(
            "rows_copy_f32",
            elementwise_ops::rows_copy(dst_rows.len()),
            &[
                dst.block(),
                src.block(),
                &db,
                &sb,
                &n,
                &w,
                &total,
                &stride,
                &col,
            ],
        );
    }

    /// `dst[rows[i]] = src[i]` for rows of width `d`; with repeated rows the last one wins.
    pub(super) fn scatter_rows_on_device(
        &self,
        dst: &mut CudaBuf<D>,
        src: &CudaBuf<D>,
        rows: &[u32],
        d: usize,
    ) {
        assert_eq!(
            src.len(),
            rows.len() * d,
            "scatter_rows: src must be [rows, d]"
        );
        dst.invalidate_shadow();
        if d == 0 {
            return;
        }
        let dst_rows = dst.len() / d;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= dst_rows) {
            panic!("scatter_rows: row {r} out of range {dst_rows}");
        }
        let (to, from) = last_writer_rows(rows);
        self.launch_rows_copy(dst, src, &to, &from, d, d, 0);
    }

    /// The key and value thirds of each `qkv` row (`[n, 3c]`) into entry `entries[r]` of
    /// the caches: two row copies.
    pub(super) fn kv_append_on_device(
        &self,
        k_cache: &mut CudaBuf<D>,
        v_cache: &mut CudaBuf<D>,
        qkv: &CudaBuf<D>,
        entries: &[u32],
        c: usize,
    ) {
        assert_eq!(
            qkv.len(),
            entries.len() * 3 * c,
            "kv_append: qkv must be [n, 3c]"
        );
        assert_eq!(k_cache.len(), v_cache.len());
        if c == 0 {
            return;
        }
        if let Some(&e) = entries
            .iter()
            .find(|&&e| (e as usize + 1) * c > k_cache.len())
        {
            panic!("kv_append: entry {e} outside the cache");
        }
        let (to, from) = last_writer_rows(entries);
        self.launch_rows_copy(k_cache, qkv, &to, &from, c, 3 * c, c);
        self.launch_rows_copy(v_cache, qkv, &to, &from, c, 3 * c, 2 * c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_writer_rows_keeps_the_last_source_of_each_row() {
        assert_eq!(
            last_writer_rows(&[3, 0, 3, 5, 0, 3]),
            (vec![5, 0, 3], vec![3, 4, 5])
        );
        assert_eq!(last_writer_rows(&[]), (vec![], vec![]));
        assert_eq!(last_writer_rows(&[7, 8]), (vec![7, 8], vec![0, 1]));
    }
}
