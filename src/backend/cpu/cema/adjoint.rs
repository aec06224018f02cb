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
use super::scan::{chunk_starts, BlockCoef, BlockState};
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
    let (w, n) = (bc.w, bc.n);
    let mut fut = BlockState::zeros(n, w);
    for tok in (t.t0..t.t1).rev() {
        let base = (t.bi * tl.l + tok) * tl.d + t.d0;
        let dys = &dy[base..base + w];
        for k in 0..n {
            let r = k * w..(k + 1) * w;
            let (fr, fi) = (&mut fut.re[r.clone()], &mut fut.im[r.clone()]);
            let (qr, qi) = (&bc.qr[r.clone()], &bc.qi[r.clone()]);
            let (gr, gi) = (&bc.gr[r.clone()], &bc.gi[r]);
            for j in 0..w {
                let lr = gr[j] * dys[j] + fr[j];
                let li = fi[j] - gi[j] * dys[j];
                fr[j] = qr[j] * lr + qi[j] * li;
                fi[j] = qr[j] * li - qi[j] * lr;
            }
        }
    }
    fut
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
                st.store(&mut local_row, t.d0, t.w, tl.n, to64);
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

/// The reverse-time state of one task, `[n][w]` planes (see the module docs).
struct AdjointState<F> {
    /// `c·λ_{t+1}`: the adjoint flowing into `h_t` from later tokens.
    fut: BlockState<F>,
    /// `λ_{t+1}`.
    lam: BlockState<F>,
    mu: BlockState<F>,
    nu: BlockState<F>,
}

/// Partial sums over a few tokens in `F`.
struct Partials<F> {
    x_lam_re: Vec<F>,
    x_mu: BlockState<F>,
    x_nu: BlockState<F>,
    dy_x: Vec<F>,
}

impl<F: Real> Partials<F> {
    fn zeros(n: usize, w: usize) -> Self {
        Self {
            x_lam_re: vec![F::zero(); n * w],
            x_mu: BlockState::zeros(n, w),
            x_nu: BlockState::zeros(n, w),
            dy_x: vec![F::zero(); w],
        }
    }

    /// Adds the partials into the f64 sums and zeroes them.
    fn flush(&mut self, s: &mut TaskSums<F>) {
        fn mv<F: Real>(dst: &mut [f64], src: &mut [F]) {
            for (a, b) in dst.iter_mut().zip(src.iter_mut()) {
                *a += to64(*b);
                *b = F::zero();
            }
        }
        mv(&mut s.dp, &mut self.x_lam_re);
        mv(&mut s.dq.0, &mut self.x_mu.re);
        mv(&mut s.dq.1, &mut self.x_mu.im);
        mv(&mut s.dgamma.0, &mut self.x_nu.re);
        mv(&mut s.dgamma.1, &mut self.x_nu.im);
        mv(&mut s.domega, &mut self.dy_x);
    }
}

