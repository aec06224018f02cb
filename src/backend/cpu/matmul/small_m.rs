//! Products `a · bᵀ` with few rows (`m ≤` [`MAX_ROWS`]): the decode steps of MEGALODON,
//! whose linear weights are stored `(out, in)`, and MEGABYTE's tied byte head.
//!
//! With `b` transposed, `gemm` packs `b` on every call, which at a handful of rows costs ten
//! times the arithmetic. Here `b` is streamed once in its stored layout: every output is a
//! dot product of a row of `a` with a row of `b`, both contiguous, summed in [`LANES`]
//! interleaved partial sums and reduced by a fixed tree. (Untransposed, `gemm` needs no
//! packing and is faster than a direct kernel at every `m`, so that case stays there.)
//!
//! Each output element is always computed by the same operations, whatever `m`, the column
//! block it falls in, or the thread that runs it: row `i` of an `m`-row call equals that row
//! computed alone, bit for bit (serving relies on this batch invariance). Copies compiled
//! for AVX-512 and for AVX2 are taken when the CPU has them; every copy performs the same
//! fused multiply-adds in the same order (the portable copy through the correctly rounded
//! `mul_add`, slow only on x86 CPUs older than FMA), so their results are identical.

use rayon::prelude::*;

use super::super::Real;
use super::PARALLEL_MIN_MACS;

/// Most rows this path takes; above, `gemm`'s packed kernels win.
pub const MAX_ROWS: usize = 16;

/// Partial sums per dot product.
const LANES: usize = 16;

/// Output columns per task (and per L1-resident accumulator block of the axpy form).
const BLOCK_COLS: usize = 64;

/// `out[m, n] (= or +=) a[m, k] · bᵀ` for `b` stored `[n, k]`. Shapes are the caller's to
/// check.
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Real>(
    out: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    debug_assert!(out.len() == m * n && a.len() == m * k && b.len() == k * n);
    // Block-major results: block `c` covers columns `c·BLOCK_COLS ..`, stored `[m, w]`.
    let mut blocks = vec![F::zero(); m * n];
    let block = |(c, blk): (usize, &mut [F])| {
        let j0 = c * BLOCK_COLS;
        let w = blk.len() / m;
        // The feature-specific copies exist only on x86-64; elsewhere the portable one runs.
        #[cfg(target_arch = "x86_64")]
        {
            if use_avx512() {
                // SAFETY: `use_avx512` confirmed that the running CPU supports AVX-512F and FMA.
                unsafe { block_avx512(blk, a, b, m, k, n, j0, w) };
                return;
            }
            if use_avx2() {
                // SAFETY: `use_avx2` confirmed that the running CPU supports AVX2 and FMA.
                unsafe { block_avx2(blk, a, b, m, k, n, j0, w) };
                return;
            }
        }
        block_portable(blk, a, b, m, k, n, j0, w)
    };
    let macs = m.saturating_mul(n).saturating_mul(k);
    if macs >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        blocks
            .par_chunks_mut(m * BLOCK_COLS)
            .enumerate()
            .for_each(block);
    } else {
        blocks
            .chunks_mut(m * BLOCK_COLS)
            .enumerate()
            .for_each(block);
    }
    for (c, blk) in blocks.chunks(m * BLOCK_COLS).enumerate() {
        let (j0, w) = (c * BLOCK_COLS, blk.len() / m);
        for i in 0..m {
            let dst = &mut out[i * n + j0..i * n + j0 + w];
            let src = &blk[i * w..(i + 1) * w];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn use_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn use_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[allow(clippy::too_many_arguments)]
fn block_portable<F: Real>(
    blk: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    w: usize,
) {
    block_kernel(blk, a, b, m, k, n, j0, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2<F: Real>(
    blk: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    w: usize,
) {
    block_kernel(blk, a, b, m, k, n, j0, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512<F: Real>(
    blk: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    w: usize,
) {
    block_kernel(blk, a, b, m, k, n, j0, w)
}

/// Columns `j0..j0 + w` of the product into `blk` (`[m, w]`). Four rows of `b` at a time
/// stay in L1 while every row of `a` meets them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_kernel<F: Real>(
    blk: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    _n: usize,
    j0: usize,
    w: usize,
) {
    let mut j = 0;
    while j + 4 <= w {
        let rows: [&[F]; 4] = std::array::from_fn(|r| &b[(j0 + j + r) * k..][..k]);
        for i in 0..m {
            let d = dot4(&a[i * k..(i + 1) * k], rows);
            blk[i * w + j..i * w + j + 4].copy_from_slice(&d);
        }
        j += 4;
    }
    for jj in j..w {
        let row = &b[(j0 + jj) * k..][..k];
        for i in 0..m {
            blk[i * w + jj] = dot4(&a[i * k..(i + 1) * k], [row; 4])[0];
        }
    }
}

/// Four dot products of `a` with `rows[r]` (all of `a`'s length), each summed exactly as
/// the others: [`LANES`] partial sums of fused multiply-adds over whole groups of lanes, a
/// fixed halving tree, then the tail in order.
#[inline(always)]
fn dot4<F: Real>(a: &[F], rows: [&[F]; 4]) -> [F; 4] {
    let k = a.len();
    let full = k - k % LANES;
    let [r0, r1, r2, r3] = rows.map(|r| &r[..k]);
    let (mut s0, mut s1, mut s2, mut s3) = (
        [F::zero(); LANES],
        [F::zero(); LANES],
        [F::zero(); LANES],
        [F::zero(); LANES],
    );
    let groups = a[..full]
        .chunks_exact(LANES)
        .zip(r0[..full].chunks_exact(LANES))
        .zip(r1[..full].chunks_exact(LANES))
        .zip(r2[..full].chunks_exact(LANES))
        .zip(r3[..full].chunks_exact(LANES));
    for ((((ca, c0), c1), c2), c3) in groups {
        let ca: &[F; LANES] = ca.try_into().expect("whole group");
        let c0: &[F; LANES] = c0.try_into().expect("whole group");
        let c1: &[F; LANES] = c1.try_into().expect("whole group");
        let c2: &[F; LANES] = c2.try_into().expect("whole group");
        let c3: &[F; LANES] = c3.try_into().expect("whole group");
        for l in 0..LANES {
            s0[l] = ca[l].mul_add(c0[l], s0[l]);
            s1[l] = ca[l].mul_add(c1[l], s1[l]);
            s2[l] = ca[l].mul_add(c2[l], s2[l]);
            s3[l] = ca[l].mul_add(c3[l], s3[l]);
        }
    }
    let finish = |mut acc: [F; LANES], row: &[F]| {
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                acc[l] = acc[l] + acc[l + width];
            }
        }
        let mut s = acc[0];
        for p in full..k {
            s = s + a[p] * row[p];
        }
        s
    };
    [
        finish(s0, r0),
        finish(s1, r1),
        finish(s2, r2),
        finish(s3, r3),
    ]
}
