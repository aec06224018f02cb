//! Causal multi-head attention on the CPU: training forward/backward, single-query decode
//! against a KV cache, and the cache append.
//!
//! Layouts follow [`crate::backend::Backend::attention_forward`]: `qkv` is `[b, t, 3c]` with
//! per row `[q | k | v]`, head `i` owning channels `i·c/h .. (i+1)·c/h` of each part.

mod short;
mod tile;

use rayon::prelude::*;

use self::tile::{tile, Strided, ROWS};
use super::loss::vector_math::{dot, exp_shifted_in_place, has_avx2_fma, madd, row_max};
use super::Real;

/// Multiply-adds worth one rayon task: well above the pool's hand-off cost.
const TASK_MACS: usize = 1 << 16;

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

fn check_heads(c: usize, h: usize) {
    assert!(
        h > 0 && c % h == 0,
        "channels {c} must split evenly into {h} heads"
    );
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

/// Longest sequences the short-sequence kernels take; longer ones use the tiled kernels.
/// Measured crossovers (c = 256..512, one thread): the forward kernels tie at t = 24, the
/// backward ones at t ≈ 32-48.
const SHORT_MAX_T_FORWARD: usize = 24;
const SHORT_MAX_T_BACKWARD: usize = 32;

/// Causal attention forward: `out = [b, t, c]`, `att = [b, h, t, t]` probabilities.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    check_heads(c, h);
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
    assert_eq!(out.len(), b * t * c, "out must be [b, t, c]");
    assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
    if out.is_empty() {
        return;
    }
    if t <= SHORT_MAX_T_FORWARD {
        return forward_short(out, att, qkv, t, c, h, scale, has_avx2_fma());
    }
    forward_tiled::<F, 16>(out, att, qkv, t, c, h, scale, has_avx2_fma())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn forward_sequences_avx2<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    forward_sequences::<F, true>(out, att, qkv, t, c, h, scale)
}

/// Runs the short-sequence forward kernel over consecutive sequences. Each sequence's
/// `[t, 3c]` input is first copied into a local buffer and its output assembled in another:
/// the kernel hops between short head segments of each row, which leaves the hardware
/// prefetchers idle, while a straight copy streams (measured: 2.3× faster on the local
/// model once its buffers outgrow the last-level cache).
#[inline(always)]
fn forward_sequences<F: Real, const FMA: bool>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let mut x_local = vec![F::zero(); t * 3 * c];
    let mut out_local = vec![F::zero(); t * c];
    let seqs = out
        .chunks_exact_mut(t * c)
        .zip(att.chunks_exact_mut(h * t * t));
    for ((out, att), x) in seqs.zip(qkv.chunks_exact(t * 3 * c)) {
        x_local.copy_from_slice(x);
        short::forward_sequence::<F, FMA>(&mut out_local, att, &x_local, t, c, h, scale);
        out.copy_from_slice(&out_local);
    }
}

/// Sequences per rayon task for the short-sequence kernels.
fn sequences_per_task(t: usize, c: usize) -> usize {
    (TASK_MACS / (t * t * c).max(1)).max(1)
}

/// The short-sequence forward over all sequences, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
fn forward_short<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    let n = sequences_per_task(t, c);
    out.par_chunks_mut(n * t * c)
        .zip(att.par_chunks_mut(n * h * t * t))
        .zip(qkv.par_chunks(n * t * 3 * c))
        .for_each(|((out, att), qkv)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { forward_sequences_avx2(out, att, qkv, t, c, h, scale) };
            }
            let _ = fma;
            forward_sequences::<F, false>(out, att, qkv, t, c, h, scale)
        });
}

/// The tiled forward over all (batch, head) pairs, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
fn forward_tiled<F: Real, const W: usize>(
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

/// Causal attention backward: `dqkv += …` given `dout` and the saved `att`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    check_heads(c, h);
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
    assert_eq!(dqkv.len(), b * t * 3 * c, "dqkv must be [b, t, 3c]");
    assert_eq!(dout.len(), b * t * c, "dout must be [b, t, c]");
    assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
    if dout.is_empty() {
        return;
    }
    if t <= SHORT_MAX_T_BACKWARD {
        return backward_short(dqkv, dout, qkv, att, t, c, h, scale, has_avx2_fma());
    }
    backward_tiled::<F, 16>(dqkv, dout, qkv, att, t, c, h, scale, has_avx2_fma())
}

