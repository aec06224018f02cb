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

    /// (batch, head) pairs per rayon task.
    fn pairs_per_task(&self) -> usize {
        (TASK_MACS / (self.t * self.t * self.hs).max(1)).max(1)
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
        // One fused pass per row: separate `copy_from_slice`s of a head's few hundred bytes
        // would each be a `memmove` call, which dominates at the local model's sizes.
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
#[allow(clippy::too_many_arguments)]
fn forward_head_avx2<F: Real, const W: usize>(
    ws: &mut ForwardScratch<F>,
    att: &mut [F],
    qkv: &[F],
    out: &DisjointWriter<F>,
    pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    forward_head::<F, W, true>(ws, att, qkv, out, pair, g, scale)
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
        return forward_short(out, att, qkv, t, c, h, scale);
    }
    forward_tiled::<F, 16>(out, att, qkv, t, c, h, scale)
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

fn forward_short<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let n = sequences_per_task(t, c);
    let fma = has_avx2_fma();
    out.par_chunks_mut(n * t * c)
        .zip(att.par_chunks_mut(n * h * t * t))
        .zip(qkv.par_chunks(n * t * 3 * c))
        .for_each(|((out, att), qkv)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                return unsafe { forward_sequences_avx2(out, att, qkv, t, c, h, scale) };
            }
            let _ = fma;
            forward_sequences::<F, false>(out, att, qkv, t, c, h, scale)
        });
}

#[allow(clippy::too_many_arguments)]
fn forward_tiled<F: Real, const W: usize>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    let g = HeadGeometry::new(t, c, h, W);
    let out = DisjointWriter::new(out);
    let fma = has_avx2_fma();
    att.par_chunks_mut(t * t)
        .enumerate()
        .with_min_len(g.pairs_per_task())
        .for_each_init(
            || ForwardScratch::new(&g),
            |ws, (pair, att)| {
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                    return unsafe {
                        forward_head_avx2::<F, W>(ws, att, qkv, &out, pair, &g, scale)
                    };
                }
                let _ = fma;
                forward_head::<F, W, false>(ws, att, qkv, &out, pair, &g, scale)
            },
        );
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn backward_head_avx2<F: Real, const W: usize>(
    ws: &mut BackwardScratch<F>,
    dqkv: &DisjointWriter<F>,
    dout: &[F],
    qkv: &[F],
    att: &[F],
    pair: usize,
    g: &HeadGeometry,
    scale: F,
) {
    backward_head::<F, W, true>(ws, dqkv, dout, qkv, att, pair, g, scale)
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
        return backward_short(dqkv, dout, qkv, att, t, c, h, scale);
    }
    backward_tiled::<F, 16>(dqkv, dout, qkv, att, t, c, h, scale)
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
) {
    let n = sequences_per_task(t, c);
    let fma = has_avx2_fma();
    dqkv.par_chunks_mut(n * t * 3 * c)
        .zip(dout.par_chunks(n * t * c))
        .zip(
            qkv.par_chunks(n * t * 3 * c)
                .zip(att.par_chunks(n * h * t * t)),
        )
        .for_each(|((dqkv, dout), (qkv, att))| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                return unsafe { backward_sequences_avx2(dqkv, dout, qkv, att, t, c, h, scale) };
            }
            let _ = fma;
            backward_sequences::<F, false>(dqkv, dout, qkv, att, t, c, h, scale)
        });
}

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
) {
    let g = HeadGeometry::new(t, c, h, W);
    let dqkv = DisjointWriter::new(dqkv);
    let fma = has_avx2_fma();
    att.par_chunks(t * t)
        .enumerate()
        .with_min_len(g.pairs_per_task())
        .for_each_init(
            || BackwardScratch::new(&g),
            |ws, (pair, att)| {
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                    return unsafe {
                        backward_head_avx2::<F, W>(ws, &dqkv, dout, qkv, att, pair, &g, scale)
                    };
                }
                let _ = fma;
                backward_head::<F, W, false>(ws, &dqkv, dout, qkv, att, pair, &g, scale)
            },
        );
}

/// One (row, head) pair of decode: scores against the first `len` cached keys, softmax, and
/// the weighted sum of cached values, all streaming the caches once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_head<F: Real, const FMA: bool>(
    out: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    len: usize,
    c: usize,
    head_offset: usize,
    scale: F,
) {
    let hs = out.len();
    let scores = &mut scores[..len];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot::<F, FMA>(q, &keys[j * c + head_offset..][..hs]) * scale;
    }
    let max = row_max(scores);
    let inv = F::one() / exp_shifted_in_place::<F, FMA>(scores, max);
    out.fill(F::zero());
    for (j, &p) in scores.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(&values[j * c + head_offset..][..hs]) {
            *o = madd::<F, FMA>(p, v, *o);
        }
    }
    for o in out.iter_mut() {
        *o = *o * inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn decode_head_avx2<F: Real>(
    out: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    len: usize,
    c: usize,
    head_offset: usize,
    scale: F,
) {
    decode_head::<F, true>(out, scores, q, keys, values, len, c, head_offset, scale)
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
    let hs = c / h;
    let mean_len = lens.iter().map(|&l| l as usize).sum::<usize>() / b;
    let pairs_per_task = (TASK_MACS / (2 * mean_len * hs).max(1)).max(1);
    let fma = has_avx2_fma();
    out.par_chunks_mut(hs)
        .enumerate()
        .with_min_len(pairs_per_task)
        .for_each_init(
            || vec![F::zero(); t_max],
            |scores, (pair, out)| {
                let (r, hi) = (pair / h, pair % h);
                let q = &qkv[r * 3 * c + hi * hs..][..hs];
                let keys = &k_cache[r * t_max * c..(r + 1) * t_max * c];
                let values = &v_cache[r * t_max * c..(r + 1) * t_max * c];
                let len = lens[r] as usize;
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
                    return unsafe {
                        decode_head_avx2(out, scores, q, keys, values, len, c, hi * hs, scale)
                    };
                }
                let _ = fma;
                decode_head::<F, false>(out, scores, q, keys, values, len, c, hi * hs, scale)
            },
        );
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
