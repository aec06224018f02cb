//! The memory-side kernels (`kernels/elementwise.cu`, `kernels/reduce.cu`) on the CPU
//! emulator against plain Rust twins. Every launch runs under the forward, greedy_low and
//! greedy_high schedules (tests/support/emu_check.rs) with launch shapes from
//! `mega::cuda::launch::{elementwise_ops, reduce}`.
//!
//! - The pointwise kernels and `rows_copy_f32` do one f32 operation (or none) per element,
//!   as the CPU backend does, so they must match their f32 twins bit for bit.
//! - The sums (`sum_partials_f32`, then `sum_combine_f64`) must give the same f64 bits under
//!   every schedule (their determinism contract), and lie within the f64 rounding bound of
//!   any summation order, `n · 2⁻⁵³ · Σ|xᵢ|`, of a compensated (Neumaier) f64 reference.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use mega::cuda::launch::{
    elementwise_ops, gathers, reduce, ELEMENTWISE_THREADS, MAX_STRIDE_BLOCKS,
};
use mega::emu::{HostBuffer, Schedule};
use rand::seq::SliceRandom;

/// One pointwise case: the seed of its inputs and the element count.
#[derive(Debug)]
struct Size {
    seed: u64,
    n: usize,
}

/// 1, a block's threads ± 1, primes, and one size past the grid-stride cap (every thread
/// takes a second pass).
fn pointwise_sizes() -> Vec<Size> {
    let tile = ELEMENTWISE_THREADS as usize;
    let capped = MAX_STRIDE_BLOCKS * tile;
    [1, tile - 1, tile, tile + 1, 37, 131, 4099, capped + 3]
        .into_iter()
        .map(|n| Size { seed: n as u64, n })
        .collect()
}

/// Bit patterns, so `exact` compares floats bitwise (and a NaN never equals itself by
/// accident).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn pointwise_kernels_match_their_twins_bitwise() {
    sweep(
        "pointwise_kernels_match_their_twins_bitwise",
        pointwise_sizes(),
        |c, schedules| {
            let mut r = rng(c.seed);
            let a = uniform(&mut r, c.n, 0.25, 2.0);
            let b = uniform(&mut r, c.n, -0.5, 3.0);
            let (s, value) = (
                uniform(&mut r, 1, 0.0, 4.0)[0],
                uniform(&mut r, 1, 1.0, 1.0)[0],
            );
            let want_add: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            let want_scale: Vec<f32> = a.iter().map(|x| x * s).collect();
            let want_mul: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
            let want_add_scalar: Vec<f32> = a.iter().map(|x| x + s).collect();
            let want_fill = vec![value; c.n];
            let shape = elementwise_ops::pointwise(c.n);
            let n = c.n as i64;
            schedules.each(|schedule, checks| {
                let (ab, bb) = (HostBuffer::from_slice(&a), HostBuffer::from_slice(&b));
                let dst = HostBuffer::from_slice(&a);
                run("add_assign_f32", shape, &[&dst, &bb, &n], schedule);
                checks.exact("add_assign", &bits(&dst.to_vec()), &bits(&want_add));

                let buf = HostBuffer::from_slice(&a);
                run("scale_f32", shape, &[&buf, &s, &n], schedule);
                checks.exact("scale", &bits(&buf.to_vec()), &bits(&want_scale));

                let out = nan_buf(c.n);
                run("mul_f32", shape, &[&out, &ab, &bb, &n], schedule);
                checks.exact("mul", &bits(&out.to_vec()), &bits(&want_mul));

                let out = nan_buf(c.n);
                run("add_scalar_f32", shape, &[&out, &ab, &s, &n], schedule);
                checks.exact("add_scalar", &bits(&out.to_vec()), &bits(&want_add_scalar));

                let out = nan_buf(c.n);
                run("fill_f32", shape, &[&out, &value, &n], schedule);
                checks.exact("fill", &bits(&out.to_vec()), &bits(&want_fill));
            });
        },
    );
}

/// One `rows_copy_f32` case: `rows` copied rows of `width` into `dst_rows` destination rows,
/// source rows of `src_stride` elements read from column `src_col`.
#[derive(Debug)]
struct RowsCase {
    seed: u64,
    rows: usize,
    width: usize,
    dst_rows: usize,
    src_stride: usize,
    src_col: usize,
}

/// The scatter_rows form (stride = width, column 0) and the kv_append forms (stride 3c,
/// columns c and 2c), over row counts around a block's 8 rows and widths around a warp.
fn rows_cases() -> Vec<RowsCase> {
    let per_block = gathers::ROWS_PER_BLOCK as usize;
    let mut cases = Vec::new();
    let mut seed = 500;
    for rows in [1, per_block - 1, per_block, per_block + 1, 37] {
        for width in [1, 31, 32, 33, 131] {
            for (src_stride, src_col) in [(width, 0), (3 * width, width), (3 * width, 2 * width)] {
                seed += 1;
                cases.push(RowsCase {
                    seed,
                    rows,
                    width,
                    dst_rows: rows + 3,
                    src_stride,
                    src_col,
                });
            }
        }
    }
    // Past the grid-stride cap: every warp takes a second row.
    let many = MAX_STRIDE_BLOCKS * per_block + 5;
    cases.push(RowsCase {
        seed: 999,
        rows: many,
        width: 1,
        dst_rows: many + 2,
        src_stride: 3,
        src_col: 2,
    });
    cases
}

