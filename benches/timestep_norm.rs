//! TimestepNorm on the CPU: forward and backward at a MEGALODON-like layer shape
//! (b = 4, l = 2048, d = 512, G = 64), fast path and plain reference, and one decode step
//! at b = 8. Throughput counts the activation bytes that must move at least once
//! (forward: x in, y out; backward: x and dy in, dx out; step: x in, y out).
//!
//! `cargo bench --bench timestep_norm`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mega::backend::cpu::timestep_norm::{self, reference, TsnState, TsnStateMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 4;
const L: usize = 2048;
const D: usize = 512;
const G: usize = 64;
const STEP_B: usize = 8;
const EPS: f32 = timestep_norm::EPS as f32;

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Carried state `(count, mean, var)` of `b` rows that have seen 100 timesteps.
fn carried(rng: &mut ChaCha8Rng, b: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        vec![100.0; b],
        uniform(rng, b * G, -0.5, 0.5),
        uniform(rng, b * G, 0.5, 1.5),
    )
}

fn bench_sequence(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = B * L * D;
    let x = uniform(&mut rng, n, -2.0, 2.0);
    let dy = uniform(&mut rng, n, -1.0, 1.0);
    let w = uniform(&mut rng, D, -0.1, 0.1);
    let bias = uniform(&mut rng, D, -0.1, 0.1);
    let (count, mean0, var0) = carried(&mut rng, B);
    let state_in = || TsnState {
        count: &count,
        mean: &mean0,
        var: &var0,
    };
    let (dm_out, dv_out) = (
        uniform(&mut rng, B * G, -1.0, 1.0),
        uniform(&mut rng, B * G, -1.0, 1.0),
    );

    let mut y = vec![0.0f32; n];
    let mut saved_mean = vec![0.0f32; B * L * G];
    let mut saved_rstd = vec![0.0f32; B * L * G];
    let (mut c_out, mut m_out, mut v_out) =
        (vec![0.0f32; B], vec![0.0f32; B * G], vec![0.0f32; B * G]);
    let mut dx = vec![0.0f32; n];
    let (mut dw, mut db) = (vec![0.0f32; D], vec![0.0f32; D]);
    let (mut dm_in, mut dv_in) = (vec![0.0f32; B * G], vec![0.0f32; B * G]);

    let mut group = c.benchmark_group(format!("timestep_norm b={B} l={L} d={D} G={G}"));
    group.sample_size(20);
    group.throughput(Throughput::Bytes((2 * n * 4) as u64));
    for (name, fast) in [("forward", true), ("forward reference", false)] {
        let fwd = if fast {
            timestep_norm::forward::<f32>
        } else {
            reference::forward::<f32>
        };
        group.bench_function(name, |bch| {
            bch.iter(|| {
                fwd(
                    &mut y,
                    &mut saved_mean,
                    &mut saved_rstd,
                    Some(TsnStateMut {
                        count: &mut c_out,
                        mean: &mut m_out,
                        var: &mut v_out,
                    }),
                    black_box(&x),
                    &w,
                    &bias,
                    Some(state_in()),
                    B,
                    L,
                    D,
                    G,
                    EPS,
                );
                black_box(y[0]);
            })
        });
    }
    group.throughput(Throughput::Bytes((3 * n * 4) as u64));
    for (name, fast) in [("backward", true), ("backward reference", false)] {
        let bwd = if fast {
            timestep_norm::backward::<f32>
        } else {
            reference::backward::<f32>
        };
        group.bench_function(name, |bch| {
            bch.iter(|| {
                bwd(
                    &mut dx,
                    &mut dw,
                    &mut db,
                    Some((&mut dm_in, &mut dv_in)),
                    black_box(&dy),
                    Some((&dm_out, &dv_out)),
                    &x,
                    &w,
                    &saved_mean,
                    &saved_rstd,
                    Some(state_in()),
                    B,
                    L,
                    D,
                    G,
                );
                black_box(dx[0]);
            })
        });
    }
    group.finish();
}

fn bench_step(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = uniform(&mut rng, STEP_B * D, -2.0, 2.0);
    let w = uniform(&mut rng, D, -0.1, 0.1);
    let bias = uniform(&mut rng, D, -0.1, 0.1);
    let (mut count, mut mean, mut var) = carried(&mut rng, STEP_B);
    let mut y = vec![0.0f32; STEP_B * D];
    let mut group = c.benchmark_group(format!("timestep_norm step b={STEP_B} d={D} G={G}"));
    group.throughput(Throughput::Bytes((2 * STEP_B * D * 4) as u64));
    group.bench_function("step", |bch| {
        bch.iter(|| {
            timestep_norm::step(
                &mut y,
                TsnStateMut {
                    count: &mut count,
                    mean: &mut mean,
                    var: &mut var,
                },
                black_box(&x),
                &w,
                &bias,
                STEP_B,
                D,
                G,
                EPS,
            );
            black_box(y[0]);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_sequence, bench_step);
criterion_main!(benches);
