//! CPU attention and loss throughput. Criterion's "elem/s" counts floating-point operations
//! (multiply and add separately) of the causal products actually needed, so it reads as
//! FLOP/s: forward `2·b·c·t·(t+1)`, backward twice that, decode `4·Σ_r c·lens[r]`.
//!
//! `cargo bench --bench attention` (all) or e.g. `cargo bench --bench attention -- global`.
//! Regimes: the MEGABYTE global model (b=4, t=256, c=512, h=8), the local model (b=1024
//! rows of t=8, c=256, h=4), decode against a full 1024-entry cache (c=512, h=8, b=1/16/64),
//! and the byte-vocabulary loss over 8192 rows.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mega::backend::cpu::{attention, loss};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn training(crit: &mut Criterion, name: &str, b: usize, t: usize, c: usize, h: usize) {
    let scale = 1.0 / ((c / h) as f32).sqrt();
    let qkv = random(b * t * 3 * c, 1);
    let dout = random(b * t * c, 2);
    let mut out = vec![0.0f32; b * t * c];
    let mut att = vec![0.0f32; b * h * t * t];
    let mut dqkv = vec![0.0f32; b * t * 3 * c];
    let flops = 2 * b * c * t * (t + 1);
    let mut group = crit.benchmark_group(format!("attention/{name}"));
    group.throughput(Throughput::Elements(flops as u64));
    group.bench_function("forward", |bench| {
        bench.iter(|| attention::forward(&mut out, &mut att, black_box(&qkv), b, t, c, h, scale))
    });
    group.throughput(Throughput::Elements(2 * flops as u64));
    group.bench_function("backward", |bench| {
        bench.iter(|| {
            attention::backward(&mut dqkv, black_box(&dout), &qkv, &att, b, t, c, h, scale)
        })
    });
    group.finish();
}

fn global(crit: &mut Criterion) {
    training(crit, "global_b4_t256_c512_h8", 4, 256, 512, 8);
}

fn local(crit: &mut Criterion) {
    training(crit, "local_b1024_t8_c256_h4", 1024, 8, 256, 4);
}

fn decode(crit: &mut Criterion) {
    let (t_max, c, h) = (1024, 512, 8);
    let scale = 1.0 / ((c / h) as f32).sqrt();
    let mut group = crit.benchmark_group("attention/decode_tmax1024_c512_h8");
    for b in [1usize, 16, 64] {
        let qkv = random(b * 3 * c, 3);
        let k_cache = random(b * t_max * c, 4);
        let v_cache = random(b * t_max * c, 5);
        let lens = vec![t_max as u32; b];
        // Paged in blocks of 16 positions, the rows' blocks interleaved in the pool (block i of
        // row r is pool block i·b + r), as a serving pool's free list scatters them.
        let bs = 16;
        let mb = t_max / bs;
        let table: Vec<u32> = (0..b)
            .flat_map(|r| (0..mb).map(move |i| (i * b + r) as u32))
            .collect();
        let pages = attention::KvPages {
            k: &k_cache,
            v: &v_cache,
            block_table: &table,
            block_size: bs,
            c,
        };
        let mut out = vec![0.0f32; b * c];
        group.throughput(Throughput::Elements((4 * b * c * t_max) as u64));
        group.bench_function(format!("b{b}"), |bench| {
            bench.iter(|| attention::decode(&mut out, black_box(&qkv), &pages, &lens, h, scale))
        });
    }
    group.finish();
}

fn cross_entropy(crit: &mut Criterion) {
    let (n, v) = (8192, 256);
    let logits = random(n * v, 6);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
    let mut losses = vec![0.0f32; n];
    let mut dlogits = vec![0.0f32; n * v];
    let mut group = crit.benchmark_group("loss/n8192_v256");
    group.throughput(Throughput::Elements((n * v) as u64));
    group.bench_function("cross_entropy_forward", |bench| {
        bench.iter(|| loss::cross_entropy_forward(&mut losses, black_box(&logits), &targets, v))
    });
    group.bench_function("cross_entropy_backward", |bench| {
        bench.iter(|| {
            loss::cross_entropy_backward(
                &mut dlogits,
                black_box(&logits),
                &targets,
                v,
                1.0 / n as f32,
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = global, local, decode, cross_entropy
}
criterion_main!(benches);
