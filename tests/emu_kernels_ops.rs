//! The per-row and elementwise kernels (`kernels/norms.cu`, `activations.cu`, `adamw.cu`,
//! `megabyte_gathers.cu`, `rope.cu`) on the CPU emulator against their Rust twins in
//! `backend::cpu`, run in f64 on the same inputs (tolerances: tests/support/emu_check.rs).
//! Every launch runs under the forward, greedy_low and greedy_high schedules into exact-size
//! NaN-filled outputs; sizes are 1, a block's 256 threads ± 1 and primes.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use half::bf16;
use mega::backend::cpu::{activation, adamw, layernorm, megabyte_embed, rmsnorm, swiglu};
use mega::backend::{Activation, AdamW, PAD_ID};
use mega::cuda::launch::{self as shapes, norms::Norm};
use mega::cuda::scatter_plan::{local_embed_plans, patch_embed_plans, RowScatterPlan};
use mega::emu::{HostBuffer, KernelArg, Schedule};
use rand::Rng;

/// Widths around the 256-thread block, and primes.
const WIDTHS: [usize; 6] = [1, 255, 256, 257, 131, 37];
const EPS: f32 = 1e-5;

/// One LayerNorm/RMSNorm case: the seed of its inputs, rows, width, and bf16 storage.
#[derive(Debug)]
struct NormCase {
    seed: u64,
    n: usize,
    d: usize,
    bf16: bool,
}

/// Every width of [`WIDTHS`] × `rows` × {f32, bf16} storage, seeded
/// `seed0 + 10 · width index + rows` (the same inputs for both storages).
fn norm_cases(seed0: u64, rows: [usize; 3]) -> impl Iterator<Item = NormCase> {
    WIDTHS.iter().enumerate().flat_map(move |(i, &d)| {
        rows.into_iter().flat_map(move |n| {
            [false, true].map(move |bf16| NormCase {
                seed: seed0 + i as u64 * 10 + n as u64,
                n,
                d,
                bf16,
            })
        })
    })
}

// ---- LayerNorm / RMSNorm -------------------------------------------------------------------

#[test]
fn layernorm_matches_the_twin() {
    sweep(
        "layernorm_matches_the_twin",
        norm_cases(1000, [1, 3, 7]),
        |case, schedules| {
            let (n, d, storage_bf16) = (case.n, case.d, case.bf16);
            let mut r = rng(case.seed);
            let x = uniform(&mut r, n * d, 0.5, 2.0);
            let w = uniform(&mut r, d, 1.0, 0.5);
            let b = uniform(&mut r, d, 0.0, 0.5);
            let dout = uniform(&mut r, n * d, 0.0, 1.0);
            let (dx0, dw0, db0) = (
                uniform(&mut r, n * d, 0.0, 1.0),
                uniform(&mut r, d, 0.0, 1.0),
                uniform(&mut r, d, 0.0, 1.0),
            );
            // A bf16 kernel reads bf16-rounded activations: give the twin the same values.
            let (xr, doutr, dx0r) = if storage_bf16 {
                (through_bf16(&x), through_bf16(&dout), through_bf16(&dx0))
            } else {
                (x.clone(), dout.clone(), dx0.clone())
            };
            let mut out_w = vec![0.0; n * d];
            let (mut mean_w, mut rstd_w) = (vec![0.0; n], vec![0.0; n]);
            layernorm::forward(
                &mut out_w,
                &mut mean_w,
                &mut rstd_w,
                &widen(&xr),
                &widen(&w),
                &widen(&b),
                n,
                d,
                EPS as f64,
            );
            let (mut dx_w, mut dw_w, mut db_w) = (widen(&dx0r), widen(&dw0), widen(&db0));
            layernorm::backward(
                &mut dx_w,
                &mut dw_w,
                &mut db_w,
                &widen(&doutr),
                &widen(&xr),
                &widen(&w),
                &mean_w,
                &rstd_w,
                n,
                d,
            );
            let tol = if storage_bf16 { BF16_TOL } else { F32_TOL };
            schedules.each(|schedule, checks| {
                let (ni, di) = (n as i32, d as i32);
                let (mean, rstd) = (nan_buf(n), nan_buf(n));
                let (wb, bb) = (HostBuffer::from_slice(&w), HostBuffer::from_slice(&b));
                let chunks = shapes::norms::backward_chunks(n) as i32;
                let partials = nan_buf(shapes::norms::partials_len(Norm::LayerNorm, n, d));
                let (dw, db) = (HostBuffer::from_slice(&dw0), HostBuffer::from_slice(&db0));
                let (out, dx) = if storage_bf16 {
                    let (out, xb) = (bf16_buf(&vec![f32::NAN; n * d]), bf16_buf(&x));
                    run(
                        "layernorm_forward_bf16",
                        shapes::norms::forward(n),
                        &[&out, &mean, &rstd, &xb, &wb, &bb, &ni, &di, &EPS],
                        schedule,
                    );
                    let (dx, doutb) = (bf16_buf(&dx0), bf16_buf(&dout));
                    run(
                        "layernorm_backward_bf16",
                        shapes::norms::backward(Norm::LayerNorm, n, d).unwrap(),
                        &[&dx, &partials, &doutb, &xb, &wb, &mean, &rstd, &ni, &di],
                        schedule,
                    );
                    (bf16_values(&out), bf16_values(&dx))
                } else {
                    let (out, xb) = (nan_buf(n * d), HostBuffer::from_slice(&x));
                    run(
                        "layernorm_forward_f32",
                        shapes::norms::forward(n),
                        &[&out, &mean, &rstd, &xb, &wb, &bb, &ni, &di, &EPS],
                        schedule,
                    );
                    let (dx, doutb) = (HostBuffer::from_slice(&dx0), HostBuffer::from_slice(&dout));
                    run(
                        "layernorm_backward_f32",
                        shapes::norms::backward(Norm::LayerNorm, n, d).unwrap(),
                        &[&dx, &partials, &doutb, &xb, &wb, &mean, &rstd, &ni, &di],
                        schedule,
                    );
                    (out.to_vec(), dx.to_vec())
                };
                run(
                    "layernorm_param_reduce_f32",
                    shapes::norms::param_reduce(d),
                    &[&dw, &db, &partials, &chunks, &di],
                    schedule,
                );
                checks.close("out", &out, &out_w, tol);
                checks.close("mean", &mean.to_vec(), &mean_w, F32_TOL);
                checks.close("rstd", &rstd.to_vec(), &rstd_w, F32_TOL);
                checks.close("dx", &dx, &dx_w, tol);
                checks.close("dw", &dw.to_vec(), &dw_w, F32_TOL);
                checks.close("db", &db.to_vec(), &db_w, F32_TOL);
            });
        },
    );
}