/// Runs the short-sequence backward kernel over consecutive sequences, staging each
/// sequence's blocks in local buffers as [`forward_sequences`] does.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_sequences<F: Real, const FMA: bool>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let mut ds = vec![F::zero(); t];
    let mut x_local = vec![F::zero(); t * 3 * c];
    let mut dx_local = vec![F::zero(); t * 3 * c];
    let mut dout_local = vec![F::zero(); t * c];
    let seqs = dqkv
        .chunks_exact_mut(t * 3 * c)
        .zip(dout.chunks_exact(t * c));
    let inputs = qkv.chunks_exact(t * 3 * c).zip(att.chunks_exact(h * t * t));
    for ((dx, dout), (x, att)) in seqs.zip(inputs) {
        x_local.copy_from_slice(x);
        dx_local.copy_from_slice(dx);
        dout_local.copy_from_slice(dout);
        short::backward_sequence::<F, FMA>(
            &mut dx_local,
            &dout_local,
            &x_local,
            att,
            &mut ds,
            t,
            c,
            h,
            scale,
        );
        dx.copy_from_slice(&dx_local);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn backward_sequences_avx2<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    backward_sequences::<F, true>(dqkv, dout, qkv, att, t, c, h, scale)
}

/// The short-sequence backward over all sequences, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
fn backward_short<F: Real>(
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
    let n = sequences_per_task(t, c);
    dqkv.par_chunks_mut(n * t * 3 * c)
        .zip(dout.par_chunks(n * t * c))
        .zip(
            qkv.par_chunks(n * t * 3 * c)
                .zip(att.par_chunks(n * h * t * t)),
        )
        .for_each(|((dqkv, dout), (qkv, att))| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: callers pass `fma` only when the CPU has AVX2 and FMA.
                return unsafe { backward_sequences_avx2(dqkv, dout, qkv, att, t, c, h, scale) };
            }
            let _ = fma;
            backward_sequences::<F, false>(dqkv, dout, qkv, att, t, c, h, scale)
        });
}

