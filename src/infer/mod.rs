//! Inference utilities that do not depend on a model: next-byte sampling and stop sequences.

pub mod sampler;
pub mod stop;

pub use sampler::{log_probs, Sampler, SamplingError, SamplingParams};
pub use stop::{StopError, StopFilter, StopMatcher, StopState};
