//! LayerNorm over the last dimension: `out = (x − μ)·rstd·w + b`, `rstd = 1/√(var + eps)`.

use rayon::prelude::*;

use super::lanes::sum_by;
use super::parallel::{min_rows, rows_with_column_sums};
use super::Real;

/// Variance floor of MEGABYTE's LayerNorms, as in GPT-2 / PyTorch's default.
pub const EPS: f64 = 1e-5;

fn check_shapes<F>(x: &[F], w: &[F], mean: &[F], rstd: &[F], n: usize, d: usize) {
    assert_eq!(x.len(), n * d, "layernorm: x must be [n, d]");
    assert_eq!(w.len(), d, "layernorm: weight must be [d]");
    assert_eq!(mean.len(), n, "layernorm: mean must be [n]");
    assert_eq!(rstd.len(), n, "layernorm: rstd must be [n]");
}

/// Forward with variance floor `eps` ([`EPS`] for MEGABYTE): writes `out` `[n, d]` and the
/// saved statistics `mean`, `rstd` `[n]`.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    x: &[F],
    w: &[F],
    b: &[F],
    n: usize,
    d: usize,
    eps: F,
) {
    check_shapes(x, w, mean, rstd, n, d);
    assert_eq!(out.len(), n * d, "layernorm: out must be [n, d]");
    assert_eq!(b.len(), d, "layernorm: bias must be [d]");
    if d == 0 {
        return;
    }
    let inv_d = F::one() / super::real(d as f64);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(min_rows(d))
        .for_each(|((o, xr), (mu_out, rs_out))| {
            let mu = sum_by(d, |j| xr[j]) * inv_d;
            let var = sum_by(d, |j| {
                let c = xr[j] - mu;
                c * c
            }) * inv_d;
            let rs = F::one() / (var + eps).sqrt();
            for j in 0..d {
                o[j] = (xr[j] - mu) * rs * w[j] + b[j];
            }
            *mu_out = mu;
            *rs_out = rs;
        });
}

/// Backward: `dx += …`, `dw += …`, `db += …` from the saved `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dx: &mut [F],
    dw: &mut [F],
    db: &mut [F],
    dout: &[F],
    x: &[F],
    w: &[F],
    mean: &[F],
    rstd: &[F],
    n: usize,
    d: usize,
) {
    check_shapes(x, w, mean, rstd, n, d);
    assert_eq!(dx.len(), n * d, "layernorm: dx must be [n, d]");
    assert_eq!(dout.len(), n * d, "layernorm: dout must be [n, d]");
    assert_eq!(dw.len(), d, "layernorm: dw must be [d]");
    assert_eq!(db.len(), d, "layernorm: db must be [d]");
    if d == 0 {
        return;
    }
    let inv_d = F::one() / super::real(d as f64);
    // One pass: each row's dx, and per block of rows partial sums of dw | db (read from the
    // rows while they are in L1), added in block order.
    let sums = rows_with_column_sums(dx, d, 2 * d, |first, block, partial| {
        let (pw, pb) = partial.split_at_mut(d);
        for (r, dxr) in block.chunks_exact_mut(d).enumerate() {
            let i = first + r;
            let (g, xr) = (&dout[i * d..(i + 1) * d], &x[i * d..(i + 1) * d]);
            let (mu, rs) = (mean[i], rstd[i]);
            let g_mean = sum_by(d, |j| g[j] * w[j]) * inv_d;
            let gx_mean = sum_by(d, |j| g[j] * w[j] * ((xr[j] - mu) * rs)) * inv_d;
            for j in 0..d {
                let xhat = (xr[j] - mu) * rs;
                dxr[j] = dxr[j] + rs * (g[j] * w[j] - g_mean - xhat * gx_mean);
                pw[j] = pw[j] + g[j] * xhat;
                pb[j] = pb[j] + g[j];
            }
        }
    });
    let (sw, sb) = sums.split_at(d);
    dw.iter_mut().zip(sw).for_each(|(o, &s)| *o = *o + s);
    db.iter_mut().zip(sb).for_each(|(o, &s)| *o = *o + s);
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{Real, EPS};

    /// Forward, two passes per row (mean, then centred variance).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        out: &mut [F],
        mean: &mut [F],
        rstd: &mut [F],
        x: &[F],
        w: &[F],
        b: &[F],
        n: usize,
        d: usize,
    ) {
        super::check_shapes(x, w, mean, rstd, n, d);
        let df: F = crate::backend::cpu::real(d as f64);
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let mut s = F::zero();
            for &v in row {
                s = s + v;
            }
            let mu = s / df;
            let mut ss = F::zero();
            for &v in row {
                ss = ss + (v - mu) * (v - mu);
            }
            let rs = F::one() / (ss / df + crate::backend::cpu::real(EPS)).sqrt();
            for j in 0..d {
                out[i * d + j] = (row[j] - mu) * rs * w[j] + b[j];
            }
            mean[i] = mu;
            rstd[i] = rs;
        }
    }

    /// Backward: with `x̂ = (x−μ)·rstd` and `g = dout·w`,
    /// `dx += rstd·(g − mean(g) − x̂·mean(g·x̂))`, `dw += Σ_rows dout·x̂`, `db += Σ_rows dout`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dx: &mut [F],
        dw: &mut [F],
        db: &mut [F],
        dout: &[F],
        x: &[F],
        w: &[F],
        mean: &[F],
        rstd: &[F],
        n: usize,
        d: usize,
    ) {
        super::check_shapes(x, w, mean, rstd, n, d);
        let df: F = crate::backend::cpu::real(d as f64);
        let xhat = |i: usize, j: usize| (x[i * d + j] - mean[i]) * rstd[i];
        for i in 0..n {
            let mut g_sum = F::zero();
            let mut gx_sum = F::zero();
            for j in 0..d {
                let g = dout[i * d + j] * w[j];
                g_sum = g_sum + g;
                gx_sum = gx_sum + g * xhat(i, j);
            }
            for j in 0..d {
                let g = dout[i * d + j] * w[j];
                let v = rstd[i] * (g - g_sum / df - xhat(i, j) * (gx_sum / df));
                dx[i * d + j] = dx[i * d + j] + v;
            }
        }
        for j in 0..d {
            let mut sw = F::zero();
            let mut sb = F::zero();
            for i in 0..n {
                sw = sw + dout[i * d + j] * xhat(i, j);
                sb = sb + dout[i * d + j];
            }
            dw[j] = dw[j] + sw;
            db[j] = db[j] + sb;
        }
    }
}