#[test]
fn rmsnorm_matches_the_twin() {
    sweep(
        "rmsnorm_matches_the_twin",
        norm_cases(2000, [1, 4, 7]),
        |case, schedules| {
            let (n, d, storage_bf16) = (case.n, case.d, case.bf16);
            let mut r = rng(case.seed);
            let x = uniform(&mut r, n * d, 0.2, 2.0);
            let w = uniform(&mut r, d, 1.0, 0.5);
            let dout = uniform(&mut r, n * d, 0.0, 1.0);
            let (dx0, dw0) = (
                uniform(&mut r, n * d, 0.0, 1.0),
                uniform(&mut r, d, 0.0, 1.0),
            );
            let (xr, doutr, dx0r) = if storage_bf16 {
                (through_bf16(&x), through_bf16(&dout), through_bf16(&dx0))
            } else {
                (x.clone(), dout.clone(), dx0.clone())
            };
            let mut out_w = vec![0.0; n * d];
            let mut rstd_w = vec![0.0; n];
            rmsnorm::forward(
                &mut out_w,
                &mut rstd_w,
                &widen(&xr),
                &widen(&w),
                n,
                d,
                EPS as f64,
            );
            let (mut dx_w, mut dw_w) = (widen(&dx0r), widen(&dw0));
            rmsnorm::backward(
                &mut dx_w,
                &mut dw_w,
                &widen(&doutr),
                &widen(&xr),
                &widen(&w),
                &rstd_w,
                n,
                d,
            );
            let tol = if storage_bf16 { BF16_TOL } else { F32_TOL };
            schedules.each(|schedule, checks| {
                let (ni, di) = (n as i32, d as i32);
                let rstd = nan_buf(n);
                let wb = HostBuffer::from_slice(&w);
                let chunks = shapes::norms::backward_chunks(n) as i32;
                let partials = nan_buf(shapes::norms::partials_len(Norm::RmsNorm, n, d));
                let dw = HostBuffer::from_slice(&dw0);
                let (out, dx) = if storage_bf16 {
                    let (out, xb) = (bf16_buf(&vec![f32::NAN; n * d]), bf16_buf(&x));
                    run(
                        "rmsnorm_forward_bf16",
                        shapes::norms::forward(n),
                        &[&out, &rstd, &xb, &wb, &ni, &di, &EPS],
                        schedule,
                    );
                    let (dx, doutb) = (bf16_buf(&dx0), bf16_buf(&dout));
                    run(
                        "rmsnorm_backward_bf16",
                        shapes::norms::backward(Norm::RmsNorm, n, d).unwrap(),
                        &[&dx, &partials, &doutb, &xb, &wb, &rstd, &ni, &di],
                        schedule,
                    );
                    (bf16_values(&out), bf16_values(&dx))
                } else {
                    let (out, xb) = (nan_buf(n * d), HostBuffer::from_slice(&x));
                    run(
                        "rmsnorm_forward_f32",
                        shapes::norms::forward(n),
                        &[&out, &rstd, &xb, &wb, &ni, &di, &EPS],
                        schedule,
                    );
                    let (dx, doutb) = (HostBuffer::from_slice(&dx0), HostBuffer::from_slice(&dout));
                    run(
                        "rmsnorm_backward_f32",
                        shapes::norms::backward(Norm::RmsNorm, n, d).unwrap(),
                        &[&dx, &partials, &doutb, &xb, &wb, &rstd, &ni, &di],
                        schedule,
                    );
                    (out.to_vec(), dx.to_vec())
                };
                run(
                    "rmsnorm_param_reduce_f32",
                    shapes::norms::param_reduce(d),
                    &[&dw, &partials, &chunks, &di],
                    schedule,
                );
                checks.close("out", &out, &out_w, tol);
                checks.close("rstd", &rstd.to_vec(), &rstd_w, F32_TOL);
                checks.close("dx", &dx, &dx_w, tol);
                checks.close("dw", &dw.to_vec(), &dw_w, F32_TOL);
            });
        },
    );
}

