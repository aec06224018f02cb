//! The training loop: batches from a byte corpus, forward/backward, global-norm clipping,
//! AdamW with warmup + cosine, periodic validation, atomic checkpoints, resume, the plot.

use super::checkpoint::{self, Checkpoint, LogPoint, OptimizerState, TrainerState};
use super::data::{ByteCorpus, DataSplit};
use super::plot::write_loss_plot;
use super::schedule::LrSchedule;
use crate::backend::{AdamW, Backend};
use crate::config::ModelConfig;
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Optimization settings that must stay fixed across a resumed run (saved in the checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainHparams {
    pub batch_size: usize,
    pub seq_len: usize,
    pub total_steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub grad_clip: f32,
    pub seed: u64,
    pub valid_fraction: f64,
}

/// Everything `mega train` needs besides the model config.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub valid: Option<PathBuf>,
    pub out: PathBuf,
    /// Fixed step count; when `None` the count is derived from `time_budget`.
    pub steps: Option<u64>,
    /// Stop when this much wall time has passed (and size the schedule to it).
    pub time_budget: Option<Duration>,
    pub hp: TrainHparams,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub checkpoint_every: u64,
    pub resume: bool,
    /// Stop (with a checkpoint) once this step is reached, without changing the schedule,
    /// so a run can be trained in pieces with `--resume`.
    pub stop_at_step: Option<u64>,
    pub progress: bool,
    /// Non-finite steps tolerated before the run stops.
    pub max_skipped: u64,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_train_loss: f32,
    pub final_valid_bpb: f32,
    pub unigram_entropy_bits: f64,
    pub bytes_per_s: f64,
    pub elapsed_s: f64,
    pub skipped_steps: u64,
    pub params: usize,
}

/// A model's parameters with their gradients and AdamW moments on one backend.
pub struct TrainState<B: Backend> {
    pub params: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
}

/// One optimizer step: clip the global gradient norm to `clip`, then AdamW. Weight decay
/// applies to matrices and embedding tables only (tensors of rank ≥ 2), not to biases,
/// norms or pads. Returns the pre-clip gradient norm.
pub fn optimizer_step<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    st: &mut TrainState<B>,
    hp: &TrainHparams,
    lr: f32,
    step: u64,
) -> f64 {
    let norm = st
        .grads
        .iter()
        .map(|g| be.sum_squares(g))
        .sum::<f64>()
        .sqrt();
    if norm > hp.grad_clip as f64 {
        let s = (hp.grad_clip as f64 / norm) as f32;
        st.grads.iter_mut().for_each(|g| be.scale(g, s));
    }
    for i in 0..st.params.len() {
        let wd = if model.decays(i) {
            hp.weight_decay
        } else {
            0.0
        };
        let h = AdamW {
            lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: wd,
            step: step + 1,
        };
        be.adamw_step(
            &mut st.params[i],
            &st.grads[i],
            &mut st.m[i],
            &mut st.v[i],
            &h,
        );
    }
    norm
}

/// Data-dependent start for an output-head bias (`local.head_bias`, when the model has one):
/// the log unigram frequencies of the corpus (add-one smoothed, mean zero), so the model
/// predicts the unigram distribution from step 0 instead of spending its first hundreds of
/// steps building it into the shared byte table.
fn init_head_bias(
    layout: &crate::model::params::ParamLayout,
    host: &mut [Vec<f32>],
    counts: &[u64; 256],
) {
    let Some(i) = layout.index("local.head_bias") else {
        return;
    };
    let total: f64 = counts.iter().map(|&c| c as f64 + 1.0).sum();
    let logp: Vec<f64> = counts
        .iter()
        .map(|&c| ((c as f64 + 1.0) / total).ln())
        .collect();
    let mean = logp.iter().sum::<f64>() / logp.len() as f64;
    host[i] = logp.iter().map(|&l| (l - mean) as f32).collect();
}

/// Mean validation bits per byte over `windows` (each `window_len(t)` bytes), in batches of
/// the workspace's `b`.
pub fn evaluate_bpb<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    params: &[B::Buf],
    ws: &mut M::Workspace,
    windows: &[Vec<u8>],
) -> f64 {
    let windows: Vec<&[u8]> = windows.iter().map(Vec::as_slice).collect();
    let losses = super::eval::batched_window_losses(be, model, params, ws, &windows);
    let total: f64 = losses.iter().flatten().map(|&x| x as f64).sum();
    let count: usize = losses.iter().map(Vec::len).sum();
    total / count.max(1) as f64 / std::f64::consts::LN_2
}

/// Train the model `cfg` describes on backend `be`; writes checkpoints and the plot under
/// `opts.out`.
pub fn train<B: Backend>(be: &B, cfg: &ModelConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    crate::with_model!(cfg, |model| train_model(be, &model, cfg, opts))
}

