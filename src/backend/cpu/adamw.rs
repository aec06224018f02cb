//! AdamW: bias-corrected Adam moments with decoupled weight decay,
//! `p -= lr·(m̂/(√v̂ + eps) + wd·p)`.

use rayon::prelude::*;

use super::parallel::ELEMWISE_CHUNK;
use super::Real;
use crate::backend::AdamW;

/// The step's scalars converted to `F` once, with the inverse bias corrections `1/(1−βᵗ)`.
struct Coefficients<F> {
    beta1: F,
    beta2: F,
    lr: F,
    eps: F,
    wd: F,
    inv_bc1: F,
    inv_bc2: F,
}

impl<F: Real> Coefficients<F> {
    fn new(hp: &AdamW) -> Self {
        assert!(hp.step >= 1, "adamw: step is 1-based");
        // Bias corrections in f64: β2ᵗ stays accurate for large t.
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
        let r = |x: f64| super::real::<F>(x);
        Self {
            beta1: r(hp.beta1 as f64),
            beta2: r(hp.beta2 as f64),
            lr: r(hp.lr as f64),
            eps: r(hp.eps as f64),
            wd: r(hp.weight_decay as f64),
            inv_bc1: r(1.0 / bc1),
            inv_bc2: r(1.0 / bc2),
        }
    }
}

fn check_shapes<F>(param: &[F], grad: &[F], m: &[F], v: &[F]) {
    let n = param.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n,
        "adamw: buffer lengths differ"
    );
}

/// One AdamW update of `param`, updating the moments `m`, `v` in place.
pub fn step<F: Real>(param: &mut [F], grad: &[F], m: &mut [F], v: &mut [F], hp: &AdamW) {
    check_shapes(param, grad, m, v);
    let k = Coefficients::<F>::new(hp);
    let (one_m_b1, one_m_b2) = (F::one() - k.beta1, F::one() - k.beta2);
    param
        .par_chunks_mut(ELEMWISE_CHUNK)
        .zip(grad.par_chunks(ELEMWISE_CHUNK))
        .zip(
            m.par_chunks_mut(ELEMWISE_CHUNK)
                .zip(v.par_chunks_mut(ELEMWISE_CHUNK)),
        )
        .for_each(|((ps, gs), (ms, vs))| {
            for (((p, &g), mi), vi) in ps.iter_mut().zip(gs).zip(ms.iter_mut()).zip(vs.iter_mut()) {
                *mi = k.beta1 * *mi + one_m_b1 * g;
                *vi = k.beta2 * *vi + one_m_b2 * g * g;
                let m_hat = *mi * k.inv_bc1;
                let v_hat = *vi * k.inv_bc2;
                *p = *p - k.lr * (m_hat / (v_hat.sqrt() + k.eps) + k.wd * *p);
            }
        });
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{AdamW, Real};

    /// One AdamW update, written as in Loshchilov & Hutter (2019), Algorithm 2.
    pub fn step<F: Real>(param: &mut [F], grad: &[F], m: &mut [F], v: &mut [F], hp: &AdamW) {
        super::check_shapes(param, grad, m, v);
        let r = |x: f64| crate::backend::cpu::real::<F>(x);
        let (b1, b2) = (r(hp.beta1 as f64), r(hp.beta2 as f64));
        let bc1 = F::one() - b1.powi(hp.step as i32);
        let bc2 = F::one() - b2.powi(hp.step as i32);
        for i in 0..param.len() {
            let g = grad[i];
            m[i] = b1 * m[i] + (F::one() - b1) * g;
            v[i] = b2 * v[i] + (F::one() - b2) * g * g;
            let m_hat = m[i] / bc1;
            let v_hat = v[i] / bc2;
            let update =
                m_hat / (v_hat.sqrt() + r(hp.eps as f64)) + r(hp.weight_decay as f64) * param[i];
            param[i] = param[i] - r(hp.lr as f64) * update;
        }
    }
}
