//! One training step (forward, backward, global-norm clipping, AdamW) of a model from given
//! parameters and bytes, with everything it produced brought back to the host: the unit the
//! CUDA-backend tests compare against the CPU backend.

use mega::backend::Backend;
use mega::model::params::ParamLayout;
use mega::model::LanguageModel;
use mega::train::trainer::{optimizer_step, TrainHparams, TrainState};

/// Learning rate of the step.
pub const LR: f32 = 1e-2;

/// Everything one step produced, on the host.
pub struct StepResult {
    pub loss: f64,
    pub grads: Vec<Vec<f32>>,
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// The step's hyper-parameters for `b` windows of `t` bytes (clipping at 1, weight decay 0.1).
pub fn hparams(b: usize, t: usize) -> TrainHparams {
    TrainHparams {
        batch_size: b,
        seq_len: t,
        total_steps: 10,
        lr: LR,
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

/// Uploads `host` as the parameters, runs one step on `windows` (`b` windows of `t` bytes)
/// and downloads the loss, the gradients (before clipping), the parameters and both moments.
pub fn one_step<B: Backend, M: LanguageModel<B>>(
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
    optimizer_step(be, model, &mut st, &hparams(b, t), LR, 0);
    let get = |v: &[B::Buf]| v.iter().map(|x| be.download(x)).collect();
    StepResult {
        loss,
        grads,
        params: get(&st.params),
        m: get(&st.m),
        v: get(&st.v),
    }
}
