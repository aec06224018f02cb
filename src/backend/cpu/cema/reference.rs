//! Plain loops: the per-token recurrence (spec §4.3) and its reverse-time adjoint over
//! stored states, the yardstick for the fast path. Everything is computed in `F`,
//! coefficients included, one (row, channel) chain at a time.

use super::{check_grads, check_params, check_state, CemaGrads, CemaParams};
use crate::backend::cpu::{real, Real};

/// The coefficients of one (channel, n), straight from §4.2.
struct Coef<F> {
    a: F,
    delta: F,
    sig_theta: F,
    /// `2π(n+1)/N`: `φ = σ(theta)·angle`.
    angle: F,
    qr: F,
    qi: F,
    gr: F,
    gi: F,
}

fn sigmoid<F: Real>(v: F) -> F {
    F::one() / (F::one() + (-v).exp())
}

fn coef<F: Real>(p: &CemaParams<F>, n: usize, di: usize, k: usize) -> Coef<F> {
    let i = di * n + k;
    let a = sigmoid(p.alpha[i]);
    let delta = sigmoid(p.delta[i]);
    let sig_theta = sigmoid(p.theta[di]);
    let angle = real::<F>(2.0 * std::f64::consts::PI * (k + 1) as f64 / n as f64);
    let phi = sig_theta * angle;
    let r = F::one() - a * delta;
    let scale = F::one() / real::<F>(n as f64).sqrt();
    Coef {
        a,
        delta,
        sig_theta,
        angle,
        qr: r * phi.cos(),
        qi: r * phi.sin(),
        gr: p.gamma[2 * i] * scale,
        gi: p.gamma[2 * i + 1] * scale,
    }
}

/// States of one (row, channel) chain for every token: `hs[t+1][k]` is `h_t`, `hs[0]` the
/// carried-in state.
fn states<F: Real>(
    x: &[F],
    cs: &[Coef<F>],
    h0: Option<&[F]>,
    bi: usize,
    di: usize,
    l: usize,
    d: usize,
) -> Vec<Vec<(F, F)>> {
    let n = cs.len();
    let first: Vec<(F, F)> = (0..n)
        .map(|k| match h0 {
            Some(h) => {
                let i = ((bi * d + di) * n + k) * 2;
                (h[i], h[i + 1])
            }
            None => (F::zero(), F::zero()),
        })
        .collect();
    let mut hs = vec![first];
    for t in 0..l {
        let xt = x[(bi * l + t) * d + di];
        let prev = &hs[t];
        let next = cs
            .iter()
            .zip(prev)
            .map(|(c, &(hr, hi))| (c.a * xt + c.qr * hr - c.qi * hi, c.qr * hi + c.qi * hr))
            .collect();
        hs.push(next);
    }
    hs
}

/// Forward: `y` `[b, l, d]` overwritten; `h_out` `[b, d, n, 2]` gets the last state.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    y: &mut [F],
    mut h_out: Option<&mut [F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
) {
    check_params(p, d, n);
    assert_eq!(x.len(), b * l * d, "cema: x must be [b, l, d]");
    assert_eq!(y.len(), b * l * d, "cema: y must be [b, l, d]");
    check_state("h0", h0, b, d, n);
    check_state("h_out", h_out.as_deref(), b, d, n);
    for di in 0..d {
        let cs: Vec<Coef<F>> = (0..n).map(|k| coef(p, n, di, k)).collect();
        for bi in 0..b {
            let hs = states(x, &cs, h0, bi, di, l, d);
            for t in 0..l {
                let xt = x[(bi * l + t) * d + di];
                let mut acc = p.omega[di] * xt;
                for (c, &(hr, hi)) in cs.iter().zip(&hs[t + 1]) {
                    acc = acc + c.gr * hr - c.gi * hi;
                }
                y[(bi * l + t) * d + di] = acc;
            }
            if let Some(ho) = h_out.as_deref_mut() {
                for (k, &(hr, hi)) in hs[l].iter().enumerate() {
                    let i = ((bi * d + di) * n + k) * 2;
                    ho[i] = hr;
                    ho[i + 1] = hi;
                }
            }
        }
    }
}

