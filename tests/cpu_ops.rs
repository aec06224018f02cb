//! CPU backend ops (all but attention and loss, which have their own suite):
//! (a) the fast path, called through the `Backend` trait on `Cpu<f32>`, against the plain
//!     reference on random inputs at several shapes, odd ones included;
//! (b) the reference backward against central finite differences in f64;
//! (c) hand-computed cases.
//!
//! Fast-vs-reference tolerance: normwise relative error `max|got − want| / max|want|` at most
//! 1e-5 (f32 rounding is ~6e-8 per operation; reordered sums of a few hundred terms stay
//! well below 1e-5). Gradient tolerance: the same measure at most 1e-6 against central
//! differences with step 1e-5 in f64. Run with `--nocapture` to see the worst errors.

mod common;

use common::*;
use mega::backend::cpu::{
    activation, adamw, attention, bias, embedding, layernorm, loss, matmul, megabyte_embed, memory,
    rmsnorm, swiglu, Cpu,
};
use mega::backend::{Activation, AdamW, Backend, PAD_ID};

/// Fast path vs reference, normwise relative.
const TOL: f64 = 1e-5;

fn report(what: &str, e: f64) {
    println!("fast-vs-ref {what:<28} worst normwise error {e:.3e}");
}

/// Runs `f` inside a rayon pool of `threads` threads.
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

// ---- memory ---------------------------------------------------------------------------------

#[test]
fn memory_upload_download_zeros_len() {
    let cpu = Cpu::<f32>::new();
    let host = vec![1.5f32, -2.25, 3e-7, f32::MAX, 0.0];
    let buf = cpu.upload(&host);
    assert_eq!(cpu.len(&buf), 5);
    assert_eq!(cpu.download(&buf), host);
    assert_eq!(cpu.zeros(3), vec![0.0f32; 3]);
    assert_eq!(cpu.name(), "cpu");

    let wide = Cpu::<f64>::new();
    let b64 = wide.upload(&host);
    assert_eq!(b64, host.iter().map(|&x| x as f64).collect::<Vec<_>>());
    // Downloading a wider type rounds to the nearest f32.
    assert_eq!(
        wide.download(&vec![0.1f64, 1.0 + 1e-12]),
        vec![0.1f32, 1.0f32]
    );
}

#[test]
fn memory_copy_fill_add_scale_match_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(1);
    for &n in &[0usize, 1, 7, 8193, 3 * 8192 + 5] {
        let x = to_f32(&uniform(&mut r, n, -2.0, 2.0));
        let y = to_f32(&uniform(&mut r, n, -2.0, 2.0));

        let mut got = x.clone();
        cpu.add_assign(&mut got, &y);
        let mut want = x.clone();
        memory::reference::add_assign(&mut want, &y);
        // One rounding per element either way: bitwise equal.
        assert_eq!(got, want, "add_assign n={n}");

        let mut got = x.clone();
        cpu.scale(&mut got, -0.375);
        let mut want = x.clone();
        memory::reference::scale(&mut want, -0.375f32);
        assert_eq!(got, want, "scale n={n}");

        let mut dst = vec![9.0f32; n];
        cpu.copy(&mut dst, &x);
        assert_eq!(dst, x);
        cpu.fill_zero(&mut dst);
        assert!(dst.iter().all(|&v| v == 0.0));
    }
    let mut v = vec![1.0f32, 2.0, 3.0];
    cpu.add_assign(&mut v, &vec![0.5, -2.0, 1.0]);
    assert_eq!(v, vec![1.5, 0.0, 4.0]);
    cpu.scale(&mut v, 2.0);
    assert_eq!(v, vec![3.0, 0.0, 8.0]);
}

#[test]
fn memory_sum_squares() {
    let cpu = Cpu::<f32>::new();
    assert_eq!(cpu.sum_squares(&vec![1.0, 2.0, 3.0]), 14.0);
    assert_eq!(cpu.sum_squares(&vec![]), 0.0);
    // f64 accumulation: 1e5 copies of 0.1f32 squared, where an f32 running sum drifts.
    let tenth = 0.1f32 as f64;
    let got = cpu.sum_squares(&vec![0.1f32; 100_000]);
    assert!((got - 1e5 * tenth * tenth).abs() < 1e-9, "{got}");
    let mut r = rng(2);
    let x = to_f32(&uniform(&mut r, 100_003, -3.0, 3.0));
    let got = cpu.sum_squares(&x);
    let want = memory::reference::sum_squares(&x);
    let e = (got - want).abs() / want;
    report("sum_squares", e);
    assert!(e < 1e-12, "sum_squares relative error {e:.3e}");
}

#[test]
fn memory_gather_scatter_rows() {
    let cpu = Cpu::<f32>::new();
    let src = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut out = vec![0.0f32; 6];
    cpu.gather_rows(&mut out, &src, &[2, 0, 2], 2);
    assert_eq!(out, vec![5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);

    // Repeated destination rows: the last source row wins.
    let mut dst = vec![0.0f32; 8];
    cpu.scatter_rows(&mut dst, &src, &[3, 1, 3], 2);
    assert_eq!(dst, vec![0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 5.0, 6.0]);

    let mut r = rng(3);
    for &(rows, n, d) in &[(5usize, 9usize, 1usize), (50, 3000, 16), (7, 4, 33)] {
        let src = to_f32(&uniform(&mut r, rows * d, -1.0, 1.0));
        let idx = ids(&mut r, n, rows as u32);
        let mut got = vec![0.0f32; n * d];
        cpu.gather_rows(&mut got, &src, &idx, d);
        let mut want = vec![0.0f32; n * d];
        memory::reference::gather_rows(&mut want, &src, &idx, d);
        assert_eq!(got, want, "gather rows={rows} n={n} d={d}");

        let back = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let mut got = src.clone();
        cpu.scatter_rows(&mut got, &back, &idx, d);
        let mut want = src.clone();
        memory::reference::scatter_rows(&mut want, &back, &idx, d);
        assert_eq!(got, want, "scatter rows={rows} n={n} d={d}");
    }
}

// ---- matmul -----------------------------------------------------------------------------------

/// Stores `op(x)` (`[rows, cols]`) the way the op reads it: transposed storage when `trans`.
fn store(x: &[f64], rows: usize, cols: usize, trans: bool) -> Vec<f64> {
    if !trans {
        return x.to_vec();
    }
    let mut t = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

#[test]
fn matmul_fast_matches_reference_all_transposes() {
    let cpu = Cpu::<f32>::new();
    let wide = Cpu::<f64>::new();
    let mut r = rng(10);
    let mut worst: f64 = 0.0;
    let mut worst64: f64 = 0.0;
    // Includes gemm's odd edges, a gemv, and one product above the threading threshold.
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (64, 1, 130),
        (1, 300, 257),
        (150, 200, 100),
    ];
    for &(m, k, n) in &shapes {
        for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
            for &acc in &[false, true] {
                let a = uniform(&mut r, m * k, -1.0, 1.0);
                let b = uniform(&mut r, k * n, -1.0, 1.0);
                let out0 = uniform(&mut r, m * n, -1.0, 1.0);
                // Round inputs to f32 first so the f64 reference sees exactly what f32 sees.
                let (a, b, out0) = (
                    to_f64(&to_f32(&a)),
                    to_f64(&to_f32(&b)),
                    to_f64(&to_f32(&out0)),
                );
                let mut want = out0.clone();
                matmul::reference::matmul(&mut want, &a, &b, m, k, n, ta, tb, acc);

                let mut got = to_f32(&out0);
                cpu.matmul(&mut got, &to_f32(&a), &to_f32(&b), m, k, n, ta, tb, acc);
                let what = format!("matmul f32 {m}x{k}x{n} ta={ta} tb={tb} acc={acc}");
                worst = worst.max(assert_close(&what, &to_f64(&got), &want, TOL));

                let mut got64 = out0.clone();
                wide.matmul(&mut got64, &a, &b, m, k, n, ta, tb, acc);
                worst64 = worst64.max(assert_close(&what, &got64, &want, 1e-13));
            }
        }
    }
    report("matmul f32 (vs f64 ref)", worst);
    report("matmul f64", worst64);
}