// ---- activations, SwiGLU -------------------------------------------------------------------

#[test]
fn activations_match_the_twin() {
    #[derive(Debug)]
    struct ActCase {
        seed: u64,
        n: usize,
        act: Activation,
        bf16: bool,
    }
    let cases = [1usize, 255, 256, 257, 1009]
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| {
            [Activation::Relu, Activation::Gelu, Activation::Silu]
                .into_iter()
                .flat_map(move |act| {
                    [false, true].map(move |bf16| ActCase {
                        seed: 3000 + i as u64,
                        n,
                        act,
                        bf16,
                    })
                })
        });
    sweep("activations_match_the_twin", cases, |case, schedules| {
        let (n, act, storage_bf16) = (case.n, case.act, case.bf16);
        let mut r = rng(case.seed);
        let x = uniform(&mut r, n, 0.0, 4.0);
        let dout = uniform(&mut r, n, 0.0, 1.0);
        let dx0 = uniform(&mut r, n, 0.0, 1.0);
        let id = shapes::activations::act_id(act);
        let ni = n as i64;
        let (xr, doutr, dx0r) = if storage_bf16 {
            (through_bf16(&x), through_bf16(&dout), through_bf16(&dx0))
        } else {
            (x.clone(), dout.clone(), dx0.clone())
        };
        let mut out_w = vec![0.0; n];
        activation::forward(act, &mut out_w, &widen(&xr));
        let mut dx_w = widen(&dx0r);
        activation::backward(act, &mut dx_w, &widen(&xr), &widen(&doutr));
        let tol = if storage_bf16 { BF16_TOL } else { F32_TOL };
        schedules.each(|schedule, checks| {
            let shape = shapes::activations::activation(n);
            let (out, dx) = forward_backward(
                "activation",
                shape,
                storage_bf16,
                n,
                [&x, &dout, &dx0],
                &[&ni, &id],
                schedule,
            );
            checks.close("out", &out, &out_w, tol);
            checks.close("dx", &dx, &dx_w, tol);
        });
    });
}

