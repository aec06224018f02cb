//! `kernels/elementwise.cu` and `kernels/reduce.cu` on the CPU emulator against their Rust
//! twins (`backend::cpu::memory`, `elementwise`, `kv_cache`). Every launch runs under the
//! forward, greedy_low and greedy_high schedules into exact-size NaN-filled outputs; sizes are
//! 1, a block's 256 threads ± 1, primes and (for the sums) several reduction blocks.
//!
//! The elementwise kernels do the twin's one f32 operation per element, so they must match
//! bitwise. The sums are f64 in a fixed tree, so they must be bitwise identical under every
//! schedule, and within f64 rounding of the twin (another order).

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use mega::backend::cpu::{elementwise, kv_cache, memory};
use mega::backend::cuda::elementwise::last_writer_rows;
use mega::cuda::launch::{elementwise_ops, reduce};
use mega::emu::{HostBuffer, KernelArg, Schedule};

const SIZES: [usize; 8] = [1, 255, 256, 257, 37, 131, 1009, 5003];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn pointwise(kernel: &str, n: usize, args: &[&dyn KernelArg], schedule: Schedule) {
    let count = n as i64;
    let mut all = args.to_vec();
    all.push(&count);
    run(kernel, elementwise_ops::pointwise(n), &all, schedule);
}

#[test]
fn pointwise_kernels_match_the_twins_bitwise() {
    for (case, &n) in SIZES.iter().enumerate() {
        let mut r = rng(100 + case as u64);
        let (a, b) = (uniform(&mut r, n, 0.0, 2.0), uniform(&mut r, n, 1.0, 1.0));
        let s = -0.37f32;
        let mut add_w = a.clone();
        memory::add_assign(&mut add_w, &b);
        let mut scale_w = a.clone();
        memory::scale(&mut scale_w, s);
        let mut mul_w = vec![0.0; n];
        elementwise::mul(&mut mul_w, &a, &b);
        let mut adds_w = vec![0.0; n];
        elementwise::add_scalar(&mut adds_w, &a, s);
        for schedule in SCHEDULES {
            let what = format!("n={n} {schedule:?}");
            let (ab, bb) = (HostBuffer::from_slice(&a), HostBuffer::from_slice(&b));
            let dst = HostBuffer::from_slice(&a);
            pointwise("add_assign_f32", n, &[&dst, &bb], schedule);
            assert_eq!(bits(&dst.to_vec()), bits(&add_w), "add_assign {what}");
            let buf = HostBuffer::from_slice(&a);
            pointwise("scale_f32", n, &[&buf, &s], schedule);
            assert_eq!(bits(&buf.to_vec()), bits(&scale_w), "scale {what}");
            let out = nan_buf(n);
            pointwise("mul_f32", n, &[&out, &ab, &bb], schedule);
            assert_eq!(bits(&out.to_vec()), bits(&mul_w), "mul {what}");
            let out = nan_buf(n);
            pointwise("add_scalar_f32", n, &[&out, &ab, &s], schedule);
            assert_eq!(bits(&out.to_vec()), bits(&adds_w), "add_scalar {what}");
            let out = nan_buf(n);
            pointwise("fill_f32", n, &[&out, &1.5f32], schedule);
            assert_eq!(out.to_vec(), vec![1.5; n], "fill {what}");
        }
    }
}

fn rows_copy(
    dst: &HostBuffer<f32>,
    src: &HostBuffer<f32>,
    rows: &[u32],
    width: usize,
    stride: usize,
    col: usize,
    schedule: Schedule,
) {
    let (to, from) = last_writer_rows(rows);
    let (db, sb) = (HostBuffer::from_slice(&to), HostBuffer::from_slice(&from));
    let (n, w, total) = (to.len() as i32, width as i32, (dst.len() / width) as i32);
    let (st, c) = (stride as i64, col as i32);
    run(
        "rows_copy_f32",
        elementwise_ops::rows_copy(to.len()),
        &[dst, src, &db, &sb, &n, &w, &total, &st, &c],
        schedule,
    );
}