#[test]
fn matmul_hand_computed() {
    let cpu = Cpu::<f32>::new();
    let a = vec![1.0f32, 2.0, 3.0, 4.0]; // [[1,2],[3,4]]
    let b = vec![5.0f32, 6.0, 7.0, 8.0]; // [[5,6],[7,8]]
    let mut out = vec![0.0f32; 4];
    cpu.matmul(&mut out, &a, &b, 2, 2, 2, false, false, false);
    assert_eq!(out, vec![19.0, 22.0, 43.0, 50.0]);
    // aᵀ·b = [[1,3],[2,4]]·b
    cpu.matmul(&mut out, &a, &b, 2, 2, 2, true, false, false);
    assert_eq!(out, vec![26.0, 30.0, 38.0, 44.0]);
    // a·bᵀ = a·[[5,7],[6,8]]
    cpu.matmul(&mut out, &a, &b, 2, 2, 2, false, true, false);
    assert_eq!(out, vec![17.0, 23.0, 39.0, 53.0]);
    // aᵀ·bᵀ, accumulated onto ones.
    let mut out = vec![1.0f32; 4];
    cpu.matmul(&mut out, &a, &b, 2, 2, 2, true, true, true);
    assert_eq!(out, vec![24.0, 32.0, 35.0, 47.0]);
    // Non-square: [1,3]·[3,2].
    let mut out = vec![0.0f32; 2];
    cpu.matmul(
        &mut out,
        &[1.0, 2.0, 3.0].to_vec(),
        &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0].to_vec(),
        1,
        3,
        2,
        false,
        false,
        false,
    );
    assert_eq!(out, vec![4.0, 5.0]);
    // k = 0: the empty sum.
    let mut out = vec![7.0f32; 6];
    cpu.matmul(&mut out, &vec![], &vec![], 2, 0, 3, false, false, true);
    assert_eq!(out, vec![7.0; 6]);
    cpu.matmul(&mut out, &vec![], &vec![], 2, 0, 3, false, false, false);
    assert_eq!(out, vec![0.0; 6]);
}

/// `y = op(a)·op(b)`: the backward the models use is two more matmuls,
/// `d op(a) = dy·op(b)ᵀ`, `d op(b) = op(a)ᵀ·dy`, checked here against finite differences.
#[test]
fn matmul_backward_by_transposed_products_matches_fd() {
    let (m, k, n) = (3, 4, 5);
    let mut r = rng(11);
    let a = uniform(&mut r, m * k, -1.0, 1.0);
    let b = uniform(&mut r, k * n, -1.0, 1.0);
    let dy = uniform(&mut r, m * n, -1.0, 1.0);
    let fwd = |a: &[f64], b: &[f64]| {
        let mut y = vec![0.0; m * n];
        matmul::reference::matmul(&mut y, a, b, m, k, n, false, false, false);
        probe(&dy, &y)
    };
    let mut da = vec![0.0; m * k];
    matmul::reference::matmul(&mut da, &dy, &b, m, n, k, false, true, false);
    let mut db = vec![0.0; k * n];
    matmul::reference::matmul(&mut db, &a, &dy, k, m, n, true, false, false);
    check_fd("matmul d(a)", &da, &fd_grad(&a, |a| fwd(a, &b)));
    check_fd("matmul d(b)", &db, &fd_grad(&b, |b| fwd(&a, b)));

    // The same with both operands stored transposed (the layout of a tied output head).
    let (at, bt) = (store(&a, m, k, true), store(&b, k, n, true));
    let fwd_t = |at: &[f64], bt: &[f64]| {
        let mut y = vec![0.0; m * n];
        matmul::reference::matmul(&mut y, at, bt, m, k, n, true, true, false);
        probe(&dy, &y)
    };
    // d(aᵀ) [k, m] = (dy·bᵀ)ᵀ = b·dyᵀ = btᵀ·dyᵀ, and d(bᵀ) [n, k] = (aᵀ·dy)ᵀ = dyᵀ·a = dyᵀ·atᵀ.
    let mut dat = vec![0.0; k * m];
    matmul::reference::matmul(&mut dat, &bt, &dy, k, n, m, true, true, false);
    let mut dbt = vec![0.0; n * k];
    matmul::reference::matmul(&mut dbt, &dy, &at, n, m, k, true, true, false);
    check_fd(
        "matmul d(aᵀ) transposed",
        &dat,
        &fd_grad(&at, |at| fwd_t(at, &bt)),
    );
    check_fd(
        "matmul d(bᵀ) transposed",
        &dbt,
        &fd_grad(&bt, |bt| fwd_t(&at, bt)),
    );
}

// ---- bias -------------------------------------------------------------------------------------

#[test]
fn bias_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(20);
    for &(n, d) in &[
        (1usize, 1usize),
        (3, 5),
        (7, 1),
        (1, 77),
        (300, 130),
        (2000, 33),
    ] {
        let out0 = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let bias = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let mut got = out0.clone();
        cpu.add_bias(&mut got, &bias, n, d);
        let mut want = out0.clone();
        bias::reference::add_bias(&mut want, &bias, n, d);
        assert_eq!(got, want, "add_bias n={n} d={d}");

        // Column sums in row order, like the reference: bitwise equal.
        let db0 = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let mut got = db0.clone();
        cpu.bias_backward(&mut got, &out0, n, d);
        let mut want = db0.clone();
        bias::reference::bias_backward(&mut want, &out0, n, d);
        assert_eq!(got, want, "bias_backward n={n} d={d}");
    }
}