/// One reverse step for one n across the block: advances `λ`, `μ`, `ν` and `c·λ`, adds the
/// x-weighted partials and `p·Re λ` into `dx_acc`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn reverse_step<F: Real>(
    st: &mut AdjointState<F>,
    pa: &mut Partials<F>,
    bc: &BlockCoef<F>,
    k: usize,
    xs: &[F],
    dys: &[F],
    dx_acc: &mut [F],
) {
    let w = xs.len();
    let r = k * w..(k + 1) * w;
    let (p, qr, qi) = (&bc.p[r.clone()], &bc.qr[r.clone()], &bc.qi[r.clone()]);
    let (gr, gi) = (&bc.gr[r.clone()], &bc.gi[r.clone()]);
    let (fr, fi) = (&mut st.fut.re[r.clone()], &mut st.fut.im[r.clone()]);
    let (lr_, li_) = (&mut st.lam.re[r.clone()], &mut st.lam.im[r.clone()]);
    let (mr_, mi_) = (&mut st.mu.re[r.clone()], &mut st.mu.im[r.clone()]);
    let (vr_, vi_) = (&mut st.nu.re[r.clone()], &mut st.nu.im[r.clone()]);
    let sl = &mut pa.x_lam_re[r.clone()];
    let (smr, smi) = (&mut pa.x_mu.re[r.clone()], &mut pa.x_mu.im[r.clone()]);
    let (svr, svi) = (&mut pa.x_nu.re[r.clone()], &mut pa.x_nu.im[r]);
    let dys = &dys[..w];
    let dx_acc = &mut dx_acc[..w];
    for j in 0..w {
        let (cr, ci) = (qr[j], qi[j]);
        let (xv, g) = (xs[j], dys[j]);
        // μ_t = λ_{t+1} + c·μ_{t+1}
        let mr = lr_[j] + (cr * mr_[j] + ci * mi_[j]);
        let mi = li_[j] + (cr * mi_[j] - ci * mr_[j]);
        // λ_t = conj(γ̃)·dy_t + c·λ_{t+1}
        let lr = gr[j] * g + fr[j];
        let li = fi[j] - gi[j] * g;
        // ν_t = dy_t + c·ν_{t+1}
        let vr = g + (cr * vr_[j] + ci * vi_[j]);
        let vi = cr * vi_[j] - ci * vr_[j];
        fr[j] = cr * lr + ci * li;
        fi[j] = cr * li - ci * lr;
        lr_[j] = lr;
        li_[j] = li;
        mr_[j] = mr;
        mi_[j] = mi;
        vr_[j] = vr;
        vi_[j] = vi;
        sl[j] = sl[j] + xv * lr;
        smr[j] = smr[j] + xv * mr;
        smi[j] = smi[j] + xv * mi;
        svr[j] = svr[j] + xv * vr;
        svi[j] = svi[j] + xv * vi;
        dx_acc[j] = dx_acc[j] + p[j] * lr;
    }
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
    let (w, n) = (bc.w, bc.n);
    let mut sums = TaskSums {
        dp: vec![0.0; n * w],
        dq: (vec![0.0; n * w], vec![0.0; n * w]),
        dgamma: (vec![0.0; n * w], vec![0.0; n * w]),
        domega: vec![0.0; w],
        dh0: None,
    };
    let mut st = AdjointState {
        fut: BlockState::load(carry, t.d0, w, n),
        lam: BlockState::zeros(n, w),
        mu: BlockState::zeros(n, w),
        nu: BlockState::zeros(n, w),
    };
    let mut pa = Partials::zeros(n, w);
    let mut dx_acc = vec![F::zero(); w];
    for (count, tok) in (t.t0..t.t1).rev().enumerate() {
        let base = (t.bi * tl.l + tok) * tl.d + t.d0;
        let (xs, dys) = (&x[base..base + w], &dy[base..base + w]);
        dx_acc.fill(F::zero());
        for k in 0..n {
            reverse_step(&mut st, &mut pa, bc, k, xs, dys, &mut dx_acc);
        }
        // SAFETY: task `t` is the only one owning channels d0..d0+w of this token.
        let dxs = unsafe { dx.segment(base, w) };
        for j in 0..w {
            dxs[j] = bc.omega[j] * dys[j] + dx_acc[j];
            pa.dy_x[j] = pa.dy_x[j] + dys[j] * xs[j];
        }
        if (count + 1) % FLUSH_TOKENS == 0 {
            pa.flush(&mut sums);
        }
    }
    pa.flush(&mut sums);
    // Close the sums in f64: scale by p, add the start-state terms.
    for k in 0..n {
        for j in 0..w {
            let (i, ci) = (k * w + j, (t.d0 + j) * n + k);
            let (p, qr, qi) = (coef.a[ci], coef.qr[ci], coef.qi[ci]);
            let (hr, hi) = (start[2 * ci], start[2 * ci + 1]);
            let (l0r, l0i) = (to64(st.lam.re[i]), to64(st.lam.im[i]));
            let (m0r, m0i) = (to64(st.mu.re[i]), to64(st.mu.im[i]));
            let (v0r, v0i) = (to64(st.nu.re[i]), to64(st.nu.im[i]));
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
        sums.dh0 = Some(st.fut);
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
            st.store(&mut g[t.bi * row..(t.bi + 1) * row], t.d0, t.w, n, |v| v);
        }
    }
    sums
}