#[test]
fn row_scatter_and_kv_append_match_the_twins() {
    for (case, &d) in [1usize, 31, 32, 33, 257].iter().enumerate() {
        let mut r = rng(200 + case as u64);
        let dst_rows = 11usize;
        // Repeated destination rows: the last source wins, as in the twin's sequential loop.
        let rows: Vec<u32> = vec![3, 0, 10, 3, 7, 0, 3, 5, 9];
        let src = uniform(&mut r, rows.len() * d, 0.0, 1.0);
        let mut want = vec![f32::NAN; dst_rows * d];
        memory::scatter_rows(&mut want, &src, &rows, d);
        let c = d;
        let qkv = uniform(&mut r, rows.len() * 3 * c, 0.0, 1.0);
        let (mut kw, mut vw) = (vec![f32::NAN; dst_rows * c], vec![f32::NAN; dst_rows * c]);
        kv_cache::append(&mut kw, &mut vw, &qkv, &rows, c);
        for schedule in SCHEDULES {
            let what = format!("d={d} {schedule:?}");
            let dst = nan_buf(dst_rows * d);
            rows_copy(
                &dst,
                &HostBuffer::from_slice(&src),
                &rows,
                d,
                d,
                0,
                schedule,
            );
            assert_eq!(bits(&dst.to_vec()), bits(&want), "scatter_rows {what}");
            let (k, v, q) = (
                nan_buf(dst_rows * c),
                nan_buf(dst_rows * c),
                HostBuffer::from_slice(&qkv),
            );
            rows_copy(&k, &q, &rows, c, 3 * c, c, schedule);
            rows_copy(&v, &q, &rows, c, 3 * c, 2 * c, schedule);
            assert_eq!(bits(&k.to_vec()), bits(&kw), "kv_append k {what}");
            assert_eq!(bits(&v.to_vec()), bits(&vw), "kv_append v {what}");
        }
    }
}

fn device_sum(x: &HostBuffer<f32>, n: usize, square: bool, schedule: Schedule) -> f64 {
    let blocks = reduce::partial_blocks(n);
    let partials = HostBuffer::filled(blocks, f64::NAN);
    let out = HostBuffer::filled(1, f64::NAN);
    let (count, sq) = (n as i64, i32::from(square));
    run(
        "sum_partials_f32",
        reduce::partials(n),
        &[&partials, x, &count, &sq],
        schedule,
    );
    let k = blocks as i32;
    run(
        "sum_combine_f64",
        reduce::combine(),
        &[&out, &partials, &k],
        schedule,
    );
    out.to_vec()[0]
}

#[test]
fn sums_are_schedule_independent_and_match_the_twin() {
    let sizes =
        SIZES
            .iter()
            .copied()
            .chain([4095, 4096, 4097, 65_537, reduce::MAX_PARTIALS * 4096 + 4099]);
    let mut worst = 0.0f64;
    for (case, n) in sizes.enumerate() {
        let mut r = rng(300 + case as u64);
        let x = uniform(&mut r, n, 0.1, 1.0);
        let xb = HostBuffer::from_slice(&x);
        for square in [false, true] {
            let want = if square {
                memory::sum_squares(&x)
            } else {
                memory::sum(&x)
            };
            let scale: f64 = x
                .iter()
                .map(|&v| {
                    if square {
                        (v as f64).powi(2)
                    } else {
                        (v as f64).abs()
                    }
                })
                .sum();
            let mut first: Option<f64> = None;
            for schedule in SCHEDULES
                .into_iter()
                .chain([Schedule::Reverse, Schedule::Random(7)])
            {
                let got = device_sum(&xb, n, square, schedule);
                let err = (got - want).abs() / scale.max(1e-300);
                worst = worst.max(err);
                assert!(
                    err <= 1e-13,
                    "n={n} square={square} {schedule:?}: {got} vs {want}"
                );
                match first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(
                        f.to_bits(),
                        got.to_bits(),
                        "n={n} square={square}: {schedule:?} differs from forward"
                    ),
                }
            }
        }
    }
    eprintln!("worst relative error of the f64 sums vs the twin: {worst:.1e}");
}