#[test]
fn bias_hand_and_fd() {
    let cpu = Cpu::<f32>::new();
    let mut out = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    cpu.add_bias(&mut out, &vec![10.0, 20.0, 30.0], 2, 3);
    assert_eq!(out, vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    let mut db = vec![1.0f32, 1.0, 1.0];
    cpu.bias_backward(&mut db, &vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
    assert_eq!(db, vec![6.0, 8.0, 10.0]);

    let (n, d) = (4, 3);
    let mut r = rng(21);
    let x = uniform(&mut r, n * d, -1.0, 1.0);
    let bias = uniform(&mut r, d, -1.0, 1.0);
    let dy = uniform(&mut r, n * d, -1.0, 1.0);
    let db0 = uniform(&mut r, d, -1.0, 1.0);
    let mut db = db0.clone();
    bias::reference::bias_backward(&mut db, &dy, n, d);
    let fd = fd_grad(&bias, |bias| {
        let mut y = x.clone();
        bias::reference::add_bias(&mut y, bias, n, d);
        probe(&dy, &y)
    });
    check_fd("bias", &added(&db, &db0), &fd);
}

// ---- layernorm ----------------------------------------------------------------------------------

#[test]
fn layernorm_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(30);
    let mut worst: f64 = 0.0;
    for &(n, d) in &[
        (1usize, 1usize),
        (2, 3),
        (5, 64),
        (33, 257),
        (130, 300),
        (64, 1024),
    ] {
        let x = to_f32(&uniform(&mut r, n * d, -2.0, 3.0));
        let w = to_f32(&uniform(&mut r, d, 0.5, 1.5));
        let b = to_f32(&uniform(&mut r, d, -0.5, 0.5));
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * d], vec![0.0f32; n], vec![0.0f32; n]);
        cpu.layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &x,
            &w,
            &b,
            n,
            d,
            layernorm::EPS as f32,
        );
        let (mut out_r, mut mean_r, mut rstd_r) =
            (vec![0.0f32; n * d], vec![0.0f32; n], vec![0.0f32; n]);
        layernorm::reference::forward(&mut out_r, &mut mean_r, &mut rstd_r, &x, &w, &b, n, d);
        let tag = format!("layernorm n={n} d={d}");
        worst = worst.max(assert_close32(&format!("{tag} out"), &out, &out_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} mean"), &mean, &mean_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} rstd"), &rstd, &rstd_r, TOL));

        let dout = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let dx0 = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let dw0 = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let db0 = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
        cpu.layernorm_backward(
            &mut dx, &mut dw, &mut db, &dout, &x, &w, &mean_r, &rstd_r, n, d,
        );
        let (mut dx_r, mut dw_r, mut db_r) = (dx0.clone(), dw0.clone(), db0.clone());
        layernorm::reference::backward(
            &mut dx_r, &mut dw_r, &mut db_r, &dout, &x, &w, &mean_r, &rstd_r, n, d,
        );
        worst = worst.max(assert_close32(&format!("{tag} dx"), &dx, &dx_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} dw"), &dw, &dw_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} db"), &db, &db_r, TOL));
    }
    report("layernorm fwd+bwd", worst);
}

#[test]
fn layernorm_hand_computed() {
    let cpu = Cpu::<f32>::new();
    let (mut out, mut mean, mut rstd) = (vec![0.0f32; 3], vec![0.0f32], vec![0.0f32]);
    let x = vec![1.0f32, 2.0, 3.0];
    cpu.layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &x,
        &vec![1.0; 3],
        &vec![0.0; 3],
        1,
        3,
        layernorm::EPS as f32,
    );
    // mean 2, variance (1 + 0 + 1)/3 = 2/3.
    let rs = 1.0 / (2.0f64 / 3.0 + 1e-5).sqrt();
    assert_eq!(mean, vec![2.0]);
    assert!((rstd[0] as f64 - rs).abs() < 1e-6 * rs);
    let want = [-rs, 0.0, rs];
    for (o, w) in out.iter().zip(want) {
        assert!((*o as f64 - w).abs() < 1e-6, "{out:?} vs {want:?}");
    }
    // Weight and bias: out = x̂·w + b.
    cpu.layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &x,
        &vec![2.0, 3.0, 4.0],
        &vec![1.0, 1.0, 1.0],
        1,
        3,
        layernorm::EPS as f32,
    );
    let want = [1.0 - 2.0 * rs, 1.0, 1.0 + 4.0 * rs];
    for (o, w) in out.iter().zip(want) {
        assert!((*o as f64 - w).abs() < 1e-5, "{out:?} vs {want:?}");
    }
    // A constant row normalizes to zero; its output is just the bias.
    cpu.layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &vec![5.0; 3],
        &vec![2.0; 3],
        &vec![0.5, -0.5, 0.0],
        1,
        3,
        layernorm::EPS as f32,
    );
    assert_eq!(out, vec![0.5, -0.5, 0.0]);
}

#[test]
fn layernorm_reference_backward_matches_fd() {
    let (n, d) = (3, 7);
    let mut r = rng(31);
    let x = uniform(&mut r, n * d, -2.0, 2.0);
    let w = uniform(&mut r, d, 0.5, 1.5);
    let b = uniform(&mut r, d, -0.5, 0.5);
    let dy = uniform(&mut r, n * d, -1.0, 1.0);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        layernorm::reference::forward(&mut out, &mut mean, &mut rstd, x, w, b, n, d);
        probe(&dy, &out)
    };
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
    layernorm::reference::forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, d);
    let dx0 = uniform(&mut r, n * d, -1.0, 1.0);
    let dw0 = uniform(&mut r, d, -1.0, 1.0);
    let db0 = uniform(&mut r, d, -1.0, 1.0);
    let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
    layernorm::reference::backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, n, d);
    check_fd(
        "layernorm dx",
        &added(&dx, &dx0),
        &fd_grad(&x, |x| loss(x, &w, &b)),
    );
    check_fd(
        "layernorm dw",
        &added(&dw, &dw0),
        &fd_grad(&w, |w| loss(&x, w, &b)),
    );
    check_fd(
        "layernorm db",
        &added(&db, &db0),
        &fd_grad(&b, |b| loss(&x, &w, b)),
    );
}

// ---- rmsnorm ------------------------------------------------------------------------------------