#[test]
fn rows_copy_matches_its_twin_bitwise() {
    sweep(
        "rows_copy_matches_its_twin_bitwise",
        rows_cases(),
        |c, schedules| {
            let mut r = rng(c.seed);
            let dst0 = uniform(&mut r, c.dst_rows * c.width, 0.0, 1.0);
            let src_rows_total = c.rows + 2;
            let src = uniform(&mut r, src_rows_total * c.src_stride, 0.0, 1.0);
            // Distinct destination rows (the host guarantees it: last_writer_rows), in random
            // order, plus one past the end that the kernel must skip.
            let mut dst_rows: Vec<u32> = (0..c.dst_rows as u32).collect();
            dst_rows.shuffle(&mut r);
            dst_rows.truncate(c.rows);
            let mut src_rows: Vec<u32> = (0..src_rows_total as u32).collect();
            src_rows.shuffle(&mut r);
            src_rows.truncate(c.rows);
            dst_rows.push(c.dst_rows as u32 + 7);
            src_rows.push(0);
            let mut want = dst0.clone();
            for (&d, &s) in dst_rows.iter().zip(&src_rows) {
                let (d, s) = (d as usize, s as usize);
                if d >= c.dst_rows {
                    continue;
                }
                let from = s * c.src_stride + c.src_col;
                want[d * c.width..(d + 1) * c.width].copy_from_slice(&src[from..from + c.width]);
            }
            let k = dst_rows.len();
            let (ki, wi, total) = (k as i32, c.width as i32, c.dst_rows as i32);
            let (stride, col) = (c.src_stride as i64, c.src_col as i32);
            schedules.each(|schedule, checks| {
                let dst = HostBuffer::from_slice(&dst0);
                let (sb, db, srb) = (
                    HostBuffer::from_slice(&src),
                    HostBuffer::from_slice(&dst_rows),
                    HostBuffer::from_slice(&src_rows),
                );
                run(
                    "rows_copy_f32",
                    elementwise_ops::rows_copy(k),
                    &[&dst, &sb, &db, &srb, &ki, &wi, &total, &stride, &col],
                    schedule,
                );
                checks.exact("rows_copy", &bits(&dst.to_vec()), &bits(&want));
            });
        },
    );
}

/// One sum case: the seed, the element count, and Σx or Σx².
#[derive(Debug)]
struct SumCase {
    seed: u64,
    n: usize,
    square: bool,
}

/// Sizes around one partials block, several blocks, and past `MAX_PARTIALS` blocks (where
/// each block's chunk grows beyond the minimum).
fn sum_cases() -> Vec<SumCase> {
    let block = reduce::MIN_ELEMS_PER_BLOCK;
    let threads = reduce::THREADS as usize;
    let sizes = [
        1,
        threads - 1,
        threads + 1,
        block - 1,
        block,
        block + 1,
        3 * block + 17,
        40_009,
        reduce::MAX_PARTIALS * block + 4_099,
    ];
    sizes
        .into_iter()
        .flat_map(|n| {
            [false, true].map(|square| SumCase {
                seed: n as u64,
                n,
                square,
            })
        })
        .collect()
}

/// Σ values in f64 with Neumaier's compensation: within a few ulps of the exact sum, an
/// independent reference for the kernels' plain f64 tree.
fn compensated_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut carry) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        carry += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    sum + carry
}

/// The two launches of a device sum, as the backend makes them: the partials pass alone when
/// one block covers `x`, else the partials into a scratch of `partial_blocks(n)` f64s and
/// the combine pass. Outputs start NaN.
fn device_sum(x: &HostBuffer<f32>, n: usize, square: bool, schedule: Schedule) -> f64 {
    let blocks = reduce::partial_blocks(n);
    let (count, sq) = (n as i64, i32::from(square));
    let out = HostBuffer::<f64>::filled(1, f64::NAN);
    if blocks == 1 {
        run(
            "sum_partials_f32",
            reduce::partials(n),
            &[&out, x, &count, &sq],
            schedule,
        );
    } else {
        let partials = HostBuffer::<f64>::filled(blocks, f64::NAN);
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
    }
    out.to_vec()[0]
}

#[test]
fn sums_are_deterministic_and_within_the_f64_bound() {
    let mut worst = (0.0f64, String::new());
    sweep(
        "sums_are_deterministic_and_within_the_f64_bound",
        sum_cases(),
        |c, schedules| {
            let x = uniform(&mut rng(c.seed), c.n, 0.1, 1.0);
            let term = |v: f32| {
                let v = v as f64;
                if c.square {
                    v * v
                } else {
                    v
                }
            };
            let want = compensated_sum(x.iter().map(|&v| term(v)));
            let magnitude: f64 = x.iter().map(|&v| term(v).abs()).sum();
            // Any order of n − 1 f64 additions: |error| ≤ (n − 1)·u·Σ|terms| (u = 2⁻⁵³); the
            // squares are exact in f64 (24-bit × 24-bit mantissas).
            let bound = c.n as f64 * f64::EPSILON / 2.0 * magnitude;
            let xb = HostBuffer::from_slice(&x);
            let mut first: Option<f64> = None;
            schedules.each(|schedule, checks| {
                let got = device_sum(&xb, c.n, c.square, schedule);
                let reference = *first.get_or_insert(got);
                checks.exact(
                    "sum bits across schedules",
                    &[got.to_bits()],
                    &[reference.to_bits()],
                );
                let err = (got - want).abs();
                let ok = got.is_finite() && err <= bound;
                // Reported relative to Σ|terms| (the scale of the bound).
                let relative = if ok {
                    err / magnitude.max(f64::MIN_POSITIVE)
                } else {
                    f64::INFINITY
                };
                checks.exact("sum within n·u·Σ|x| of the reference", &[ok], &[true]);
                if relative > worst.0 || worst.1.is_empty() {
                    worst = (relative, format!("{c:?} under {schedule:?}"));
                }
            });
        },
    );
    eprintln!(
        "sums: worst |device − reference| / Σ|terms| = {:.1e} at {}",
        worst.0, worst.1
    );
}
