//! One request inside the engine: its output state, its client channel and its timings.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{Metrics, Outcome};
use super::request::{ByteLogprob, Event, Request};
use crate::infer::generate::{Continuation, FinishReason};
use crate::infer::sampler::log_probs;

/// A request being served.
pub struct Sequence {
    /// Engine-wide request number.
    pub id: u64,
    /// The request.
    pub req: Request,
    /// Sampling, stop filter and budget.
    pub cont: Continuation,
    /// Where the events go.
    pub tx: UnboundedSender<Event>,
    /// Decoder slot while running.
    pub slot: Option<usize>,
    /// When it was submitted.
    pub submitted: Instant,
    /// When its previous byte was sampled.
    last_sample: Option<Instant>,
    /// When its first byte was released.
    first_release: Option<Instant>,
    /// Log-probabilities of sampled bytes not yet released, oldest first.
    unreleased: VecDeque<ByteLogprob>,
}

impl Sequence {
    /// A sequence for a validated request.
    pub fn new(req: Request, tx: UnboundedSender<Event>) -> Result<Self, String> {
        let cont = Continuation::new(req.sampling, req.stop.clone(), req.max_bytes)?;
        Ok(Self {
            id: 0,
            req,
            cont,
            tx,
            slot: None,
            submitted: Instant::now(),
            last_sample: None,
            first_release: None,
            unreleased: VecDeque::new(),
        })
    }

    /// The bytes a (re)admitted sequence must run through the model: its prompt, then every
    /// byte it has sampled so far.
    pub fn replay(&self) -> (&[u8], &[u8]) {
        (&self.req.prompt, self.cont.sampled())
    }

    /// True when the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// Samples one byte from `logits`, sends the bytes this releases, and returns the byte
    /// and whether the sequence has finished (its `Done` event then sent).
    pub fn sample(&mut self, logits: &[f32], metrics: &Metrics) -> (u8, bool) {
        let now = Instant::now();
        if let Some(prev) = self.last_sample {
            metrics.per_byte.observe(now.duration_since(prev));
        }
        self.last_sample = Some(now);
        let before = self.cont.released().len();
        let byte = self.cont.sample(logits);
        if let Some(k) = self.req.logprobs {
            self.unreleased.push_back(byte_logprob(logits, byte, k));
        }
        let released = &self.cont.released()[before..];
        if !released.is_empty() {
            if self.first_release.is_none() {
                self.first_release = Some(now);
                metrics.ttfb.observe(now.duration_since(self.submitted));
            }
            let logprobs = self
                .req
                .logprobs
                .map(|_| self.unreleased.drain(..released.len()).collect());
            let _ = self.tx.send(Event::Bytes {
                bytes: released.to_vec(),
                logprobs,
            });
        }
        match self.cont.finish_reason() {
            Some(reason) => {
                self.finish(reason, metrics);
                (byte, true)
            }
            None => (byte, false),
        }
    }

    /// Sends `Done` (for a request that finishes without sampling, e.g. `max_bytes = 0`,
    /// or after the last byte).
    pub fn finish(&mut self, reason: FinishReason, metrics: &Metrics) {
        let _ = self.tx.send(Event::Done {
            finish_reason: reason,
            prompt_bytes: self.req.prompt.len(),
            completion_bytes: self.cont.released().len(),
        });
        metrics.record_outcome(Outcome::Finished(reason));
    }

    /// Sends `Error` (shutdown, internal failure).
    pub fn abort(&mut self, message: &str, metrics: &Metrics) {
        let _ = self.tx.send(Event::Error(message.to_string()));
        metrics.record_outcome(Outcome::Error);
    }
}

/// `byte`'s log-probability under `logits` and the `k` most likely bytes (ties: lower byte).
fn byte_logprob(logits: &[f32], byte: u8, k: usize) -> ByteLogprob {
    let lp = log_probs(logits);
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    ByteLogprob {
        byte,
        logprob: lp[byte as usize],
        top: order.iter().take(k).map(|&i| (i as u8, lp[i])).collect(),
    }
}
