//! RMSNorm over the last dimension: `out = x·rstd·w`, `rstd = 1/√(mean(x²) + eps)`.

use rayon::prelude::*;

use super::lanes::sum_by;
use super::parallel::{min_rows, rows_with_column_sums};
use super::Real;

/// Default mean-square floor (the reference implementation's).
pub const EPS: f64 = 1e-6;

fn check_shapes<F>(x: &[F], w: &[F], rstd: &[F], n: usize, d: usize) {
    assert_eq!(x.len(), n * d, "rmsnorm: x must be [n, d]");
    assert_eq!(w.len(), d, "rmsnorm: weight must be [d]");
    assert_eq!(rstd.len(), n, "rmsnorm: rstd must be [n]");
}

/// Forward with mean-square floor `eps`: writes `out` `[n, d]` and the saved `rstd` `[n]`.
pub fn forward<F: Real>(
    out: &mut [F],
    rstd: &mut [F],
    x: &[F],
    w: &[F],
    n: usize,
    d: usize,
    eps: F,
) {
    check_shapes(x, w, rstd, n, d);
    assert_eq!(out.len(), n * d, "rmsnorm: out must be [n, d]");
    if d == 0 {
        return;
    }
    let inv_d = F::one() / super::real(d as f64);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .with_min_len(min_rows(d))
        .for_each(|((o, xr), rs_out)| {
            let ms = sum_by(d, |j| xr[j] * xr[j]) * inv_d;
            let rs = F::one() / (ms + eps).sqrt();
            for j in 0..d {
                o[j] = xr[j] * rs * w[j];
            }
            *rs_out = rs;
        });
}

/// Backward: `dx += …`, `dw += …` from the saved `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dx: &mut [F],
    dw: &mut [F],
    dout: &[F],
    x: &[F],
    w: &[F],
    rstd: &[F],
    n: usize,
    d: usize,
) {
    check_shapes(x, w, rstd, n, d);
    assert_eq!(dx.len(), n * d, "rmsnorm: dx must be [n, d]");
    assert_eq!(dout.len(), n * d, "rmsnorm: dout must be [n, d]");
    assert_eq!(dw.len(), d, "rmsnorm: dw must be [d]");
    if d == 0 {
        return;
    }
    let inv_d = F::one() / super::real(d as f64);
    // One pass: each row's dx, and per block of rows partial sums of dw, added in block order.
    let sums = rows_with_column_sums(dx, d, d, |first, block, pw| {
        for (r, dxr) in block.chunks_exact_mut(d).enumerate() {
            let i = first + r;
            let (g, xr) = (&dout[i * d..(i + 1) * d], &x[i * d..(i + 1) * d]);
            let rs = rstd[i];
            let gx_mean = sum_by(d, |j| g[j] * w[j] * (xr[j] * rs)) * inv_d;
            for j in 0..d {
                let xhat = xr[j] * rs;
                dxr[j] = dxr[j] + rs * (g[j] * w[j] - xhat * gx_mean);
                pw[j] = pw[j] + g[j] * xhat;
            }
        }
    });
    dw.iter_mut().zip(&sums).for_each(|(o, &s)| *o = *o + s);
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{Real, EPS};

    /// Forward.
    pub fn forward<F: Real>(out: &mut [F], rstd: &mut [F], x: &[F], w: &[F], n: usize, d: usize) {
        super::check_shapes(x, w, rstd, n, d);
        let df: F = crate::backend::cpu::real(d as f64);
        for i in 0..n {
            let mut ss = F::zero();
            for j in 0..d {
                ss = ss + x[i * d + j] * x[i * d + j];
            }
            let rs = F::one() / (ss / df + crate::backend::cpu::real(EPS)).sqrt();
            for j in 0..d {
                out[i * d + j] = x[i * d + j] * rs * w[j];
            }
            rstd[i] = rs;
        }
    }

    /// Backward: with `x̂ = x·rstd` and `g = dout·w`,
    /// `dx += rstd·(g − x̂·mean(g·x̂))`, `dw += Σ_rows dout·x̂`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dx: &mut [F],
        dw: &mut [F],
        dout: &[F],
        x: &[F],
        w: &[F],
        rstd: &[F],
        n: usize,
        d: usize,
    ) {
        super::check_shapes(x, w, rstd, n, d);
        let df: F = crate::backend::cpu::real(d as f64);
        for i in 0..n {
            let mut gx_sum = F::zero();
            for j in 0..d {
                gx_sum = gx_sum + dout[i * d + j] * w[j] * (x[i * d + j] * rstd[i]);
            }
            for j in 0..d {
                let xhat = x[i * d + j] * rstd[i];
                let v = rstd[i] * (dout[i * d + j] * w[j] - xhat * (gx_sum / df));
                dx[i * d + j] = dx[i * d + j] + v;
            }
        }
        for j in 0..d {
            let mut sw = F::zero();
            for i in 0..n {
                sw = sw + dout[i * d + j] * (x[i * d + j] * rstd[i]);
            }
            dw[j] = dw[j] + sw;
        }
    }
}
