//! Criterion benchmarks of MEGALODON's chunk-local attention core on the CPU (f32):
//! training forward, forward+backward at b = 4, l = 2048, C = 256, dz = 128, dv = 256 with
//! one and two heads, and one decode step (one token per row against a half-full chunk) at
//! b = 8.
//!
//! Throughput is reported in elements/s where one element is one FLOP of the causal matmuls
//! (QKᵀ, PV and, for backward, dP, dQ, dK, dV; 2 FLOPs per multiply-add over the visible
//! lower triangle only). The elementwise work (norm, RoPE, softmax) is not counted.
//!
//! `cargo bench --bench megalodon_attention`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mega::backend::cpu::megalodon_attention::{self as ma, ChunkKvCache, MegaAttnShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::Duration;

fn shape(b: usize, l: usize, heads: usize) -> MegaAttnShape {
    MegaAttnShape {
        b,
        l,
        heads,
        dz: 128,
        dv: 256,
        chunk: 256,
        rope_base: 10_000.0,
        eps: 1e-5,
    }
}

fn random(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// FLOPs of the causal forward matmuls: per (row, head, chunk of n) `n(n+1)(dz+dv)`.
fn forward_flops(s: &MegaAttnShape) -> u64 {
    let mut per_row = 0u64;
    let mut t = 0;
    while t < s.l {
        let n = s.span().min(s.l - t) as u64;
        per_row += n * (n + 1) * (s.dz + s.dv) as u64;
        t += s.span();
    }
    per_row * (s.b * s.heads) as u64
}

fn training(c: &mut Criterion) {
    let mut g = c.benchmark_group("megalodon_attention_train");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for heads in [1usize, 2] {
        let s = shape(4, 2048, heads);
        let mut r = ChaCha8Rng::seed_from_u64(heads as u64);
        let z = random(&mut r, s.b * s.l * s.zdim(), -1.0, 1.0);
        let v = random(&mut r, s.b * s.l * s.vdim(), -1.0, 1.0);
        let gamma = random(&mut r, 2 * s.zdim(), -0.5, 0.5);
        let beta = random(&mut r, 2 * s.zdim(), -0.5, 0.5);
        let dout = random(&mut r, s.b * s.l * s.vdim(), -1.0, 1.0);
        let mut out = vec![0.0f32; s.b * s.l * s.vdim()];
        let mut saved = ma::saved_new::<f32>(&s);
        let mut dz = vec![0.0f32; z.len()];
        let mut dv = vec![0.0f32; v.len()];
        let mut dgamma = vec![0.0f32; gamma.len()];
        let mut dbeta = vec![0.0f32; beta.len()];
        let fwd = forward_flops(&s);
        println!(
            "heads={heads}: forward {:.3} GFLOP, forward+backward {:.3} GFLOP",
            fwd as f64 * 1e-9,
            3.0 * fwd as f64 * 1e-9
        );

        g.throughput(Throughput::Elements(fwd));
        g.bench_function(
            BenchmarkId::new("forward", format!("b4_l2048_C256_h{heads}")),
            |bch| {
                bch.iter(|| {
                    ma::forward(&mut out, &mut saved, &z, &v, &gamma, &beta, &s);
                    black_box(&out);
                })
            },
        );
        g.throughput(Throughput::Elements(3 * fwd));
        g.bench_function(
            BenchmarkId::new("forward_backward", format!("b4_l2048_C256_h{heads}")),
            |bch| {
                bch.iter(|| {
                    ma::forward(&mut out, &mut saved, &z, &v, &gamma, &beta, &s);
                    ma::backward(
                        &mut dz,
                        &mut dv,
                        &mut dgamma,
                        &mut dbeta,
                        &dout,
                        &z,
                        &v,
                        &gamma,
                        &beta,
                        &saved,
                        &s,
                    );
                    black_box(&dz);
                })
            },
        );
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("megalodon_attention_decode");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (heads, count) in [(2usize, 128usize), (2, 255)] {
        let s = shape(8, 1, heads);
        let mut r = ChaCha8Rng::seed_from_u64(7);
        let z = random(&mut r, s.b * s.zdim(), -1.0, 1.0);
        let v = random(&mut r, s.b * s.vdim(), -1.0, 1.0);
        let gamma = random(&mut r, 2 * s.zdim(), -0.5, 0.5);
        let beta = random(&mut r, 2 * s.zdim(), -0.5, 0.5);
        let mut cache = ChunkKvCache::<f32>::new(s.b, heads, s.dz, s.dv, s.chunk);
        cache.k = random(&mut r, cache.k.len(), -1.0, 1.0);
        cache.v = random(&mut r, cache.v.len(), -1.0, 1.0);
        let mut out = vec![0.0f32; s.b * s.vdim()];
        // One query against count + 1 keys: (count + 1)(dz + dv) multiply-adds per (row, head).
        let flops = 2 * ((count + 1) * (s.dz + s.dv) * s.b * heads) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_function(
            BenchmarkId::new("step", format!("b8_h{heads}_cached{count}")),
            |bch| {
                bch.iter(|| {
                    cache.count.fill(count);
                    ma::forward_cached(&mut out, &mut cache, &z, &v, &gamma, &beta, &s)
                        .expect("one token into a partial chunk");
                    black_box(&out);
                })
            },
        );
    }
    g.finish();
}

/// A dense f32 GEMM of about the same size as the training benchmarks, as the yardstick of
/// what this machine sustains: the attention figures read as a fraction of it.
fn gemm_yardstick(c: &mut Criterion) {
    let mut g = c.benchmark_group("megalodon_attention_yardstick");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (m, k, n) = (2048usize, 384usize, 1024usize);
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let a = random(&mut r, m * k, -1.0, 1.0);
    let b = random(&mut r, k * n, -1.0, 1.0);
    let mut out = vec![0.0f32; m * n];
    g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
    g.bench_function(
        BenchmarkId::new("gemm_f32", format!("{m}x{k}x{n}")),
        |bch| {
            bch.iter(|| {
                mega::backend::cpu::matmul::matmul(&mut out, &a, &b, m, k, n, false, false, false);
                black_box(&out);
            })
        },
    );
    g.finish();
}

criterion_group!(benches, gemm_yardstick, training, decode);
criterion_main!(benches);
