//! The backward chunked scan: a reverse-time adjoint that needs no stored states.
//!
//! Per (row, channel, n), with `c = conj(q)` and `λ_t = ∂L/∂Re h_t + i·∂L/∂Im h_t`:
//!
//! ```text
//! λ_t = conj(γ̃)·dy_t + c·λ_{t+1}          (λ beyond the call: dh_out)
//! dx_t = omega·dy_t + Σ_n p·Re λ_t,   ∂L/∂p = Σ_t x_t·Re λ_t,   ∂L/∂h0 = c·λ_0
//! ∂L/∂q = Σ_t λ_t·conj(h_{t−1}),      ∂L/∂γ̃ = Σ_t dy_t·conj(h_t)
//! ```
//!
//! The last two need `h` in forward order while `λ` runs backwards. Expanding
//! `h_{t−1} = Σ_{s<t} q^{t−1−s}·p·x_s + q^{t−s0}·H` inside a chunk `s0..=e` that starts from
//! the state `H` turns them into reverse-time sums as well:
//!
//! ```text
//! ∂L/∂q  += p·Σ_s x_s·μ_s + conj(H)·(λ_{s0} + c·μ_{s0}),   μ_s = λ_{s+1} + c·μ_{s+1},  μ_e = 0
//! ∂L/∂γ̃ += p·Σ_s x_s·ν_s + conj(q·H)·ν_{s0},             ν_s = dy_s + c·ν_{s+1},     ν_{e+1} = 0
//! ```
//!
//! so each chunk needs only its start state `H` (the forward carries of
//! [`super::scan::chunk_starts`]) and the adjoint arriving at its end, `Λ`. The latter comes
//! from the mirror image of the forward carry passes: every chunk but the first runs the
//! `λ` recurrence from zero, giving `o_c = c·λ_{s0}`, and `Λ_{c−1} = o_c + conj(q^T_c)·Λ_c`
//! serially in f64.

use rayon::prelude::*;

use super::coefficients::{CoefficientGrads, Coefficients};
use super::disjoint::DisjointOut;
use super::plan::{Task, Tiling};
use super::scan::{
    chunk_starts, lanes_at, BlockCoef, BlockState, CoefLane, Lanes, StateLane, LANES,
};
use crate::backend::cpu::Real;

/// Tokens summed in `F` before a partial sum moves into its f64 accumulator: keeps the f32
/// rounding error of the parameter-gradient sums independent of the call length.
const FLUSH_TOKENS: usize = 64;

/// One task's contribution to the coefficient gradients, f64 `[n][w]` (`domega` `[w]`),
/// and, for the first chunk, the gradient with respect to its start state.
struct TaskSums<F> {
    dp: Vec<f64>,
    dq: (Vec<f64>, Vec<f64>),
    dgamma: (Vec<f64>, Vec<f64>),
    domega: Vec<f64>,
    dh0: Option<BlockState<F>>,
}

fn to64<F: Real>(v: F) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

/// `λ` from zero over task `t`'s chunk, backwards; returns `c·λ_{s0}` per (n, channel).
fn run_local_adjoint<F: Real>(bc: &BlockCoef<F>, dy: &[F], t: &Task, tl: &Tiling) -> BlockState<F> {
    #[cfg(target_arch = "x86_64")]
    if super::isa::use_avx2() {
        // SAFETY: `use_avx2` confirmed that the running CPU supports AVX2.
        return unsafe { run_local_adjoint_avx2(bc, dy, t, tl) };
    }
    run_local_adjoint_body(bc, dy, t, tl)
}

/// [`run_local_adjoint`] compiled with 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_local_adjoint_avx2<F: Real>(
    bc: &BlockCoef<F>,
    dy: &[F],
    t: &Task,
    tl: &Tiling,
) -> BlockState<F> {
    run_local_adjoint_body(bc, dy, t, tl)
}

