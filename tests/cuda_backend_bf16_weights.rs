//! The weights' bf16 working copies under `Precision::Bf16Gemm` (src/backend/cuda/shadow.rs),
//! on the emulated device:
//! - training steps of the tiny MEGABYTE and MEGALODON read every weight from its copy: after
//!   the first GEMM read of each weight (one cast into the copy) no weight is cast again, only
//!   activations and gradients are; after every step each copy equals `bf16(master)` bit for
//!   bit; and the steps give the same bits as the cast-per-call path (weights without copies);
//! - every backend op that writes a weight makes its next GEMM use the new values (a stale
//!   copy would give the old product);
//! - a checkpoint uploaded into a backend that has trained steps gives the same next step as
//!   a fresh backend loading it.

use half::bf16;
use mega::backend::cuda::{CudaBackend, CudaBuf, Precision};
use mega::backend::{AdamW, Backend};
use mega::config::{MegabyteConfig, MegalodonConfig};
use mega::emu::EmulatedDevice;
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::params::ParamLayout;
use mega::model::{LanguageModel, ModelShape};
use mega::train::trainer::{optimizer_step, TrainState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "support/train_step.rs"]
#[allow(dead_code)] // this file uses the step's hyper-parameters only
mod train_step;
use train_step::{hparams, LR};

type Emu = CudaBackend<EmulatedDevice>;

