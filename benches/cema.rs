//! CPU CEMA throughput (MEGALODON §4), f32. Criterion's "elem/s" counts the floating-point
//! operations the chunked scan executes (multiply and add separately), so it reads as FLOP/s.
//! Per (token, channel, n): forward 12 (state update 8, projection 4); backward 37 (the
//! λ, μ, ν recurrences, c·λ and five weighted sums); every extra carry pass of a split call
//! (forward: pass 1; backward: pass 1 and the reverse local pass) 8 each on the fraction
//! (chunks − 1)/chunks of the tokens.
//!
//! Bytes moved (each activation read or written once, f32): forward `8·b·l·d` (x in, y out),
//! backward `12·b·l·d` (x, dy in, dx out); split calls read x (and dy) once more. The state,
//! coefficients and parameter gradients are O(b·d·n) and negligible next to that.
//!
//! `cargo bench --bench cema` (all) or e.g. `cargo bench --bench cema -- batch4`.
//! Regimes: training (b=4, l=2048, d=512, n=16: batch rows × channel blocks already give
//! 64 tasks, one chunk), one long sequence (b=1, l=65536, d=512, n=16: time split into 4
//! chunks of 16384), and decoding steps (b=8, d=512, n=16), with the coefficients computed
//! on every call (`step`) and cached (`step_with`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mega::backend::cpu::cema::{self, auto_chunk_len, CemaGrads, CemaParams, Coefficients};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

struct Params {
    alpha: Vec<f32>,
    delta: Vec<f32>,
    theta: Vec<f32>,
    gamma: Vec<f32>,
    omega: Vec<f32>,
}

impl Params {
    fn new(d: usize, n: usize) -> Self {
        Self {
            alpha: random(d * n, 1, -1.0, 1.0),
            delta: random(d * n, 2, -3.0, 1.0),
            theta: random(d, 3, -3.0, 3.0),
            gamma: random(d * n * 2, 4, -1.0, 1.0),
            omega: random(d, 5, -1.0, 1.0),
        }
    }

    fn view(&self) -> CemaParams<'_, f32> {
        CemaParams {
            alpha: &self.alpha,
            delta: &self.delta,
            theta: &self.theta,
            gamma: &self.gamma,
            omega: &self.omega,
        }
    }
}

/// Executed FLOPs of forward and backward (see the module docs).
fn flops(b: usize, l: usize, d: usize, n: usize) -> (u64, u64) {
    let chunks = l.div_ceil(auto_chunk_len(b, l, d)) as f64;
    let elems = (b * l * d * n) as f64;
    let extra = (chunks - 1.0) / chunks;
    let fwd = elems * (12.0 + 8.0 * extra);
    let bwd = elems * (37.0 + 16.0 * extra);
    (fwd as u64, bwd as u64)
}

fn training(crit: &mut Criterion, name: &str, b: usize, l: usize, d: usize, n: usize) {
    let p = Params::new(d, n);
    let x = random(b * l * d, 6, -1.0, 1.0);
    let dy = random(b * l * d, 7, -1.0, 1.0);
    let h0 = random(b * d * n * 2, 8, -1.0, 1.0);
    let mut y = vec![0.0f32; b * l * d];
    let mut h = vec![0.0f32; b * d * n * 2];
    let mut dx = vec![0.0f32; b * l * d];
    let mut dh0 = vec![0.0f32; b * d * n * 2];
    let (mut ga, mut gd, mut gt, mut gg, mut go) = (
        vec![0.0f32; d * n],
        vec![0.0f32; d * n],
        vec![0.0f32; d],
        vec![0.0f32; d * n * 2],
        vec![0.0f32; d],
    );
    let (fwd, bwd) = flops(b, l, d, n);
    let mut group = crit.benchmark_group(format!("cema/{name}"));
    group.throughput(Throughput::Elements(fwd));
    group.bench_function("forward", |bench| {
        bench.iter(|| {
            cema::forward(
                &mut y,
                Some(&mut h),
                black_box(&x),
                &p.view(),
                Some(&h0),
                b,
                l,
                d,
                n,
            )
        })
    });
    group.throughput(Throughput::Elements(bwd));
    group.bench_function("backward", |bench| {
        bench.iter(|| {
            let mut g = CemaGrads {
                alpha: &mut ga,
                delta: &mut gd,
                theta: &mut gt,
                gamma: &mut gg,
                omega: &mut go,
            };
            cema::backward(
                &mut dx,
                &mut g,
                Some(&mut dh0),
                black_box(&dy),
                Some(&h0),
                &x,
                &p.view(),
                Some(&h0),
                b,
                l,
                d,
                n,
            )
        })
    });
    group.finish();
}

fn batch4(crit: &mut Criterion) {
    training(crit, "batch4_l2048_d512_n16", 4, 2048, 512, 16);
}

fn long(crit: &mut Criterion) {
    training(crit, "long_b1_l65536_d512_n16", 1, 65536, 512, 16);
}

fn decode(crit: &mut Criterion) {
    let (b, d, n) = (8usize, 512usize, 16usize);
    let p = Params::new(d, n);
    let x = random(b * d, 9, -1.0, 1.0);
    let mut h = random(b * d * n * 2, 10, -1.0, 1.0);
    let mut y = vec![0.0f32; b * d];
    let coef = Coefficients::new(&p.view(), d, n);
    let mut group = crit.benchmark_group("cema/step_b8_d512_n16");
    group.throughput(Throughput::Elements((12 * b * d * n) as u64));
    group.bench_function("step", |bench| {
        bench.iter(|| cema::step(&mut y, &mut h, black_box(&x), &p.view(), b, d, n))
    });
    group.bench_function("step_with", |bench| {
        bench.iter(|| cema::step_with(&mut y, &mut h, black_box(&x), &coef, b))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = batch4, long, decode
}
criterion_main!(benches);