/// Body of [`run_local_adjoint`], inlined into each instruction-set variant.
#[inline(always)]
fn run_local_adjoint_body<F: Real>(
    bc: &BlockCoef<F>,
    dy: &[F],
    t: &Task,
    tl: &Tiling,
) -> BlockState<F> {
    let mut fut = BlockState::zeros(tl.n);
    let mut pad = [F::zero(); LANES];
    for tok in (t.t0..t.t1).rev() {
        let dys = lanes_at(dy, (t.bi * tl.l + tok) * tl.d + t.d0, t.w, &mut pad);
        for (f, c) in fut.lanes.iter_mut().zip(&bc.lanes) {
            local_adjoint_step(f, c, dys);
        }
    }
    fut
}

/// `λ = conj(γ̃)·dy + f`, `f ← c·λ` for one n across a block.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one index across six parallel arrays
fn local_adjoint_step<F: Real>(f: &mut StateLane<F>, c: &CoefLane<F>, dys: &Lanes<F>) {
    for j in 0..LANES {
        let lr = c.gr[j] * dys[j] + f.re[j];
        let li = f.im[j] - c.gi[j] * dys[j];
        f.re[j] = c.qr[j] * lr + c.qi[j] * li;
        f.im[j] = c.qr[j] * li - c.qi[j] * lr;
    }
}

/// The adjoint arriving at the last state of every chunk, f64 `[b, chunks, d, n, 2]`.
fn chunk_carries<F: Real>(
    dy: &[F],
    coef: &Coefficients,
    dh_out: Option<&[F]>,
    tl: &Tiling,
) -> Vec<f64> {
    let row = tl.d * tl.n * 2;
    let mut carries = vec![0.0f64; tl.b * tl.chunks * row];
    if let Some(g) = dh_out {
        for bi in 0..tl.b {
            let dst = &mut carries[(bi * tl.chunks + tl.chunks - 1) * row..][..row];
            for (s, &v) in dst.iter_mut().zip(&g[bi * row..(bi + 1) * row]) {
                *s = to64(v);
            }
        }
    }
    if tl.chunks == 1 {
        return carries;
    }
    let locals: Vec<Option<BlockState<F>>> = (0..tl.len())
        .into_par_iter()
        .with_min_len(tl.min_tasks_per_job())
        .map(|i| {
            let t = tl.task(i);
            (t.c > 0).then(|| run_local_adjoint(&BlockCoef::new(coef, t.d0, t.w), dy, &t, tl))
        })
        .collect();
    let full = coef.q_pow(tl.chunk_len);
    let last_len = tl.l - (tl.chunks - 1) * tl.chunk_len;
    let last = coef.q_pow(last_len);
    let mut local_row = vec![0.0f64; row];
    for bi in 0..tl.b {
        for c in (1..tl.chunks).rev() {
            for blk in 0..tl.blocks {
                let i = tl.index(bi, c, blk);
                let t = tl.task(i);
                let st = locals[i].as_ref().expect("every chunk but the first ran");
                st.store(&mut local_row, t.d0, t.w, to64);
            }
            let (pr, pi) = if c + 1 == tl.chunks { &last } else { &full };
            let base = (bi * tl.chunks + c - 1) * row;
            let (prev, cur) = carries[base..base + 2 * row].split_at_mut(row);
            for i in 0..tl.d * tl.n {
                let (gr, gi) = (cur[2 * i], cur[2 * i + 1]);
                prev[2 * i] = local_row[2 * i] + (pr[i] * gr + pi[i] * gi);
                prev[2 * i + 1] = local_row[2 * i + 1] + (pr[i] * gi - pi[i] * gr);
            }
        }
    }
    carries
}

/// The reverse-time state of one n across a block (see the module docs), with the partial
/// x-weighted sums over the last few tokens.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct AdjointLane<F> {
    /// `λ_{t+1}`.
    lr: Lanes<F>,
    li: Lanes<F>,
    /// `μ_t` (after a step).
    mr: Lanes<F>,
    mi: Lanes<F>,
    /// `ν_t` (after a step).
    vr: Lanes<F>,
    vi: Lanes<F>,
    /// Partial `Σ x·Re λ`, `Σ x·μ`, `Σ x·ν`.
    x_lr: Lanes<F>,
    x_mr: Lanes<F>,
    x_mi: Lanes<F>,
    x_vr: Lanes<F>,
    x_vi: Lanes<F>,
}