/// [`train`] for a constructed model.
pub fn train_model<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    cfg: &ModelConfig,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    let corpus =
        ByteCorpus::open(&opts.data).with_context(|| "opening the training data".to_string())?;
    let entropy = corpus.unigram_entropy_bits();
    let valid = match &opts.valid {
        Some(v) => Some(ByteCorpus::open(v).context("opening the validation data")?),
        None => None,
    };

    let ckpt_dir = opts.out.clone();
    let (mut hp, mut tstate, host_params, opt_state) = if opts.resume {
        let ck = checkpoint::load(&ckpt_dir)
            .with_context(|| format!("resuming from {}", ckpt_dir.display()))?;
        let saved_cfg: ModelConfig =
            serde_json::from_value(ck.config.clone()).context("checkpoint config.json")?;
        if &saved_cfg != cfg {
            bail!(
                "the checkpoint in {} was trained with a different model config",
                ckpt_dir.display()
            );
        }
        let ts = ck
            .trainer
            .context("checkpoint has no trainer state; cannot resume")?;
        let hp: TrainHparams =
            serde_json::from_value(ts.extra.get("hparams").cloned().unwrap_or_default())
                .context("trainer hparams")?;
        let host = model
            .layout()
            .host_from_named(&ck.model)
            .map_err(anyhow::Error::msg)?;
        (hp, ts, host, ck.optimizer)
    } else {
        let ts = TrainerState {
            step: 0,
            seed: opts.hp.seed,
            bytes_seen: 0,
            skipped_steps: 0,
            elapsed_s: 0.0,
            history: Vec::new(),
            extra: serde_json::Value::Null,
        };
        let mut host = model.layout().init_host(opts.hp.seed);
        init_head_bias(model.layout(), &mut host, &corpus.byte_counts());
        (opts.hp.clone(), ts, host, None)
    };
    model
        .check_seq_len(hp.seq_len)
        .map_err(|e| anyhow::anyhow!("--seq-len: {e}"))?;
    let window = model.window_len(hp.seq_len);
    let data = corpus.split(valid, hp.valid_fraction)?;
    data.check_window(window)?;

    let layout = model.layout();
    let mut st = TrainState {
        params: layout.upload(be, &host_params),
        grads: layout.zeros(be),
        m: layout.zeros(be),
        v: layout.zeros(be),
    };
    if let Some(o) = opt_state {
        let named = |t| layout.host_from_named(t).map_err(anyhow::Error::msg);
        st.m = layout.upload(be, &named(&o.m)?);
        st.v = layout.upload(be, &named(&o.v)?);
    }
    let mut ws = model.workspace(be, hp.batch_size, hp.seq_len, true);
    let mut eval_ws = model.workspace(be, hp.batch_size, hp.seq_len, false);
    let valid_windows = data.valid_windows(window, opts.eval_windows);
    let bytes_per_step = (hp.batch_size * hp.seq_len) as u64;

    let t0 = Instant::now();
    let elapsed_before = tstate.elapsed_s;
    let mut total = if opts.resume {
        hp.total_steps
    } else {
        opts.steps.unwrap_or(0)
    };
    if let (true, Some(n)) = (opts.resume, opts.steps) {
        if n != total {
            eprintln!("note: --steps {n} replaces the saved schedule length {total}; the LR schedule changes");
            total = n;
        }
    }
    let budget = opts.time_budget;
    if !opts.resume && opts.steps.is_none() && budget.is_none() {
        bail!("give --steps N or --time-budget (e.g. 10m)");
    }
    let pb = progress_bar(opts.progress, total);
    let mut last_loss = f32::NAN;
    let mut last_valid = f32::NAN;
    let run_start_step = tstate.step;
    loop {
        let step = tstate.step;
        if total > 0 && step >= total {
            break;
        }
        if let Some(b) = budget {
            if t0.elapsed() >= b && total > 0 {
                break;
            }
        }
        let batch = data.train_batch(hp.seed, step, hp.batch_size, window);
        st.grads.iter_mut().for_each(|g| be.fill_zero(g));
        let loss = model.forward(be, &st.params, &mut ws, &batch);
        model.backward(be, &st.params, &mut st.grads, &mut ws);
        // Without a fixed step count, size the schedule from the first steps' speed.
        if total == 0 && step - run_start_step == 2 {
            let per_step = t0.elapsed().as_secs_f64() / 3.0;
            let b = budget.expect("checked above").as_secs_f64();
            total = ((b / per_step) as u64).max(step + 1);
            hp.total_steps = total;
            pb.set_length(total);
        }
        let sched = LrSchedule {
            max_lr: hp.lr,
            min_lr: hp.min_lr,
            warmup_steps: hp.warmup_steps,
            total_steps: total.max(1),
        };
        let lr = sched.lr_at(step);
        let grad_finite =
            loss.is_finite() && st.grads.iter().all(|g| be.sum_squares(g).is_finite());
        if !grad_finite {
            tstate.skipped_steps += 1;
            say(
                &pb,
                format!("step {step}: non-finite loss or gradient, step skipped"),
            );
            if tstate.skipped_steps > opts.max_skipped {
                bail!(
                    "stopping: {} steps had non-finite loss or gradients (limit {}); lower --lr",
                    tstate.skipped_steps,
                    opts.max_skipped
                );
            }
        } else {
            optimizer_step(be, model, &mut st, &hp, lr, step);
            last_loss = loss as f32;
        }
        tstate.step += 1;
        tstate.bytes_seen += bytes_per_step;
        let mut point = LogPoint {
            step: tstate.step,
            train_loss: Some(loss as f32),
            valid_bpb: None,
            lr,
        };
        let done = (total > 0 && tstate.step >= total)
            || budget.is_some_and(|b| t0.elapsed() >= b)
            || opts.stop_at_step.is_some_and(|s| tstate.step >= s);
        if tstate.step % opts.eval_every == 0 || done {
            last_valid = evaluate_bpb(be, model, &st.params, &mut eval_ws, &valid_windows) as f32;
            point.valid_bpb = Some(last_valid);
        }
        tstate.history.push(point);
        let secs = t0.elapsed().as_secs_f64();
        let rate = ((tstate.step - run_start_step) * bytes_per_step) as f64 / secs.max(1e-9);
        if point.valid_bpb.is_some() {
            let eta = if total > tstate.step {
                (total - tstate.step) as f64 * secs / (tstate.step - run_start_step) as f64
            } else {
                0.0
            };
            say(
                &pb,
                format!(
                    "step {:>6}/{total}  train loss {:.4} ({:.3} bpb)  valid {:.3} bpb  {:.0} bytes/s  eta {:.0}s",
                    tstate.step,
                    loss,
                    loss / std::f64::consts::LN_2,
                    last_valid,
                    rate,
                    eta
                ),
            );
        }
        pb.set_position(tstate.step);
        pb.set_message(format!(
            "loss {:.3} | {:.3} bpb | {:.0} B/s",
            loss,
            loss / std::f64::consts::LN_2,
            rate
        ));
        if tstate.step % opts.checkpoint_every == 0 || done {
            tstate.elapsed_s = elapsed_before + secs;
            hp.total_steps = total;
            save(be, layout, cfg, &st, &tstate, &hp, &ckpt_dir)?;
        }
        if done {
            break;
        }
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    tstate.elapsed_s = elapsed_before + secs;
    hp.total_steps = total;
    save(be, layout, cfg, &st, &tstate, &hp, &ckpt_dir)?;
    let plot = ckpt_dir.join("loss.svg");
    write_loss_plot(&plot, &tstate.history, "MEGABYTE training")
        .context("writing the loss plot")?;
    Ok(TrainSummary {
        steps: tstate.step,
        final_train_loss: last_loss,
        final_valid_bpb: last_valid,
        unigram_entropy_bits: entropy,
        bytes_per_s: ((tstate.step - run_start_step) * bytes_per_step) as f64 / secs.max(1e-9),
        elapsed_s: tstate.elapsed_s,
        skipped_steps: tstate.skipped_steps,
        params: layout.numel(),
    })
}

