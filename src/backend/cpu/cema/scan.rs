//! The forward chunked scan and the single-token step.
//!
//! A task runs the recurrence for one batch row, one block of channels and one chunk of
//! time. When time is split into several chunks the forward takes three passes:
//! 1. every chunk but the last runs from a zero state and keeps only its end state `s_c`;
//! 2. the true chunk-start states follow serially per (row, channel, n) from the associative
//!    rule `H_{c+1} = q^T·H_c + s_c` (f64; `q^T` by binary powering);
//! 3. every chunk reruns from its true start state and writes `y`.
//!
//! With a single chunk only pass 3 runs, from `h0`.
//!
//! Inner loops run across a block of [`LANES`] channels for one n at a time: channels are
//! contiguous in `x` and `y`, every (channel, n) pair is an independent recurrence, so the
//! loops vectorize with no shuffles and no cross-lane reductions (which would also tie the
//! result to the vector width).

use rayon::prelude::*;

use super::coefficients::Coefficients;
use super::disjoint::DisjointOut;
use super::plan::{Task, Tiling, BLOCK_WIDTH};
use crate::backend::cpu::{real, Real};

/// Channels of one block as a fixed-width array: the inner loops always run over
/// [`LANES`] channels (a narrower last block is zero-padded), so they compile to straight
/// vector code without remainder loops or bounds checks.
pub(super) type Lanes<F> = [F; LANES];

/// Width of [`Lanes`].
pub(super) const LANES: usize = BLOCK_WIDTH;

/// The coefficients of one n across a block of channels, rounded to `F`. Cache-line
/// aligned, like every lane struct, so no vector load straddles two lines.
#[repr(C, align(64))]
pub(super) struct CoefLane<F> {
    pub p: Lanes<F>,
    pub qr: Lanes<F>,
    pub qi: Lanes<F>,
    pub gr: Lanes<F>,
    pub gi: Lanes<F>,
}

/// One task's coefficients: a [`CoefLane`] per n, plus the skip weights. Padding channels
/// have all coefficients zero.
pub(super) struct BlockCoef<F> {
    pub lanes: Vec<CoefLane<F>>,
    pub omega: Lanes<F>,
}

impl<F: Real> BlockCoef<F> {
    pub fn new(coef: &Coefficients, d0: usize, w: usize) -> Self {
        let n = coef.n;
        let lane = |src: &[f64], k: usize| -> Lanes<F> {
            let mut v = [F::zero(); LANES];
            for (j, slot) in v.iter_mut().enumerate().take(w) {
                *slot = real(src[(d0 + j) * n + k]);
            }
            v
        };
        let mut omega = [F::zero(); LANES];
        for (j, slot) in omega.iter_mut().enumerate().take(w) {
            *slot = real(coef.omega[d0 + j]);
        }
        Self {
            lanes: (0..n)
                .map(|k| CoefLane {
                    p: lane(&coef.a, k),
                    qr: lane(&coef.qr, k),
                    qi: lane(&coef.qi, k),
                    gr: lane(&coef.gr, k),
                    gi: lane(&coef.gi, k),
                })
                .collect(),
            omega,
        }
    }
}

/// A complex value per channel of a block.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct StateLane<F> {
    pub re: Lanes<F>,
    pub im: Lanes<F>,
}

/// One task's complex state (or adjoint): a [`StateLane`] per n.
pub(super) struct BlockState<F> {
    pub lanes: Vec<StateLane<F>>,
}

impl<F: Real> BlockState<F> {
    pub fn zeros(n: usize) -> Self {
        let zero = StateLane {
            re: [F::zero(); LANES],
            im: [F::zero(); LANES],
        };
        Self {
            lanes: vec![zero; n],
        }
    }

    /// The block's part of a `[d, n, 2]` state row held in f64.
    pub fn load(row: &[f64], d0: usize, w: usize, n: usize) -> Self {
        let mut s = Self::zeros(n);
        for (k, lane) in s.lanes.iter_mut().enumerate() {
            for j in 0..w {
                let i = ((d0 + j) * n + k) * 2;
                lane.re[j] = real(row[i]);
                lane.im[j] = real(row[i + 1]);
            }
        }
        s
    }

    /// Writes the block into its part of a `[d, n, 2]` state row.
    pub fn store<T>(&self, row: &mut [T], d0: usize, w: usize, conv: impl Fn(F) -> T) {
        let n = self.lanes.len();
        for (k, lane) in self.lanes.iter().enumerate() {
            for j in 0..w {
                let i = ((d0 + j) * n + k) * 2;
                row[i] = conv(lane.re[j]);
                row[i + 1] = conv(lane.im[j]);
            }
        }
    }
}

/// The `w` values at `src[base..]` as a full [`Lanes`]: borrowed when the block is full
/// width, else copied into `pad` (whose tail stays zero).
#[inline(always)]
pub(super) fn lanes_at<'a, F: Real>(
    src: &'a [F],
    base: usize,
    w: usize,
    pad: &'a mut Lanes<F>,
) -> &'a Lanes<F> {
    if w == LANES {
        src[base..base + LANES]
            .try_into()
            .expect("a full block is LANES wide")
    } else {
        pad[..w].copy_from_slice(&src[base..base + w]);
        pad
    }
}

