//! Attention for long sequences (the MEGABYTE global model), one (batch, head) pair at a
//! time: the head's `q`, `k`, `v` are gathered into zero-padded scratch, and the products
//! `S = q·kᵀ`, `O = P·v` (and the four backward ones) run as register tiles
//! ([`super::tile`]) over only the tiles that touch the causal triangle.
//!
//! Pairs write disjoint but interleaved channel ranges of `out` / `dqkv`, hence
//! [`DisjointWriter`]. Measured against the `gemm` crate (which reads the strided operands
//! directly but must compute full squares): its two forward products alone took as long as
//! this whole forward pass at b=4, t=256, c=512, h=8, so it is not used.

use rayon::prelude::*;

use super::tile::{tile, Strided, ROWS};
use super::TASK_MACS;
use crate::backend::cpu::loss::vector_math::{dot, exp_shifted_in_place, row_max};
use crate::backend::cpu::Real;

/// Shapes of one call, with the per-head tile padding for tile width `W`.
#[derive(Clone, Copy, Debug)]
struct HeadGeometry {
    t: usize,
    c: usize,
    h: usize,
    /// Channels per head, `c / h`.
    hs: usize,
    /// `t` rounded up to whole tiles (a multiple of `W`, itself a multiple of [`ROWS`]).
    tp: usize,
    /// `hs` rounded up to whole tiles.
    hsp: usize,
}

impl HeadGeometry {
    fn new(t: usize, c: usize, h: usize, w: usize) -> Self {
        debug_assert_eq!(w % ROWS, 0);
        let hs = c / h;
        Self {
            t,
            c,
            h,
            hs,
            tp: t.next_multiple_of(w),
            hsp: hs.next_multiple_of(w),
        }
    }

    /// (batch, head) pairs per rayon task, out of `pairs`: enough work to outweigh the
    /// hand-off and the task's scratch allocation (a few hundred KiB at t = 256, so it must
    /// not be paid per pair), yet about four tasks per thread for load balance.
    fn pairs_per_task(&self, pairs: usize) -> usize {
        let by_work = TASK_MACS / (self.t * self.t * self.hs).max(1);
        let by_balance = pairs.div_ceil(4 * rayon::current_num_threads());
        by_work.max(by_balance).max(1)
    }
}

/// A buffer that parallel tasks write in disjoint, strided parts (each (batch, head) pair owns
/// its head's channels of every row, which no slice split can express).
struct DisjointWriter<F> {
    ptr: *mut F,
    len: usize,
}

// SAFETY: only used to hand out non-overlapping ranges to different threads (see `range`).
unsafe impl<F: Send> Send for DisjointWriter<F> {}

// SAFETY: as above.
unsafe impl<F: Send> Sync for DisjointWriter<F> {}