#[test]
fn rmsnorm_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(40);
    let mut worst: f64 = 0.0;
    for &(n, d) in &[
        (1usize, 1usize),
        (2, 3),
        (5, 64),
        (33, 257),
        (130, 300),
        (64, 1024),
    ] {
        let x = to_f32(&uniform(&mut r, n * d, -2.0, 3.0));
        let w = to_f32(&uniform(&mut r, d, 0.5, 1.5));
        let (mut out, mut rstd) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        cpu.rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, d, rmsnorm::EPS as f32);
        let (mut out_r, mut rstd_r) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        rmsnorm::reference::forward(&mut out_r, &mut rstd_r, &x, &w, n, d);
        let tag = format!("rmsnorm n={n} d={d}");
        worst = worst.max(assert_close32(&format!("{tag} out"), &out, &out_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} rstd"), &rstd, &rstd_r, TOL));

        let dout = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let dx0 = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let dw0 = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        cpu.rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &w, &rstd_r, n, d);
        let (mut dx_r, mut dw_r) = (dx0.clone(), dw0.clone());
        rmsnorm::reference::backward(&mut dx_r, &mut dw_r, &dout, &x, &w, &rstd_r, n, d);
        worst = worst.max(assert_close32(&format!("{tag} dx"), &dx, &dx_r, TOL));
        worst = worst.max(assert_close32(&format!("{tag} dw"), &dw, &dw_r, TOL));
    }
    report("rmsnorm fwd+bwd", worst);
}

#[test]
fn rmsnorm_hand_computed() {
    let cpu = Cpu::<f32>::new();
    let (mut out, mut rstd) = (vec![0.0f32; 2], vec![0.0f32]);
    cpu.rmsnorm_forward(
        &mut out,
        &mut rstd,
        &vec![3.0, 4.0],
        &vec![1.0, 2.0],
        1,
        2,
        rmsnorm::EPS as f32,
    );
    // mean(x²) = (9 + 16)/2 = 12.5.
    let rs = 1.0 / (12.5f64 + 1e-6).sqrt();
    assert!((rstd[0] as f64 - rs).abs() < 1e-6 * rs);
    let want = [3.0 * rs, 8.0 * rs];
    for (o, w) in out.iter().zip(want) {
        assert!((*o as f64 - w).abs() < 1e-6, "{out:?} vs {want:?}");
    }
}

#[test]
fn rmsnorm_reference_backward_matches_fd() {
    let (n, d) = (3, 7);
    let mut r = rng(41);
    let x = uniform(&mut r, n * d, -2.0, 2.0);
    let w = uniform(&mut r, d, 0.5, 1.5);
    let dy = uniform(&mut r, n * d, -1.0, 1.0);
    let loss = |x: &[f64], w: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        rmsnorm::reference::forward(&mut out, &mut rstd, x, w, n, d);
        probe(&dy, &out)
    };
    let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
    rmsnorm::reference::forward(&mut out, &mut rstd, &x, &w, n, d);
    let dx0 = uniform(&mut r, n * d, -1.0, 1.0);
    let dw0 = uniform(&mut r, d, -1.0, 1.0);
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    rmsnorm::reference::backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, n, d);
    check_fd(
        "rmsnorm dx",
        &added(&dx, &dx0),
        &fd_grad(&x, |x| loss(x, &w)),
    );
    check_fd(
        "rmsnorm dw",
        &added(&dw, &dw0),
        &fd_grad(&w, |w| loss(&x, w)),
    );
}

// ---- activations ----------------------------------------------------------------------------------

const ACTIVATIONS: [Activation; 3] = [Activation::Relu, Activation::Gelu, Activation::Silu];

#[test]
fn activation_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(50);
    for act in ACTIVATIONS {
        let mut worst: f64 = 0.0;
        for &n in &[1usize, 7, 3 * 8192 + 7] {
            let x = to_f32(&uniform(&mut r, n, -6.0, 6.0));
            let mut got = vec![0.0f32; n];
            cpu.activation_forward(act, &mut got, &x);
            let mut want = vec![0.0f32; n];
            activation::reference::forward(act, &mut want, &x);
            worst = worst.max(assert_close32(
                &format!("{act:?} fwd n={n}"),
                &got,
                &want,
                TOL,
            ));

            let dout = to_f32(&uniform(&mut r, n, -1.0, 1.0));
            let dx0 = to_f32(&uniform(&mut r, n, -1.0, 1.0));
            let mut got = dx0.clone();
            cpu.activation_backward(act, &mut got, &x, &dout);
            let mut want = dx0.clone();
            activation::reference::backward(act, &mut want, &x, &dout);
            worst = worst.max(assert_close32(
                &format!("{act:?} bwd n={n}"),
                &got,
                &want,
                TOL,
            ));
        }
        report(&format!("{act:?} fwd+bwd"), worst);
    }
}

#[test]
fn activation_hand_computed() {
    let cpu = Cpu::<f32>::new();
    let x = vec![-1.0f32, 0.0, 1.0, 2.0];
    let mut out = vec![0.0f32; 4];
    cpu.activation_forward(Activation::Relu, &mut out, &x);
    assert_eq!(out, vec![0.0, 0.0, 1.0, 2.0]);
    // GELU-tanh(1) = 0.5·(1 + tanh(√(2/π)·1.044715)); silu(1) = 1/(1 + e⁻¹).
    let gelu1 = 0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * 1.044715).tanh());
    let silu1 = 1.0 / (1.0 + (-1.0f64).exp());
    assert!((gelu1 - 0.841_192).abs() < 1e-6);
    assert!((silu1 - 0.731_058_6).abs() < 1e-7);
    cpu.activation_forward(Activation::Gelu, &mut out, &x);
    assert!(
        (out[2] as f64 - gelu1).abs() < 1e-6 && out[1] == 0.0,
        "{out:?}"
    );
    // GELU(−x) = GELU(x) − x.
    assert!((out[0] as f64 - (gelu1 - 1.0)).abs() < 1e-6, "{out:?}");
    cpu.activation_forward(Activation::Silu, &mut out, &x);
    assert!(
        (out[2] as f64 - silu1).abs() < 1e-6 && out[1] == 0.0,
        "{out:?}"
    );

    // Slopes at 0: relu 0, gelu 1/2, silu 1/2; relu at 2: 1. dx accumulates onto 1.
    let mut dx = vec![1.0f32; 4];
    cpu.activation_backward(Activation::Relu, &mut dx, &x, &vec![3.0; 4]);
    assert_eq!(dx, vec![1.0, 1.0, 4.0, 4.0]);
    for act in [Activation::Gelu, Activation::Silu] {
        let mut dx = vec![1.0f32];
        cpu.activation_backward(act, &mut dx, &vec![0.0], &vec![2.0]);
        assert!((dx[0] - 2.0).abs() < 1e-7, "{act:?} {dx:?}");
    }
}

