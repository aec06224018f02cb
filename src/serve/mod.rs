//! Serving: a continuous-batching engine on its own thread (MEGABYTE and MEGALODON), its cache
//! manager and metrics, and `mega batch` (offline inference over a JSONL file). The HTTP layer
//! (`mega serve`) talks to the engine only through [`Engine`], [`Request`] and [`Event`].

pub mod batch;
pub mod block_allocator;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod request;
pub mod scheduler;
pub mod sequence;

pub use crate::infer::generate::FinishReason;
pub use crate::infer::sampler::SamplingParams;
pub use config::{parse_byte_size, EngineArgs, EngineConfig};
pub use engine::Engine;
pub use metrics::Metrics;
pub use request::{ByteLogprob, Event, Request, RequestHandle, SubmitError};