fn bf16_backend() -> Emu {
    CudaBackend::with_precision(EmulatedDevice::new(), Precision::Bf16Gemm)
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Initial parameters plus uniform ±0.05 and `steps` batches of random bytes.
fn inputs(layout: &ParamLayout, batch_bytes: usize, steps: usize) -> (Vec<Vec<f32>>, Vec<Vec<u8>>) {
    let mut r = rng(11);
    let mut host = layout.init_host(3);
    for x in host.iter_mut().flatten() {
        *x += 0.05 * r.random_range(-1.0f32..1.0);
    }
    let batches = (0..steps)
        .map(|_| (0..batch_bytes).map(|_| r.random()).collect())
        .collect();
    (host, batches)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_bits_of(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// Asserts each parameter's working copy exists and is `bf16(master)` bit for bit, and that
/// gradients and moments have none.
fn assert_copies_match_masters(be: &Emu, layout: &ParamLayout, st: &TrainState<Emu>, when: &str) {
    for (spec, p) in layout.specs.iter().zip(&st.params) {
        let copy = be
            .bf16_working_copy(p)
            .unwrap_or_else(|| panic!("{when}: {} has no current bf16 copy", spec.name));
        let copy: Vec<u16> = copy.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            copy,
            bf16_bits_of(&be.download(p)),
            "{when}: {}: copy ≠ bf16(master)",
            spec.name
        );
    }
    for b in st.grads.iter().chain(&st.m).chain(&st.v) {
        assert!(
            be.bf16_working_copy(b).is_none(),
            "{when}: a gradient or moment has a copy"
        );
    }
}

/// What `steps` training steps produced: the losses, the final parameters, and per step the
/// casts of weights (launches whose source is the parameter arena) and of anything else.
struct Run {
    losses: Vec<f64>,
    params: Vec<Vec<f32>>,
    weight_casts: Vec<u64>,
    other_casts: Vec<u64>,
    /// Elements cast to bf16 per step (forward and backward).
    cast_elements: Vec<u64>,
}

/// Trains `batches.len()` steps on `be` from `params` (already on `be`), checking the working
/// copies after every step when `copies`.
fn train<M: LanguageModel<Emu> + ModelShape>(
    be: &Emu,
    model: &M,
    layout: &ParamLayout,
    params: Vec<CudaBuf<EmulatedDevice>>,
    batches: &[Vec<u8>],
    (b, t): (usize, usize),
    copies: bool,
) -> Run {
    let mut st: TrainState<Emu> = TrainState {
        params,
        grads: layout.zeros(be),
        m: layout.zeros(be),
        v: layout.zeros(be),
    };
    let arena = st.params[0].allocation_address();
    let mut ws = model.workspace(be, b, t, true);
    let hp = hparams(b, t);
    let mut run = Run {
        losses: vec![],
        params: vec![],
        weight_casts: vec![],
        other_casts: vec![],
        cast_elements: vec![],
    };
    for (step, batch) in batches.iter().enumerate() {
        be.reset_bf16_operand_stats();
        st.grads.iter_mut().for_each(|g| be.fill_zero(g));
        run.losses
            .push(model.forward(be, &st.params, &mut ws, batch));
        model.backward(be, &st.params, &mut st.grads, &mut ws);
        let gemms = be.bf16_operand_stats();
        let weight = gemms.casts_by_allocation.get(&arena).copied().unwrap_or(0);
        let all: u64 = gemms.casts_by_allocation.values().sum();
        run.weight_casts.push(weight);
        run.other_casts.push(all - weight);
        run.cast_elements.push(gemms.cast_elements);
        optimizer_step(be, model, &mut st, &hp, LR, step as u64);
        if copies {
            assert_eq!(
                gemms.shadow_refreshes, weight,
                "casts of weights are refreshes"
            );
            assert!(gemms.shadow_reads > 0, "no GEMM read a working copy");
            assert_eq!(
                be.bf16_operand_stats().fused_adamw_steps,
                layout.specs.len() as u64,
                "step {step}: every weight's copy is written by AdamW"
            );
            assert_copies_match_masters(be, layout, &st, &format!("after step {step}"));
        } else {
            assert!(st.params.iter().all(|p| be.bf16_working_copy(p).is_none()));
        }
    }
    run.params = st.params.iter().map(|p| be.download(p)).collect();
    run
}

fn check_training<M: LanguageModel<Emu> + ModelShape>(
    what: &str,
    model: &M,
    layout: &ParamLayout,
    b: usize,
    t: usize,
) {
    let (host, batches) = inputs(layout, b * model.window_len(t), 3);
    let be = bf16_backend();
    let with_copies = train(
        &be,
        model,
        layout,
        layout.upload(&be, &host),
        &batches,
        (b, t),
        true,
    );
    // The first step casts each weight a GEMM reads once, into its copy; later steps none.
    let n = layout.specs.len() as u64;
    assert!(
        with_copies.weight_casts[0] > 0 && with_copies.weight_casts[0] <= n,
        "{what}: step 0 cast weights {} times ({n} tensors)",
        with_copies.weight_casts[0]
    );
    assert!(
        with_copies.weight_casts[1..].iter().all(|&c| c == 0),
        "{what}: weights cast after the first step: {:?}",
        with_copies.weight_casts
    );
    assert!(with_copies.other_casts.iter().all(|&c| c > 0));

    // The same steps with the weights in a zeroed arena, written by copies: no working
    // copies, so every GEMM casts its weight as before. Same bf16 values, same bits.
    let be = bf16_backend();
    let mut params = layout.zeros(&be);
    for (p, h) in params.iter_mut().zip(&host) {
        be.copy(p, &be.upload(h));
    }
    let cast_per_call = train(&be, model, layout, params, &batches, (b, t), false);
    assert_eq!(
        with_copies.other_casts, cast_per_call.other_casts,
        "{what}: activation casts"
    );
    assert_eq!(with_copies.losses, cast_per_call.losses, "{what}: losses");
    for (spec, (a, c)) in layout
        .specs
        .iter()
        .zip(with_copies.params.iter().zip(&cast_per_call.params))
    {
        assert_eq!(bits(a), bits(c), "{what}: {} after 3 steps", spec.name);
    }
    println!(
        "{what}: weight casts per step {:?} with working copies, {:?} cast per call; \
         activation/gradient casts per step {:?}; elements cast per step {:?} vs {:?}",
        with_copies.weight_casts,
        cast_per_call.weight_casts,
        with_copies.other_casts,
        with_copies.cast_elements,
        cast_per_call.cast_elements
    );
    // Cast per call, each weight a GEMM reads is cast at least twice a step (forward and
    // input gradient).
    assert!(cast_per_call
        .weight_casts
        .iter()
        .all(|&c| c >= 2 * with_copies.weight_casts[0]));
}

#[test]
fn megabyte_steps_read_weights_from_their_bf16_copies() {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    check_training("megabyte tiny", &model, &model.layout, 2, cfg.max_seq_len);
}

#[test]
fn megalodon_steps_read_weights_from_their_bf16_copies() {
    let cfg = MegalodonConfig::preset("tiny").unwrap();
    let model = Megalodon::new(&cfg);
    check_training("megalodon tiny", &model, &model.layout, 2, 16);
}

/// `x[m, k] · w[k, n]` on `be`.
fn product(
    be: &Emu,
    x: &CudaBuf<EmulatedDevice>,
    w: &CudaBuf<EmulatedDevice>,
    m: usize,
) -> Vec<f32> {
    let k = be.len(x) / m;
    let n = be.len(w) / k;
    let mut out = be.zeros(m * n);
    be.matmul(&mut out, x, w, m, k, n, false, false, false);
    be.download(&out)
}

fn uniform(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| r.random_range(-1.0f64..1.0) as f32)
        .collect()
}

#[test]
fn a_written_weight_is_never_read_from_a_stale_copy() {
    let (m, k, n) = (5, 12, 8);
    let mut r = rng(5);
    let be = bf16_backend();
    let x = be.upload(&uniform(&mut r, m * k));
    let (w0, other, bias) = (
        uniform(&mut r, k * n),
        uniform(&mut r, k * n),
        uniform(&mut r, n),
    );
    let mut arena = be.upload_many(&[&w0, &other, &bias]);
    let [w, other, bias] = &mut arena[..] else {
        unreachable!()
    };
    // The product with `w`'s current values, computed with no copy involved (a pooled
    // upload of the downloaded master is cast per call).
    let expected =
        |be: &Emu, w: &CudaBuf<EmulatedDevice>| product(be, &x, &be.upload(&be.download(w)), m);
    let first = product(&be, &x, w, m);
    assert_eq!(bits(&first), bits(&expected(&be, w)));
    assert!(
        be.bf16_working_copy(w).is_some(),
        "the GEMM made the copy current"
    );

    let hp = AdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };
    let rows: Vec<u32> = (0..k as u32).rev().step_by(2).collect();
    let row_src = be.upload(&uniform(&mut r, rows.len() * n));
    type Write<'a> = Box<dyn Fn(&Emu, &mut CudaBuf<EmulatedDevice>) + 'a>;
    let writes: Vec<(&str, Write)> = vec![
        ("copy", Box::new(|be, w| be.copy(w, other))),
        ("scale", Box::new(|be, w| be.scale(w, -1.5))),
        ("fill_zero", Box::new(|be, w| be.fill_zero(w))),
        ("add_assign", Box::new(|be, w| be.add_assign(w, other))),
        (
            "scatter_rows",
            Box::new(|be, w| be.scatter_rows(w, &row_src, &rows, n)),
        ),
        ("add_bias", Box::new(|be, w| be.add_bias(w, bias, k, n))),
        (
            "mul",
            Box::new(|be, w| {
                let copy = be.upload(&be.download(w));
                be.mul(w, &copy, other)
            }),
        ),
        (
            "add_scalar",
            Box::new(|be, w| {
                let copy = be.upload(&be.download(w));
                be.add_scalar(w, &copy, 0.25)
            }),
        ),
        (
            "matmul into the weight",
            Box::new(|be, w| {
                let a = be.upload(&vec![0.5; k * k]);
                let b = be.upload(&be.download(other));
                be.matmul(w, &a, &b, k, k, n, false, false, true)
            }),
        ),
        (
            "adamw (rewrites the copy)",
            Box::new(|be, w| {
                let (g, mut m1, mut v1) = (
                    be.upload(&vec![0.3; k * n]),
                    be.zeros(k * n),
                    be.zeros(k * n),
                );
                be.adamw_step(w, &g, &mut m1, &mut v1, &hp)
            }),
        ),
    ];
    let mut previous = first;
    for (what, write) in &writes {
        write(&be, w);
        let fused = what.starts_with("adamw");
        assert_eq!(
            be.bf16_working_copy(w).is_some(),
            fused,
            "{what}: the copy must be stale after any write but AdamW's"
        );
        let refreshes = be.bf16_operand_stats().shadow_refreshes;
        let got = product(&be, &x, w, m);
        assert_eq!(
            bits(&got),
            bits(&expected(&be, w)),
            "{what}: stale copy used"
        );
        assert_ne!(
            bits(&got),
            bits(&previous),
            "{what}: the write changed nothing"
        );
        assert_eq!(
            be.bf16_operand_stats().shadow_refreshes - refreshes,
            u64::from(!fused),
            "{what}: one refresh after a write, none after AdamW"
        );
        previous = got;
    }
    // Both operands weights of one arena: each read from its own part of the copy.
    let mut out = be.zeros(k * k);
    be.matmul(&mut out, w, other, k, n, k, false, true, false);
    let (wd, od) = (be.upload(&be.download(w)), be.upload(&be.download(other)));
    let mut want = be.zeros(k * k);
    be.matmul(&mut want, &wd, &od, k, n, k, false, true, false);
    assert_eq!(bits(&be.download(&out)), bits(&be.download(&want)));
}