impl<F: Real> AdjointLane<F> {
    fn zeros() -> Self {
        let z = [F::zero(); LANES];
        Self {
            lr: z,
            li: z,
            mr: z,
            mi: z,
            vr: z,
            vi: z,
            x_lr: z,
            x_mr: z,
            x_mi: z,
            x_vr: z,
            x_vi: z,
        }
    }
}

/// One reverse step for one n across a block: `μ_t = λ_{t+1} + c·μ_{t+1}`,
/// `λ_t = conj(γ̃)·dy_t + fut`, `ν_t = dy_t + c·ν_{t+1}`, where `fut`, the adjoint flowing into
/// `h_t` from later tokens, is `c·λ_{t+1}`, or the chunk's carry at its last token (then
/// `λ_{t+1}`, `μ`, `ν` are zero). Adds the x-weighted partials and `p·Re λ_t` into `dx_acc`.
#[inline(always)]
fn reverse_step<F: Real>(
    s: &mut AdjointLane<F>,
    c: &CoefLane<F>,
    carry: Option<&StateLane<F>>,
    xs: &Lanes<F>,
    dys: &Lanes<F>,
    dx_acc: &mut Lanes<F>,
) {
    for j in 0..LANES {
        let (cr, ci) = (c.qr[j], c.qi[j]);
        let (xv, g) = (xs[j], dys[j]);
        let (l1r, l1i) = (s.lr[j], s.li[j]);
        let mr = l1r + (cr * s.mr[j] + ci * s.mi[j]);
        let mi = l1i + (cr * s.mi[j] - ci * s.mr[j]);
        let (fr, fi) = match carry {
            Some(k) => (k.re[j], k.im[j]),
            None => (cr * l1r + ci * l1i, cr * l1i - ci * l1r),
        };
        let lr = c.gr[j] * g + fr;
        let li = fi - c.gi[j] * g;
        let vr = g + (cr * s.vr[j] + ci * s.vi[j]);
        let vi = cr * s.vi[j] - ci * s.vr[j];
        s.lr[j] = lr;
        s.li[j] = li;
        s.mr[j] = mr;
        s.mi[j] = mi;
        s.vr[j] = vr;
        s.vi[j] = vi;
        s.x_lr[j] = s.x_lr[j] + xv * lr;
        s.x_mr[j] = s.x_mr[j] + xv * mr;
        s.x_mi[j] = s.x_mi[j] + xv * mi;
        s.x_vr[j] = s.x_vr[j] + xv * vr;
        s.x_vi[j] = s.x_vi[j] + xv * vi;
        dx_acc[j] = dx_acc[j] + c.p[j] * lr;
    }
}

/// Moves the partial sums of `lanes` into the f64 sums (`[n][w]`) and zeroes them.
fn flush<F: Real>(
    lanes: &mut [AdjointLane<F>],
    dy_x: &mut Lanes<F>,
    s: &mut TaskSums<F>,
    w: usize,
) {
    for (k, a) in lanes.iter_mut().enumerate() {
        for j in 0..w {
            let i = k * w + j;
            s.dp[i] += to64(a.x_lr[j]);
            s.dq.0[i] += to64(a.x_mr[j]);
            s.dq.1[i] += to64(a.x_mi[j]);
            s.dgamma.0[i] += to64(a.x_vr[j]);
            s.dgamma.1[i] += to64(a.x_vi[j]);
        }
        a.x_lr = [F::zero(); LANES];
        a.x_mr = [F::zero(); LANES];
        a.x_mi = [F::zero(); LANES];
        a.x_vr = [F::zero(); LANES];
        a.x_vi = [F::zero(); LANES];
    }
    for (acc, &v) in s.domega.iter_mut().zip(&dy_x[..w]) {
        *acc += to64(v);
    }
    *dy_x = [F::zero(); LANES];
}

