//! `GET /v1/models`, `GET /health` and `GET /metrics`.

use super::response::unix_now;
use super::state::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;

/// The one served model, OpenAI-shaped.
pub async fn models(State(app): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": app.engine.model_id(),
            "object": "model",
            "created": unix_now(),
            "owned_by": "mega",
            "kind": app.engine.model_kind(),
        }],
    }))
    .into_response()
}

/// 200 while serving, 503 once shutdown has begun.
pub async fn health(State(app): State<Arc<AppState>>) -> Response {
    let (status, state) = if app.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        (StatusCode::OK, "ok")
    };
    (
        status,
        axum::Json(json!({
            "status": state,
            "model": app.engine.model_id(),
            "kind": app.engine.model_kind(),
        })),
    )
        .into_response()
}

/// The engine's Prometheus text followed by the HTTP counters.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut text = app.engine.render_metrics();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&app.metrics.render());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
