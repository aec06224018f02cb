//! Helpers shared by the CPU op tests: seeded random data, error measures, finite differences.

#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator, so every failure reproduces.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `n` values in `±[lo, hi)` with random sign: keeps inputs away from kinks at zero.
pub fn away_from_zero(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let m = rng.random_range(lo..hi);
            if rng.random_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect()
}

/// `n` ids uniform in `0..hi`.
pub fn ids(rng: &mut ChaCha8Rng, n: usize, hi: u32) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..hi)).collect()
}

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Normwise relative error `max|got − want| / max|want|` (absolute when `want` is all zero).
pub fn normwise_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs()));
    let diff = got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let d = (g - w).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

/// [`normwise_err`] for f32 results against f32 or f64 expectations.
pub fn err32(got: &[f32], want: &[f32]) -> f64 {
    normwise_err(&to_f64(got), &to_f64(want))
}

/// Asserts `normwise_err(got, want) <= tol` with a readable message; returns the error.
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    let e = normwise_err(got, want);
    assert!(e <= tol, "{what}: normwise error {e:.3e} > {tol:.1e}");
    e
}

/// [`assert_close`] for f32 buffers.
#[track_caller]
pub fn assert_close32(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_close(what, &to_f64(got), &to_f64(want), tol)
}

/// Step of the central differences: truncation error `~h²` and cancellation `~ε/h` balance
/// near `ε^(1/3)` ≈ 6e-6 in f64.
pub const FD_STEP: f64 = 1e-5;

/// Central finite-difference gradient of `loss` at `x`.
pub fn fd_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + FD_STEP;
            let up = loss(&xp);
            xp[i] = x0 - FD_STEP;
            let down = loss(&xp);
            xp[i] = x0;
            (up - down) / (2.0 * FD_STEP)
        })
        .collect()
}

/// `Σ r ⊙ y`: a loss whose gradient with respect to `y` is the random `r`.
pub fn probe(r: &[f64], y: &[f64]) -> f64 {
    assert_eq!(r.len(), y.len());
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Tolerance for analytic (reference, f64) gradients against finite differences.
pub const FD_TOL: f64 = 1e-6;

/// Checks an analytic gradient against finite differences, prints and returns the error.
#[track_caller]
pub fn check_fd(what: &str, analytic: &[f64], fd: &[f64]) -> f64 {
    let e = normwise_err(analytic, fd);
    println!("fd-check {what:<28} worst normwise error {e:.3e}");
    assert!(
        e <= FD_TOL,
        "{what}: analytic vs finite-difference error {e:.3e} > {FD_TOL:.0e}"
    );
    e
}

/// The gradient an accumulating backward added: `after − before`.
pub fn added(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}