/// Runs task `t` backwards from the adjoint `carry` at its end, writes its `dx` segments and
/// returns its gradient sums. `start` is the f64 `[d, n, 2]` state row before the chunk.
#[allow(clippy::too_many_arguments)]
fn run_adjoint<F: Real>(
    coef: &Coefficients,
    bc: &BlockCoef<F>,
    start: &[f64],
    carry: &[f64],
    x: &[F],
    dy: &[F],
    dx: &DisjointOut<F>,
    t: &Task,
    tl: &Tiling,
) -> TaskSums<F> {
    #[cfg(target_arch = "x86_64")]
    if super::isa::use_avx2() {
        // SAFETY: `use_avx2` confirmed that the running CPU supports AVX2.
        return unsafe { run_adjoint_avx2(coef, bc, start, carry, x, dy, dx, t, tl) };
    }
    run_adjoint_body(coef, bc, start, carry, x, dy, dx, t, tl)
}

/// [`run_adjoint`] compiled with 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_adjoint_avx2<F: Real>(
    coef: &Coefficients,
    bc: &BlockCoef<F>,
    start: &[f64],
    carry: &[f64],
    x: &[F],
    dy: &[F],
    dx: &DisjointOut<F>,
    t: &Task,
    tl: &Tiling,
) -> TaskSums<F> {
    run_adjoint_body(coef, bc, start, carry, x, dy, dx, t, tl)
}

/// Body of [`run_adjoint`], inlined into each instruction-set variant.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_adjoint_body<F: Real>(
    coef: &Coefficients,
    bc: &BlockCoef<F>,
    start: &[f64],
    carry: &[f64],
    x: &[F],
    dy: &[F],
    dx: &DisjointOut<F>,
    t: &Task,
    tl: &Tiling,
) -> TaskSums<F> {
    let (w, n) = (t.w, tl.n);
    let mut sums = TaskSums {
        dp: vec![0.0; n * w],
        dq: (vec![0.0; n * w], vec![0.0; n * w]),
        dgamma: (vec![0.0; n * w], vec![0.0; n * w]),
        domega: vec![0.0; w],
        dh0: None,
    };
    let carry = BlockState::load(carry, t.d0, w, n);
    let mut lanes = vec![AdjointLane::zeros(); n];
    let (mut xpad, mut dypad) = ([F::zero(); LANES], [F::zero(); LANES]);
    let mut dy_x = [F::zero(); LANES];
    for (count, tok) in (t.t0..t.t1).rev().enumerate() {
        let base = (t.bi * tl.l + tok) * tl.d + t.d0;
        let xs = lanes_at(x, base, w, &mut xpad);
        let dys = lanes_at(dy, base, w, &mut dypad);
        let mut dx_acc = [F::zero(); LANES];
        if count == 0 {
            for ((s, c), k) in lanes.iter_mut().zip(&bc.lanes).zip(&carry.lanes) {
                reverse_step(s, c, Some(k), xs, dys, &mut dx_acc);
            }
        } else {
            for (s, c) in lanes.iter_mut().zip(&bc.lanes) {
                reverse_step(s, c, None, xs, dys, &mut dx_acc);
            }
        }
        // SAFETY: task `t` is the only one owning channels d0..d0+w of this token.
        let dxs = unsafe { dx.segment(base, w) };
        for j in 0..w {
            dxs[j] = bc.omega[j] * dys[j] + dx_acc[j];
            dy_x[j] = dy_x[j] + dys[j] * xs[j];
        }
        if (count + 1) % FLUSH_TOKENS == 0 {
            flush(&mut lanes, &mut dy_x, &mut sums, w);
        }
    }
    flush(&mut lanes, &mut dy_x, &mut sums, w);
    // Close the sums in f64: scale by p, add the start-state terms.
    for (k, a) in lanes.iter().enumerate() {
        for j in 0..w {
            let (i, ci) = (k * w + j, (t.d0 + j) * n + k);
            let (p, qr, qi) = (coef.a[ci], coef.qr[ci], coef.qi[ci]);
            let (hr, hi) = (start[2 * ci], start[2 * ci + 1]);
            let (l0r, l0i) = (to64(a.lr[j]), to64(a.li[j]));
            let (m0r, m0i) = (to64(a.mr[j]), to64(a.mi[j]));
            let (v0r, v0i) = (to64(a.vr[j]), to64(a.vi[j]));
            // s = λ_{s0} + conj(q)·μ_{s0}; ∂L/∂q += conj(H)·s
            let sr = l0r + (qr * m0r + qi * m0i);
            let si = l0i + (qr * m0i - qi * m0r);
            sums.dq.0[i] = p * sums.dq.0[i] + (hr * sr + hi * si);
            sums.dq.1[i] = p * sums.dq.1[i] + (hr * si - hi * sr);
            // ∂L/∂γ̃ += conj(q·H)·ν_{s0}
            let (qhr, qhi) = (qr * hr - qi * hi, qr * hi + qi * hr);
            sums.dgamma.0[i] = p * sums.dgamma.0[i] + (qhr * v0r + qhi * v0i);
            sums.dgamma.1[i] = p * sums.dgamma.1[i] + (qhr * v0i - qhi * v0r);
        }
    }
    if t.c == 0 {
        // ∂L/∂h0 = c·λ_0, or the carry itself when the call has no tokens.
        sums.dh0 = Some(if t.t0 == t.t1 {
            carry
        } else {
            let mut g = BlockState::zeros(n);
            for ((o, a), c) in g.lanes.iter_mut().zip(&lanes).zip(&bc.lanes) {
                for j in 0..LANES {
                    let (cr, ci) = (c.qr[j], c.qi[j]);
                    o.re[j] = cr * a.lr[j] + ci * a.li[j];
                    o.im[j] = cr * a.li[j] - ci * a.lr[j];
                }
            }
            g
        });
    }
    sums
}

