//! CPU op throughput: matmul in GFLOP/s (criterion's "elem/s" counts flops, `2·m·n·k` per
//! product) and LayerNorm in bytes moved, each on one thread and on the whole rayon pool.
//!
//! `cargo bench --bench ops` (all), `cargo bench --bench ops -- matmul/` (a group).
//! Shapes: square 512/1024/2048; the MEGABYTE training products `8192×512×2048` (local FFN
//! at B·T = 8192, D = 512) and `8192×256×1024`, plus its weight-gradient form `Xᵀ·dY`; and
//! one decode-step product (a single row), which must not pay for threading.

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// The pools to compare: one thread, and every thread rayon would use by default.
fn pools() -> Vec<(usize, rayon::ThreadPool)> {
    let all = rayon::current_num_threads();
    let mut sizes = vec![1];
    if all > 1 {
        sizes.push(all);
    }
    sizes
        .into_iter()
        .map(|t| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("pool");
            (t, pool)
        })
        .collect()
}

/// `(label, m, k, n, trans_a)`.
const MATMULS: [(&str, usize, usize, usize, bool); 8] = [
    ("decode_1x512x2048", 1, 512, 2048, false),
    ("square_512", 512, 512, 512, false),
    ("square_1024", 1024, 1024, 1024, false),
    ("square_2048", 2048, 2048, 2048, false),
    ("megabyte_8192x512x2048", 8192, 512, 2048, false),
    ("megabyte_8192x256x1024", 8192, 256, 1024, false),
    ("megabyte_dW_512x8192x2048_ta", 512, 8192, 2048, true),
    ("megabyte_dW_256x8192x1024_ta", 256, 8192, 1024, true),
];

fn bench_matmul(c: &mut Criterion) {
    let cpu = Cpu::<f32>::new();
    let mut group = c.benchmark_group("matmul");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for (label, m, k, n, ta) in MATMULS {
        let a = random(m * k, 1);
        let b = random(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (threads, pool) in pools() {
            group.bench_function(
                BenchmarkId::new(label, format!("threads={threads}")),
                |bench| {
                    pool.install(|| {
                        bench.iter(|| {
                            cpu.matmul(&mut out, &a, &b, m, k, n, ta, false, false);
                            black_box(&out);
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

fn bench_layernorm(c: &mut Criterion) {
    let cpu = Cpu::<f32>::new();
    let mut group = c.benchmark_group("layernorm");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (n, d) in [(8192usize, 512usize), (8192, 256)] {
        let x = random(n * d, 3);
        let w = random(d, 4);
        let b = random(d, 5);
        let dout = random(n * d, 6);
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * d], vec![0.0f32; n], vec![0.0f32; n]);
        let (mut dx, mut dw, mut db) = (vec![0.0f32; n * d], vec![0.0f32; d], vec![0.0f32; d]);
        let bytes = (n * d * 4) as u64;
        for (threads, pool) in pools() {
            // Forward reads x, writes out.
            group.throughput(Throughput::Bytes(2 * bytes));
            group.bench_function(
                BenchmarkId::new(format!("forward_{n}x{d}"), format!("threads={threads}")),
                |bench| {
                    pool.install(|| {
                        bench.iter(|| {
                            cpu.layernorm_forward(
                                &mut out,
                                &mut mean,
                                &mut rstd,
                                &x,
                                &w,
                                &b,
                                n,
                                d,
                                mega::backend::cpu::layernorm::EPS as f32,
                            );
                            black_box(&out);
                        })
                    })
                },
            );
            // Backward reads dout, x and dx and writes dx, in one pass (dw, db from partials).
            group.throughput(Throughput::Bytes(4 * bytes));
            group.bench_function(
                BenchmarkId::new(format!("backward_{n}x{d}"), format!("threads={threads}")),
                |bench| {
                    pool.install(|| {
                        bench.iter(|| {
                            cpu.layernorm_backward(
                                &mut dx, &mut dw, &mut db, &dout, &x, &w, &mean, &rstd, n, d,
                            );
                            black_box(&dx);
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_layernorm);
criterion_main!(benches);
