//! One training step (forward, backward, global-norm clipping, AdamW) of the `tiny` MEGABYTE
//! and the `tiny` MEGALODON on the CUDA backend over the emulated device, against the CPU
//! backend from the same parameters and bytes.
//!
//! Tolerances, with the differences measured when they were set (docs/cuda-backend.md):
//! - loss: `|Δ| ≤ 1e-5` nats (measured 3.0e-8 MEGABYTE, 7.5e-8 MEGALODON: the kernels reduce
//!   in other orders than the CPU loops);
//! - gradients: per tensor, `max|Δ| ≤ 1e-4 · max|g_cpu|` (measured 7.0e-7 and 9.1e-7: norm
//!   partials, CEMA and TimestepNorm scans, the CSR scatters and the cross-entropy rows sum in
//!   other orders);
//! - updated parameters and AdamW moments: `|Δ| ≤ 1e-4 + 1e-4·|x|` (measured 1.6e-5 and
//!   3.1e-6). The first AdamW step moves a weight by lr·g/(|g| + ε), which turns a gradient
//!   difference at |g| ≈ ε into up to lr·|Δg|/ε, so the bound is 1 % of the learning rate;
//!   the gradients themselves are held to the tighter bound above.

use mega::backend::cpu::Cpu;
use mega::backend::cuda::buffer::CudaBuf;
use mega::backend::cuda::CudaBackend;
use mega::config::{MegabyteConfig, MegalodonConfig};
use mega::emu::EmulatedDevice;
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::params::ParamLayout;
use mega::model::ModelShape;
use mega::train::trainer::{optimizer_step, TrainState};
use rand::{Rng, SeedableRng};

#[path = "support/train_step.rs"]
mod train_step;
use train_step::{hparams, one_step, StepResult, LR};

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f32 = 1e-4;
const PARAM_ABS_TOL: f32 = 1e-4;
const PARAM_REL_TOL: f32 = 1e-4;

/// Random bytes and a random perturbation of the initial parameters (std 0.05 on top of the
/// init, so every path carries signal, as in a trained model).
fn inputs(layout: &ParamLayout, window_bytes: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<u8>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut host = layout.init_host(seed);
    for p in host.iter_mut() {
        for x in p.iter_mut() {
            *x += 0.05 * rng.random_range(-1.0f32..1.0);
        }
    }
    let bytes = (0..window_bytes).map(|_| rng.random()).collect();
    (host, bytes)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, &x| m.max(x.abs()))
}

/// Asserts the two steps agree, and prints the worst differences (for docs/cuda-backend.md).
fn compare(what: &str, layout: &ParamLayout, cpu: &StepResult, cuda: &StepResult) {
    let loss_diff = (cpu.loss - cuda.loss).abs();
    assert!(
        loss_diff <= LOSS_TOL,
        "{what}: loss cuda {} vs cpu {}",
        cuda.loss,
        cpu.loss
    );
    let (mut worst_grad, mut worst_param) = (0.0f32, 0.0f32);
    for (i, spec) in layout.specs.iter().enumerate() {
        let scale = max_abs(&cpu.grads[i]).max(f32::MIN_POSITIVE);
        let diff = cpu.grads[i]
            .iter()
            .zip(&cuda.grads[i])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= GRAD_TOL * scale,
            "{what}: gradient of {}: max diff {diff} at scale {scale}",
            spec.name
        );
        worst_grad = worst_grad.max(diff / scale);
        for (kind, c, g) in [
            ("param", &cpu.params[i], &cuda.params[i]),
            ("m", &cpu.m[i], &cuda.m[i]),
            ("v", &cpu.v[i], &cuda.v[i]),
        ] {
            for (j, (&a, &b)) in c.iter().zip(g).enumerate() {
                let d = (a - b).abs();
                assert!(
                    d <= PARAM_ABS_TOL + PARAM_REL_TOL * a.abs(),
                    "{what}: {kind} {}[{j}]: cuda {b} vs cpu {a}",
                    spec.name
                );
                if kind == "param" {
                    worst_param = worst_param.max(d);
                }
            }
        }
    }
    println!(
        "{what}: |Δloss| = {loss_diff:.2e}, max gradient |Δ|/scale = {worst_grad:.2e}, \
         max parameter |Δ| = {worst_param:.2e}"
    );
}

#[test]
fn megabyte_tiny_step_matches_cpu() {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    let (b, t) = (2, cfg.max_seq_len);
    let (host, bytes) = inputs(&model.layout, b * model.window_len(t), 1);
    let cpu = one_step(
        &Cpu::<f32>::new(),
        &model,
        &model.layout,
        &host,
        &bytes,
        b,
        t,
    );
    let be = CudaBackend::new(EmulatedDevice::new());
    let cuda = one_step(&be, &model, &model.layout, &host, &bytes, b, t);
    println!("pool: {:?}", be.pool_stats());
    assert!(
        be.host_fallback_calls().is_empty(),
        "host fallbacks in a MEGABYTE step: {:?}",
        be.host_fallback_calls()
    );
    compare("megabyte tiny", &model.layout, &cpu, &cuda);
    assert_state_in_arenas(&be, &model.layout);
}