fn save<B: Backend>(
    be: &B,
    layout: &crate::model::params::ParamLayout,
    cfg: &ModelConfig,
    st: &TrainState<B>,
    ts: &TrainerState,
    hp: &TrainHparams,
    dir: &Path,
) -> Result<()> {
    let mut ts = ts.clone();
    ts.extra = serde_json::json!({ "hparams": hp });
    let ck = Checkpoint {
        config: cfg.to_json(),
        model: layout.download(be, &st.params),
        optimizer: Some(OptimizerState {
            m: layout.download(be, &st.m),
            v: layout.download(be, &st.v),
        }),
        trainer: Some(ts),
    };
    checkpoint::save(dir, &ck)
        .with_context(|| format!("saving the checkpoint to {}", dir.display()))?;
    Ok(())
}

/// Print a log line above the progress bar, or plainly when no bar is drawn (not a terminal).
fn say(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    pb
}

/// Open a model checkpoint for inference: its config and its named tensors (matched to a
/// model's layout by [`crate::model::params::ParamLayout::host_from_named`]).
pub fn load_checkpoint(dir: &Path) -> Result<(ModelConfig, Vec<checkpoint::HostTensor>)> {
    let ck = checkpoint::load_model_only(dir)
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let cfg: ModelConfig = serde_json::from_value(ck.config.clone())
        .with_context(|| format!("{}: config.json is not a valid model config", dir.display()))?;
    cfg.validate()?;
    Ok((cfg, ck.model))
}

/// The data split for a run's options (for `mega eval` and tests).
pub fn open_split(data: &Path, valid: Option<&Path>, fraction: f64) -> Result<DataSplit> {
    let corpus = ByteCorpus::open(data)?;
    let v = valid.map(ByteCorpus::open).transpose()?;
    Ok(corpus.split(v, fraction)?)
}