/// Backward by the reverse-time adjoint over stored states. With `λ_t` the gradient with
/// respect to `h_t` as `∂/∂re + i·∂/∂im`: `λ_t = conj(γ̃)·dy_t + conj(q)·λ_{t+1}` (`λ_l`
/// replaced by `dh_out`), `dx_t = omega·dy_t + Σ p·Re λ_t`, `∂L/∂p += x_t·Re λ_t`,
/// `∂L/∂q += λ_t·conj(h_{t−1})`, `∂L/∂γ̃ += dy_t·conj(h_t)`, `∂L/∂h0 = conj(q)·λ_0`; then
/// the chain rule through `q = (1−aδ)e^{iφ}` and the sigmoids. `dx`, `dh0` overwritten,
/// parameter gradients accumulated.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dx: &mut [F],
    g: &mut CemaGrads<F>,
    mut dh0: Option<&mut [F]>,
    dy: &[F],
    dh_out: Option<&[F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
) {
    check_params(p, d, n);
    check_grads(g, d, n);
    assert_eq!(x.len(), b * l * d, "cema: x must be [b, l, d]");
    assert_eq!(dy.len(), b * l * d, "cema: dy must be [b, l, d]");
    assert_eq!(dx.len(), b * l * d, "cema: dx must be [b, l, d]");
    check_state("h0", h0, b, d, n);
    check_state("dh0", dh0.as_deref(), b, d, n);
    check_state("dh_out", dh_out, b, d, n);
    let scale = F::one() / real::<F>(n as f64).sqrt();
    for di in 0..d {
        let cs: Vec<Coef<F>> = (0..n).map(|k| coef(p, n, di, k)).collect();
        // Gradients with respect to p, q (re, im), γ̃ (re, im) for this channel.
        let mut dp = vec![F::zero(); n];
        let mut dq = vec![(F::zero(), F::zero()); n];
        let mut dgt = vec![(F::zero(), F::zero()); n];
        let mut domega = F::zero();
        for bi in 0..b {
            let hs = states(x, &cs, h0, bi, di, l, d);
            // λ flowing into h_t from later tokens (and from h_out).
            let mut fut: Vec<(F, F)> = (0..n)
                .map(|k| match dh_out {
                    Some(gh) => {
                        let i = ((bi * d + di) * n + k) * 2;
                        (gh[i], gh[i + 1])
                    }
                    None => (F::zero(), F::zero()),
                })
                .collect();
            for t in (0..l).rev() {
                let at = (bi * l + t) * d + di;
                let (xt, gy) = (x[at], dy[at]);
                domega = domega + gy * xt;
                let mut gx = p.omega[di] * gy;
                for k in 0..n {
                    let c = &cs[k];
                    let lr = c.gr * gy + fut[k].0;
                    let li = -c.gi * gy + fut[k].1;
                    let (hr, hi) = hs[t + 1][k];
                    let (pr, pi) = hs[t][k];
                    gx = gx + c.a * lr;
                    dp[k] = dp[k] + xt * lr;
                    dq[k] = (dq[k].0 + lr * pr + li * pi, dq[k].1 + li * pr - lr * pi);
                    dgt[k] = (dgt[k].0 + gy * hr, dgt[k].1 - gy * hi);
                    fut[k] = (c.qr * lr + c.qi * li, c.qr * li - c.qi * lr);
                }
                dx[at] = gx;
            }
            if let Some(gh) = dh0.as_deref_mut() {
                for (k, &(fr, fi)) in fut.iter().enumerate() {
                    let i = ((bi * d + di) * n + k) * 2;
                    gh[i] = fr;
                    gh[i + 1] = fi;
                }
            }
        }
        let mut dsig_theta = F::zero();
        for k in 0..n {
            let c = &cs[k];
            let i = di * n + k;
            let phi = c.sig_theta * c.angle;
            // ∂L/∂r = Re(G·e^{−iφ}), ∂L/∂φ = Im(G·conj q).
            let dr = dq[k].0 * phi.cos() + dq[k].1 * phi.sin();
            let dphi = dq[k].1 * c.qr - dq[k].0 * c.qi;
            let da = dp[k] - c.delta * dr;
            let ddelta = -c.a * dr;
            g.alpha[i] = g.alpha[i] + da * c.a * (F::one() - c.a);
            g.delta[i] = g.delta[i] + ddelta * c.delta * (F::one() - c.delta);
            dsig_theta = dsig_theta + dphi * c.angle;
            g.gamma[2 * i] = g.gamma[2 * i] + dgt[k].0 * scale;
            g.gamma[2 * i + 1] = g.gamma[2 * i + 1] + dgt[k].1 * scale;
        }
        let st = sigmoid(p.theta[di]);
        g.theta[di] = g.theta[di] + dsig_theta * st * (F::one() - st);
        g.omega[di] = g.omega[di] + domega;
    }
}
