//! One training step (forward, backward, global-norm clipping, AdamW) of the `tiny` MEGABYTE
//! and the `tiny` MEGALODON on the CUDA backend over the emulated device, against the CPU
//! backend from the same parameters and bytes.
//!
//! Tolerances, with the differences measured when they were set (docs/cuda-backend.md):
//! - loss: `|Δ| ≤ 1e-5` nats (measured 1.5e-8 MEGABYTE, 7.5e-8 MEGALODON: the kernels reduce
//!   in other orders than the CPU loops);
//! - gradients: per tensor, `max|Δ| ≤ 1e-4 · max|g_cpu|` (measured 7.1e-7 and 9.1e-7: norm
//!   partials, CEMA and TimestepNorm scans, the CSR scatters and the cross-entropy rows sum in
//!   other orders);
//! - updated parameters and AdamW moments: `|Δ| ≤ 1e-4 + 1e-4·|x|` (measured 9.4e-6 and
//!   3.1e-6). The first AdamW step moves a weight by lr·g/(|g| + ε), which turns a gradient
//!   difference at |g| ≈ ε into up to lr·|Δg|/ε, so the bound is 1 % of the learning rate;
//!   the gradients themselves are held to the tighter bound above.

use mega::backend::cpu::Cpu;
use mega::backend::cuda::CudaBackend;
use mega::backend::Backend;
use mega::config::{MegabyteConfig, MegalodonConfig};
use mega::emu::EmulatedDevice;
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::params::ParamLayout;
use mega::model::{LanguageModel, ModelShape};
use mega::train::trainer::{optimizer_step, TrainHparams, TrainState};
use rand::{Rng, SeedableRng};

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f32 = 1e-4;
const PARAM_ABS_TOL: f32 = 1e-4;
const PARAM_REL_TOL: f32 = 1e-4;

/// Everything one step produced, on the host.
struct StepResult {
    loss: f64,
    grads: Vec<Vec<f32>>,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn hparams(b: usize, t: usize) -> TrainHparams {
    TrainHparams {
        batch_size: b,
        seq_len: t,
        total_steps: 10,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
        seed: 0,
        valid_fraction: 0.0,
    }
}

fn one_step<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    layout: &ParamLayout,
    host: &[Vec<f32>],
    windows: &[u8],
    b: usize,
    t: usize,
) -> StepResult {
    let mut st = TrainState {
        params: layout.upload(be, host),
        grads: layout.zeros(be),
        m: layout.zeros(be),
        v: layout.zeros(be),
    };
    let mut ws = model.workspace(be, b, t, true);
    let loss = model.forward(be, &st.params, &mut ws, windows);
    model.backward(be, &st.params, &mut st.grads, &mut ws);
    let grads = st.grads.iter().map(|g| be.download(g)).collect();
    optimizer_step(be, model, &mut st, &hparams(b, t), 1e-2, 0);
    let get = |v: &[B::Buf]| v.iter().map(|x| be.download(x)).collect();
    StepResult {
        loss,
        grads,
        params: get(&st.params),
        m: get(&st.m),
        v: get(&st.v),
    }
}

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
    println!("host fallbacks: {:?}", be.host_fallback_calls());
    println!("pool: {:?}", be.pool_stats());
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
    println!("host fallbacks: {:?}", be.host_fallback_calls());
    println!("pool: {:?}", be.pool_stats());
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
