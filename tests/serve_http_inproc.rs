//! The HTTP layer in process (no `mega serve` child): the panic-catching layer, and what
//! clients see during a graceful shutdown.
//!
//! Shutdown contract (README, "Serving"): once the signal arrives the server stops listening,
//! so new connections are refused; a request that still arrives on an open connection gets
//! 503 `shutting_down`; running sequences are ended at once — a stream with an error event
//! (code `shutting_down`) followed by `data: [DONE]`, a plain request with a 503 — and the
//! server returns when every open response has been written.

#[path = "support/checkpoint.rs"]
mod checkpoint;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use mega::config::{FeedForward, MegabyteConfig, ModelConfig};
use mega::model::megabyte::Megabyte;
use mega::serve::http::{router_with, serve_until, AppState, HttpConfig};
use mega::serve::{Engine, EngineConfig};
use serde_json::{json, Value};

fn start_engine(dir: &Path) -> Engine {
    let cfg = MegabyteConfig {
        vocab_size: 256,
        patch_size: 4,
        max_seq_len: 64,
        global_byte_dim: 16,
        global_dim: 32,
        global_layers: 1,
        global_heads: 2,
        local_dim: 32,
        local_layers: 1,
        local_heads: 2,
        ffn_mult: 2,
        activation: FeedForward::Relu,
        init_std: 0.1,
        head_bias: true,
    };
    let model = Megabyte::new(&cfg);
    checkpoint::write_checkpoint(dir, &ModelConfig::Megabyte(cfg), &model, 5);
    let ecfg = EngineConfig {
        memory_budget_bytes: 4 << 20,
        max_running: 4,
        block_size: 4,
        ..EngineConfig::default()
    };
    Engine::start(dir, ecfg).unwrap()
}

fn app_state(engine: Engine) -> Arc<AppState> {
    let cfg = engine.config().clone();
    Arc::new(AppState::new(
        engine,
        HttpConfig {
            max_concurrent_requests: 16,
            max_body_bytes: 1 << 20,
            max_prompt_bytes: cfg.max_prompt_bytes,
            max_total_bytes: cfg.max_total_bytes,
        },
    ))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

fn error_code(body: &Value) -> &str {
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    body["error"]["message"].as_str().expect("an error message");
    body["error"]["code"].as_str().expect("an error code")
}

async fn planted_panic() -> &'static str {
    panic!("planted panic (tests/serve_http_inproc.rs)")
}

async fn bind() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_the_server_keeps_serving_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_state(start_engine(dir.path()));
    let extra = Router::new().route("/test/panic", get(planted_panic));
    let router = router_with(app.clone(), extra);
    let (listener, addr) = bind().await;
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");

    for _ in 0..2 {
        let resp = http.get(url("/test/panic")).send().await.unwrap();
        assert_eq!(resp.status(), 500);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(error_code(&body), "internal_error");
    }
    // Still serving: health, and a real completion.
    assert_eq!(http.get(url("/health")).send().await.unwrap().status(), 200);
    let resp = http
        .post(url("/v1/completions"))
        .json(&json!({"prompt": "It was", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 5);

    let m = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&m, "mega_http_panics_total"), 2.0);
    assert_eq!(
        metric(&m, "mega_http_responses_total{code=\"500\"}"),
        2.0,
        "each panic answered once with a 500"
    );
    server.abort();
    app.engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_shutdown_running_requests_end_cleanly_and_new_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_state(start_engine(dir.path()));
    let (listener, addr) = bind().await;
    let (fire, signal) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_until(listener, app.clone(), async move {
        let _ = signal.await;
    }));
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let long = |stream: bool| json!({"prompt": "It", "max_tokens": 1_000_000, "stream": stream});

    // One stream and one plain request, both running.
    let resp = http
        .post(url("/v1/completions"))
        .json(&long(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut body = stream.next().await.unwrap().unwrap().to_vec();
    let plain = tokio::spawn({
        let (http, u) = (http.clone(), url("/v1/completions"));
        let req = long(false);
        async move {
            let resp = http.post(u).json(&req).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    });
    let start = Instant::now();
    while metric(&app.engine.render_metrics(), "mega_running_sequences") < 2.0 {
        assert!(start.elapsed() < Duration::from_secs(20), "both never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    fire.send(()).unwrap();

    // The stream ends with a shutting_down error event, then [DONE].
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    let error: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error_code(&error), "shutting_down");
    // The plain request gets a 503 with the OpenAI error body.
    let (status, body) = plain.await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(error_code(&body), "shutting_down");

    // Open responses done: the server returns, and new connections are refused, not left
    // hanging in a backlog nobody accepts from.
    let finished = tokio::time::timeout(Duration::from_secs(20), server).await;
    finished
        .expect("the server returns once open responses are done")
        .unwrap()
        .unwrap();
    let connect =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .expect("a refused connection fails at once");
    assert_eq!(
        connect.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_on_an_open_connection_during_shutdown_get_503() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_state(start_engine(dir.path()));
    let router = router_with(app.clone(), Router::new());
    let (listener, addr) = bind().await;
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    assert_eq!(http.get(url("/health")).send().await.unwrap().status(), 200);

    // What the signal handler runs first; the listener is still open here, as a connection
    // accepted just before the signal would be.
    app.begin_shutdown();
    let resp = http
        .post(url("/v1/completions"))
        .json(&json!({"prompt": "It", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(&resp.json().await.unwrap()), "shutting_down");
    let health = http.get(url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let m = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metric(&m, "mega_http_responses_total{code=\"503\"}") >= 2.0);
    server.abort();
}