#[test]
fn activation_reference_backward_matches_fd() {
    let mut r = rng(51);
    for act in ACTIVATIONS {
        // Away from relu's kink at 0, which central differences cannot resolve.
        let x = away_from_zero(&mut r, 40, 0.01, 5.0);
        let dy = uniform(&mut r, 40, -1.0, 1.0);
        let dx0 = uniform(&mut r, 40, -1.0, 1.0);
        let mut dx = dx0.clone();
        activation::reference::backward(act, &mut dx, &x, &dy);
        let fd = fd_grad(&x, |x| {
            let mut y = vec![0.0; x.len()];
            activation::reference::forward(act, &mut y, x);
            probe(&dy, &y)
        });
        check_fd(&format!("{act:?}"), &added(&dx, &dx0), &fd);
    }
}

// ---- swiglu ---------------------------------------------------------------------------------------

#[test]
fn swiglu_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(60);
    let mut worst: f64 = 0.0;
    for &(n, h) in &[(1usize, 1usize), (3, 5), (40, 1000), (9, 17)] {
        let x = to_f32(&uniform(&mut r, n * 2 * h, -5.0, 5.0));
        let mut got = vec![0.0f32; n * h];
        cpu.swiglu_forward(&mut got, &x, n, h);
        let mut want = vec![0.0f32; n * h];
        swiglu::reference::forward(&mut want, &x, n, h);
        worst = worst.max(assert_close32(
            &format!("swiglu fwd n={n} h={h}"),
            &got,
            &want,
            TOL,
        ));

        let dout = to_f32(&uniform(&mut r, n * h, -1.0, 1.0));
        let dx0 = to_f32(&uniform(&mut r, n * 2 * h, -1.0, 1.0));
        let mut got = dx0.clone();
        cpu.swiglu_backward(&mut got, &x, &dout, n, h);
        let mut want = dx0.clone();
        swiglu::reference::backward(&mut want, &x, &dout, n, h);
        worst = worst.max(assert_close32(
            &format!("swiglu bwd n={n} h={h}"),
            &got,
            &want,
            TOL,
        ));
    }
    report("swiglu fwd+bwd", worst);
}

#[test]
fn swiglu_hand_and_fd() {
    let cpu = Cpu::<f32>::new();
    // Row [a0, a1 | g0, g1] = [1, 0 | 2, 5]: out = [silu(1)·2, silu(0)·5] = [2/(1+e⁻¹), 0].
    let mut out = vec![0.0f32; 2];
    cpu.swiglu_forward(&mut out, &vec![1.0, 0.0, 2.0, 5.0], 1, 2);
    let want0 = 2.0 / (1.0 + (-1.0f64).exp());
    assert!(
        (out[0] as f64 - want0).abs() < 1e-6 && out[1] == 0.0,
        "{out:?}"
    );
    // d/dg = silu(a) = 0 at a = 0; d/da = g·silu'(0) = 5/2.
    let mut dx = vec![0.0f32; 4];
    cpu.swiglu_backward(&mut dx, &vec![1.0, 0.0, 2.0, 5.0], &vec![0.0, 1.0], 1, 2);
    assert_eq!(dx, vec![0.0, 2.5, 0.0, 0.0]);

    let (n, h) = (3, 4);
    let mut r = rng(61);
    let x = uniform(&mut r, n * 2 * h, -3.0, 3.0);
    let dy = uniform(&mut r, n * h, -1.0, 1.0);
    let dx0 = uniform(&mut r, n * 2 * h, -1.0, 1.0);
    let mut dx = dx0.clone();
    swiglu::reference::backward(&mut dx, &x, &dy, n, h);
    let fd = fd_grad(&x, |x| {
        let mut y = vec![0.0; n * h];
        swiglu::reference::forward(&mut y, x, n, h);
        probe(&dy, &y)
    });
    check_fd("swiglu", &added(&dx, &dx0), &fd);
}

// ---- embeddings -------------------------------------------------------------------------------------

#[test]
fn embedding_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(70);
    // The last case is big enough for the parallel scatter-add.
    for &(v, n, d) in &[
        (1usize, 1usize, 1usize),
        (5, 9, 3),
        (256, 4000, 24),
        (3, 2, 100),
    ] {
        let table = to_f32(&uniform(&mut r, v * d, -1.0, 1.0));
        let idx = ids(&mut r, n, v as u32);
        for acc in [false, true] {
            let out0 = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
            let mut got = out0.clone();
            cpu.embedding_forward(&mut got, &table, &idx, d, acc);
            let mut want = out0.clone();
            embedding::reference::forward(&mut want, &table, &idx, d, acc);
            assert_eq!(got, want, "embedding fwd v={v} n={n} d={d} acc={acc}");
        }
        // Same per-row summation order as the reference: bitwise equal.
        let dout = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let dt0 = to_f32(&uniform(&mut r, v * d, -1.0, 1.0));
        let mut got = dt0.clone();
        cpu.embedding_backward(&mut got, &dout, &idx, d);
        let mut want = dt0.clone();
        embedding::reference::backward(&mut want, &dout, &idx, d);
        assert_eq!(got, want, "embedding bwd v={v} n={n} d={d}");
    }
}

#[test]
fn embedding_hand_and_fd() {
    let cpu = Cpu::<f32>::new();
    let table = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut out = vec![0.5f32; 4];
    cpu.embedding_forward(&mut out, &table, &[2, 0], 2, true);
    assert_eq!(out, vec![5.5, 6.5, 1.5, 2.5]);
    cpu.embedding_forward(&mut out, &table, &[1, 1], 2, false);
    assert_eq!(out, vec![3.0, 4.0, 3.0, 4.0]);
    let mut dt = vec![0.0f32; 6];
    cpu.embedding_backward(
        &mut dt,
        &vec![1.0, 2.0, 10.0, 20.0, 100.0, 200.0],
        &[2, 0, 2],
        2,
    );
    assert_eq!(dt, vec![10.0, 20.0, 0.0, 0.0, 101.0, 202.0]);

    let (v, n, d) = (4, 6, 3);
    let mut r = rng(71);
    let table = uniform(&mut r, v * d, -1.0, 1.0);
    let idx = ids(&mut r, n, v as u32);
    let dy = uniform(&mut r, n * d, -1.0, 1.0);
    let dt0 = uniform(&mut r, v * d, -1.0, 1.0);
    let mut dt = dt0.clone();
    embedding::reference::backward(&mut dt, &dy, &idx, d);
    let fd = fd_grad(&table, |t| {
        let mut y = vec![0.0; n * d];
        embedding::reference::forward(&mut y, t, &idx, d, false);
        probe(&dy, &y)
    });
    check_fd("embedding", &added(&dt, &dt0), &fd);
}