/// The fast backward (see the module docs): writes `dx` and `dh0`, returns the coefficient
/// gradients summed over batch rows and time.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Real>(
    dx: &mut [F],
    dh0: Option<&mut [F]>,
    dy: &[F],
    dh_out: Option<&[F]>,
    x: &[F],
    coef: &Coefficients,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    chunk_len: usize,
) -> CoefficientGrads {
    let tl = Tiling::new(b, l, coef.d, coef.n, chunk_len);
    let mut sums = CoefficientGrads::zeros(tl.d, tl.n);
    if tl.b == 0 || tl.d == 0 {
        return sums;
    }
    let starts = chunk_starts(x, coef, h0, &tl);
    let carries = chunk_carries(dy, coef, dh_out, &tl);
    let row = tl.d * tl.n * 2;
    let out = DisjointOut::new(dx);
    let parts: Vec<TaskSums<F>> = (0..tl.len())
        .into_par_iter()
        .with_min_len(tl.min_tasks_per_job())
        .map(|i| {
            let t = tl.task(i);
            let bc = BlockCoef::new(coef, t.d0, t.w);
            let at = (t.bi * tl.chunks + t.c) * row;
            run_adjoint(
                coef,
                &bc,
                &starts[at..at + row],
                &carries[at..at + row],
                x,
                dy,
                &out,
                &t,
                &tl,
            )
        })
        .collect();
    // Fixed summation order (row, chunk, block) keeps the result independent of threading.
    let n = tl.n;
    let mut dh0 = dh0;
    for (i, part) in parts.iter().enumerate() {
        let t = tl.task(i);
        for k in 0..n {
            for j in 0..t.w {
                let (pi, ci) = (k * t.w + j, (t.d0 + j) * n + k);
                sums.dp[ci] += part.dp[pi];
                sums.dq[2 * ci] += part.dq.0[pi];
                sums.dq[2 * ci + 1] += part.dq.1[pi];
                sums.dgamma[2 * ci] += part.dgamma.0[pi];
                sums.dgamma[2 * ci + 1] += part.dgamma.1[pi];
            }
        }
        for j in 0..t.w {
            sums.domega[t.d0 + j] += part.domega[j];
        }
        if let (Some(g), Some(st)) = (dh0.as_deref_mut(), part.dh0.as_ref()) {
            st.store(&mut g[t.bi * row..(t.bi + 1) * row], t.d0, t.w, |v| v);
        }
    }
    sums
}