#[test]
fn megalodon_tiny_step_matches_cpu() {
    let cfg = MegalodonConfig::preset("tiny").unwrap();
    let model = Megalodon::new(&cfg);
    let (b, t) = (2, 16);
    let (host, bytes) = inputs(&model.layout, b * model.window_len(t), 2);
    let cpu = one_step(
        &Cpu::<f32>::new(),
        &model,
        &model.layout,
        &host,
        &bytes,
        b,
        t,
    );
    let be = CudaBackend::new(EmulatedDevice::new());
    let cuda = one_step(&be, &model, &model.layout, &host, &bytes, b, t);
    println!("pool: {:?}", be.pool_stats());
    // The whole step runs on the device: chunk attention included (no host round trips).
    assert!(
        be.host_fallback_calls().is_empty(),
        "host fallbacks in a MEGALODON step: {:?}",
        be.host_fallback_calls()
    );
    compare("megalodon tiny", &model.layout, &cpu, &cuda);
    assert_state_in_arenas(&be, &model.layout);
}

/// A training state's parameters, gradients and AdamW moments each lie in at most 3
/// allocations (here one arena per category), as the pool and the views' allocations show.
fn assert_state_in_arenas(be: &CudaBackend<EmulatedDevice>, layout: &ParamLayout) {
    let host = layout.init_host(0);
    let before = be.pool_stats();
    let st: TrainState<CudaBackend<EmulatedDevice>> = TrainState {
        params: layout.upload(be, &host),
        grads: layout.zeros(be),
        m: layout.zeros(be),
        v: layout.zeros(be),
    };
    let after = be.pool_stats();
    assert!(
        after.misses - before.misses <= 12,
        "{} allocations for {} tensors × 4",
        after.misses - before.misses,
        layout.specs.len()
    );
    let categories: [(&str, &Vec<mega::backend::cuda::CudaBuf<EmulatedDevice>>); 4] = [
        ("params", &st.params),
        ("grads", &st.grads),
        ("m", &st.m),
        ("v", &st.v),
    ];
    for (what, bufs) in categories {
        let mut allocations: Vec<usize> = bufs.iter().map(|b| b.allocation_address()).collect();
        allocations.sort();
        allocations.dedup();
        assert!(
            allocations.len() <= 3,
            "{what}: {} tensors in {} allocations",
            bufs.len(),
            allocations.len()
        );
    }
    assert_eq!(after.arenas - before.arenas, 4);
}

/// The allocations a category of training state (parameters, gradients, a moment) lies in,
/// after checking its views are disjoint within each allocation.
fn allocations_of(what: &str, bufs: &[CudaBuf<EmulatedDevice>]) -> Vec<usize> {
    let mut views: Vec<(usize, usize, usize)> = bufs
        .iter()
        .map(|b| (b.allocation_address(), b.offset(), b.len()))
        .collect();
    views.sort_unstable();
    for pair in views.windows(2) {
        let ((a0, o0, l0), (a1, o1, _)) = (pair[0], pair[1]);
        assert!(
            a0 != a1 || o0 + l0 <= o1,
            "{what}: views [{o0}, {}) and [{o1}, …) of one allocation overlap",
            o0 + l0
        );
    }
    let mut addresses: Vec<usize> = views.iter().map(|v| v.0).collect();
    addresses.dedup();
    addresses
}

/// Parameters, gradients and each AdamW moment live in one device allocation each (the
/// issue allows up to 3 per category; the arenas give 1), still after a training step, and
/// the arenas go back to the device when the training state drops.
#[test]
fn megabyte_training_state_lives_in_one_allocation_per_category() {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    let (b, t) = (2, cfg.max_seq_len);
    let (host, bytes) = inputs(&model.layout, b * model.window_len(t), 3);
    let be = CudaBackend::new(EmulatedDevice::new());
    assert_eq!(be.pool_stats().arenas, 0);
    // As the trainer builds it (src/train/trainer.rs).
    let mut st = TrainState {
        params: model.layout.upload(&be, &host),
        grads: model.layout.zeros(&be),
        m: model.layout.zeros(&be),
        v: model.layout.zeros(&be),
    };
    let tensors = st.params.len();
    assert!(tensors > 3, "the tiny model has {tensors} tensors");
    {
        let mut ws = model.workspace(&be, b, t, true);
        model.forward(&be, &st.params, &mut ws, &bytes);
        model.backward(&be, &st.params, &mut st.grads, &mut ws);
        optimizer_step(&be, &model, &mut st, &hparams(b, t), LR, 0);
    }
    let categories = [
        ("parameters", &st.params),
        ("gradients", &st.grads),
        ("AdamW m", &st.m),
        ("AdamW v", &st.v),
    ];
    let mut all = Vec::new();
    for (what, bufs) in categories {
        assert_eq!(bufs.len(), tensors, "{what}: one buffer per tensor");
        let allocations = allocations_of(what, bufs);
        println!(
            "{what}: {tensors} tensors in {} allocation(s)",
            allocations.len()
        );
        assert_eq!(
            allocations.len(),
            1,
            "{what}: {tensors} tensors in {allocations:x?}"
        );
        all.extend(allocations);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 4, "the four categories share an allocation");
    assert_eq!(be.pool_stats().arenas, 4, "pool: {:?}", be.pool_stats());
    drop(st);
    assert_eq!(be.pool_stats().arenas, 0, "pool: {:?}", be.pool_stats());
}