/// MEGABYTE-style patch ids: the first patch of each sequence is all pad, the rest real bytes
/// at their byte positions.
fn patch_inputs(
    r: &mut rand_chacha::ChaCha8Rng,
    seqs: usize,
    k: usize,
    p: usize,
    v: u32,
) -> (Vec<u32>, Vec<u32>) {
    let mut idx = Vec::new();
    let mut pos = Vec::new();
    for _ in 0..seqs {
        for kk in 0..k {
            for q in 0..p {
                if kk == 0 {
                    idx.push(PAD_ID);
                    pos.push(0);
                } else {
                    idx.push(ids(r, 1, v)[0]);
                    pos.push(((kk - 1) * p + q) as u32);
                }
            }
        }
    }
    (idx, pos)
}

#[test]
fn patch_embed_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(80);
    for &(seqs, k, p, dg, v) in &[
        (1usize, 2usize, 1usize, 1usize, 3u32),
        (2, 3, 4, 5, 7),
        (8, 32, 8, 64, 256),
    ] {
        let (idx, pos) = patch_inputs(&mut r, seqs, k, p, v);
        let t = k * p;
        let tok = to_f32(&uniform(&mut r, v as usize * dg, -1.0, 1.0));
        let pe = to_f32(&uniform(&mut r, t * dg, -1.0, 1.0));
        let pad = to_f32(&uniform(&mut r, p * dg, -1.0, 1.0));
        let n = idx.len() * dg;
        let mut got = to_f32(&uniform(&mut r, n, -1.0, 1.0));
        cpu.patch_embed_forward(&mut got, &tok, &pe, &pad, &idx, &pos, p, dg);
        let mut want = vec![0.0f32; n];
        megabyte_embed::reference::patch_forward(&mut want, &tok, &pe, &pad, &idx, &pos, p, dg);
        assert_eq!(got, want, "patch fwd seqs={seqs} k={k} p={p} dg={dg}");

        let dout = to_f32(&uniform(&mut r, n, -1.0, 1.0));
        let g0 = [
            to_f32(&uniform(&mut r, tok.len(), -1.0, 1.0)),
            to_f32(&uniform(&mut r, pe.len(), -1.0, 1.0)),
            to_f32(&uniform(&mut r, pad.len(), -1.0, 1.0)),
        ];
        let [mut a, mut b, mut c] = g0.clone();
        cpu.patch_embed_backward(&mut a, &mut b, &mut c, &dout, &idx, &pos, p, dg);
        let [mut ar, mut br, mut cr] = g0.clone();
        megabyte_embed::reference::patch_backward(
            &mut ar, &mut br, &mut cr, &dout, &idx, &pos, p, dg,
        );
        assert_eq!(
            (a, b, c),
            (ar, br, cr),
            "patch bwd seqs={seqs} k={k} p={p} dg={dg}"
        );
    }
}

#[test]
fn patch_embed_hand_and_fd() {
    let cpu = Cpu::<f32>::new();
    // p = 2, dg = 1; rows: [PAD, PAD], [tok 1 @ pos 0, tok 0 @ pos 1].
    let tok = vec![10.0f32, 20.0];
    let pe = vec![0.1f32, 0.2];
    let pad = vec![-1.0f32, -2.0];
    let idx = [PAD_ID, PAD_ID, 1, 0];
    let pos = [0u32, 0, 0, 1];
    let mut out = vec![0.0f32; 4];
    cpu.patch_embed_forward(&mut out, &tok, &pe, &pad, &idx, &pos, 2, 1);
    assert_eq!(out, vec![-1.0, -2.0, 20.1, 10.2]);
    let (mut dt, mut dp, mut dpad) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
    cpu.patch_embed_backward(
        &mut dt,
        &mut dp,
        &mut dpad,
        &vec![1.0, 2.0, 3.0, 4.0],
        &idx,
        &pos,
        2,
        1,
    );
    assert_eq!(
        (dt, dp, dpad),
        (vec![4.0, 3.0], vec![3.0, 4.0], vec![1.0, 2.0])
    );

    let (seqs, k, p, dg, v) = (2, 3, 2, 3, 3u32);
    let mut r = rng(81);
    let (mut idx, pos) = patch_inputs(&mut r, seqs, k, p, v);
    idx[8] = PAD_ID; // a pad in the middle of a patch, too
    let tok = uniform(&mut r, v as usize * dg, -1.0, 1.0);
    let pe = uniform(&mut r, k * p * dg, -1.0, 1.0);
    let pad = uniform(&mut r, p * dg, -1.0, 1.0);
    let dy = uniform(&mut r, idx.len() * dg, -1.0, 1.0);
    let loss = |tok: &[f64], pe: &[f64], pad: &[f64]| {
        let mut y = vec![0.0; idx.len() * dg];
        megabyte_embed::reference::patch_forward(&mut y, tok, pe, pad, &idx, &pos, p, dg);
        probe(&dy, &y)
    };
    let g0 = [
        uniform(&mut r, tok.len(), -1.0, 1.0),
        uniform(&mut r, pe.len(), -1.0, 1.0),
        uniform(&mut r, pad.len(), -1.0, 1.0),
    ];
    let [mut a, mut b, mut c] = g0.clone();
    megabyte_embed::reference::patch_backward(&mut a, &mut b, &mut c, &dy, &idx, &pos, p, dg);
    check_fd(
        "patch_embed dtok",
        &added(&a, &g0[0]),
        &fd_grad(&tok, |t| loss(t, &pe, &pad)),
    );
    check_fd(
        "patch_embed dpos",
        &added(&b, &g0[1]),
        &fd_grad(&pe, |e| loss(&tok, e, &pad)),
    );
    check_fd(
        "patch_embed dpad",
        &added(&c, &g0[2]),
        &fd_grad(&pad, |q| loss(&tok, &pe, q)),
    );
}

/// Local-stack ids: slot 0 of every patch is the pad, the rest shifted bytes.
fn local_inputs(
    r: &mut rand_chacha::ChaCha8Rng,
    n: usize,
    p: usize,
    v: u32,
) -> (Vec<u32>, Vec<u32>) {
    let slots: Vec<u32> = (0..n).map(|i| (i % p) as u32).collect();
    let idx = slots
        .iter()
        .map(|&s| if s == 0 { PAD_ID } else { ids(r, 1, v)[0] })
        .collect();
    (idx, slots)
}