/// One step of the recurrence for one (channel, n): `(p·x + q·h)`. Shared with [`step`],
/// which makes a step and a one-token forward agree bit for bit.
#[inline(always)]
fn recur<F: Real>(hr: F, hi: F, p: F, qr: F, qi: F, x: F) -> (F, F) {
    (p * x + (qr * hr - qi * hi), qr * hi + qi * hr)
}

/// `h ← p·x + q·h` for one n across a block.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one index across seven parallel arrays
fn advance<F: Real>(s: &mut StateLane<F>, c: &CoefLane<F>, xs: &Lanes<F>) {
    for j in 0..LANES {
        let (nr, ni) = recur(s.re[j], s.im[j], c.p[j], c.qr[j], c.qi[j], xs[j]);
        s.re[j] = nr;
        s.im[j] = ni;
    }
}

/// [`advance`], then `acc += Re(γ̃·h)`.
#[inline(always)]
fn advance_project<F: Real>(
    s: &mut StateLane<F>,
    c: &CoefLane<F>,
    xs: &Lanes<F>,
    acc: &mut Lanes<F>,
) {
    for j in 0..LANES {
        let (nr, ni) = recur(s.re[j], s.im[j], c.p[j], c.qr[j], c.qi[j], xs[j]);
        s.re[j] = nr;
        s.im[j] = ni;
        acc[j] = acc[j] + (c.gr[j] * nr - c.gi[j] * ni);
    }
}

/// Runs task `t` from the state in `st`, leaving the state after its last token there, and
/// writes its `y` segments when `y` is given.
pub(super) fn run_forward<F: Real>(
    bc: &BlockCoef<F>,
    st: &mut BlockState<F>,
    x: &[F],
    y: Option<&DisjointOut<F>>,
    t: &Task,
    tl: &Tiling,
) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::use_avx2() {
        // SAFETY: `use_avx2` confirmed that the running CPU supports AVX2.
        return unsafe { run_forward_avx2(bc, st, x, y, t, tl) };
    }
    run_forward_body(bc, st, x, y, t, tl)
}

/// [`run_forward`] compiled with 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_forward_avx2<F: Real>(
    bc: &BlockCoef<F>,
    st: &mut BlockState<F>,
    x: &[F],
    y: Option<&DisjointOut<F>>,
    t: &Task,
    tl: &Tiling,
) {
    run_forward_body(bc, st, x, y, t, tl)
}

/// Body of [`run_forward`], inlined into each instruction-set variant.
#[inline(always)]
fn run_forward_body<F: Real>(
    bc: &BlockCoef<F>,
    st: &mut BlockState<F>,
    x: &[F],
    y: Option<&DisjointOut<F>>,
    t: &Task,
    tl: &Tiling,
) {
    let (w, l, d) = (t.w, tl.l, tl.d);
    let mut pad = [F::zero(); LANES];
    let mut acc = [F::zero(); LANES];
    for tok in t.t0..t.t1 {
        let base = (t.bi * l + tok) * d + t.d0;
        let xs = lanes_at(x, base, w, &mut pad);
        match y {
            None => {
                for (s, c) in st.lanes.iter_mut().zip(&bc.lanes) {
                    advance(s, c, xs);
                }
            }
            Some(y) => {
                for (s, c) in st.lanes.iter_mut().zip(&bc.lanes) {
                    advance_project(s, c, xs, &mut acc);
                }
                // SAFETY: task `t` is the only one owning channels d0..d0+w of this token.
                let ys = unsafe { y.segment(base, w) };
                for j in 0..w {
                    ys[j] = acc[j] + bc.omega[j] * xs[j];
                }
                acc = [F::zero(); LANES];
            }
        }
    }
}

