//! Strided-batched f32 GEMM: `batch` independent row-major products
//! `out_i = alpha · op(a_i) · op(b_i) + beta · out_i`, each matrix addressed by an element
//! offset, a leading dimension and a batch stride inside one buffer — a cuBLASLt matmul with
//! batched layouts (`BATCH_COUNT`, `STRIDED_BATCH_OFFSET`; src/backend/cuda/cublaslt.rs) in
//! row-major terms. Attention uses it to address the heads of an
//! interleaved `[b, t, 3c]` qkv tensor in place (leading dimension `3c`), so no gather into
//! head-major copies is needed.

use super::device::DeviceError;

/// Where the matrices of one operand lie in its buffer (in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixLayout {
    /// First element of matrix 0.
    pub offset: usize,
    /// Distance between consecutive stored rows (at least the stored row length).
    pub ld: usize,
    /// Distance between the first elements of consecutive matrices of the batch.
    pub stride: usize,
}

impl MatrixLayout {
    /// Matrices at `offset`, rows `ld` apart, matrices `stride` apart.
    pub fn new(offset: usize, ld: usize, stride: usize) -> Self {
        Self { offset, ld, stride }
    }
}

/// A strided-batched GEMM: for `i < batch`,
/// `out_i[m, n] = alpha · op(a_i)[m, k] · op(b_i)[k, n] + beta · out_i[m, n]`, where `a_i` is
/// stored `[m, k]` (`[k, m]` when `trans_a`) and `b_i` `[k, n]` (`[n, k]` when `trans_b`).
/// With `beta == 0` the old contents of `out` are not read (NaN there does not propagate),
/// as in BLAS. The output matrices must not overlap each other or the inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StridedGemm {
    /// Rows of each output.
    pub m: usize,
    /// Reduction length.
    pub k: usize,
    /// Columns of each output.
    pub n: usize,
    /// Number of products.
    pub batch: usize,
    /// `a` is stored transposed (`[k, m]`).
    pub trans_a: bool,
    /// `b` is stored transposed (`[n, k]`).
    pub trans_b: bool,
    /// Layout of the `a` matrices.
    pub a: MatrixLayout,
    /// Layout of the `b` matrices.
    pub b: MatrixLayout,
    /// Layout of the output matrices.
    pub out: MatrixLayout,
    /// Factor of the product.
    pub alpha: f32,
    /// Factor of the old output (0: overwrite, 1: accumulate).
    pub beta: f32,
}

