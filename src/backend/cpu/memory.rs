//! Buffer housekeeping on the CPU: conversions, copies, elementwise sums and row moves.

use rayon::prelude::*;

use super::parallel::{min_rows, ELEMWISE_CHUNK};
use super::Real;

/// Host f32 data converted to `F`.
pub fn upload<F: Real>(host: &[f32]) -> Vec<F> {
    host.iter().map(|&x| super::real(x as f64)).collect()
}

/// A buffer converted to host f32 (rounding to nearest when `F` is wider).
pub fn download<F: Real>(buf: &[F]) -> Vec<f32> {
    buf.iter()
        .map(|&x| x.to_f32().unwrap_or(f32::NAN))
        .collect()
}

/// `dst += src`.
pub fn add_assign<F: Real>(dst: &mut [F], src: &[F]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    dst.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(src.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = *d + s));
}

/// `buf *= s`.
pub fn scale<F: Real>(buf: &mut [F], s: F) {
    buf.par_chunks_mut(ELEMWISE_CHUNK)
        .for_each(|c| c.iter_mut().for_each(|x| *x = *x * s));
}

/// `Σ f(x)` in f64. Fixed chunks, summed in chunk order, so the result never depends on
/// how the pool scheduled them.
fn sum_map<F: Real>(buf: &[F], f: impl Fn(f64) -> f64 + Sync) -> f64 {
    let partials: Vec<f64> = buf
        .par_chunks(ELEMWISE_CHUNK)
        .map(|c| {
            c.iter()
                .map(|&x| f(x.to_f64().unwrap_or(f64::NAN)))
                .sum::<f64>()
        })
        .collect();
    partials.iter().sum()
}

/// `Σ buf²` in f64, deterministic (see [`sum_map`]).
pub fn sum_squares<F: Real>(buf: &[F]) -> f64 {
    sum_map(buf, |x| x * x)
}

/// `Σ buf` in f64, deterministic (see [`sum_map`]).
pub fn sum<F: Real>(buf: &[F]) -> f64 {
    sum_map(buf, |x| x)
}

/// `out[i] = src[rows[i]]` for rows of width `d`.
pub fn gather_rows<F: Real>(out: &mut [F], src: &[F], rows: &[u32], d: usize) {
    assert_eq!(
        out.len(),
        rows.len() * d,
        "gather_rows: out must be [rows, d]"
    );
    if d == 0 {
        return;
    }
    let src_rows = src.len() / d;
    out.par_chunks_mut(d)
        .zip(rows.par_iter())
        .with_min_len(min_rows(d))
        .for_each(|(o, &r)| {
            let r = r as usize;
            assert!(r < src_rows, "gather_rows: row {r} out of range {src_rows}");
            o.copy_from_slice(&src[r * d..(r + 1) * d]);
        });
}

/// `dst[rows[i]] = src[i]` for rows of width `d`; with repeated rows the last one wins.
/// Sequential: it moves few rows (cache slots), and order decides the repeated case.
pub fn scatter_rows<F: Real>(dst: &mut [F], src: &[F], rows: &[u32], d: usize) {
    assert_eq!(
        src.len(),
        rows.len() * d,
        "scatter_rows: src must be [rows, d]"
    );
    if d == 0 {
        return;
    }
    let dst_rows = dst.len() / d;
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        assert!(
            r < dst_rows,
            "scatter_rows: row {r} out of range {dst_rows}"
        );
        dst[r * d..(r + 1) * d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// `dst += src`.
    pub fn add_assign<F: Real>(dst: &mut [F], src: &[F]) {
        assert_eq!(dst.len(), src.len());
        for i in 0..dst.len() {
            dst[i] = dst[i] + src[i];
        }
    }

    /// `buf *= s`.
    pub fn scale<F: Real>(buf: &mut [F], s: F) {
        for x in buf.iter_mut() {
            *x = *x * s;
        }
    }

    /// `Σ buf²` in f64, one running sum.
    pub fn sum_squares<F: Real>(buf: &[F]) -> f64 {
        let mut s = 0.0f64;
        for &x in buf {
            let x = x.to_f64().unwrap();
            s += x * x;
        }
        s
    }

    /// `out[i] = src[rows[i]]`.
    pub fn gather_rows<F: Real>(out: &mut [F], src: &[F], rows: &[u32], d: usize) {
        assert_eq!(out.len(), rows.len() * d);
        for (i, &r) in rows.iter().enumerate() {
            for j in 0..d {
                out[i * d + j] = src[r as usize * d + j];
            }
        }
    }

    /// `dst[rows[i]] = src[i]`, in order.
    pub fn scatter_rows<F: Real>(dst: &mut [F], src: &[F], rows: &[u32], d: usize) {
        assert_eq!(src.len(), rows.len() * d);
        for (i, &r) in rows.iter().enumerate() {
            for j in 0..d {
                dst[r as usize * d + j] = src[i * d + j];
            }
        }
    }
}
