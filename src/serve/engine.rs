//! The continuous-batching engine: one OS thread owns the model and its decoder and runs a
//! scheduler step after step. Each step admits waiting requests into free decoder slots,
//! runs one batched model call in which every running sequence advances (decoding sequences
//! by one byte, prefilling ones by a share of the `prefill_chunk` budget), samples a byte for
//! every sequence whose logits are current, and retires finished or cancelled sequences at
//! once, freeing their slot and cache blocks for the next step.
//!
//! The engine runs on any [`Backend`] ([`Engine::start_on`]); its caches are that backend's
//! buffers, allocated once at start. MEGABYTE's global KV cache is one paged pool per layer
//! whose blocks the scheduler's allocator hands out: a running sequence's block table is
//! passed to the decoder before each step, and a finished or preempted sequence's blocks go
//! straight back to the free list, with no copy anywhere.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::config::EngineConfig;
use super::metrics::{Metrics, Outcome, Rejection};
use super::request::{Request, RequestHandle, SubmitError};
use super::scheduler::{Scheduler, SeqId};
use super::sequence::Sequence;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::infer::generate::FinishReason;
use crate::infer::megabyte_decoder::MegabyteDecoder;
use crate::infer::megalodon_stream::MegalodonStream;
use crate::model::megabyte::Megabyte;
use crate::model::megalodon::Megalodon;
use crate::model::{Decoder, ModelShape};

/// How long an idle engine waits for a submission before checking for shutdown.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// A handle on a running engine; clones share it. Dropping every clone lets the engine
/// thread exit once its queued and running requests are done.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    model_id: String,
    model_kind: &'static str,
    context_len: usize,
    cfg: EngineConfig,
    tx: mpsc::Sender<Sequence>,
    ids: AtomicU64,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// State the engine thread and the handles both touch.
struct Shared {
    metrics: Metrics,
    shutting_down: AtomicBool,
}

/// How the cache budget is split, fixed at start.
#[derive(Clone, Copy, Debug)]
struct Sizing {
    /// Decoder slots (sequences running at once).
    slots: usize,
    /// Cache blocks in the pool.
    blocks: usize,
    /// Global positions per block (MEGABYTE); 0 when every sequence holds one block.
    positions_per_block: usize,
    /// MEGABYTE patch size and context (to size a prompt's first reservation).
    patch: usize,
    context: usize,
}

impl Sizing {
    /// Blocks for `positions` cache positions.
    fn blocks_for(&self, positions: usize) -> usize {
        if self.positions_per_block == 0 {
            1
        } else {
            positions.div_ceil(self.positions_per_block)
        }
    }

    /// Blocks a (re)admitted sequence of `len` bytes needs for its whole prefill.
    fn blocks_for_replay(&self, len: usize) -> usize {
        if self.positions_per_block == 0 {
            1
        } else {
            self.blocks_for(len.min(self.context - 1) / self.patch + 1)
        }
    }
}

impl Engine {
    /// [`Engine::start_on`] the CPU backend.
    pub fn start(checkpoint: &Path, cfg: EngineConfig) -> Result<Engine> {
        Self::start_on(Cpu::<f32>::new(), checkpoint, cfg)
    }

