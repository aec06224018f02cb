//! The few-row matmul path (`backend::cpu::matmul::small_m`, taken by `matmul` for
//! `m ≤ 16` with `b` transposed, MEGALODON's decode shape):
//! (a) against the plain-loop reference at awkward sizes (m = 1, 3, 16; k and n of 1, odd
//!     and prime, below and above the 16-lane groups and the 64-column blocks), with
//!     accumulation on and off, in f32 and f64, through `matmul` and the kernel itself
//!     (and, through `matmul`, the untransposed small-m case, which stays on `gemm`);
//! (b) batch invariance: row `i` of an `m`-row call equals the same row computed alone, bit
//!     for bit, including calls large enough to split over threads.

mod common;

use common::*;
use mega::backend::cpu::matmul::{self, reference, small_m};
use mega::backend::cpu::Real;

fn cast<F: Real>(x: &[f64]) -> Vec<F> {
    x.iter().map(|&v| F::from_f64(v).unwrap()).collect()
}

fn wide<F: Real>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64().unwrap()).collect()
}

/// `(want, got through matmul, got from the kernel)` for one case in `F`.
fn case<F: Real>(
    m: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    accumulate: bool,
    seed: u64,
) -> [Vec<f64>; 3] {
    let mut r = rng(seed);
    let a: Vec<F> = cast(&uniform(&mut r, m * k, -1.0, 1.0));
    let b: Vec<F> = cast(&uniform(&mut r, k * n, -1.0, 1.0));
    let out0: Vec<F> = cast(&uniform(&mut r, m * n, -1.0, 1.0));
    let mut want = out0.clone();
    reference::matmul(&mut want, &a, &b, m, k, n, false, trans_b, accumulate);
    let mut via_matmul = out0.clone();
    matmul::matmul(&mut via_matmul, &a, &b, m, k, n, false, trans_b, accumulate);
    let direct = if trans_b {
        let mut direct = out0;
        small_m::matmul(&mut direct, &a, &b, m, k, n, accumulate);
        direct
    } else {
        via_matmul.clone()
    };
    [wide(&want), wide(&via_matmul), wide(&direct)]
}

#[test]
fn small_m_matches_reference_at_awkward_sizes() {
    let (mut w32, mut w64) = (0.0f64, 0.0f64);
    let mut seed = 0;
    for m in [1, 3, 16] {
        for k in [1, 7, 31, 101] {
            for n in [1, 5, 67, 131] {
                for trans_b in [true, false] {
                    for accumulate in [false, true] {
                        seed += 1;
                        let what = format!("m={m} k={k} n={n} trans_b={trans_b} acc={accumulate}");
                        let [want, got, direct] = case::<f32>(m, k, n, trans_b, accumulate, seed);
                        // Sums of k products of magnitude ≤ 1 in f32.
                        w32 = w32.max(assert_close(&format!("f32 {what}"), &got, &want, 1e-5));
                        w32 = w32.max(assert_close(
                            &format!("f32 kernel {what}"),
                            &direct,
                            &want,
                            1e-5,
                        ));
                        let [want, got, direct] = case::<f64>(m, k, n, trans_b, accumulate, seed);
                        w64 = w64.max(assert_close(&format!("f64 {what}"), &got, &want, 1e-13));
                        w64 = w64.max(assert_close(
                            &format!("f64 kernel {what}"),
                            &direct,
                            &want,
                            1e-13,
                        ));
                    }
                }
            }
        }
    }
    println!("small-m vs reference: worst f32 {w32:.3e}, worst f64 {w64:.3e}");
}

#[test]
fn a_row_does_not_depend_on_the_other_rows_of_the_call() {
    // k = 509 and n = 1031 (primes): tails in both the lane groups and the column blocks;
    // 16 × 1031 × 509 multiply-adds are enough for the call to split over threads.
    let (k, n) = (509, 1031);
    let mut r = rng(42);
    let a = to_f32(&uniform(&mut r, 16 * k, -1.0, 1.0));
    let b = to_f32(&uniform(&mut r, k * n, -1.0, 1.0));
    let alone: Vec<Vec<f32>> = (0..16)
        .map(|i| {
            let mut out = vec![0.0f32; n];
            let row = &a[i * k..(i + 1) * k];
            matmul::matmul(&mut out, row, &b, 1, k, n, false, true, false);
            out
        })
        .collect();
    for m in [3, 16] {
        let mut out = vec![0.0f32; m * n];
        matmul::matmul(&mut out, &a[..m * k], &b, m, k, n, false, true, false);
        for (i, row) in out.chunks(n).enumerate() {
            let same = row
                .iter()
                .zip(&alone[i])
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "row {i} of a {m}-row call differs from the row alone");
        }
    }
}
