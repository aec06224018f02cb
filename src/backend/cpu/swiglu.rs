//! SwiGLU gate: for `x` `[n, 2h]` holding `[a | g]` per row, `out [n, h] = silu(a) ⊙ g`.

use rayon::prelude::*;

use super::parallel::min_rows;
use super::Real;

fn check_shapes<F>(x: &[F], half: &[F], n: usize, h: usize) {
    assert_eq!(x.len(), n * 2 * h, "swiglu: x must be [n, 2h]");
    assert_eq!(half.len(), n * h, "swiglu: out / dout must be [n, h]");
}

/// `out = silu(a) ⊙ g`.
pub fn forward<F: Real>(out: &mut [F], x: &[F], n: usize, h: usize) {
    check_shapes(x, out, n, h);
    if h == 0 {
        return;
    }
    out.par_chunks_mut(h)
        .zip(x.par_chunks(2 * h))
        .with_min_len(min_rows(3 * h))
        .for_each(|(o, xr)| {
            let (a, g) = xr.split_at(h);
            for j in 0..h {
                let s = F::one() / (F::one() + (-a[j]).exp());
                o[j] = a[j] * s * g[j];
            }
        });
}

/// `dx += …`: `da = dout·g·silu'(a)`, `dg = dout·silu(a)`.
pub fn backward<F: Real>(dx: &mut [F], x: &[F], dout: &[F], n: usize, h: usize) {
    check_shapes(x, dout, n, h);
    assert_eq!(dx.len(), x.len(), "swiglu: dx must be [n, 2h]");
    if h == 0 {
        return;
    }
    dx.par_chunks_mut(2 * h)
        .zip(x.par_chunks(2 * h).zip(dout.par_chunks(h)))
        .with_min_len(min_rows(5 * h))
        .for_each(|(dxr, (xr, go))| {
            let (a, g) = xr.split_at(h);
            let (da, dg) = dxr.split_at_mut(h);
            for j in 0..h {
                let s = F::one() / (F::one() + (-a[j]).exp());
                let silu = a[j] * s;
                let dsilu = s * (F::one() + a[j] * (F::one() - s));
                da[j] = da[j] + go[j] * g[j] * dsilu;
                dg[j] = dg[j] + go[j] * silu;
            }
        });
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;
    use crate::backend::cpu::activation::reference as act;
    use crate::backend::Activation;

    /// `out[i, j] = silu(x[i, j]) · x[i, h + j]`.
    pub fn forward<F: Real>(out: &mut [F], x: &[F], n: usize, h: usize) {
        super::check_shapes(x, out, n, h);
        for i in 0..n {
            for j in 0..h {
                let a = x[i * 2 * h + j];
                let g = x[i * 2 * h + h + j];
                out[i * h + j] = act::value(Activation::Silu, a) * g;
            }
        }
    }

    /// `dx[i, j] += dout·g·silu'(a)`, `dx[i, h + j] += dout·silu(a)`.
    pub fn backward<F: Real>(dx: &mut [F], x: &[F], dout: &[F], n: usize, h: usize) {
        super::check_shapes(x, dout, n, h);
        for i in 0..n {
            for j in 0..h {
                let ia = i * 2 * h + j;
                let ig = ia + h;
                let go = dout[i * h + j];
                dx[ia] = dx[ia] + go * x[ig] * act::slope(Activation::Silu, x[ia]);
                dx[ig] = dx[ig] + go * act::value(Activation::Silu, x[ia]);
            }
        }
    }
}
