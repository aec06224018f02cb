//! Linear-layer bias: broadcast add, and its gradient (a column sum).

use rayon::prelude::*;

use super::parallel::{column_block, min_rows};
use super::Real;

/// `out[i, j] += bias[j]` for `out` `[n, d]`.
pub fn add_bias<F: Real>(out: &mut [F], bias: &[F], n: usize, d: usize) {
    assert_eq!(out.len(), n * d, "add_bias: out must be [n, d]");
    assert_eq!(bias.len(), d, "add_bias: bias must be [d]");
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .with_min_len(min_rows(d))
        .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, &b)| *o = *o + b));
}

/// `dbias[j] += Σ_i dout[i, j]`.
pub fn bias_backward<F: Real>(dbias: &mut [F], dout: &[F], n: usize, d: usize) {
    assert_eq!(dout.len(), n * d, "bias_backward: dout must be [n, d]");
    assert_eq!(dbias.len(), d, "bias_backward: dbias must be [d]");
    if d == 0 {
        return;
    }
    // Parallel over column blocks: each column is still summed over rows in order, so the
    // result is exactly the reference's, whatever the block width or thread count.
    let block = column_block(n, d);
    dbias
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(bi, db)| {
            let j0 = bi * block;
            let mut acc = vec![F::zero(); db.len()];
            for row in dout.chunks_exact(d) {
                for (s, &g) in acc.iter_mut().zip(&row[j0..j0 + db.len()]) {
                    *s = *s + g;
                }
            }
            db.iter_mut().zip(&acc).for_each(|(o, &s)| *o = *o + s);
        });
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// `out[i, j] += bias[j]`.
    pub fn add_bias<F: Real>(out: &mut [F], bias: &[F], n: usize, d: usize) {
        assert_eq!(out.len(), n * d);
        for i in 0..n {
            for j in 0..d {
                out[i * d + j] = out[i * d + j] + bias[j];
            }
        }
    }

    /// `dbias[j] += Σ_i dout[i, j]`.
    pub fn bias_backward<F: Real>(dbias: &mut [F], dout: &[F], n: usize, d: usize) {
        assert_eq!(dout.len(), n * d);
        for j in 0..d {
            let mut s = F::zero();
            for i in 0..n {
                s = s + dout[i * d + j];
            }
            dbias[j] = dbias[j] + s;
        }
    }
}