/// Runs `{op}_forward_{storage}` with `(out, x, scalars…)` and `{op}_backward_{storage}` with
/// `(dx, x, dout, scalars…)`, every buffer in the storage type (bf16 or f32; `out` of
/// `out_len` NaNs, `dx` starting from `dx0`), and returns `out` and `dx` as f32.
#[allow(clippy::too_many_arguments)]
fn forward_backward(
    op: &str,
    shape: shapes::LaunchShape,
    storage_bf16: bool,
    out_len: usize,
    [x, dout, dx0]: [&[f32]; 3],
    scalars: &[&dyn KernelArg],
    schedule: Schedule,
) -> (Vec<f32>, Vec<f32>) {
    let launch =
        |out: &dyn KernelArg, dx: &dyn KernelArg, xb: &dyn KernelArg, doutb: &dyn KernelArg| {
            let storage = if storage_bf16 { "bf16" } else { "f32" };
            run(
                &format!("{op}_forward_{storage}"),
                shape,
                &[&[out, xb], scalars].concat(),
                schedule,
            );
            run(
                &format!("{op}_backward_{storage}"),
                shape,
                &[&[dx, xb, doutb], scalars].concat(),
                schedule,
            );
        };
    if storage_bf16 {
        let (out, dx) = (bf16_buf(&vec![f32::NAN; out_len]), bf16_buf(dx0));
        launch(&out, &dx, &bf16_buf(x), &bf16_buf(dout));
        (bf16_values(&out), bf16_values(&dx))
    } else {
        let (out, dx) = (nan_buf(out_len), HostBuffer::from_slice(dx0));
        launch(
            &out,
            &dx,
            &HostBuffer::from_slice(x),
            &HostBuffer::from_slice(dout),
        );
        (out.to_vec(), dx.to_vec())
    }
}

#[test]
fn swiglu_matches_the_twin() {
    #[derive(Debug)]
    struct SwigluCase {
        seed: u64,
        n: usize,
        h: usize,
        bf16: bool,
    }
    let cases = [(1usize, 1usize), (3, 255), (2, 257), (5, 131)]
        .iter()
        .enumerate()
        .flat_map(|(i, &(n, h))| {
            [false, true].map(move |bf16| SwigluCase {
                seed: 4000 + i as u64,
                n,
                h,
                bf16,
            })
        });
    sweep("swiglu_matches_the_twin", cases, |case, schedules| {
        let (n, h, storage_bf16) = (case.n, case.h, case.bf16);
        let mut r = rng(case.seed);
        let x = uniform(&mut r, n * 2 * h, 0.0, 4.0);
        let dout = uniform(&mut r, n * h, 0.0, 1.0);
        let dx0 = uniform(&mut r, n * 2 * h, 0.0, 1.0);
        let (ni, hi) = (n as i32, h as i32);
        let (xr, doutr, dx0r) = if storage_bf16 {
            (through_bf16(&x), through_bf16(&dout), through_bf16(&dx0))
        } else {
            (x.clone(), dout.clone(), dx0.clone())
        };
        let mut out_w = vec![0.0; n * h];
        swiglu::forward(&mut out_w, &widen(&xr), n, h);
        let mut dx_w = widen(&dx0r);
        swiglu::backward(&mut dx_w, &widen(&xr), &widen(&doutr), n, h);
        let tol = if storage_bf16 { BF16_TOL } else { F32_TOL };
        schedules.each(|schedule, checks| {
            let shape = shapes::activations::swiglu(n, h);
            let (out, dx) = forward_backward(
                "swiglu",
                shape,
                storage_bf16,
                n * h,
                [&x, &dout, &dx0],
                &[&ni, &hi],
                schedule,
            );
            checks.close("out", &out, &out_w, tol);
            checks.close("dx", &dx, &dx_w, tol);
        });
    });
}

// ---- AdamW -----------------------------------------------------------------------------------

