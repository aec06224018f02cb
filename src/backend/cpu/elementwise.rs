//! Elementwise products and offsets: the gates of MEGALODON's attention and SwiGLU
//! (`out = a ⊙ b`) and its plus-one norm scales (`out = w + 1`).

use rayon::prelude::*;

use super::parallel::ELEMWISE_CHUNK;
use super::Real;

/// `out = a ⊙ b`.
pub fn mul<F: Real>(out: &mut [F], a: &[F], b: &[F]) {
    assert_eq!(out.len(), a.len(), "mul: out and a differ in length");
    assert_eq!(a.len(), b.len(), "mul: a and b differ in length");
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(
            a.par_chunks(ELEMWISE_CHUNK)
                .zip(b.par_chunks(ELEMWISE_CHUNK)),
        )
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a * b;
            }
        });
}

/// `out = x + s`.
pub fn add_scalar<F: Real>(out: &mut [F], x: &[F], s: F) {
    assert_eq!(out.len(), x.len(), "add_scalar: out and x differ in length");
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x + s;
            }
        });
}