#[test]
fn local_embed_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(90);
    for &(n, p, d, v) in &[
        (1usize, 1usize, 1usize, 2u32),
        (12, 4, 5, 7),
        (4096, 8, 32, 256),
    ] {
        let (idx, slots) = local_inputs(&mut r, n, p, v);
        let tok = to_f32(&uniform(&mut r, v as usize * d, -1.0, 1.0));
        let pe = to_f32(&uniform(&mut r, p * d, -1.0, 1.0));
        let pad = to_f32(&uniform(&mut r, d, -1.0, 1.0));
        let out0 = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let mut got = out0.clone();
        cpu.local_embed_forward(&mut got, &tok, &pe, &pad, &idx, &slots, d);
        let mut want = out0.clone();
        megabyte_embed::reference::local_forward(&mut want, &tok, &pe, &pad, &idx, &slots, d);
        assert_eq!(got, want, "local fwd n={n} p={p} d={d}");

        let dout = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
        let g0 = [
            to_f32(&uniform(&mut r, tok.len(), -1.0, 1.0)),
            to_f32(&uniform(&mut r, pe.len(), -1.0, 1.0)),
            to_f32(&uniform(&mut r, pad.len(), -1.0, 1.0)),
        ];
        let [mut a, mut b, mut c] = g0.clone();
        cpu.local_embed_backward(&mut a, &mut b, &mut c, &dout, &idx, &slots, d);
        let [mut ar, mut br, mut cr] = g0.clone();
        megabyte_embed::reference::local_backward(
            &mut ar, &mut br, &mut cr, &dout, &idx, &slots, d,
        );
        assert_eq!((a, b, c), (ar, br, cr), "local bwd n={n} p={p} d={d}");
    }
}

#[test]
fn local_embed_hand_and_fd() {
    let cpu = Cpu::<f32>::new();
    // d = 1, p = 2: rows [pad @ slot 0, tok 1 @ slot 1], accumulated onto [100, 200].
    let tok = vec![10.0f32, 20.0];
    let pe = vec![0.25f32, 0.5];
    let pad = vec![-1.0f32];
    let idx = [PAD_ID, 1];
    let slots = [0u32, 1];
    let mut out = vec![100.0f32, 200.0];
    cpu.local_embed_forward(&mut out, &tok, &pe, &pad, &idx, &slots, 1);
    assert_eq!(out, vec![99.25, 220.5]);
    let (mut dt, mut dp, mut dpad) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32]);
    cpu.local_embed_backward(
        &mut dt,
        &mut dp,
        &mut dpad,
        &vec![3.0, 5.0],
        &idx,
        &slots,
        1,
    );
    assert_eq!((dt, dp, dpad), (vec![0.0, 5.0], vec![3.0, 5.0], vec![3.0]));

    let (n, p, d, v) = (8, 4, 3, 3u32);
    let mut r = rng(91);
    let (idx, slots) = local_inputs(&mut r, n, p, v);
    let tok = uniform(&mut r, v as usize * d, -1.0, 1.0);
    let pe = uniform(&mut r, p * d, -1.0, 1.0);
    let pad = uniform(&mut r, d, -1.0, 1.0);
    let base = uniform(&mut r, n * d, -1.0, 1.0);
    let dy = uniform(&mut r, n * d, -1.0, 1.0);
    let loss = |tok: &[f64], pe: &[f64], pad: &[f64]| {
        let mut y = base.clone();
        megabyte_embed::reference::local_forward(&mut y, tok, pe, pad, &idx, &slots, d);
        probe(&dy, &y)
    };
    let g0 = [
        uniform(&mut r, tok.len(), -1.0, 1.0),
        uniform(&mut r, pe.len(), -1.0, 1.0),
        uniform(&mut r, pad.len(), -1.0, 1.0),
    ];
    let [mut a, mut b, mut c] = g0.clone();
    megabyte_embed::reference::local_backward(&mut a, &mut b, &mut c, &dy, &idx, &slots, d);
    check_fd(
        "local_embed dtok",
        &added(&a, &g0[0]),
        &fd_grad(&tok, |t| loss(t, &pe, &pad)),
    );
    check_fd(
        "local_embed dpos",
        &added(&b, &g0[1]),
        &fd_grad(&pe, |e| loss(&tok, e, &pad)),
    );
    check_fd(
        "local_embed dpad",
        &added(&c, &g0[2]),
        &fd_grad(&pad, |q| loss(&tok, &pe, q)),
    );
}

// ---- determinism ------------------------------------------------------------------------------------

/// Reductions and scatter-adds give bitwise the same result whatever the pool size.
#[test]
fn reductions_do_not_depend_on_thread_count() {
    let mut r = rng(100);
    let (v, n, d) = (256usize, 6000usize, 48usize);
    let table0 = to_f32(&uniform(&mut r, v * d, -1.0, 1.0));
    let dout = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
    let idx = ids(&mut r, n, v as u32);
    let x = to_f32(&uniform(&mut r, n * d, -1.0, 1.0));
    let w = to_f32(&uniform(&mut r, d, 0.5, 1.5));
    let (mut mean, mut rstd, mut y) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n * d]);
    layernorm::forward(
        &mut y,
        &mut mean,
        &mut rstd,
        &x,
        &w,
        &w,
        n,
        d,
        layernorm::EPS as f32,
    );
    let run = || {
        let cpu = Cpu::<f32>::new();
        let mut dt = table0.clone();
        cpu.embedding_backward(&mut dt, &dout, &idx, d);
        let mut db = vec![0.0f32; d];
        cpu.bias_backward(&mut db, &dout, n, d);
        let (mut dx, mut dw, mut dbn) = (vec![0.0f32; n * d], vec![0.0f32; d], vec![0.0f32; d]);
        cpu.layernorm_backward(
            &mut dx, &mut dw, &mut dbn, &dout, &x, &w, &mean, &rstd, n, d,
        );
        let ss = cpu.sum_squares(&dout);
        (dt, db, dx, dw, dbn, ss.to_bits())
    };
    let one = in_pool(1, run);
    let three = in_pool(3, run);
    let four = in_pool(4, run);
    assert!(
        one == three && one == four,
        "results depend on the thread count"
    );
}

// ---- adamw ----------------------------------------------------------------------------------------

fn hp(step: u64) -> AdamW {
    AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
    }
}

