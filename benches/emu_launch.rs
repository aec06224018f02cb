//! Cost of a launch in the CPU emulation harness (kernels/emu/README.md): the fixed overhead of
//! a tiny launch, the per-thread cost of fiber switching at barriers, and the test-sized
//! launches of the shipped kernels, per schedule.
//!
//! `cargo bench --bench emu_launch`. Figures go to docs/perf.md ("CUDA emulation harness").

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use mega::emu::{launch, set_schedule, HostBuffer, LaunchConfig, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn bench_block_sum(c: &mut Criterion) {
    let mut group = c.benchmark_group("emu_block_sum");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    // One block of 32 threads is the fixed cost; 1024 threads and 64 blocks of 256 show how it
    // scales with fibers (each thread passes 5 shuffles and one barrier).
    for (label, blocks, threads) in [
        ("1x32", 1u32, 32u32),
        ("1x1024", 1, 1024),
        ("64x256", 64, 256),
    ] {
        let n = (blocks * threads) as usize;
        let x = HostBuffer::from_slice(&random(n, 1));
        let out = HostBuffer::filled(n, 0.0f32);
        let n_i = n as i32;
        for (name, schedule) in [
            ("forward", Schedule::Forward),
            ("greedy_low", Schedule::GreedyLow),
        ] {
            set_schedule(schedule);
            group.bench_function(BenchmarkId::new(label, name), |bench| {
                bench.iter(|| {
                    launch(
                        "selftest_block_sum",
                        LaunchConfig::new(blocks, threads, 4 * threads / 32),
                        &[&out, &x, &n_i],
                    )
                    .unwrap();
                    black_box(&out);
                })
            });
        }
    }
    set_schedule(Schedule::Forward);
    group.finish();
}

fn bench_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("emu_kernels");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));

    // Cross-entropy forward, 64 rows of the byte vocabulary: 64 blocks of 256 threads.
    let (rows, vocab) = (64usize, 256usize);
    let logits = HostBuffer::from_slice(&random(rows * vocab, 2));
    let targets = HostBuffer::from_slice(&(0..rows as u32).collect::<Vec<_>>());
    let losses = HostBuffer::filled(rows, 0.0f32);
    let (rows_i, vocab_i) = (rows as i32, vocab as i32);
    group.bench_function("cross_entropy_forward_64x256", |bench| {
        bench.iter(|| {
            launch(
                "cross_entropy_forward_f32",
                LaunchConfig::new(rows as u32, 256, 0),
                &[&losses, &logits, &targets, &rows_i, &vocab_i],
            )
            .unwrap();
        })
    });

    // Embedding backward, 4096 tokens of width 64: grid (2, 4) of 256 threads, 32 KiB smem.
    let (n, d) = (4096usize, 64usize);
    let dout = HostBuffer::from_slice(&random(n * d, 3));
    let ids = HostBuffer::from_slice(&(0..n as u32).map(|i| (i * 37) % 256).collect::<Vec<_>>());
    let dtable = HostBuffer::filled(256 * d, 0.0f32);
    let (n_i, d_i, v_i) = (n as i32, d as i32, 256i32);
    group.bench_function("embedding_backward_atomic_4096x64", |bench| {
        bench.iter(|| {
            launch(
                "embedding_backward_atomic_f32",
                LaunchConfig::new((2, 4), 256, 256 * 32 * 4),
                &[&dtable, &dout, &ids, &n_i, &d_i, &v_i],
            )
            .unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench_block_sum, bench_kernels);
criterion_main!(benches);
