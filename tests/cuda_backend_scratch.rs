//! Once warm, the CUDA backend's hot paths allocate no device memory: the f64 buffers of the
//! sums, the u32 index arrays of the gathers and scatters, and the bf16 casts of the attention
//! GEMMs come from cached scratch (src/backend/cuda/scratch.rs), activations from the pool.
//! Counted by the emulated device (`EmulatedDevice::allocations`: every `alloc_zeros` and
//! `upload`), which a GPU would pay a cuMemAlloc for.

use mega::backend::cuda::CudaBackend;
use mega::backend::cuda::Precision;
use mega::backend::Backend;
use mega::config::MegabyteConfig;
use mega::emu::EmulatedDevice;
use mega::model::megabyte::Megabyte;
use mega::model::ModelShape;
use mega::train::trainer::{optimizer_step, TrainState};
use rand::{Rng, SeedableRng};

// Only the step's hyper-parameters are used here.
#[allow(dead_code)]
#[path = "support/train_step.rs"]
mod train_step;
use train_step::{hparams, LR};

#[test]
fn sums_and_index_ops_reuse_their_scratch() {
    let be = CudaBackend::new(EmulatedDevice::new());
    // One partial block, the edges of two, and many (4096 floats per block).
    let sizes = [1usize, 300, 4096, 4097, 70_001];
    let hosts: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i % 7) as f32 - 2.5).collect())
        .collect();
    let bufs: Vec<_> = hosts.iter().map(|h| be.upload(h)).collect();
    let (d, rows) = (4usize, 10usize);
    let table = be.upload(&(0..rows * d).map(|i| i as f32).collect::<Vec<_>>());
    let mut gathered = be.zeros(5 * d);
    let mut scattered = be.zeros(rows * d);
    let round = |gathered: &mut _, scattered: &mut _| {
        let sums: Vec<(f64, f64)> = bufs
            .iter()
            .map(|b| (be.sum(b), be.sum_squares(b)))
            .collect();
        be.gather_rows(gathered, &table, &[1, 3, 5, 7, 9], d);
        be.scatter_rows(scattered, gathered, &[0, 2, 4, 6, 8], d);
        sums
    };
    let first = round(&mut gathered, &mut scattered);
    let warm = be.device().allocations();
    let stats = be.scratch_stats();
    for _ in 0..3 {
        // Reused scratch still gives the right answers (the host's f64 sums, exact here).
        assert_eq!(round(&mut gathered, &mut scattered), first);
    }
    for (h, (sum, squares)) in hosts.iter().zip(&first) {
        let want: f64 = h.iter().map(|&x| x as f64).sum();
        let want_sq: f64 = h.iter().map(|&x| (x as f64).powi(2)).sum();
        assert_eq!((*sum, *squares), (want, want_sq), "n = {}", h.len());
    }
    let mut want_rows = vec![0.0f32; rows * d];
    for (k, r) in [1usize, 3, 5, 7, 9].iter().enumerate() {
        for j in 0..d {
            want_rows[2 * k * d + j] = (r * d + j) as f32;
        }
    }
    assert_eq!(be.download(&scattered), want_rows);
    assert_eq!(
        be.device().allocations(),
        warm,
        "device allocations after the first round"
    );
    let after = be.scratch_stats();
    assert_eq!(after.allocations, stats.allocations);
    // Per round: a total per sum, partials for the two multi-block buffers (4097 and 70,001
    // elements; 4096 is one block) per sum kind, one index array for the gather and two (the
    // last writer of each row, destination and source) for the scatter.
    assert_eq!(
        after.reuses - stats.reuses,
        3 * (2 * sizes.len() as u64 + 2 * 2 + 1 + 2)
    );
}

/// Steps of the tiny MEGABYTE (forward, backward, clipping, AdamW) at `precision`: the
/// device allocations of the second and third steps.
fn allocations_per_warm_step(precision: Precision) -> Vec<u64> {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    let (b, t) = (2, cfg.max_seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let bytes: Vec<u8> = (0..b * model.window_len(t)).map(|_| rng.random()).collect();
    let be = CudaBackend::with_precision(EmulatedDevice::new(), precision);
    let layout = &model.layout;
    let mut st = TrainState {
        params: layout.upload(&be, &layout.init_host(7)),
        grads: layout.zeros(&be),
        m: layout.zeros(&be),
        v: layout.zeros(&be),
    };
    let mut ws = model.workspace(&be, b, t, true);
    let mut per_step = Vec::new();
    for step in 0..3u64 {
        let before = be.device().allocations();
        for g in st.grads.iter_mut() {
            be.fill_zero(g);
        }
        let loss = model.forward(&be, &st.params, &mut ws, &bytes);
        assert!(loss.is_finite());
        model.backward(&be, &st.params, &mut st.grads, &mut ws);
        optimizer_step(&be, &model, &mut st, &hparams(b, t), LR, step);
        per_step.push(be.device().allocations() - before);
    }
    assert!(be.host_fallback_calls().is_empty());
    println!(
        "{precision:?}: device allocations per step {per_step:?}, scratch {:?}, pool {:?}",
        be.scratch_stats(),
        be.pool_stats()
    );
    per_step[1..].to_vec()
}

#[test]
fn warm_training_steps_allocate_no_device_memory() {
    for precision in [Precision::F32, Precision::Bf16Gemm] {
        assert_eq!(
            allocations_per_warm_step(precision),
            vec![0, 0],
            "{precision:?}"
        );
    }
}
