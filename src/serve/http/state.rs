//! What every handler shares: the engine, the limits and the HTTP counters.

use super::metrics::HttpMetrics;
use super::request::RequestLimits;
use crate::serve::Engine;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// HTTP-side limits (the engine has its own in `EngineConfig`).
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Completion requests served at once; more get 429 with `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest prompt in bytes (the engine's `max_prompt_bytes`).
    pub max_prompt_bytes: usize,
    /// Longest prompt + `max_tokens` (the engine's `max_total_bytes`).
    pub max_total_bytes: usize,
}

/// Shared server state.
pub struct AppState {
    /// The generation engine.
    pub engine: Engine,
    /// HTTP limits.
    pub config: HttpConfig,
    /// Request limits derived from the config and the model.
    pub limits: RequestLimits,
    /// HTTP counters.
    pub metrics: Arc<HttpMetrics>,
    /// One permit per completion request being served.
    pub slots: Arc<Semaphore>,
    shutting_down: AtomicBool,
}

impl AppState {
    /// State for `engine` under `config`.
    pub fn new(engine: Engine, config: HttpConfig) -> Self {
        let limits = RequestLimits {
            model_id: engine.model_id().to_string(),
            max_prompt_bytes: config.max_prompt_bytes,
            max_total_bytes: config.max_total_bytes,
        };
        Self {
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            engine,
            config,
            limits,
            metrics: Arc::new(HttpMetrics::default()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Refuse new completions from now on and stop the engine.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.engine.shutdown();
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