impl<F> DisjointWriter<F> {
    fn new(buf: &mut [F]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Pointer to `start..start + len`, bounds-checked.
    ///
    /// The caller may turn it into a `&mut` slice only while no other reference to that range
    /// exists, which holds when every range is handed to exactly one task.
    fn range(&self, start: usize, len: usize) -> *mut F {
        assert!(start + len <= self.len, "strided write out of bounds");
        // SAFETY: in bounds by the assert.
        unsafe { self.ptr.add(start) }
    }
}

/// `dst[rows][offset .. offset + width] (= or +=)` the first `rows` rows of a tile, where tile
/// row `r` lands at `dst` element `row_start(r)`.
#[inline(always)]
fn store_tile<F: Real, const W: usize>(
    dst: &DisjointWriter<F>,
    acc: &[[F; W]; ROWS],
    rows: usize,
    row_start: impl Fn(usize) -> usize,
    width: usize,
    accumulate: bool,
) {
    for (r, acc_row) in acc.iter().enumerate().take(rows) {
        // SAFETY: each (batch, head) pair is the only writer of its head's channels, and the
        // caller hands this pair's ranges to no one else.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.range(row_start(r), width), width) };
        // Whole-tile rows go through a fixed-size array so the copy is a few vector moves
        // instead of a `memmove` call (a runtime-length copy loop becomes one).
        match <&mut [F; W]>::try_from(&mut *out) {
            Ok(full) if accumulate => {
                for (o, &a) in full.iter_mut().zip(acc_row) {
                    *o = *o + a;
                }
            }
            Ok(full) => *full = *acc_row,
            Err(_) => {
                for (o, &a) in out.iter_mut().zip(acc_row) {
                    *o = if accumulate { *o + a } else { a };
                }
            }
        }
    }
}

/// Per-task scratch of the forward pass: one head's operands, zero-padded to whole tiles.
struct ForwardScratch<F> {
    /// `scale·q`, `[tp, hsp]`.
    q: Vec<F>,
    /// `kᵀ`, `[hsp, tp]`.
    kt: Vec<F>,
    /// `[tp, hsp]`.
    v: Vec<F>,
    /// Scores, then probabilities, `[tp, tp]`.
    s: Vec<F>,
}

impl<F: Real> ForwardScratch<F> {
    fn new(g: &HeadGeometry) -> Self {
        let z = |n| vec![F::zero(); n];
        Self {
            q: z(g.tp * g.hsp),
            kt: z(g.hsp * g.tp),
            v: z(g.tp * g.hsp),
            s: z(g.tp * g.tp),
        }
    }
}

/// One (batch, head) pair of the forward pass. Padded scratch rows and columns stay zero
/// across pairs because only the live `t × hs` region is ever written.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_head<F: Real, const W: usize, const FMA: bool>(
    ws: &mut ForwardScratch<F>,
    att: &mut [F],
    qkv: &[F],
    out: &DisjointWriter<F>,
    pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    let HeadGeometry {
        t,
        c,
        h,
        hs,
        tp,
        hsp,
    } = *g;
    let (bi, hi) = (pair / h, pair % h);
    let ForwardScratch { q, kt, v, s } = ws;
    for (i, row) in qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c]
        .chunks_exact(3 * c)
        .enumerate()
    {
        // One fused pass per row (the transposed `k` store keeps it scalar either way).
        let (q_in, k_in, v_in) = (
            &row[hi * hs..][..hs],
            &row[c + hi * hs..][..hs],
            &row[2 * c + hi * hs..][..hs],
        );
        let (q_row, v_row) = (&mut q[i * hsp..][..hs], &mut v[i * hsp..][..hs]);
        for d in 0..hs {
            q_row[d] = q_in[d] * scale;
            v_row[d] = v_in[d];
            kt[d * tp + i] = k_in[d];
        }
    }

    // Scores, only over tiles that touch the causal triangle.
    let qv = Strided {
        data: &q[..],
        row_stride: hsp,
        col_stride: 1,
    };
    for i0 in (0..t).step_by(ROWS) {
        let n_end = (i0 + ROWS).min(t).next_multiple_of(W);
        for n0 in (0..n_end).step_by(W) {
            let acc = tile::<F, W, FMA>(qv, i0, kt, tp, n0, 0..hs);
            for (r, acc_row) in acc.iter().enumerate() {
                s[(i0 + r) * tp + n0..][..W].copy_from_slice(acc_row);
            }
        }
    }

    for i in 0..t {
        let row = &mut s[i * tp..(i + 1) * tp];
        let (live, masked) = row.split_at_mut(i + 1);
        let max = row_max(live);
        let inv = F::one() / exp_shifted_in_place::<F, FMA>(live, max);
        for p in live.iter_mut() {
            *p = *p * inv;
        }
        // Zeros above the diagonal, both for `att` and so the P·V tiles may span them.
        masked.fill(F::zero());
        att[i * t..(i + 1) * t].copy_from_slice(&row[..t]);
    }

    let probs = Strided {
        data: &s[..],
        row_stride: tp,
        col_stride: 1,
    };
    for i0 in (0..t).step_by(ROWS) {
        let k_end = (i0 + ROWS).min(t);
        for n0 in (0..hsp).step_by(W) {
            let acc = tile::<F, W, FMA>(probs, i0, v, hsp, n0, 0..k_end);
            let row_start = |r: usize| (bi * t + i0 + r) * c + hi * hs + n0;
            store_tile(out, &acc, k_end - i0, row_start, W.min(hs - n0), false);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_heads_avx2<F: Real, const W: usize>(
    att: &mut [F],
    qkv: &[F],
    out: &DisjointWriter<F>,
    first_pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    forward_heads::<F, W, true>(att, qkv, out, first_pair, g, scale)
}

/// The tiled forward over all (batch, head) pairs, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<F: Real, const W: usize>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    let g = HeadGeometry::new(t, c, h, W);
    let out = DisjointWriter::new(out);
    let per_task = g.pairs_per_task(att.len() / (t * t));
    att.par_chunks_mut(per_task * t * t)
        .enumerate()
        .for_each(|(task, att)| {
            let first_pair = task * per_task;
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe {
                    forward_heads_avx2::<F, W>(att, qkv, &out, first_pair, &g, scale)
                };
            }
            let _ = fma;
            forward_heads::<F, W, false>(att, qkv, &out, first_pair, &g, scale)
        });
}

