//! The OpenAI-compatible HTTP front end of `mega serve` (axum on tokio): `/v1/completions`
//! (JSON or server-sent events), `/v1/models`, `/health` and `/metrics`, with OpenAI-style
//! error bodies for every failure. It talks to the generation engine only through
//! [`crate::serve::Engine`].

pub mod completions;
pub mod error;
pub mod info;
pub mod metrics;
pub mod request;
pub mod response;
pub mod state;
pub mod utf8_text;

pub use error::ApiError;
pub use state::{AppState, HttpConfig};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tower_http::catch_panic::CatchPanicLayer;

/// The application: every route, the body limit, status counting and the panic layer.
pub fn router(app: Arc<AppState>) -> Router {
    router_with(app, Router::new())
}

/// [`router`] with `extra` routes merged in under the same layers (tests use it to add a
/// handler that panics; no production route goes through it).
#[doc(hidden)]
pub fn router_with(app: Arc<AppState>, extra: Router<Arc<AppState>>) -> Router {
    let on_panic = {
        let app = app.clone();
        move |_: Box<dyn std::any::Any + Send + 'static>| {
            app.metrics.record_panic();
            app.metrics.record_status(500);
            app.engine.metrics().record_http_status(500);
            ApiError::internal("The server hit an internal error while handling this request")
                .into_response()
        }
    };
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(info::models))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .merge(extra)
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), count_status))
        .layer(CatchPanicLayer::custom(on_panic))
        .with_state(app)
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    ApiError::unknown_route(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

async fn count_status(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    app.metrics.record_status(status);
    app.engine.metrics().record_http_status(status);
    resp
}

/// Serve on `listener` until SIGINT or SIGTERM; then shut down as [`serve_until`] does.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<AppState>) -> std::io::Result<()> {
    serve_until(listener, app, shutdown_signal()).await
}

/// Serve on `listener` until `signal` resolves; then stop listening (new connections are
/// refused), answer requests still arriving on open connections with 503 `shutting_down`,
/// stop the engine (running sequences end: a stream with an error event and `[DONE]`, a
/// plain request with a 503), and return once every open response has finished.
#[doc(hidden)]
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    app: Arc<AppState>,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let on_signal = app.clone();
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move {
            signal.await;
            eprintln!("shutting down: refusing new requests, cancelling running sequences");
            on_signal.begin_shutdown();
        })
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
