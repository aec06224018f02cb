//! What a client hands the engine and what it gets back.

use crate::infer::generate::FinishReason;
use crate::infer::sampler::SamplingParams;

/// Most alternatives a request may ask for per byte in `logprobs`.
pub const MAX_LOGPROBS: usize = 5;

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt bytes.
    pub prompt: Vec<u8>,
    /// Bytes to generate at most (OpenAI `max_tokens`, counted in bytes).
    pub max_bytes: usize,
    /// Temperature, top-k, top-p and seed; each request samples with its own stream.
    pub sampling: SamplingParams,
    /// Stop sequences (not included in the output).
    pub stop: Vec<Vec<u8>>,
    /// `Some(k)`: per released byte its log-probability and the `k` (≤ 5) most likely bytes.
    pub logprobs: Option<usize>,
}

/// One released byte's log-probability under the model (temperature 1, unfiltered) and the
/// most likely alternatives, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct ByteLogprob {
    /// The byte released.
    pub byte: u8,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The `k` most likely bytes and their log-probabilities.
    pub top: Vec<(u8, f32)>,
}

/// What a sequence reports, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Bytes that are final (never part of a possible stop sequence), in order;
    /// `logprobs.len() == bytes.len()` when requested.
    Bytes {
        /// The bytes.
        bytes: Vec<u8>,
        /// One entry per byte when the request asked for log-probabilities.
        logprobs: Option<Vec<ByteLogprob>>,
    },
    /// Last event of a sequence that finished normally.
    Done {
        /// Stop sequence or byte budget.
        finish_reason: FinishReason,
        /// Prompt length in bytes.
        prompt_bytes: usize,
        /// Bytes released (stop sequence excluded).
        completion_bytes: usize,
    },
    /// The sequence was aborted (shutdown, internal error); last event.
    Error(String),
}

/// Receives a sequence's events. Dropping it cancels the sequence: the engine notices at its
/// next step and frees the sequence's cache at once.
#[derive(Debug)]
pub struct RequestHandle {
    /// Engine-wide request number.
    pub id: u64,
    /// The events; sync callers use `events.blocking_recv()`.
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
}

/// Why a request was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too many requests waiting (HTTP 429).
    #[error("too many requests queued; retry in {retry_after_s} s")]
    QueueFull {
        /// Suggested wait before retrying.
        retry_after_s: u64,
    },
    /// The prompt exceeds the engine's limit (HTTP 400).
    #[error("prompt longer than the {max}-byte limit")]
    PromptTooLong {
        /// The limit in bytes.
        max: usize,
    },
    /// A parameter is out of range (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The engine is stopping (HTTP 503).
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl Request {
    /// Checks the request against the engine's limits; the message names the bad field.
    pub fn validate(
        &self,
        max_prompt_bytes: usize,
        max_total_bytes: usize,
    ) -> Result<(), SubmitError> {
        if self.prompt.len() > max_prompt_bytes {
            return Err(SubmitError::PromptTooLong {
                max: max_prompt_bytes,
            });
        }
        self.sampling
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(SubmitError::Invalid(format!("stop sequence #{i} is empty")));
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(SubmitError::Invalid(format!(
                    "logprobs must be at most {MAX_LOGPROBS}, got {k}"
                )));
            }
        }
        let total = self.prompt.len().saturating_add(self.max_bytes);
        if total > max_total_bytes {
            return Err(SubmitError::Invalid(format!(
                "prompt ({} bytes) + max_tokens ({}) exceeds the {max_total_bytes}-byte limit",
                self.prompt.len(),
                self.max_bytes
            )));
        }
        Ok(())
    }
}