/// Consecutive (batch, head) pairs from `first_pair` on, one per `t × t` block of `att`,
/// sharing one scratch allocation.
#[inline(always)]
fn forward_heads<F: Real, const W: usize, const FMA: bool>(
    att: &mut [F],
    qkv: &[F],
    out: &DisjointWriter<F>,
    first_pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    let mut ws = ForwardScratch::new(g);
    for (k, att) in att.chunks_exact_mut(g.t * g.t).enumerate() {
        forward_head::<F, W, FMA>(&mut ws, att, qkv, out, first_pair + k, g, scale);
    }
}

/// Per-task scratch of the backward pass, zero-padded to whole tiles.
struct BackwardScratch<F> {
    /// `[tp, hsp]` each.
    q: Vec<F>,
    k: Vec<F>,
    dout: Vec<F>,
    /// `vᵀ`, `[hsp, tp]`.
    vt: Vec<F>,
    /// Saved probabilities, `[tp, tp]`.
    p: Vec<F>,
    /// `dP`, then `dS`, `[tp, tp]`.
    ds: Vec<F>,
}

impl<F: Real> BackwardScratch<F> {
    fn new(g: &HeadGeometry) -> Self {
        let z = |n| vec![F::zero(); n];
        let (th, tt) = (g.tp * g.hsp, g.tp * g.tp);
        Self {
            q: z(th),
            k: z(th),
            dout: z(th),
            vt: z(th),
            p: z(tt),
            ds: z(tt),
        }
    }
}

