//! `POST /v1/completions`: validation, submission of one engine request per choice, and the
//! answer as one JSON body or as server-sent events.
//!
//! Every choice owns its engine [`RequestHandle`]; when the client goes away axum drops the
//! handler future or the event stream, which drops the handles, and the engine frees their
//! cache blocks at its next step.

use super::error::ApiError;
use super::metrics::HttpMetrics;
use super::request::CompletionParams;
use super::response::{
    completion_id, finish_reason_str, unix_now, ChoiceBody, Completion, CompletionChunk, Logprobs,
    Usage,
};
use super::state::AppState;
use super::utf8_text::Utf8Text;
use crate::infer::sampler::SamplingParams;
use crate::serve::{ByteLogprob, Event, FinishReason, Request, RequestHandle, SubmitError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// The route handler.
pub async fn completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(app, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    app: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(app.config.max_body_bytes)
        } else {
            ApiError::bad_json(format!(
                "Could not read the request body: {}",
                r.body_text()
            ))
        }
    })?;
    if app.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let params = CompletionParams::parse(&body, &app.limits)?;
    let permit = app
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::too_many_requests(app.config.max_concurrent_requests))?;
    let runs = submit_all(&app, &params)?;
    if params.stream {
        app.metrics.record_stream();
        Ok(stream_response(app, params, runs, permit))
    } else {
        let done = collect(&app, &params, runs).await?;
        drop(permit);
        Ok(axum::Json(done).into_response())
    }
}

/// One choice: its prompt and the engine request producing it (`None` when `max_tokens` is 0:
/// nothing to generate).
struct ChoiceRun {
    index: usize,
    prompt: usize,
    handle: Option<RequestHandle>,
}

/// Submit every choice; on the first refusal the handles already obtained are dropped, which
/// cancels them.
fn submit_all(app: &AppState, p: &CompletionParams) -> Result<Vec<ChoiceRun>, ApiError> {
    let base_seed = p.seed.unwrap_or_else(rand::random);
    let mut runs = Vec::with_capacity(p.prompts.len() * p.n);
    for (pi, prompt) in p.prompts.iter().enumerate() {
        for j in 0..p.n {
            let handle = if p.max_bytes == 0 {
                None
            } else {
                let req = Request {
                    prompt: prompt.clone(),
                    max_bytes: p.max_bytes,
                    sampling: SamplingParams {
                        temperature: p.temperature,
                        top_k: p.top_k,
                        top_p: p.top_p,
                        seed: base_seed.wrapping_add(j as u64),
                    },
                    stop: p.stop.clone(),
                    logprobs: p.logprobs,
                };
                Some(app.engine.submit(req).map_err(submit_error)?)
            };
            runs.push(ChoiceRun {
                index: pi * p.n + j,
                prompt: pi,
                handle,
            });
        }
    }
    Ok(runs)
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after_s } => ApiError::queue_full(retry_after_s),
        SubmitError::PromptTooLong { max } => ApiError::invalid(
            "prompt",
            "prompt_too_long",
            format!("The prompt is longer than the {max} bytes this server accepts"),
        ),
        SubmitError::Invalid(m) => ApiError::invalid("prompt", "invalid_value", m),
        SubmitError::ShuttingDown => ApiError::shutting_down(),
    }
}

/// An aborted sequence: 503 while shutting down, else 500.
fn aborted(app: &AppState, message: &str) -> ApiError {
    if app.is_shutting_down() {
        ApiError::shutting_down()
    } else {
        ApiError::internal(format!("Generation failed: {message}"))
    }
}

/// Counts a disconnect unless [`Finished::finish`] ran before the drop.
struct Finished {
    metrics: Arc<HttpMetrics>,
    finished: bool,
}

impl Finished {
    fn new(metrics: &Arc<HttpMetrics>) -> Self {
        Self {
            metrics: metrics.clone(),
            finished: false,
        }
    }

    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.record_disconnect();
        }
    }
}

/// What one choice produced.
struct ChoiceOutput {
    bytes: Vec<u8>,
    logprobs: Vec<ByteLogprob>,
    finish_reason: FinishReason,
}

async fn run_to_end(handle: Option<RequestHandle>) -> Result<ChoiceOutput, String> {
    let mut out = ChoiceOutput {
        bytes: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: FinishReason::Length,
    };
    let Some(mut handle) = handle else {
        return Ok(out);
    };
    loop {
        match handle.events.recv().await {
            Some(Event::Bytes { bytes, logprobs }) => {
                out.bytes.extend_from_slice(&bytes);
                out.logprobs.extend(logprobs.into_iter().flatten());
            }
            Some(Event::Done { finish_reason, .. }) => {
                out.finish_reason = finish_reason;
                return Ok(out);
            }
            Some(Event::Error(m)) => return Err(m),
            None => return Err("the engine dropped the request".into()),
        }
    }
}