/// The true state before every chunk, f64 `[b, chunks, d, n, 2]`: `h0` (or zero) for chunk
/// 0, the carries of passes 1–2 (module docs) for the others.
pub(super) fn chunk_starts<F: Real>(
    x: &[F],
    coef: &Coefficients,
    h0: Option<&[F]>,
    tl: &Tiling,
) -> Vec<f64> {
    let row = tl.d * tl.n * 2;
    let mut starts = vec![0.0f64; tl.b * tl.chunks * row];
    if let Some(h0) = h0 {
        for bi in 0..tl.b {
            let dst = &mut starts[bi * tl.chunks * row..][..row];
            for (s, &v) in dst.iter_mut().zip(&h0[bi * row..(bi + 1) * row]) {
                *s = v.to_f64().unwrap_or(f64::NAN);
            }
        }
    }
    if tl.chunks == 1 {
        return starts;
    }
    // Pass 1: end state of every chunk but the last, each from a zero state.
    let locals: Vec<Option<BlockState<F>>> = (0..tl.len())
        .into_par_iter()
        .with_min_len(tl.min_tasks_per_job())
        .map(|i| {
            let t = tl.task(i);
            if t.c + 1 == tl.chunks {
                return None;
            }
            let bc = BlockCoef::new(coef, t.d0, t.w);
            let mut st = BlockState::zeros(tl.n);
            run_forward(&bc, &mut st, x, None, &t, tl);
            Some(st)
        })
        .collect();
    // Pass 2: H_{c+1} = q^T·H_c + s_c, every chunk but the last being T = chunk_len long.
    let (pr, pi) = coef.q_pow(tl.chunk_len);
    let mut local_row = vec![0.0f64; row];
    for bi in 0..tl.b {
        for c in 0..tl.chunks - 1 {
            for blk in 0..tl.blocks {
                let t = tl.task(tl.index(bi, c, blk));
                let st = locals[tl.index(bi, c, blk)]
                    .as_ref()
                    .expect("pass 1 ran every chunk but the last");
                st.store(&mut local_row, t.d0, t.w, |v| {
                    v.to_f64().unwrap_or(f64::NAN)
                });
            }
            let base = (bi * tl.chunks + c) * row;
            let (cur, next) = starts[base..base + 2 * row].split_at_mut(row);
            for i in 0..tl.d * tl.n {
                let (hr, hi) = (cur[2 * i], cur[2 * i + 1]);
                next[2 * i] = pr[i] * hr - pi[i] * hi + local_row[2 * i];
                next[2 * i + 1] = pr[i] * hi + pi[i] * hr + local_row[2 * i + 1];
            }
        }
    }
    starts
}

/// The fast forward (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<F: Real>(
    y: &mut [F],
    h_out: Option<&mut [F]>,
    x: &[F],
    coef: &Coefficients,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    chunk_len: usize,
) {
    let tl = Tiling::new(b, l, coef.d, coef.n, chunk_len);
    if tl.b == 0 || tl.d == 0 {
        return;
    }
    let starts = chunk_starts(x, coef, h0, &tl);
    let row = tl.d * tl.n * 2;
    let want_final = h_out.is_some();
    let out = DisjointOut::new(y);
    let finals: Vec<Option<BlockState<F>>> = (0..tl.len())
        .into_par_iter()
        .with_min_len(tl.min_tasks_per_job())
        .map(|i| {
            let t = tl.task(i);
            let bc = BlockCoef::new(coef, t.d0, t.w);
            let start = &starts[(t.bi * tl.chunks + t.c) * row..][..row];
            let mut st = BlockState::load(start, t.d0, t.w, tl.n);
            run_forward(&bc, &mut st, x, Some(&out), &t, &tl);
            (want_final && t.c + 1 == tl.chunks).then_some(st)
        })
        .collect();
    if let Some(h_out) = h_out {
        for bi in 0..tl.b {
            for blk in 0..tl.blocks {
                let i = tl.index(bi, tl.chunks - 1, blk);
                let t = tl.task(i);
                let st = finals[i].as_ref().expect("last chunks keep their state");
                st.store(&mut h_out[bi * row..(bi + 1) * row], t.d0, t.w, |v| v);
            }
        }
    }
}

/// One token per batch row: `h ← p·x + q·h`, `y = Re(Σ_n γ̃·h) + omega·x`.
pub(super) fn step<F: Real>(y: &mut [F], h: &mut [F], x: &[F], coef: &Coefficients, b: usize) {
    let (d, n) = (coef.d, coef.n);
    if b == 0 || d == 0 {
        return;
    }
    let rows = crate::backend::cpu::parallel::min_rows(d * n * 2);
    y.par_chunks_mut(d)
        .zip(h.par_chunks_mut(d * n * 2))
        .zip(x.par_chunks(d))
        .with_min_len(rows)
        .for_each(|((yr, hr), xr)| {
            // Per channel: the n updates are independent (and vectorize); their projections
            // are then summed in n order, as the forward does.
            let mut terms = vec![F::zero(); n];
            for (di, ((yv, &xv), hc)) in yr
                .iter_mut()
                .zip(xr)
                .zip(hr.chunks_exact_mut(2 * n))
                .enumerate()
            {
                let at = di * n;
                let (a, qr, qi) = (&coef.a[at..][..n], &coef.qr[at..][..n], &coef.qi[at..][..n]);
                let (gr, gi) = (&coef.gr[at..][..n], &coef.gi[at..][..n]);
                for (k, (s, t)) in hc.chunks_exact_mut(2).zip(terms.iter_mut()).enumerate() {
                    let (nr, ni) = recur(s[0], s[1], real(a[k]), real(qr[k]), real(qi[k]), xv);
                    s[0] = nr;
                    s[1] = ni;
                    *t = real::<F>(gr[k]) * nr - real::<F>(gi[k]) * ni;
                }
                let acc = terms.iter().fold(F::zero(), |acc, &t| acc + t);
                *yv = acc + real::<F>(coef.omega[di]) * xv;
            }
        });
}
