//! Pointwise nonlinearities (ReLU, GELU-tanh, SiLU) and their derivatives.

use rayon::prelude::*;

use super::parallel::ELEMWISE_CHUNK;
use super::Real;
use crate::backend::Activation;

/// `√(2/π)`, the GELU tanh-approximation's input scale.
const GELU_K: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_C: f64 = 0.044_715;

/// `act(x)`.
#[inline(always)]
fn value<F: Real>(act: Activation, x: F) -> F {
    match act {
        Activation::Relu => x.max(F::zero()),
        Activation::Gelu => {
            let half: F = super::real(0.5);
            let u = super::real::<F>(GELU_K) * (x + super::real::<F>(GELU_C) * x * x * x);
            half * x * (F::one() + u.tanh())
        }
        Activation::Silu => x / (F::one() + (-x).exp()),
    }
}

/// `act'(x)`.
#[inline(always)]
fn slope<F: Real>(act: Activation, x: F) -> F {
    match act {
        Activation::Relu => {
            if x > F::zero() {
                F::one()
            } else {
                F::zero()
            }
        }
        Activation::Gelu => {
            let half: F = super::real(0.5);
            let k: F = super::real(GELU_K);
            let c: F = super::real(GELU_C);
            let x2 = x * x;
            let t = (k * (x + c * x2 * x)).tanh();
            let three: F = super::real(3.0);
            half * (F::one() + t) + half * x * (F::one() - t * t) * k * (F::one() + three * c * x2)
        }
        Activation::Silu => {
            let s = F::one() / (F::one() + (-x).exp());
            s * (F::one() + x * (F::one() - s))
        }
    }
}

/// `out = act(x)` elementwise.
pub fn forward<F: Real>(act: Activation, out: &mut [F], x: &[F]) {
    assert_eq!(out.len(), x.len(), "activation: out and x differ in length");
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &x)| *o = value(act, x)));
}

/// `dx += act'(x) · dout` elementwise.
pub fn backward<F: Real>(act: Activation, dx: &mut [F], x: &[F], dout: &[F]) {
    assert_eq!(dx.len(), x.len(), "activation: dx and x differ in length");
    assert_eq!(
        dout.len(),
        x.len(),
        "activation: dout and x differ in length"
    );
    dx.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(
            x.par_chunks(ELEMWISE_CHUNK)
                .zip(dout.par_chunks(ELEMWISE_CHUNK)),
        )
        .for_each(|(dxs, (xs, gs))| {
            for ((d, &x), &g) in dxs.iter_mut().zip(xs).zip(gs) {
                *d = *d + slope(act, x) * g;
            }
        });
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{Activation, Real, GELU_C, GELU_K};

    fn r<F: Real>(x: f64) -> F {
        crate::backend::cpu::real(x)
    }

    fn sigmoid<F: Real>(x: F) -> F {
        F::one() / (F::one() + (-x).exp())
    }

    /// `act(x)` for one element.
    pub fn value<F: Real>(act: Activation, x: F) -> F {
        match act {
            Activation::Relu => {
                if x > F::zero() {
                    x
                } else {
                    F::zero()
                }
            }
            Activation::Gelu => {
                let inner = r::<F>(GELU_K) * (x + r::<F>(GELU_C) * x.powi(3));
                r::<F>(0.5) * x * (F::one() + inner.tanh())
            }
            Activation::Silu => x * sigmoid(x),
        }
    }

    /// `act'(x)` for one element, by the product and chain rules written out.
    pub fn slope<F: Real>(act: Activation, x: F) -> F {
        match act {
            Activation::Relu => {
                if x > F::zero() {
                    F::one()
                } else {
                    F::zero()
                }
            }
            Activation::Gelu => {
                let inner = r::<F>(GELU_K) * (x + r::<F>(GELU_C) * x.powi(3));
                let d_inner = r::<F>(GELU_K) * (F::one() + r::<F>(3.0 * GELU_C) * x.powi(2));
                let t = inner.tanh();
                let sech2 = F::one() - t * t;
                r::<F>(0.5) * (F::one() + t) + r::<F>(0.5) * x * sech2 * d_inner
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s + x * s * (F::one() - s)
            }
        }
    }

    /// `out = act(x)`.
    pub fn forward<F: Real>(act: Activation, out: &mut [F], x: &[F]) {
        assert_eq!(out.len(), x.len());
        for i in 0..x.len() {
            out[i] = value(act, x[i]);
        }
    }

    /// `dx += act'(x) · dout`.
    pub fn backward<F: Real>(act: Activation, dx: &mut [F], x: &[F], dout: &[F]) {
        assert_eq!(dx.len(), x.len());
        assert_eq!(dout.len(), x.len());
        for i in 0..x.len() {
            dx[i] = dx[i] + slope(act, x[i]) * dout[i];
        }
    }
}