#[test]
fn adamw_matches_the_twin() {
    #[derive(Debug)]
    struct AdamCase {
        seed: u64,
        n: usize,
        step: u64,
    }
    let cases = [1usize, 257, 1009].iter().enumerate().flat_map(|(i, &n)| {
        [1u64, 7].map(move |step| AdamCase {
            seed: 5000 + i as u64 * 10 + step,
            n,
            step,
        })
    });
    sweep("adamw_matches_the_twin", cases, |case, schedules| {
        let (n, step) = (case.n, case.step);
        let mut r = rng(case.seed);
        let hp = AdamW {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        let p0 = uniform(&mut r, n, 0.0, 1.0);
        let g = uniform(&mut r, n, 0.0, 1.0);
        let m0 = uniform(&mut r, n, 0.0, 0.1);
        let v0: Vec<f32> = uniform(&mut r, n, 0.02, 0.01);
        let (mut p_w, mut m_w, mut v_w) = (widen(&p0), widen(&m0), widen(&v0));
        adamw::step(&mut p_w, &widen(&g), &mut m_w, &mut v_w, &hp);
        let (bc1, bc2) = shapes::adamw::bias_corrections(&hp).unwrap();
        schedules.each(|schedule, checks| {
            for with_copy in [false, true] {
                let (p, gb, m, v) = (
                    HostBuffer::from_slice(&p0),
                    HostBuffer::from_slice(&g),
                    HostBuffer::from_slice(&m0),
                    HostBuffer::from_slice(&v0),
                );
                let ni = n as i64;
                let scalars = (hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, bc1, bc2);
                let (lr, b1, b2, eps, wd, c1, c2) = scalars;
                let copy = bf16_buf(&vec![f32::NAN; n]);
                if with_copy {
                    run(
                        "adamw_step_f32_bf16_copy",
                        shapes::adamw::step(n),
                        &[
                            &p, &copy, &gb, &m, &v, &ni, &lr, &b1, &b2, &eps, &wd, &c1, &c2,
                        ],
                        schedule,
                    );
                    let want: Vec<f64> = p
                        .to_vec()
                        .iter()
                        .map(|&x| bf16::from_f32(x).to_f64())
                        .collect();
                    checks.close("bf16 copy", &bf16_values(&copy), &want, 0.0);
                } else {
                    run(
                        "adamw_step_f32",
                        shapes::adamw::step(n),
                        &[&p, &gb, &m, &v, &ni, &lr, &b1, &b2, &eps, &wd, &c1, &c2],
                        schedule,
                    );
                }
                checks.close("param", &p.to_vec(), &p_w, F32_TOL);
                checks.close("m", &m.to_vec(), &m_w, F32_TOL);
                checks.close("v", &v.to_vec(), &v_w, F32_TOL);
            }
        });
    });
}

// ---- MEGABYTE gathers ------------------------------------------------------------------------

/// Ids for `n` rows: a quarter pads, the rest table rows.
fn ids_with_pads(r: &mut rand_chacha::ChaCha8Rng, n: usize, rows: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            if r.random_range(0..4) == 0 {
                PAD_ID
            } else {
                r.random_range(0..rows as u32)
            }
        })
        .collect()
}

/// Runs rows_scatter_add_csr_f32 of `src` (rows of `width`) into `dst` with `plan`.
fn scatter(
    dst: &HostBuffer<f32>,
    src: &HostBuffer<f32>,
    plan: &RowScatterPlan,
    width: usize,
    schedule: mega::emu::Schedule,
) {
    let offsets = HostBuffer::from_slice(&plan.offsets);
    // The kernel never reads `sources` when it is empty; keep one element so the buffer exists.
    let sources = HostBuffer::from_slice(if plan.sources.is_empty() {
        &[0u32][..]
    } else {
        &plan.sources
    });
    let (n_dst, w) = (plan.n_dst() as i32, width as i32);
    run(
        "rows_scatter_add_csr_f32",
        shapes::gathers::rows(plan.n_dst()),
        &[dst, src, &offsets, &sources, &n_dst, &w],
        schedule,
    );
}