#[test]
fn a_loaded_checkpoint_steps_like_a_fresh_backend() {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    let layout = &model.layout;
    let (b, t) = (2, cfg.max_seq_len);
    let (host, batches) = inputs(layout, b * model.window_len(t), 3);
    let be = bf16_backend();
    // Two steps from `host` (the working copies are made and rewritten)…
    let trained = train(
        &be,
        &model,
        layout,
        layout.upload(&be, &host),
        &batches[..2],
        (b, t),
        true,
    );
    // … then the initial checkpoint loaded into the same backend, and one step.
    let reloaded = train(
        &be,
        &model,
        layout,
        layout.upload(&be, &host),
        &batches[2..],
        (b, t),
        true,
    );
    let fresh_be = bf16_backend();
    let fresh = train(
        &fresh_be,
        &model,
        layout,
        layout.upload(&fresh_be, &host),
        &batches[2..],
        (b, t),
        true,
    );
    assert_ne!(
        trained.params, fresh.params,
        "the checkpoint differs from the trained state"
    );
    assert_eq!(reloaded.losses, fresh.losses);
    for (spec, (a, c)) in layout
        .specs
        .iter()
        .zip(reloaded.params.iter().zip(&fresh.params))
    {
        assert_eq!(bits(a), bits(c), "{}", spec.name);
    }
}