/// One (batch, head) pair of the backward pass:
/// `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale`, `dV += Pᵀ·dO`, `dQ += dS·K`,
/// `dK += dSᵀ·Q`, each restricted to the causal tiles.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_head<F: Real, const W: usize, const FMA: bool>(
    ws: &mut BackwardScratch<F>,
    dqkv: &DisjointWriter<F>,
    dout: &[F],
    qkv: &[F],
    att: &[F],
    pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    let HeadGeometry {
        t,
        c,
        h,
        hs,
        tp,
        hsp,
    } = *g;
    let (bi, hi) = (pair / h, pair % h);
    let BackwardScratch {
        q,
        k,
        dout: dout_h,
        vt,
        p,
        ds,
    } = ws;
    for (i, row) in qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c]
        .chunks_exact(3 * c)
        .enumerate()
    {
        // Fused copies, as in the forward gather.
        let (q_in, k_in, v_in) = (
            &row[hi * hs..][..hs],
            &row[c + hi * hs..][..hs],
            &row[2 * c + hi * hs..][..hs],
        );
        let dout_in = &dout[(bi * t + i) * c + hi * hs..][..hs];
        let (q_row, k_row) = (&mut q[i * hsp..][..hs], &mut k[i * hsp..][..hs]);
        let dout_row = &mut dout_h[i * hsp..][..hs];
        for d in 0..hs {
            q_row[d] = q_in[d];
            k_row[d] = k_in[d];
            dout_row[d] = dout_in[d];
            vt[d * tp + i] = v_in[d];
        }
        p[i * tp..][..t].copy_from_slice(&att[i * t..(i + 1) * t]);
    }

    let dov = Strided {
        data: &dout_h[..],
        row_stride: hsp,
        col_stride: 1,
    };
    for i0 in (0..t).step_by(ROWS) {
        let n_end = (i0 + ROWS).min(t).next_multiple_of(W);
        for n0 in (0..n_end).step_by(W) {
            let acc = tile::<F, W, FMA>(dov, i0, vt, tp, n0, 0..hs);
            for (r, acc_row) in acc.iter().enumerate() {
                ds[(i0 + r) * tp + n0..][..W].copy_from_slice(acc_row);
            }
        }
    }
    for i in 0..t {
        let prow = &p[i * tp..][..i + 1];
        let (live, masked) = ds[i * tp..(i + 1) * tp].split_at_mut(i + 1);
        let centre = dot::<F, FMA>(prow, live);
        for (d, &pv) in live.iter_mut().zip(prow) {
            *d = pv * (*d - centre) * scale;
        }
        masked.fill(F::zero());
    }

    let row3 = |i: usize| (bi * t + i) * 3 * c;
    let pt = Strided {
        data: &p[..],
        row_stride: 1,
        col_stride: tp,
    };
    let dsv = Strided {
        data: &ds[..],
        row_stride: tp,
        col_stride: 1,
    };
    let dst = Strided {
        data: &ds[..],
        row_stride: 1,
        col_stride: tp,
    };
    for i0 in (0..t).step_by(ROWS) {
        let rows = (i0 + ROWS).min(t) - i0;
        for n0 in (0..hsp).step_by(W) {
            let width = W.min(hs - n0);
            let dv = tile::<F, W, FMA>(pt, i0, dout_h, hsp, n0, i0..t);
            store_tile(
                dqkv,
                &dv,
                rows,
                |r| row3(i0 + r) + 2 * c + hi * hs + n0,
                width,
                true,
            );
            let dq = tile::<F, W, FMA>(dsv, i0, k, hsp, n0, 0..i0 + rows);
            store_tile(
                dqkv,
                &dq,
                rows,
                |r| row3(i0 + r) + hi * hs + n0,
                width,
                true,
            );
            let dk = tile::<F, W, FMA>(dst, i0, q, hsp, n0, i0..t);
            store_tile(
                dqkv,
                &dk,
                rows,
                |r| row3(i0 + r) + c + hi * hs + n0,
                width,
                true,
            );
        }
    }
}

/// The tiled backward over all (batch, head) pairs, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Real, const W: usize>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    let g = HeadGeometry::new(t, c, h, W);
    let dqkv = DisjointWriter::new(dqkv);
    let per_task = g.pairs_per_task(att.len() / (t * t));
    att.par_chunks(per_task * t * t)
        .enumerate()
        .for_each(|(task, att)| {
            let first_pair = task * per_task;
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe {
                    backward_heads_avx2::<F, W>(&dqkv, dout, qkv, att, first_pair, &g, scale)
                };
            }
            let _ = fma;
            backward_heads::<F, W, false>(&dqkv, dout, qkv, att, first_pair, &g, scale)
        });
}

/// Consecutive (batch, head) pairs from `first_pair` on, one per `t × t` block of `att`,
/// sharing one scratch allocation.
#[inline(always)]
fn backward_heads<F: Real, const W: usize, const FMA: bool>(
    dqkv: &DisjointWriter<F>,
    dout: &[F],
    qkv: &[F],
    att: &[F],
    first_pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    let mut ws = BackwardScratch::new(g);
    for (k, att) in att.chunks_exact(g.t * g.t).enumerate() {
        backward_head::<F, W, FMA>(&mut ws, dqkv, dout, qkv, att, first_pair + k, g, scale);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_heads_avx2<F: Real, const W: usize>(
    dqkv: &DisjointWriter<F>,
    dout: &[F],
    qkv: &[F],
    att: &[F],
    first_pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    backward_heads::<F, W, true>(dqkv, dout, qkv, att, first_pair, g, scale)
}