async fn collect(
    app: &Arc<AppState>,
    p: &CompletionParams,
    runs: Vec<ChoiceRun>,
) -> Result<Completion, ApiError> {
    let _in_flight = app.metrics.in_flight();
    let mut finished = Finished::new(&app.metrics);
    let prompts: Vec<usize> = runs.iter().map(|r| r.prompt).collect();
    let outputs =
        futures_util::future::join_all(runs.into_iter().map(|r| run_to_end(r.handle))).await;
    finished.finish();
    let mut choices = Vec::with_capacity(outputs.len());
    let mut completion_bytes = 0;
    for (index, (out, pi)) in outputs.into_iter().zip(prompts).enumerate() {
        let out = out.map_err(|m| aborted(app, &m))?;
        completion_bytes += out.bytes.len();
        let prompt: &[u8] = if p.echo { &p.prompts[pi] } else { &[] };
        let all = [prompt, &out.bytes].concat();
        let logprobs = p.logprobs.map(|_| {
            let mut lp = Logprobs::default();
            let mut offset = 0;
            lp.push_prompt(prompt, &mut offset);
            lp.push_generated(&out.logprobs, &mut offset);
            lp
        });
        let mut choice = ChoiceBody::new(
            index,
            String::from_utf8_lossy(&all).into_owned(),
            &all,
            logprobs,
        );
        choice.finish_reason = Some(finish_reason_str(out.finish_reason));
        choices.push(choice);
    }
    app.metrics.record_completion_bytes(completion_bytes);
    let prompt_bytes = p.prompts.iter().map(Vec::len).sum();
    Ok(Completion {
        id: completion_id(),
        object: "text_completion",
        created: unix_now(),
        model: app.limits.model_id.clone(),
        choices,
        usage: Usage::new(prompt_bytes, completion_bytes),
    })
}

/// A choice's events, ending after its `Done` or `Error`; a channel closed early becomes an
/// `Error`.
fn choice_events(run: ChoiceRun) -> BoxStream<'static, (usize, Event)> {
    let index = run.index;
    match run.handle {
        None => stream::iter([(
            index,
            Event::Done {
                finish_reason: FinishReason::Length,
                prompt_bytes: 0,
                completion_bytes: 0,
            },
        )])
        .boxed(),
        Some(handle) => stream::unfold(Some(handle), move |state| async move {
            let mut handle = state?;
            let ev = handle
                .events
                .recv()
                .await
                .unwrap_or_else(|| Event::Error("the engine dropped the request".into()));
            let last = !matches!(ev, Event::Bytes { .. });
            Some(((index, ev), (!last).then_some(handle)))
        })
        .boxed(),
    }
}

/// Per-choice streaming state.
struct StreamedChoice {
    prompt: usize,
    text: Utf8Text,
    offset: usize,
}

fn stream_response(
    app: Arc<AppState>,
    p: CompletionParams,
    runs: Vec<ChoiceRun>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let id = completion_id();
    let created = unix_now();
    let model = app.limits.model_id.clone();
    let chunk = move |choices: Vec<ChoiceBody>, usage: Option<Usage>, with_usage: bool| {
        let c = CompletionChunk {
            id: &id,
            object: "text_completion",
            created,
            model: &model,
            choices,
            usage: with_usage.then_some(usage),
        };
        SseEvent::default().data(serde_json::to_string(&c).expect("chunks serialize"))
    };
    let events = async_stream::stream! {
        let _permit = permit;
        let _in_flight = app.metrics.in_flight();
        let mut finished = Finished::new(&app.metrics);
        let mut state: Vec<StreamedChoice> = runs
            .iter()
            .map(|r| StreamedChoice { prompt: r.prompt, text: Utf8Text::new(), offset: 0 })
            .collect();
        if p.echo {
            for (index, c) in state.iter_mut().enumerate() {
                let prompt = &p.prompts[c.prompt];
                let logprobs = p.logprobs.map(|_| {
                    let mut lp = Logprobs::default();
                    lp.push_prompt(prompt, &mut c.offset);
                    lp
                });
                let text = c.text.push(prompt);
                let body = ChoiceBody::new(index, text, prompt, logprobs);
                yield Ok::<_, Infallible>(chunk(vec![body], None, p.include_usage));
            }
        }
        let mut merged = stream::select_all(runs.into_iter().map(choice_events));
        let mut completion_bytes = 0;
        let mut failure = None;
        while let Some((index, ev)) = merged.next().await {
            let c = &mut state[index];
            match ev {
                Event::Bytes { bytes, logprobs } => {
                    completion_bytes += bytes.len();
                    app.metrics.record_completion_bytes(bytes.len());
                    let logprobs = p.logprobs.map(|_| {
                        let mut lp = Logprobs::default();
                        lp.push_generated(logprobs.as_deref().unwrap_or(&[]), &mut c.offset);
                        lp
                    });
                    let text = c.text.push(&bytes);
                    let body = ChoiceBody::new(index, text, &bytes, logprobs);
                    yield Ok(chunk(vec![body], None, p.include_usage));
                }
                Event::Done { finish_reason, .. } => {
                    let text = c.text.finish();
                    let logprobs = p.logprobs.map(|_| Logprobs::default());
                    let mut body = ChoiceBody::new(index, text, &[], logprobs);
                    body.finish_reason = Some(finish_reason_str(finish_reason));
                    yield Ok(chunk(vec![body], None, p.include_usage));
                }
                Event::Error(m) => {
                    failure = Some(aborted(&app, &m));
                    break;
                }
            }
        }
        // Cancel whatever still runs (after an error) before the last events go out.
        drop(merged);
        match failure {
            Some(e) => yield Ok(SseEvent::default().data(e.body().to_string())),
            None if p.include_usage => {
                let prompt_bytes = p.prompts.iter().map(Vec::len).sum();
                let usage = Usage::new(prompt_bytes, completion_bytes);
                yield Ok(chunk(Vec::new(), Some(usage), true));
            }
            None => {}
        }
        finished.finish();
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Sse::new(events).into_response()
}
