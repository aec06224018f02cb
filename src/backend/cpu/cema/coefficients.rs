//! The per-(channel, n) coefficients `p`, `q`, `γ̃` (spec §4.2), computed in f64, and the
//! chain rule that turns gradients with respect to them into parameter gradients (§4.6).

use std::f64::consts::PI;

use super::{CemaGrads, CemaParams};
use crate::backend::cpu::{real, Real};

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// CEMA coefficients of one layer in f64, `[d, n]` layouts (n fastest). Computing them costs
/// a few exponentials and a `sin_cos` per (channel, n), so a decoder stepping token by token
/// builds them once per parameter update rather than once per token.
#[derive(Clone, Debug)]
pub struct Coefficients {
    pub(super) d: usize,
    pub(super) n: usize,
    /// `a = σ(alpha)`, which is also the real input coefficient `p`.
    pub(super) a: Vec<f64>,
    /// `δ = σ(delta)`.
    pub(super) delta: Vec<f64>,
    /// `σ(theta)`, `[d]`.
    pub(super) sig_theta: Vec<f64>,
    /// `cos φ`, `sin φ`.
    pub(super) cos_phi: Vec<f64>,
    pub(super) sin_phi: Vec<f64>,
    /// Real and imaginary parts of `q = (1 − aδ)·e^{iφ}`.
    pub(super) qr: Vec<f64>,
    pub(super) qi: Vec<f64>,
    /// Real and imaginary parts of `γ̃ = gamma/√N`.
    pub(super) gr: Vec<f64>,
    pub(super) gi: Vec<f64>,
    /// Skip weight, `[d]`.
    pub(super) omega: Vec<f64>,
}

/// Gradients with respect to the coefficients, summed over batch and time, in f64.
#[derive(Clone, Debug)]
pub(super) struct CoefficientGrads {
    /// `∂L/∂p`, `[d, n]`.
    pub dp: Vec<f64>,
    /// `∂L/∂Re q + i·∂L/∂Im q` as (re, im) pairs, `[d, n, 2]`.
    pub dq: Vec<f64>,
    /// `∂L/∂Re γ̃ + i·∂L/∂Im γ̃` as (re, im) pairs, `[d, n, 2]`.
    pub dgamma: Vec<f64>,
    /// `∂L/∂omega`, `[d]`.
    pub domega: Vec<f64>,
}

impl CoefficientGrads {
    pub fn zeros(d: usize, n: usize) -> Self {
        Self {
            dp: vec![0.0; d * n],
            dq: vec![0.0; d * n * 2],
            dgamma: vec![0.0; d * n * 2],
            domega: vec![0.0; d],
        }
    }
}

impl Coefficients {
    /// Coefficients from the parameters of a layer with `d` channels and expansion `n`.
    pub fn new<F: Real>(p: &CemaParams<F>, d: usize, n: usize) -> Self {
        super::check_params(p, d, n);
        let f = |v: F| v.to_f64().unwrap_or(f64::NAN);
        let scale = 1.0 / (n as f64).sqrt();
        let mut c = Self {
            d,
            n,
            a: vec![0.0; d * n],
            delta: vec![0.0; d * n],
            sig_theta: vec![0.0; d],
            cos_phi: vec![0.0; d * n],
            sin_phi: vec![0.0; d * n],
            qr: vec![0.0; d * n],
            qi: vec![0.0; d * n],
            gr: vec![0.0; d * n],
            gi: vec![0.0; d * n],
            omega: p.omega.iter().map(|&v| f(v)).collect(),
        };
        for di in 0..d {
            let st = sigmoid(f(p.theta[di]));
            c.sig_theta[di] = st;
            // e^{iφ_k} = (e^{iφ_1})^k with φ_1 = σ(theta)·2π/N: one sin_cos per channel; the
            // repeated products drift by ~k·1e-16, far below f32 and test tolerances.
            let (s1, c1) = (st * 2.0 * PI / n as f64).sin_cos();
            let (mut co, mut si) = (c1, s1);
            for k in 0..n {
                let i = di * n + k;
                let a = sigmoid(f(p.alpha[i]));
                let dl = sigmoid(f(p.delta[i]));
                let r = 1.0 - a * dl;
                c.a[i] = a;
                c.delta[i] = dl;
                c.cos_phi[i] = co;
                c.sin_phi[i] = si;
                c.qr[i] = r * co;
                c.qi[i] = r * si;
                c.gr[i] = f(p.gamma[2 * i]) * scale;
                c.gi[i] = f(p.gamma[2 * i + 1]) * scale;
                (co, si) = (co * c1 - si * s1, co * s1 + si * c1);
            }
        }
        c
    }

    /// Channels.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Expansion dimension N.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `q^e` for every (channel, n) in f64 by binary powering, as (re, im) vectors `[d, n]`.
    pub(super) fn q_pow(&self, e: usize) -> (Vec<f64>, Vec<f64>) {
        let mut re = vec![0.0; self.qr.len()];
        let mut im = vec![0.0; self.qr.len()];
        for i in 0..self.qr.len() {
            let (mut br, mut bi) = (self.qr[i], self.qi[i]);
            let (mut rr, mut ri) = (1.0, 0.0);
            let mut k = e;
            while k > 0 {
                if k & 1 == 1 {
                    (rr, ri) = (rr * br - ri * bi, rr * bi + ri * br);
                }
                (br, bi) = (br * br - bi * bi, 2.0 * br * bi);
                k >>= 1;
            }
            re[i] = rr;
            im[i] = ri;
        }
        (re, im)
    }

    /// Chain rule (§4.6) from coefficient gradients into the parameter gradients (`+=`).
    pub(super) fn accumulate_grads<F: Real>(&self, s: &CoefficientGrads, g: &mut CemaGrads<F>) {
        let (d, n) = (self.d, self.n);
        super::check_grads(g, d, n);
        let scale = 1.0 / (n as f64).sqrt();
        let add = |dst: &mut F, v: f64| *dst = *dst + real::<F>(v);
        for di in 0..d {
            let mut dsig_theta = 0.0;
            for k in 0..n {
                let i = di * n + k;
                let (a, dl) = (self.a[i], self.delta[i]);
                let (gqr, gqi) = (s.dq[2 * i], s.dq[2 * i + 1]);
                // q = r·e^{iφ}: ∂L/∂r = Re(G·e^{−iφ}), ∂L/∂φ = Im(G·conj q).
                let dr = gqr * self.cos_phi[i] + gqi * self.sin_phi[i];
                let dphi = gqi * self.qr[i] - gqr * self.qi[i];
                let da = s.dp[i] - dl * dr;
                let ddelta = -a * dr;
                add(&mut g.alpha[i], da * a * (1.0 - a));
                add(&mut g.delta[i], ddelta * dl * (1.0 - dl));
                dsig_theta += dphi * (2.0 * PI / n as f64) * (k + 1) as f64;
                add(&mut g.gamma[2 * i], s.dgamma[2 * i] * scale);
                add(&mut g.gamma[2 * i + 1], s.dgamma[2 * i + 1] * scale);
            }
            let st = self.sig_theta[di];
            add(&mut g.theta[di], dsig_theta * st * (1.0 - st));
            add(&mut g.omega[di], s.domega[di]);
        }
    }
}