#[test]
fn patch_embed_matches_the_twin() {
    let (p, tok_rows, pos_rows) = (4usize, 11usize, 17usize);
    #[derive(Debug)]
    struct Size {
        seed: u64,
        rows: usize,
        dg: usize,
    }
    let cases = [(1usize, 1usize), (3, 31), (2, 33), (5, 7)]
        .iter()
        .enumerate()
        .map(|(i, &(rows, dg))| Size {
            seed: 6000 + i as u64,
            rows,
            dg,
        });
    sweep("patch_embed_matches_the_twin", cases, |case, schedules| {
        let (rows, dg) = (case.rows, case.dg);
        let mut r = rng(case.seed);
        let n_ids = rows * p;
        let ids = ids_with_pads(&mut r, n_ids, tok_rows);
        let positions: Vec<u32> = (0..n_ids)
            .map(|_| r.random_range(0..pos_rows as u32))
            .collect();
        let (tok, pos, pad) = (
            uniform(&mut r, tok_rows * dg, 0.0, 1.0),
            uniform(&mut r, pos_rows * dg, 0.0, 1.0),
            uniform(&mut r, p * dg, 0.0, 1.0),
        );
        let dout = uniform(&mut r, n_ids * dg, 0.0, 1.0);
        let (dtok0, dpos0, dpad0) = (
            uniform(&mut r, tok_rows * dg, 0.0, 1.0),
            uniform(&mut r, pos_rows * dg, 0.0, 1.0),
            uniform(&mut r, p * dg, 0.0, 1.0),
        );
        let mut out_w = vec![0.0; n_ids * dg];
        megabyte_embed::patch_forward(
            &mut out_w,
            &widen(&tok),
            &widen(&pos),
            &widen(&pad),
            &ids,
            &positions,
            p,
            dg,
        );
        // The bf16 kernel reads bf16-rounded tables: so does its twin.
        let mut out_bf16_w = vec![0.0; n_ids * dg];
        megabyte_embed::patch_forward(
            &mut out_bf16_w,
            &widen(&through_bf16(&tok)),
            &widen(&through_bf16(&pos)),
            &widen(&through_bf16(&pad)),
            &ids,
            &positions,
            p,
            dg,
        );
        let (mut dtok_w, mut dpos_w, mut dpad_w) = (widen(&dtok0), widen(&dpos0), widen(&dpad0));
        megabyte_embed::patch_backward(
            &mut dtok_w,
            &mut dpos_w,
            &mut dpad_w,
            &widen(&dout),
            &ids,
            &positions,
            p,
            dg,
        );
        let plans = patch_embed_plans(&ids, &positions, p, tok_rows, pos_rows).unwrap();
        let args = (
            n_ids as i32,
            p as i32,
            dg as i32,
            tok_rows as i32,
            pos_rows as i32,
        );
        let (ni, pi, di, ti, qi) = args;
        let (idb, posb) = (
            HostBuffer::from_slice(&ids),
            HostBuffer::from_slice(&positions),
        );
        schedules.each(|schedule, checks| {
            let out = nan_buf(n_ids * dg);
            let (tb, pb, padb) = (
                HostBuffer::from_slice(&tok),
                HostBuffer::from_slice(&pos),
                HostBuffer::from_slice(&pad),
            );
            run(
                "patch_embed_forward_f32",
                shapes::gathers::rows(n_ids),
                &[&out, &tb, &pb, &padb, &idb, &posb, &ni, &pi, &di, &ti, &qi],
                schedule,
            );
            checks.close("out", &out.to_vec(), &out_w, F32_TOL);
            let outb = bf16_buf(&vec![f32::NAN; n_ids * dg]);
            run(
                "patch_embed_forward_bf16",
                shapes::gathers::rows(n_ids),
                &[
                    &outb,
                    &bf16_buf(&tok),
                    &bf16_buf(&pos),
                    &bf16_buf(&pad),
                    &idb,
                    &posb,
                    &ni,
                    &pi,
                    &di,
                    &ti,
                    &qi,
                ],
                schedule,
            );
            checks.close("out bf16", &bf16_values(&outb), &out_bf16_w, BF16_TOL);
            let (dtok, dpos, dpad) = (
                HostBuffer::from_slice(&dtok0),
                HostBuffer::from_slice(&dpos0),
                HostBuffer::from_slice(&dpad0),
            );
            let doutb = HostBuffer::from_slice(&dout);
            scatter(&dtok, &doutb, &plans.tok, dg, schedule);
            scatter(&dpos, &doutb, &plans.pos, dg, schedule);
            scatter(&dpad, &doutb, &plans.pad, dg, schedule);
            checks.close("dtok", &dtok.to_vec(), &dtok_w, F32_TOL);
            checks.close("dpos", &dpos.to_vec(), &dpos_w, F32_TOL);
            checks.close("dpad", &dpad.to_vec(), &dpad_w, F32_TOL);
        });
    });
}

