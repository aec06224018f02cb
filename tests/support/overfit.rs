//! Memorising one batch: the end-to-end check that forward, backward and AdamW fit together,
//! shared by the MEGABYTE and MEGALODON model tests.

use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use mega::model::LanguageModel;
use mega::train::trainer::{optimizer_step, TrainHparams, TrainState};

/// Trains `model` from its seed-0 init on the two 16-byte windows of `windows` for `steps`
/// AdamW steps at learning rate 1e-2; returns the first and the last loss.
pub fn memorise_one_batch<M: LanguageModel<Cpu<f32>>>(
    model: &M,
    windows: &[u8],
    steps: u64,
) -> (f64, f64) {
    let be = Cpu::<f32>::new();
    let layout = model.layout();
    let mut st = TrainState {
        params: layout.upload(&be, &layout.init_host(0)),
        grads: layout.zeros(&be),
        m: layout.zeros(&be),
        v: layout.zeros(&be),
    };
    let hp = TrainHparams {
        batch_size: 2,
        seq_len: 16,
        total_steps: steps,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 10,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        grad_clip: 1.0,
        seed: 0,
        valid_fraction: 0.0,
    };
    let mut ws = model.workspace(&be, 2, 16, true);
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..steps {
        st.grads.iter_mut().for_each(|g| be.fill_zero(g));
        let loss = model.forward(&be, &st.params, &mut ws, windows);
        model.backward(&be, &st.params, &mut st.grads, &mut ws);
        optimizer_step(&be, model, &mut st, &hp, 1e-2, step);
        if step == 0 {
            first = loss;
        }
        last = loss;
    }
    (first, last)
}