#[test]
fn adamw_hand_computed() {
    let wide = Cpu::<f64>::new();
    let (mut p, mut m, mut v) = (vec![1.0f64], vec![0.0f64], vec![0.0f64]);
    wide.adamw_step(&mut p, &vec![0.5], &mut m, &mut v, &hp(1));
    // m = 0.1·0.5 = 0.05, v = 0.001·0.25; m̂ = 0.5, v̂ = 0.25, so
    // p = 1 − 0.1·(0.5/(0.5 + 1e-8) + 0.01·1) = 0.899 (to 1e-9). The β's arrive as f32
    // (0.9f32 = 0.9 − 2.4e-8, 0.999f32 = 0.999 + 1.3e-8), hence the looser bounds.
    assert!((m[0] - 0.05).abs() < 2e-8, "{m:?}");
    assert!((v[0] - 0.00025).abs() < 1e-8, "{v:?}");
    assert!((p[0] - 0.899).abs() < 1e-7, "{p:?}");
    // Second step, g = −0.5: m = 0.9·0.05 − 0.05 = −0.005, v = 0.999·0.00025 + 0.00025;
    // m̂ = −0.005/0.19, v̂ = 0.00049975/0.001999.
    let p1 = p[0];
    wide.adamw_step(&mut p, &vec![-0.5], &mut m, &mut v, &hp(2));
    let m_hat = -0.005 / (1.0 - 0.81);
    let v_hat = (0.999 * 0.00025 + 0.00025) / (1.0 - 0.999f64 * 0.999);
    let want = p1 - 0.1 * (m_hat / (v_hat.sqrt() + 1e-8) + 0.01 * p1);
    assert!((p[0] - want).abs() < 1e-6, "{} vs {want}", p[0]);

    // Zero gradient and moments: only decay acts, p ← p·(1 − lr·wd).
    let cpu = Cpu::<f32>::new();
    let (mut p, mut m, mut v) = (vec![2.0f32, -4.0], vec![0.0f32; 2], vec![0.0f32; 2]);
    cpu.adamw_step(&mut p, &vec![0.0; 2], &mut m, &mut v, &hp(7));
    assert_eq!(p, vec![2.0 * (1.0 - 0.001), -4.0 * (1.0 - 0.001)]);
}

#[test]
fn adamw_fast_matches_reference() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(110);
    let mut worst: f64 = 0.0;
    for &n in &[1usize, 5, 3 * 8192 + 3] {
        let mut p = to_f32(&uniform(&mut r, n, -1.0, 1.0));
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut pr, mut mr, mut vr) = (p.clone(), m.clone(), v.clone());
        for step in 1..=3 {
            let g = to_f32(&uniform(&mut r, n, -1.0, 1.0));
            let h = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            cpu.adamw_step(&mut p, &g, &mut m, &mut v, &h);
            adamw::reference::step(&mut pr, &g, &mut mr, &mut vr, &h);
        }
        worst = worst.max(assert_close32(&format!("adamw p n={n}"), &p, &pr, TOL));
        worst = worst.max(assert_close32(&format!("adamw m n={n}"), &m, &mr, TOL));
        worst = worst.max(assert_close32(&format!("adamw v n={n}"), &v, &vr, TOL));
    }
    report("adamw (3 steps)", worst);
}

// ---- attention and loss wiring ----------------------------------------------------------------------

/// The trait methods reach the attention and loss modules with the arguments in place
/// (their numerics are tested in `cpu_attention_loss.rs`).
#[test]
fn attention_and_loss_are_wired_through_the_trait() {
    let cpu = Cpu::<f32>::new();
    let mut r = rng(120);
    let (b, t, c, h, scale) = (2usize, 5usize, 8usize, 2usize, 0.35f32);
    let qkv = to_f32(&uniform(&mut r, b * t * 3 * c, -1.0, 1.0));
    let (mut out, mut att) = (vec![0.0f32; b * t * c], vec![0.0f32; b * h * t * t]);
    cpu.attention_forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
    let (mut out_r, mut att_r) = (vec![0.0f32; b * t * c], vec![0.0f32; b * h * t * t]);
    attention::reference::forward(&mut out_r, &mut att_r, &qkv, b, t, c, h, scale);
    assert_close32("attention out", &out, &out_r, TOL);
    assert_close32("attention att", &att, &att_r, TOL);

    let dout = to_f32(&uniform(&mut r, b * t * c, -1.0, 1.0));
    let d0 = to_f32(&uniform(&mut r, qkv.len(), -1.0, 1.0));
    let mut d = d0.clone();
    cpu.attention_backward(&mut d, &dout, &qkv, &att_r, b, t, c, h, scale);
    let mut d_r = d0.clone();
    attention::reference::backward(&mut d_r, &dout, &qkv, &att_r, b, t, c, h, scale);
    assert_close32("attention dqkv", &d, &d_r, TOL);

    let t_max = 6;
    let kc = to_f32(&uniform(&mut r, b * t_max * c, -1.0, 1.0));
    let vc = to_f32(&uniform(&mut r, b * t_max * c, -1.0, 1.0));
    let q1 = to_f32(&uniform(&mut r, b * 3 * c, -1.0, 1.0));
    let lens = [3u32, 6];
    let mut o = vec![0.0f32; b * c];
    // A contiguous [b, t_max, c] cache: one block of t_max positions per row.
    cpu.attention_decode(&mut o, &q1, &kc, &vc, &lens, &[0, 1], t_max, c, h, scale);
    let mut o_r = vec![0.0f32; b * c];
    let pages = attention::KvPages {
        k: &kc,
        v: &vc,
        block_table: &[0, 1],
        block_size: t_max,
        c,
    };
    attention::reference::decode(&mut o_r, &q1, &pages, &lens, h, scale);
    assert_close32("attention decode", &o, &o_r, TOL);

    // kv_append addresses flat cache entries: row r, position p is entry r·t_max + p.
    let (mut k1, mut v1) = (kc.clone(), vc.clone());
    cpu.kv_append(&mut k1, &mut v1, &q1, &[2, t_max as u32 + 5], c);
    let (mut k_r, mut v_r) = (kc.clone(), vc.clone());
    for (r, e) in [(0usize, 2usize), (1, t_max + 5)] {
        k_r[e * c..(e + 1) * c].copy_from_slice(&q1[r * 3 * c + c..r * 3 * c + 2 * c]);
        v_r[e * c..(e + 1) * c].copy_from_slice(&q1[r * 3 * c + 2 * c..(r + 1) * 3 * c]);
    }
    assert_eq!((k1, v1), (k_r, v_r), "kv_append");

    let (n, v) = (4usize, 11usize);
    let logits = to_f32(&uniform(&mut r, n * v, -3.0, 3.0));
    let targets = ids(&mut r, n, v as u32);
    let mut l = vec![0.0f32; n];
    cpu.cross_entropy_forward(&mut l, &logits, &targets, v);
    let mut l_r = vec![0.0f32; n];
    loss::reference::cross_entropy_forward(&mut l_r, &logits, &targets, v);
    assert_close32("cross_entropy", &l, &l_r, TOL);
    let mut dl = vec![0.0f32; n * v];
    cpu.cross_entropy_backward(&mut dl, &logits, &targets, v, 0.25);
    let mut dl_r = vec![0.0f32; n * v];
    loss::reference::cross_entropy_backward(&mut dl_r, &logits, &targets, v, 0.25);
    assert_close32("cross_entropy grad", &dl, &dl_r, TOL);
    let mut ls = vec![0.0f32; n * v];
    cpu.log_softmax(&mut ls, &logits, v);
    let mut ls_r = vec![0.0f32; n * v];
    loss::reference::log_softmax(&mut ls_r, &logits, v);
    assert_close32("log_softmax", &ls, &ls_r, TOL);
}