#[test]
fn local_embed_matches_the_twin() {
    let (tok_rows, pos_rows) = (9usize, 8usize);
    #[derive(Debug)]
    struct Size {
        seed: u64,
        n: usize,
        d: usize,
    }
    let cases = [(1usize, 1usize), (7, 33), (13, 64), (4, 257)]
        .iter()
        .enumerate()
        .map(|(i, &(n, d))| Size {
            seed: 7000 + i as u64,
            n,
            d,
        });
    sweep("local_embed_matches_the_twin", cases, |case, schedules| {
        let (n, d) = (case.n, case.d);
        let mut r = rng(case.seed);
        let ids = ids_with_pads(&mut r, n, tok_rows);
        let slots: Vec<u32> = (0..n).map(|i| (i % pos_rows) as u32).collect();
        let (tok, pos, pad) = (
            uniform(&mut r, tok_rows * d, 0.0, 1.0),
            uniform(&mut r, pos_rows * d, 0.0, 1.0),
            uniform(&mut r, d, 0.0, 1.0),
        );
        let out0 = uniform(&mut r, n * d, 0.0, 1.0);
        let dout = uniform(&mut r, n * d, 0.0, 1.0);
        let (dtok0, dpos0, dpad0) = (
            uniform(&mut r, tok_rows * d, 0.0, 1.0),
            uniform(&mut r, pos_rows * d, 0.0, 1.0),
            uniform(&mut r, d, 0.0, 1.0),
        );
        let mut out_w = widen(&out0);
        megabyte_embed::local_forward(
            &mut out_w,
            &widen(&tok),
            &widen(&pos),
            &widen(&pad),
            &ids,
            &slots,
            d,
        );
        let mut out_bf16_w = widen(&through_bf16(&out0));
        megabyte_embed::local_forward(
            &mut out_bf16_w,
            &widen(&through_bf16(&tok)),
            &widen(&through_bf16(&pos)),
            &widen(&through_bf16(&pad)),
            &ids,
            &slots,
            d,
        );
        let (mut dtok_w, mut dpos_w, mut dpad_w) = (widen(&dtok0), widen(&dpos0), widen(&dpad0));
        megabyte_embed::local_backward(
            &mut dtok_w,
            &mut dpos_w,
            &mut dpad_w,
            &widen(&dout),
            &ids,
            &slots,
            d,
        );
        let plans = local_embed_plans(&ids, &slots, tok_rows, pos_rows).unwrap();
        let (ni, di, ti, qi) = (n as i32, d as i32, tok_rows as i32, pos_rows as i32);
        let (idb, slb) = (HostBuffer::from_slice(&ids), HostBuffer::from_slice(&slots));
        schedules.each(|schedule, checks| {
            let out = HostBuffer::from_slice(&out0);
            let (tb, pb, padb) = (
                HostBuffer::from_slice(&tok),
                HostBuffer::from_slice(&pos),
                HostBuffer::from_slice(&pad),
            );
            run(
                "local_embed_forward_f32",
                shapes::gathers::rows(n),
                &[&out, &tb, &pb, &padb, &idb, &slb, &ni, &di, &ti, &qi],
                schedule,
            );
            checks.close("out", &out.to_vec(), &out_w, F32_TOL);
            let outb = bf16_buf(&out0);
            run(
                "local_embed_forward_bf16",
                shapes::gathers::rows(n),
                &[
                    &outb,
                    &bf16_buf(&tok),
                    &bf16_buf(&pos),
                    &bf16_buf(&pad),
                    &idb,
                    &slb,
                    &ni,
                    &di,
                    &ti,
                    &qi,
                ],
                schedule,
            );
            checks.close("out bf16", &bf16_values(&outb), &out_bf16_w, BF16_TOL);
            let (dtok, dpos, dpad) = (
                HostBuffer::from_slice(&dtok0),
                HostBuffer::from_slice(&dpos0),
                HostBuffer::from_slice(&dpad0),
            );
            let doutb = HostBuffer::from_slice(&dout);
            scatter(&dtok, &doutb, &plans.tok, d, schedule);
            scatter(&dpos, &doutb, &plans.pos, d, schedule);
            scatter(&dpad, &doutb, &plans.pad, d, schedule);
            checks.close("dtok", &dtok.to_vec(), &dtok_w, F32_TOL);
            checks.close("dpos", &dpos.to_vec(), &dpos_w, F32_TOL);
            checks.close("dpad", &dpad.to_vec(), &dpad_w, F32_TOL);
        });
    });
}

/// An id past the table (a caller bug) writes a NaN row instead of reading out of bounds.
#[test]
fn gathers_turn_bad_ids_into_nan_rows() {
    let (d, tok_rows, pos_rows) = (5usize, 3usize, 2usize);
    let ids = [1u32, 7, PAD_ID];
    let slots = [0u32, 1, 5];
    let (tok, pos, pad) = (
        vec![1.0f32; tok_rows * d],
        vec![2.0f32; pos_rows * d],
        vec![3.0f32; d],
    );
    let (ni, di, ti, qi) = (3i32, d as i32, tok_rows as i32, pos_rows as i32);
    let out = HostBuffer::filled(3 * d, 0.0f32);
    run(
        "local_embed_forward_f32",
        shapes::gathers::rows(3),
        &[
            &out,
            &HostBuffer::from_slice(&tok),
            &HostBuffer::from_slice(&pos),
            &HostBuffer::from_slice(&pad),
            &HostBuffer::from_slice(&ids),
            &HostBuffer::from_slice(&slots),
            &ni,
            &di,
            &ti,
            &qi,
        ],
        SCHEDULES[0],
    );
    let out = out.to_vec();
    assert!(out[..d].iter().all(|&v| v == 3.0), "row 0: tok 1 + pos 0");
    assert!(
        out[d..].iter().all(|v| v.is_nan()),
        "rows 1-2: id 7 and slot 5 are out of range"
    );
}

// ---- RoPE ------------------------------------------------------------------------------------