    /// Load the checkpoint (MEGABYTE or MEGALODON), size the caches from the budget, log
    /// the sizing on stderr in one line and start the engine thread, which owns `backend`:
    /// the weights and every cache live in its buffers (device memory on a GPU backend).
    pub fn start_on<B: Backend + 'static>(
        backend: B,
        checkpoint: &Path,
        cfg: EngineConfig,
    ) -> Result<Engine> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        let (model_cfg, tensors) = crate::train::trainer::load_checkpoint(checkpoint)?;
        let host = crate::with_model!(&model_cfg, |m| m.layout().host_from_named(&tensors))
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("loading weights from {}", checkpoint.display()))?;
        drop(tensors);
        let model_id = checkpoint
            .canonicalize()
            .unwrap_or_else(|_| checkpoint.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mega".to_string());
        let (sizing, line) = size_caches(&model_cfg, &cfg)?;
        eprintln!("{line}");
        let (model_kind, context_len) = match &model_cfg {
            ModelConfig::Megabyte(c) => ("megabyte", c.max_seq_len),
            ModelConfig::Megalodon(c) => ("megalodon", Megalodon::new(c).max_seq_len()),
        };
        let shared = Arc::new(Shared {
            metrics: Metrics::new(),
            shutting_down: AtomicBool::new(false),
        });
        shared
            .metrics
            .cache_blocks_total
            .store(sizing.blocks as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread_cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("mega-engine".into())
            .spawn(move || {
                engine_main(
                    backend,
                    model_cfg,
                    host,
                    sizing,
                    thread_cfg,
                    thread_shared,
                    rx,
                )
            })
            .context("starting the engine thread")?;
        Ok(Engine {
            inner: Arc::new(Inner {
                model_id,
                model_kind,
                context_len,
                cfg,
                tx,
                ids: AtomicU64::new(1),
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Model id for /v1/models: the checkpoint directory's file name.
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// `"megabyte"` or `"megalodon"`.
    pub fn model_kind(&self) -> &str {
        self.inner.model_kind
    }

    /// The model's context length in bytes (MEGABYTE's window; MEGALODON's training
    /// context, which streaming may exceed).
    pub fn context_len(&self) -> usize {
        self.inner.context_len
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Queue a request; never blocks. Errors map to HTTP: `QueueFull` → 429 + Retry-After,
    /// `Invalid`/`PromptTooLong` → 400, `ShuttingDown` → 503.
    pub fn submit(&self, req: Request) -> Result<RequestHandle, SubmitError> {
        let inner = &self.inner;
        let metrics = &inner.shared.metrics;
        let reject = |why: Rejection, e: SubmitError| {
            metrics.record_rejection(why);
            Err(e)
        };
        if inner.shared.shutting_down.load(Ordering::Acquire) {
            return reject(Rejection::ShuttingDown, SubmitError::ShuttingDown);
        }
        if let Err(e) = req.validate(inner.cfg.max_prompt_bytes, inner.cfg.max_total_bytes) {
            let why = match e {
                SubmitError::PromptTooLong { .. } => Rejection::PromptTooLong,
                _ => Rejection::Invalid,
            };
            return reject(why, e);
        }
        // Count the request as queued before it reaches the thread, so bursts are capped.
        let max = inner.cfg.max_queued as u64;
        let counted = metrics
            .queue_depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max).then_some(q + 1)
            });
        if counted.is_err() {
            return reject(
                Rejection::QueueFull,
                SubmitError::QueueFull { retry_after_s: 1 },
            );
        }
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let seq = match Sequence::new(req, tx) {
            Ok(s) => s,
            Err(e) => {
                metrics.queue_depth.fetch_sub(1, Ordering::AcqRel);
                return reject(Rejection::Invalid, SubmitError::Invalid(e));
            }
        };
        let id = inner.ids.fetch_add(1, Ordering::Relaxed);
        let mut seq = seq;
        seq.id = id;
        if inner.tx.send(seq).is_err() {
            metrics.queue_depth.fetch_sub(1, Ordering::AcqRel);
            return reject(Rejection::ShuttingDown, SubmitError::ShuttingDown);
        }
        metrics.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(RequestHandle { id, events })
    }

    /// Prometheus text exposition of every metric.
    pub fn render_metrics(&self) -> String {
        self.inner.shared.metrics.render()
    }

    /// The shared counters, including the `http_*` ones the HTTP layer bumps.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.shared.metrics
    }

    /// Accept nothing new; queued and running sequences end with `Event::Error`. Waits for
    /// the engine thread to stop.
    pub fn shutdown(&self) {
        self.inner
            .shared
            .shutting_down
            .store(true, Ordering::Release);
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Splits the budget into slots and blocks; returns the sizing and its one-line log.
fn size_caches(model: &ModelConfig, cfg: &EngineConfig) -> Result<(Sizing, String)> {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let budget = cfg.memory_budget_bytes;
    match model {
        ModelConfig::Megabyte(c) => {
            let m = Megabyte::new(c);
            let slot_bytes = MegabyteDecoder::<Cpu<f32>>::slot_bytes(&m);
            let block_bytes =
                MegabyteDecoder::<Cpu<f32>>::global_bytes_per_position(&m) * cfg.block_size;
            // The decoder's throw-away padding row (single-row steps) takes one more slot's
            // local state and one more global block: inside the budget, so the pools
            // allocated are what the budget says.
            let fixed = slot_bytes * (cfg.max_running + 1) + block_bytes;
            let blocks = budget.saturating_sub(fixed) / block_bytes;
            let full = c.patches().div_ceil(cfg.block_size);
            if blocks < full {
                bail!(
                    "cache memory {:.1} MiB is too small: one full-context sequence needs {:.1} MiB \
                     ({full} blocks of {} patches) plus {:.1} MiB for {} slots and the padding row",
                    mib(budget),
                    mib(full * block_bytes),
                    cfg.block_size,
                    mib(fixed),
                    cfg.max_running
                );
            }
            let line = format!(
                "engine: megabyte cache {:.1} MiB = paged global KV pool of {} blocks x {} patches x {:.1} KiB \
                 ({:.1} MiB over all layers, allocated once; a full {}-byte context takes {} blocks) + {} slots x {:.1} KiB \
                 local state, + one block and one slot for padding rows",
                mib(budget),
                blocks,
                cfg.block_size,
                block_bytes as f64 / 1024.0,
                mib(blocks * block_bytes),
                c.max_seq_len,
                full,
                cfg.max_running,
                slot_bytes as f64 / 1024.0
            );
            Ok((
                Sizing {
                    slots: cfg.max_running,
                    blocks,
                    positions_per_block: cfg.block_size,
                    patch: c.patch_size,
                    context: c.max_seq_len,
                },
                line,
            ))
        }
        ModelConfig::Megalodon(c) => {
            let m = Megalodon::new(c);
            let slot_bytes = MegalodonStream::<Cpu<f32>>::slot_bytes(&m);
            let fit = budget / slot_bytes;
            if fit == 0 {
                bail!(
                    "cache memory {:.1} MiB is too small: one MEGALODON stream slot needs {:.1} MiB",
                    mib(budget),
                    mib(slot_bytes)
                );
            }
            let slots = fit.min(cfg.max_running);
            let line = format!(
                "engine: megalodon cache {:.1} MiB = {} stream slots x {:.1} KiB constant state \
                 (budget fits {}, --max-running {})",
                mib(budget),
                slots,
                slot_bytes as f64 / 1024.0,
                fit,
                cfg.max_running
            );
            Ok((
                Sizing {
                    slots,
                    blocks: slots,
                    positions_per_block: 0,
                    patch: 1,
                    context: usize::MAX,
                },
                line,
            ))
        }
    }
}

/// Engine thread entry: builds the model and its caches on `be` and runs the loop.
fn engine_main<B: Backend>(
    be: B,
    model_cfg: ModelConfig,
    host: Vec<Vec<f32>>,
    sizing: Sizing,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Sequence>,
) {
    match &model_cfg {
        ModelConfig::Megabyte(c) => {
            let model = Megabyte::new(c);
            let params = model.layout().upload(&be, &host);
            drop(host);
            let mut dec = MegabyteDecoder::with_pool(
                &model,
                &be,
                &params,
                sizing.slots,
                cfg.block_size,
                sizing.blocks,
            );
            Loop::new(sizing, &cfg, &shared).run(&mut dec, &rx);
        }
        ModelConfig::Megalodon(c) => {
            let model = Megalodon::new(c);
            let params = model.layout().upload(&be, &host);
            drop(host);
            let mut dec = MegalodonStream::new(&model, &be, &params, sizing.slots);
            Loop::new(sizing, &cfg, &shared).run(&mut dec, &rx);
        }
    }
}

/// The scheduler loop's state.
struct Loop<'s> {
    sizing: Sizing,
    prefill_chunk: usize,
    shared: &'s Shared,
    sched: Scheduler,
    seqs: HashMap<SeqId, Sequence>,
    free_slots: Vec<usize>,
}

impl<'s> Loop<'s> {
    fn new(sizing: Sizing, cfg: &EngineConfig, shared: &'s Shared) -> Self {
        Self {
            sizing,
            prefill_chunk: cfg.prefill_chunk,
            shared,
            sched: Scheduler::new(sizing.blocks, sizing.slots),
            seqs: HashMap::new(),
            free_slots: (0..sizing.slots).rev().collect(),
        }
    }

    fn metrics(&self) -> &'s Metrics {
        &self.shared.metrics
    }

    fn run(mut self, dec: &mut dyn Decoder, rx: &mpsc::Receiver<Sequence>) {
        let mut disconnected = false;
        loop {
            if self.shared.shutting_down.load(Ordering::Acquire) {
                self.abort_all(dec, rx, "the engine is shutting down");
                return;
            }
            let idle = self.seqs.is_empty();
            if idle && disconnected {
                return;
            }
            if idle {
                match rx.recv_timeout(IDLE_POLL) {
                    Ok(seq) => self.intake(seq),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        disconnected = true;
                        continue;
                    }
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(seq) => self.intake(seq),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.step(dec);
        }
    }

    /// A new request from a handle.
    fn intake(&mut self, mut seq: Sequence) {
        if seq.req.max_bytes == 0 {
            self.metrics().queue_depth.fetch_sub(1, Ordering::AcqRel);
            seq.finish(FinishReason::Length, self.metrics());
            return;
        }
        self.sched.enqueue(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// One scheduler step.
    fn step(&mut self, dec: &mut dyn Decoder) {
        self.drop_cancelled(dec);
        self.admit(dec);
        let work = self.plan(dec);
        if !work.is_empty() {
            dec.advance(&work);
        }
        self.sample(dec);
        let m = self.metrics();
        m.steps.fetch_add(1, Ordering::Relaxed);
        m.running
            .store(self.sched.running().len() as u64, Ordering::Relaxed);
        let (used, _) = self.sched.blocks_used_total();
        m.cache_blocks_used.store(used as u64, Ordering::Relaxed);
    }

    /// Frees every sequence whose handle was dropped.
    fn drop_cancelled(&mut self, dec: &mut dyn Decoder) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.is_cancelled())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if self.sched.waiting().contains(&id) {
                self.metrics().queue_depth.fetch_sub(1, Ordering::AcqRel);
            }
            self.remove(dec, id);
            self.metrics().record_outcome(Outcome::Cancelled);
        }
    }

    /// Retires `id` and frees its slot.
    fn remove(&mut self, dec: &mut dyn Decoder, id: SeqId) {
        self.sched.retire(id);
        if let Some(seq) = self.seqs.remove(&id) {
            if let Some(slot) = seq.slot {
                dec.remove(slot);
                dec.set_block_table(slot, &[]);
                self.free_slots.push(slot);
            }
        }
    }

    /// Moves waiting sequences into free slots and queues their prompt (and, after a
    /// preemption, the bytes they had already produced).
    fn admit(&mut self, dec: &mut dyn Decoder) {
        let sizing = self.sizing;
        let seqs = &self.seqs;
        let admitted = self.sched.admit(|id| {
            let (prompt, sampled) = seqs[&id].replay();
            sizing.blocks_for_replay(prompt.len() + sampled.len())
        });
        for id in admitted {
            self.metrics().queue_depth.fetch_sub(1, Ordering::AcqRel);
            let slot = self.free_slots.pop().expect("a slot per running sequence");
            let seq = self.seqs.get_mut(&id).expect("admitted sequence exists");
            seq.slot = Some(slot);
            let (prompt, sampled) = seq.replay();
            dec.insert(slot, prompt);
            for &b in sampled {
                dec.push(slot, b);
            }
        }
    }

    /// This step's work per running sequence, oldest first: decoding sequences one byte,
    /// prefilling ones a share of the prefill budget. Reserves the blocks the work needs,
    /// preempting the youngest sequences when the pool runs out.
    fn plan(&mut self, dec: &mut dyn Decoder) -> Vec<(usize, usize)> {
        let mut budget = self.prefill_chunk;
        let mut work = Vec::new();
        let order: Vec<SeqId> = self.sched.running().to_vec();
        for id in order {
            let Some(slot) = self.seqs.get(&id).and_then(|s| s.slot) else {
                continue; // preempted earlier in this loop
            };
            let pending = dec.pending(slot);
            let units = match pending {
                0 => continue,
                1 => 1,
                _ if budget == 0 => continue,
                _ => {
                    let n = pending.min(budget);
                    budget -= n;
                    n
                }
            };
            let need = self.sizing.blocks_for(dec.cache_positions(slot, units));
            let preempted = self.sched.reserve(id, need);
            let preempted_self = preempted.contains(&id);
            for victim in preempted {
                let seq = self
                    .seqs
                    .get_mut(&victim)
                    .expect("preempted sequence exists");
                let vslot = seq.slot.take().expect("a running sequence has a slot");
                dec.remove(vslot);
                dec.set_block_table(vslot, &[]);
                self.free_slots.push(vslot);
                work.retain(|&(s, _)| s != vslot);
                self.metrics().preemptions.fetch_add(1, Ordering::Relaxed);
                self.metrics().queue_depth.fetch_add(1, Ordering::AcqRel);
            }
            if !preempted_self {
                dec.set_block_table(slot, self.sched.blocks_of(id));
                work.push((slot, units));
            }
        }
        work
    }

    /// Samples a byte for every running sequence whose logits are current.
    fn sample(&mut self, dec: &mut dyn Decoder) {
        let order: Vec<SeqId> = self.sched.running().to_vec();
        let mut sampled = 0;
        for id in order {
            let seq = self.seqs.get_mut(&id).expect("running sequence exists");
            let slot = seq.slot.expect("a running sequence has a slot");
            if dec.pending(slot) > 0 {
                continue;
            }
            let (byte, done) = seq.sample(dec.slot_logits(slot), &self.shared.metrics);
            sampled += 1;
            if done {
                self.remove(dec, id);
            } else {
                dec.push(slot, byte);
            }
        }
        if sampled > 0 {
            self.metrics().add_generated(sampled);
        }
    }

    /// Ends every sequence with an error (shutdown) and refuses what is still in the channel.
    fn abort_all(&mut self, dec: &mut dyn Decoder, rx: &mpsc::Receiver<Sequence>, why: &str) {
        while let Ok(seq) = rx.try_recv() {
            self.intake(seq);
        }
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            if self.sched.waiting().contains(&id) {
                self.metrics().queue_depth.fetch_sub(1, Ordering::AcqRel);
            }
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.abort(why, &self.shared.metrics);
            }
            self.remove(dec, id);
        }
        let m = self.metrics();
        m.running.store(0, Ordering::Relaxed);
        m.cache_blocks_used.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MegabyteConfig;

    /// The caches the MEGABYTE decoder allocates for a sizing — the padding row's block and
    /// slot included — fit the budget they were sized from, at budgets from the smallest
    /// accepted to a roomy one and at several block sizes.
    #[test]
    fn megabyte_caches_with_their_padding_fit_the_budget() {
        let c = MegabyteConfig::preset("tiny").unwrap();
        let model = Megabyte::new(&c);
        let be = Cpu::<f32>::new();
        let params = model.layout.upload(&be, &model.layout.init_host(1));
        for block_size in [1, 3, 16] {
            let mut accepted = 0;
            for budget_kib in [64, 256, 1024, 4096] {
                let cfg = EngineConfig {
                    max_running: 4,
                    block_size,
                    memory_budget_bytes: budget_kib << 10,
                    ..EngineConfig::default()
                };
                let Ok((sizing, _)) = size_caches(&ModelConfig::Megabyte(c.clone()), &cfg) else {
                    continue;
                };
                accepted += 1;
                let dec = MegabyteDecoder::with_pool(
                    &model,
                    &be,
                    &params,
                    sizing.slots,
                    block_size,
                    sizing.blocks,
                );
                assert!(
                    dec.cache_bytes() <= cfg.memory_budget_bytes,
                    "block size {block_size}, budget {budget_kib} KiB: allocated {} bytes",
                    dec.cache_bytes()
                );
            }
            assert!(
                accepted >= 2,
                "block size {block_size}: budgets too small for the test"
            );
        }
    }
}