impl StridedGemm {
    /// Stored `(rows, columns)` of each `a` matrix.
    pub fn a_dims(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// Stored `(rows, columns)` of each `b` matrix.
    pub fn b_dims(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// The element ranges `[first, last + 1)` of `out`, `a` and `b` that the GEMM addresses
    /// (empty when it addresses nothing): what the stream hazard checker tracks.
    pub fn spans(&self) -> [std::ops::Range<usize>; 3] {
        let span = |layout: MatrixLayout, (rows, cols): (usize, usize)| {
            if self.batch == 0 || rows == 0 || cols == 0 {
                return layout.offset..layout.offset;
            }
            let end =
                layout.offset + (self.batch - 1) * layout.stride + (rows - 1) * layout.ld + cols;
            layout.offset..end
        };
        [
            span(self.out, (self.m, self.n)),
            span(self.a, self.a_dims()),
            span(self.b, self.b_dims()),
        ]
    }

    /// Checks that every element the GEMM addresses lies inside buffers of `out_len`, `a_len`
    /// and `b_len` elements, and that each leading dimension covers a stored row.
    pub fn check(&self, out_len: usize, a_len: usize, b_len: usize) -> Result<(), DeviceError> {
        let operands = [
            ("out", self.out, (self.m, self.n), out_len),
            ("a", self.a, self.a_dims(), a_len),
            ("b", self.b, self.b_dims(), b_len),
        ];
        for (name, layout, (rows, cols), len) in operands {
            if let Err(why) = check_operand(layout, rows, cols, self.batch, len) {
                return Err(DeviceError::Shape(format!(
                    "strided gemm {}x{}x{} (batch {}): {name}: {why}",
                    self.m, self.k, self.n, self.batch
                )));
            }
        }
        Ok(())
    }
}

/// Whether `batch` stored `rows × cols` matrices at `layout` fit in `len` elements.
fn check_operand(
    layout: MatrixLayout,
    rows: usize,
    cols: usize,
    batch: usize,
    len: usize,
) -> Result<(), String> {
    if batch == 0 || rows == 0 || cols == 0 {
        return Ok(());
    }
    if layout.ld < cols {
        return Err(format!(
            "leading dimension {} below the row length {cols}",
            layout.ld
        ));
    }
    let end = (batch - 1)
        .checked_mul(layout.stride)
        .and_then(|x| x.checked_add((rows - 1).checked_mul(layout.ld)?))
        .and_then(|x| x.checked_add(layout.offset))
        .and_then(|x| x.checked_add(cols));
    match end {
        Some(end) if end <= len => Ok(()),
        _ => Err(format!(
            "{batch} matrices of {rows}x{cols} at offset {}, ld {}, stride {} exceed {len} elements",
            layout.offset, layout.ld, layout.stride
        )),
    }
}

/// Copies matrix `i` of `layout` (`rows × cols`) into a contiguous row-major vector.
fn gather(src: &[f32], layout: MatrixLayout, i: usize, rows: usize, cols: usize) -> Vec<f32> {
    let start = layout.offset + i * layout.stride;
    let mut dense = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = start + r * layout.ld;
        dense.extend_from_slice(&src[row..row + cols]);
    }
    dense
}

/// Runs `g` on host slices (the emulated device's GEMM): each product through the CPU
/// backend's matmul on contiguous copies of its operands. `g` must have passed
/// [`StridedGemm::check`] for these lengths.
pub(crate) fn strided_gemm_on_host(out: &mut [f32], a: &[f32], b: &[f32], g: &StridedGemm) {
    let (m, k, n) = (g.m, g.k, g.n);
    if m == 0 || n == 0 {
        return;
    }
    let (a_rows, a_cols) = g.a_dims();
    let (b_rows, b_cols) = g.b_dims();
    let mut product = vec![0.0f32; m * n];
    for i in 0..g.batch {
        let a_i = gather(a, g.a, i, a_rows, a_cols);
        let b_i = gather(b, g.b, i, b_rows, b_cols);
        crate::backend::cpu::matmul::matmul(
            &mut product,
            &a_i,
            &b_i,
            m,
            k,
            n,
            g.trans_a,
            g.trans_b,
            false,
        );
        let start = g.out.offset + i * g.out.stride;
        for (r, product_row) in product.chunks_exact(n).enumerate() {
            let row = &mut out[start + r * g.out.ld..][..n];
            for (o, &p) in row.iter_mut().zip(product_row) {
                *o = if g.beta == 0.0 {
                    g.alpha * p
                } else {
                    g.alpha * p + g.beta * *o
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop over the same layouts, the yardstick for the gather + matmul path.
    fn naive(out: &mut [f32], a: &[f32], b: &[f32], g: &StridedGemm) {
        for i in 0..g.batch {
            for r in 0..g.m {
                for c in 0..g.n {
                    let mut acc = 0.0f64;
                    for x in 0..g.k {
                        let ai = if g.trans_a {
                            x * g.a.ld + r
                        } else {
                            r * g.a.ld + x
                        };
                        let bi = if g.trans_b {
                            c * g.b.ld + x
                        } else {
                            x * g.b.ld + c
                        };
                        acc += a[g.a.offset + i * g.a.stride + ai] as f64
                            * b[g.b.offset + i * g.b.stride + bi] as f64;
                    }
                    let o = &mut out[g.out.offset + i * g.out.stride + r * g.out.ld + c];
                    let old = if g.beta == 0.0 { 0.0 } else { g.beta * *o };
                    *o = (g.alpha as f64 * acc) as f32 + old;
                }
            }
        }
    }

    #[test]
    fn interleaved_layouts_match_the_naive_product() {
        // Two batches of 3x4 · 4x5 read from padded, interleaved storage; out rows padded too.
        for (trans_a, trans_b, beta) in
            [(false, false, 0.0), (true, false, 1.0), (false, true, 0.5)]
        {
            let (m, k, n, batch) = (3usize, 4usize, 5usize, 2usize);
            let mut g = StridedGemm {
                m,
                k,
                n,
                batch,
                trans_a,
                trans_b,
                a: MatrixLayout::new(1, 7, 2),
                b: MatrixLayout::new(3, 11, 5),
                out: MatrixLayout::new(2, 13, 6),
                alpha: 0.75,
                beta,
            };
            // Exact lengths, so one more matrix overruns every operand.
            let exact = |l: MatrixLayout, (rows, cols): (usize, usize)| {
                l.offset + (batch - 1) * l.stride + (rows - 1) * l.ld + cols
            };
            let a: Vec<f32> = (0..exact(g.a, g.a_dims()))
                .map(|x| (x as f32 * 0.37).sin())
                .collect();
            let b: Vec<f32> = (0..exact(g.b, g.b_dims()))
                .map(|x| (x as f32 * 0.91).cos())
                .collect();
            let start: Vec<f32> = (0..exact(g.out, (m, n))).map(|x| x as f32 * 0.01).collect();
            g.check(start.len(), a.len(), b.len()).unwrap();
            let (mut got, mut want) = (start.clone(), start.clone());
            strided_gemm_on_host(&mut got, &a, &b, &g);
            naive(&mut want, &a, &b, &g);
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
            }
            g.batch = 3;
            assert!(g.check(start.len(), a.len(), b.len()).is_err());
        }
    }

    #[test]
    fn check_rejects_short_leading_dimensions_and_overruns() {
        let g = StridedGemm {
            m: 2,
            k: 3,
            n: 4,
            batch: 1,
            trans_a: false,
            trans_b: false,
            a: MatrixLayout::new(0, 2, 0),
            b: MatrixLayout::new(0, 4, 0),
            out: MatrixLayout::new(0, 4, 0),
            alpha: 1.0,
            beta: 0.0,
        };
        let err = g.check(8, 6, 12).unwrap_err().to_string();
        assert!(err.contains("a: leading dimension 2"), "{err}");
        let g = StridedGemm {
            a: MatrixLayout::new(0, 3, 0),
            ..g
        };
        g.check(8, 6, 12).unwrap();
        assert!(g.check(7, 6, 12).is_err());
        let beta_zero_ignores_nan = {
            let mut out = vec![f32::NAN; 8];
            strided_gemm_on_host(&mut out, &[1.0; 6], &[1.0; 12], &g);
            out
        };
        assert_eq!(beta_zero_ignores_nan, vec![3.0; 8]);
    }
}
