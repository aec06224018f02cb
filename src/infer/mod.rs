//! Inference: next-byte sampling, stop sequences, the KV-cached MEGABYTE decoder, the
//! streaming MEGALODON decoder and the generation loop.

pub mod sampler;
pub mod stop;

pub use sampler::{log_probs, Sampler, SamplingError, SamplingParams};
pub use stop::{StopError, StopFilter, StopMatcher, StopState};

pub mod generate;
pub mod megabyte_decoder;
pub mod megalodon_stream;