#[test]
fn rope_matches_the_definition() {
    let base = 10_000.0f32;
    #[derive(Debug)]
    struct RopeCase {
        seed: u64,
        rows: usize,
        heads: usize,
        dz: usize,
    }
    let cases = [(1usize, 1usize, 2usize), (5, 2, 8), (3, 3, 34)]
        .iter()
        .enumerate()
        .map(|(i, &(rows, heads, dz))| RopeCase {
            seed: 8000 + i as u64,
            rows,
            heads,
            dz,
        });
    sweep("rope_matches_the_definition", cases, |case, schedules| {
        let (rows, heads, dz) = (case.rows, case.heads, case.dz);
        let mut r = rng(case.seed);
        let x = uniform(&mut r, rows * heads * dz, 0.0, 1.0);
        // Positions inside a chunk; small enough that the f32 angle pos·inv keeps 1e-5 (its
        // rounding grows with the position, as in the official fp32 RoPE).
        let positions: Vec<u32> = (0..rows).map(|_| r.random_range(0..32)).collect();
        let inv = mega::backend::cpu::megalodon_attention::rope_inv_freqs::<f64>(dz, base as f64);
        let rotate = |v: &[f32], sign: f64| -> Vec<f64> {
            let mut out = vec![0.0; v.len()];
            for (row, &pos) in positions.iter().enumerate() {
                for h in 0..heads {
                    for (i, &f) in inv.iter().enumerate() {
                        let a = pos as f64 * f;
                        let (s, c) = (sign * a.sin(), a.cos());
                        let at = (row * heads + h) * dz + 2 * i;
                        let (x0, x1) = (v[at] as f64, v[at + 1] as f64);
                        out[at] = x0 * c - x1 * s;
                        out[at + 1] = x0 * s + x1 * c;
                    }
                }
            }
            out
        };
        let (ri, hi, di) = (rows as i32, heads as i32, dz as i32);
        let pb = HostBuffer::from_slice(&positions);
        let shape = shapes::rope::rotate(rows, heads, dz).unwrap();
        schedules.each(|schedule, checks| {
            let y = nan_buf(x.len());
            let xb = HostBuffer::from_slice(&x);
            run(
                "rope_forward_f32",
                shape,
                &[&y, &xb, &pb, &ri, &hi, &di, &base],
                schedule,
            );
            checks.close("forward", &y.to_vec(), &rotate(&x, 1.0), F32_TOL);
            let dx = nan_buf(x.len());
            run(
                "rope_backward_f32",
                shape,
                &[&dx, &xb, &pb, &ri, &hi, &di, &base],
                schedule,
            );
            checks.close("backward", &dx.to_vec(), &rotate(&x, -1.0), F32_TOL);
            // In place: y aliases x.
            run(
                "rope_forward_f32",
                shape,
                &[&xb, &xb, &pb, &ri, &hi, &di, &base],
                schedule,
            );
            checks.close("in place", &xb.to_vec(), &rotate(&x, 1.0), F32_TOL);
        });
    });
}

// ---- the sweep itself ------------------------------------------------------------------------

/// `sweep` fails on a planted error and names the worst failing case and schedule, the count
/// of failing launches, and the element; within tolerance it passes. (Comparisons only, no
/// launches: what is under test is the report.)
#[test]
fn sweep_names_the_worst_failing_case_and_schedule() {
    #[derive(Debug)]
    struct Planted {
        error: f32,
    }
    let want = vec![1.0f64; 5];
    let planted = |errors: [f32; 3]| {
        let cases = errors.map(|error| Planted { error });
        std::panic::catch_unwind(|| {
            sweep("planted", cases, |case, schedules| {
                schedules.each(|schedule, checks| {
                    let mut got = vec![1.0f32; 5];
                    // The planted error grows along the schedules, so the worst is the last.
                    let k = SCHEDULES.iter().position(|&s| s == schedule).unwrap() as f32;
                    got[3] += case.error * (1.0 + k);
                    checks.close("out", &got, &want, F32_TOL);
                });
            })
        })
        .map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
    };
    assert!(planted([0.0, 1e-6, 3e-6]).is_ok(), "within 1e-5 everywhere");
    let message = planted([0.0, 4e-6, 1e-3]).unwrap_err();
    let expected = format!(
        "out: worst 3.0e-3 (tol 1e-5) at Planted {{ error: 0.001 }} under {:?}; \
         4 of 9 launches over tolerance; largest at [3]",
        SCHEDULES[2]
    );
    assert!(message.contains(&expected), "{message}");
}
