//! Dense matrix product `out[m,n] (= or +=) op(a)[m,k] · op(b)[k,n]`.
//!
//! The fast path hands the strides to the `gemm` crate, so transposed operands cost nothing
//! extra. Note `gemm` computes `dst = alpha·dst + beta·lhs·rhs`, the reverse of BLAS naming.
//! Products `a·bᵀ` of at most [`small_m::MAX_ROWS`] rows (decoding) skip `gemm`'s packing
//! and run [`small_m::matmul`], whose rows are computed independently of each other.

use std::any::TypeId;

use gemm::Parallelism;

use super::Real;

pub mod small_m;

/// Below this many multiply-adds (`m·n·k`) a product runs on the calling thread: the small
/// products of a decode step would otherwise spend more on rayon hand-offs than on arithmetic.
/// It equals `gemm`'s own default threading threshold, so above it `gemm` does split the work.
pub const PARALLEL_MIN_MACS: usize = 48 * 48 * 256;

fn check_shapes(
    out: &[impl Sized],
    a: &[impl Sized],
    b: &[impl Sized],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "matmul: out must be [m, n] = [{m}, {n}]");
    assert_eq!(a.len(), m * k, "matmul: a must hold m·k = {m}·{k}");
    assert_eq!(b.len(), k * n, "matmul: b must hold k·n = {k}·{n}");
}

/// `(row stride, column stride)` of `op(x)` for `x` stored `[rows, cols]` untransposed.
fn strides(trans: bool, rows: usize, cols: usize) -> (isize, isize) {
    if trans {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// `out (= or +=) op(a) · op(b)`; see [`crate::backend::Backend::matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Real>(
    out: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    check_shapes(out, a, b, m, k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(F::zero());
        }
        return;
    }
    let gemm_supports =
        TypeId::of::<F>() == TypeId::of::<f32>() || TypeId::of::<F>() == TypeId::of::<f64>();
    if !gemm_supports {
        return reference::matmul(out, a, b, m, k, n, trans_a, trans_b, accumulate);
    }
    if m <= small_m::MAX_ROWS && !trans_a && trans_b {
        return small_m::matmul(out, a, b, m, k, n, accumulate);
    }
    let macs = m.saturating_mul(n).saturating_mul(k);
    let parallelism = if macs >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // op(a) is [m, k]: stored [m, k], or [k, m] when transposed; likewise op(b) is [k, n].
    let (a_rs, a_cs) = strides(trans_a, m, k);
    let (b_rs, b_cs) = strides(trans_b, k, n);
    // SAFETY: F is f32 or f64 (checked above), which gemm implements. The shapes were checked
    // against the slice lengths, so every index gemm forms from (m, n, k) and these strides
    // lies inside its slice; `out` is a unique borrow and so aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// `out (= or +=) op(a) · op(b)` with one dot product per output element.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<F: Real>(
        out: &mut [F],
        a: &[F],
        b: &[F],
        m: usize,
        k: usize,
        n: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        super::check_shapes(out, a, b, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let mut s = F::zero();
                for p in 0..k {
                    let aip = if trans_a { a[p * m + i] } else { a[i * k + p] };
                    let bpj = if trans_b { b[j * k + p] } else { b[p * n + j] };
                    s = s + aip * bpj;
                }
                out[i * n + j] = if accumulate { out[i * n + j] + s } else { s };
            }
        }
    }
}