/// The tiled backward over all (batch, head) pairs, on the AVX2+FMA path when `fma`.
#[allow(clippy::too_many_arguments)]
fn backward_tiled<F: Real, const W: usize>(
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

/// Cached keys per decode task. Long caches split into several tasks (so a single row still
/// spreads over the pool), whose partial softmax sums are merged afterwards.
const DECODE_CHUNK: usize = 256;

/// One decode task: row `r`'s query against a run of `n` consecutive cached keys, all heads
/// at once so each cached row of `c` values is streamed exactly once. `part` receives, per
/// head, the running max of the scaled scores, `Σ e^(score − max)`, and the unnormalised
/// `Σ e^(score − max)·v` (`[h | h | c]`); `scores` is `[h, n]` scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_chunk<F: Real, const FMA: bool>(
    part: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    c: usize,
    h: usize,
    scale: F,
) {
    let hs = c / h;
    let n = keys.len() / c;
    let scores = &mut scores[..h * n];
    for (j, key) in keys.chunks_exact(c).enumerate() {
        for hi in 0..h {
            let seg = hi * hs..(hi + 1) * hs;
            scores[hi * n + j] = dot::<F, FMA>(&q[seg.clone()], &key[seg]) * scale;
        }
    }
    let (maxima, rest) = part.split_at_mut(h);
    let (sums, acc) = rest.split_at_mut(h);
    for ((head_scores, max), sum) in scores.chunks_exact_mut(n).zip(maxima).zip(sums) {
        *max = row_max(head_scores);
        *sum = exp_shifted_in_place::<F, FMA>(head_scores, *max);
    }
    acc.fill(F::zero());
    for (j, value) in values.chunks_exact(c).enumerate() {
        for ((acc, value), hi) in acc
            .chunks_exact_mut(hs)
            .zip(value.chunks_exact(hs))
            .zip(0..h)
        {
            let p = scores[hi * n + j];
            for (a, &v) in acc.iter_mut().zip(value) {
                *a = madd::<F, FMA>(p, v, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn decode_chunk_avx2<F: Real>(
    part: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    c: usize,
    h: usize,
    scale: F,
) {
    decode_chunk::<F, true>(part, scores, q, keys, values, c, h, scale)
}

/// Single-query attention of each row `r` over its first `lens[r]` cached keys.
#[allow(clippy::too_many_arguments)]
pub fn decode<F: Real>(
    out: &mut [F],
    qkv: &[F],
    k_cache: &[F],
    v_cache: &[F],
    lens: &[u32],
    t_max: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    check_heads(c, h);
    let b = lens.len();
    assert_eq!(qkv.len(), b * 3 * c, "qkv must be [b, 3c]");
    assert_eq!(out.len(), b * c, "out must be [b, c]");
    assert_eq!(
        k_cache.len(),
        b * t_max * c,
        "k_cache must be [b, t_max, c]"
    );
    assert_eq!(
        v_cache.len(),
        b * t_max * c,
        "v_cache must be [b, t_max, c]"
    );
    for &len in lens {
        assert!(
            len >= 1 && len as usize <= t_max,
            "decode length {len} outside 1..={t_max}"
        );
    }
    if out.is_empty() {
        return;
    }
    decode_chunked(
        out,
        qkv,
        k_cache,
        v_cache,
        lens,
        t_max,
        c,
        h,
        scale,
        has_avx2_fma(),
    );
}

/// [`decode`] after validation, on the AVX2+FMA code path when `fma`.
#[allow(clippy::too_many_arguments)]
fn decode_chunked<F: Real>(
    out: &mut [F],
    qkv: &[F],
    k_cache: &[F],
    v_cache: &[F],
    lens: &[u32],
    t_max: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    // Tasks in row order, each a (row, first key) pair; `first_task[r]` indexes row r's.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(lens.len() + 1);
    for (r, &len) in lens.iter().enumerate() {
        first_task.push(tasks.len());
        tasks.extend((0..len as usize).step_by(DECODE_CHUNK).map(|j0| (r, j0)));
    }
    first_task.push(tasks.len());

    let width = 2 * h + c;
    let mut partials = vec![F::zero(); tasks.len() * width];
    let keys_per_task = lens
        .iter()
        .map(|&l| l as usize)
        .sum::<usize>()
        .div_ceil(tasks.len());
    let tasks_per_job = (TASK_MACS / (2 * keys_per_task * c).max(1)).max(1);
    partials
        .par_chunks_mut(width)
        .zip(tasks.par_iter())
        .with_min_len(tasks_per_job)
        .for_each_init(
            || vec![F::zero(); h * DECODE_CHUNK],
            |scores, (part, &(r, j0))| {
                let j1 = (j0 + DECODE_CHUNK).min(lens[r] as usize);
                let q = &qkv[r * 3 * c..][..c];
                let keys = &k_cache[(r * t_max + j0) * c..(r * t_max + j1) * c];
                let values = &v_cache[(r * t_max + j0) * c..(r * t_max + j1) * c];
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the caller passes `fma` only when the CPU has AVX2 and FMA.
                    return unsafe {
                        decode_chunk_avx2(part, scores, q, keys, values, c, h, scale)
                    };
                }
                let _ = fma;
                decode_chunk::<F, false>(part, scores, q, keys, values, c, h, scale)
            },
        );

    // Merge each row's chunks: rescale every partial to the row's overall max.
    let hs = c / h;
    out.par_chunks_mut(c).enumerate().for_each(|(r, out)| {
        let parts = &partials[first_task[r] * width..first_task[r + 1] * width];
        for (hi, out) in out.chunks_exact_mut(hs).enumerate() {
            let max = parts
                .chunks_exact(width)
                .fold(F::neg_infinity(), |m, p| m.max(p[hi]));
            out.fill(F::zero());
            let mut total = F::zero();
            for part in parts.chunks_exact(width) {
                let weight = (part[hi] - max).exp();
                total = total + part[h + hi] * weight;
                let acc = &part[2 * h + hi * hs..][..hs];
                for (o, &a) in out.iter_mut().zip(acc) {
                    *o = *o + a * weight;
                }
            }
            let inv = F::one() / total;
            for o in out.iter_mut() {
                *o = *o * inv;
            }
        }
    });
}

/// Copy the `k` and `v` parts of `qkv[r]` into the caches at position `pos[r]`.
pub fn kv_append<F: Real>(
    k_cache: &mut [F],
    v_cache: &mut [F],
    qkv: &[F],
    pos: &[u32],
    t_max: usize,
    c: usize,
) {
    let b = pos.len();
    assert_eq!(qkv.len(), b * 3 * c, "qkv must be [b, 3c]");
    assert_eq!(
        k_cache.len(),
        b * t_max * c,
        "k_cache must be [b, t_max, c]"
    );
    assert_eq!(
        v_cache.len(),
        b * t_max * c,
        "v_cache must be [b, t_max, c]"
    );
    for (r, &p) in pos.iter().enumerate() {
        let p = p as usize;
        assert!(p < t_max, "cache position {p} outside 0..{t_max}");
        let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
        let at = (r * t_max + p) * c;
        k_cache[at..at + c].copy_from_slice(&row[c..2 * c]);
        v_cache[at..at + c].copy_from_slice(&row[2 * c..]);
    }
}

#[cfg(test)]
mod tests {
    //! Both kernels on both instruction-set paths, for lengths on either side of the switch
    //! between them (the public functions pick one kernel per length and one path per CPU,
    //! so the integration tests cannot reach every combination).

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        // `f32::max` skips NaN, so non-finite values must be rejected explicitly.
        assert!(
            a.iter().chain(b).all(|x| x.is_finite()),
            "{what}: non-finite values"
        );
        let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 4e-6 * (1.0 + scale), "{what}: max diff {diff}");
    }

    fn instruction_sets() -> Vec<bool> {
        if has_avx2_fma() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn every_kernel_and_instruction_set_matches_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (b, t, c, h) in [
            (2, 1, 8, 2),
            (3, 7, 12, 3),
            (1, 9, 6, 2),
            (2, 30, 16, 2),
            (1, 40, 32, 4),
        ] {
            let scale = 1.0 / ((c / h) as f32).sqrt();
            let qkv = random(&mut rng, b * t * 3 * c);
            let dout = random(&mut rng, b * t * c);
            let start = random(&mut rng, b * t * 3 * c);
            let (mut out_ref, mut att_ref) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
            reference::forward(&mut out_ref, &mut att_ref, &qkv, b, t, c, h, scale);
            let mut dqkv_ref = start.clone();
            reference::backward(&mut dqkv_ref, &dout, &qkv, &att_ref, b, t, c, h, scale);
            for fma in instruction_sets() {
                let what = format!("{b}x{t}x{c}/{h} fma={fma}");
                let (mut out, mut att) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * h * t * t]);
                forward_short(&mut out, &mut att, &qkv, t, c, h, scale, fma);
                assert_close(&out, &out_ref, &format!("short forward out {what}"));
                assert_close(&att, &att_ref, &format!("short forward att {what}"));
                let (mut out, mut att) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * h * t * t]);
                forward_tiled::<f32, 16>(&mut out, &mut att, &qkv, t, c, h, scale, fma);
                assert_close(&out, &out_ref, &format!("tiled forward out {what}"));
                assert_close(&att, &att_ref, &format!("tiled forward att {what}"));

                let mut dqkv = start.clone();
                backward_short(&mut dqkv, &dout, &qkv, &att_ref, t, c, h, scale, fma);
                assert_close(&dqkv, &dqkv_ref, &format!("short backward {what}"));
                let mut dqkv = start.clone();
                backward_tiled::<f32, 16>(&mut dqkv, &dout, &qkv, &att_ref, t, c, h, scale, fma);
                assert_close(&dqkv, &dqkv_ref, &format!("tiled backward {what}"));
            }
        }
    }

    #[test]
    fn decode_on_every_instruction_set_matches_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (t_max, c, h) = (2 * DECODE_CHUNK + 3, 16, 2);
        let lens = [
            1,
            DECODE_CHUNK as u32,
            DECODE_CHUNK as u32 + 1,
            t_max as u32,
        ];
        let b = lens.len();
        let qkv = random(&mut rng, b * 3 * c);
        let k_cache = random(&mut rng, b * t_max * c);
        let v_cache = random(&mut rng, b * t_max * c);
        let mut out_ref = vec![0.0; b * c];
        reference::decode(
            &mut out_ref,
            &qkv,
            &k_cache,
            &v_cache,
            &lens,
            t_max,
            c,
            h,
            0.3,
        );
        for fma in instruction_sets() {
            let mut out = vec![f32::NAN; b * c];
            decode_chunked(
                &mut out, &qkv, &k_cache, &v_cache, &lens, t_max, c, h, 0.3, fma,
            );
            assert_close(&out, &out_ref, &format!("decode fma={fma}"));
        }
    }
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// Reference of [`super::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        out: &mut [F],
        att: &mut [F],
        qkv: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(out.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    let arow = ((bi * h + hi) * t + i) * t;
                    let mut max = F::neg_infinity();
                    for j in 0..=i {
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + qkv[q + d] * qkv[k + d];
                        }
                        s = s * scale;
                        att[arow + j] = s;
                        max = max.max(s);
                    }
                    let mut sum = F::zero();
                    for j in 0..=i {
                        let e = (att[arow + j] - max).exp();
                        att[arow + j] = e;
                        sum = sum + e;
                    }
                    for j in 0..t {
                        att[arow + j] = if j <= i {
                            att[arow + j] / sum
                        } else {
                            F::zero()
                        };
                    }
                    let o = (bi * t + i) * c + hi * hs;
                    for d in 0..hs {
                        let mut acc = F::zero();
                        for j in 0..=i {
                            let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                            acc = acc + att[arow + j] * qkv[v + d];
                        }
                        out[o + d] = acc;
                    }
                }
            }
        }
    }

    /// Reference of [`super::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dqkv: &mut [F],
        dout: &[F],
        qkv: &[F],
        att: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(dqkv.len(), b * t * 3 * c);
        assert_eq!(dout.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        let mut datt = vec![F::zero(); t];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let arow = ((bi * h + hi) * t + i) * t;
                    let o = (bi * t + i) * c + hi * hs;
                    // dP[j] = dout_i · v_j ; dv_j += P[j] dout_i
                    for j in 0..=i {
                        let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + dout[o + d] * qkv[v + d];
                            dqkv[v + d] = dqkv[v + d] + att[arow + j] * dout[o + d];
                        }
                        datt[j] = s;
                    }
                    // softmax backward: dS[j] = P[j] (dP[j] - Σ_k P[k] dP[k])
                    let mut dot = F::zero();
                    for j in 0..=i {
                        dot = dot + att[arow + j] * datt[j];
                    }
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    for j in 0..=i {
                        let ds = att[arow + j] * (datt[j] - dot) * scale;
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        for d in 0..hs {
                            dqkv[q + d] = dqkv[q + d] + ds * qkv[k + d];
                            dqkv[k + d] = dqkv[k + d] + ds * qkv[q + d];
                        }
                    }
                }
            }
        }
    }

    /// Reference of [`super::decode`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode<F: Real>(
        out: &mut [F],
        qkv: &[F],
        k_cache: &[F],
        v_cache: &[F],
        lens: &[u32],
        t_max: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        let b = lens.len();
        assert_eq!(qkv.len(), b * 3 * c);
        assert_eq!(out.len(), b * c);
        assert_eq!(k_cache.len(), b * t_max * c);
        assert_eq!(v_cache.len(), b * t_max * c);
        let hs = c / h;
        let mut scores = vec![F::zero(); t_max];
        for r in 0..b {
            let len = lens[r] as usize;
            assert!(
                len >= 1 && len <= t_max,
                "decode length {len} outside 1..={t_max}"
            );
            for hi in 0..h {
                let q = r * 3 * c + hi * hs;
                let mut max = F::neg_infinity();
                for (j, sj) in scores.iter_mut().enumerate().take(len) {
                    let k = (r * t_max + j) * c + hi * hs;
                    let mut s = F::zero();
                    for d in 0..hs {
                        s = s + qkv[q + d] * k_cache[k + d];
                    }
                    *sj = s * scale;
                    max = max.max(*sj);
                }
                let mut sum = F::zero();
                for sj in scores.iter_mut().take(len) {
                    *sj = (*sj - max).exp();
                    sum = sum + *sj;
                }
                let o = r * c + hi * hs;
                for d in 0..hs {
                    let mut acc = F::zero();
                    for (j, sj) in scores.iter().enumerate().take(len) {
                        acc = acc + *sj * v_cache[(r * t_max + j) * c + hi * hs + d];
                    }
                    out[o + d] = acc / sum;
                }
            }
        }
    }

    /// Reference of [`super::kv_append`].
    pub fn kv_append<F: Real>(
        k_cache: &mut [F],
        v_cache: &mut [F],
        qkv: &[F],
        pos: &[u32],
        t_max: usize,
        c: usize,
    ) {
        let b = pos.len();
        assert_eq!(qkv.len(), b * 3 * c);
        assert_eq!(k_cache.len(), b * t_max * c);
        assert_eq!(v_cache.len(), b * t_max * c);
        for r in 0..b {
            let p = pos[r] as usize;
            assert!(p < t_max, "cache position {p} outside 0..{t_max}");
            for d in 0..c {
                k_cache[(r * t_max + p) * c + d] = qkv[r * 3 * c + c + d];
                v_cache[(r * t_max + p) * c + d] = qkv[r * 3 * c + 2 * c + d];
            }
        }
    }
}
