//! `mega serve` end to end over loopback: each test starts the real binary on a free port with
//! a tiny checkpoint trained here in a few steps, talks HTTP to it and kills it at the end.
//! Expected bytes come from `mega generate`, an independent path (no engine, no HTTP).

use base64::Engine as _;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PROMPTS: [&str; 4] = [
    "It was the best",
    "the age of",
    "It",
    "wisdom, it was the worst of times, ",
];

/// Train a tiny checkpoint for 3 steps in `dir/name` with `model_args` (`--config F` or
/// `--model M --preset P`).
fn train_tiny(dir: &Path, name: &str, model_args: &[&std::ffi::OsStr]) -> PathBuf {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness.\n"
        .repeat(40);
    let data = dir.join("corpus.txt");
    std::fs::write(&data, text).unwrap();
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_mega"))
        .arg("train")
        .args(model_args)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--warmup",
            "1",
            "--seq-len",
            "32",
        ])
        .args(["--quiet", "--sample-bytes", "0", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A MEGABYTE checkpoint (tiny preset with a 128-byte context), shared by the tests.
fn checkpoint() -> &'static Path {
    static CK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &CK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = mega::config::MegabyteConfig::preset("tiny").unwrap();
        cfg.max_seq_len = 128;
        let config = dir.path().join("model.json");
        std::fs::write(
            &config,
            mega::config::ModelConfig::Megabyte(cfg)
                .to_json()
                .to_string(),
        )
        .unwrap();
        let out = train_tiny(
            dir.path(),
            "tiny-megabyte",
            &["--config".as_ref(), config.as_os_str()],
        );
        (dir, out)
    })
    .1
}

/// A MEGALODON checkpoint (tiny preset).
fn megalodon_checkpoint() -> &'static Path {
    static CK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &CK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--model", "megalodon", "--preset", "tiny"].map(std::ffi::OsStr::new);
        let out = train_tiny(dir.path(), "tiny-megalodon", &args);
        (dir, out)
    })
    .1
}

/// A running `mega serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    /// The served model id (the checkpoint directory's name).
    model: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_on(checkpoint(), extra)
    }

    fn start_on(ck: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mega"))
            .args(["--threads", "1", "serve", "--port", "0", "--checkpoint"])
            .arg(ck)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mega serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let base = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("mega serve exited before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(at) = line.find(" on http://") {
                let url = line[at + 4..].split_whitespace().next().unwrap();
                break url.trim_end_matches("/v1").to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        let model = ck.file_name().unwrap().to_string_lossy().into_owned();
        Server { child, base, model }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server exited"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Sampling settings of one expected generation.
#[derive(Clone, Debug)]
struct Case {
    prompt: &'static str,
    seed: u64,
    max_bytes: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    stop: Option<&'static str>,
}

/// What `mega generate` prints for `case` (prompt and trailing newline removed).
fn generate_cli(ck: &Path, case: &Case) -> Vec<u8> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mega"));
    cmd.args(["--threads", "1", "generate", "--checkpoint"])
        .arg(ck)
        .args(["--prompt", case.prompt])
        .args(["--seed", &case.seed.to_string()])
        .args(["--max-bytes", &case.max_bytes.to_string()])
        .args(["--temperature", &case.temperature.to_string()])
        .args(["--top-k", &case.top_k.to_string()])
        .args(["--top-p", &case.top_p.to_string()]);
    if let Some(s) = case.stop {
        cmd.args(["--stop", s]);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = o.stdout;
    assert!(out.starts_with(case.prompt.as_bytes()) && out.ends_with(b"\n"));
    out[case.prompt.len()..out.len() - 1].to_vec()
}

fn request_body(model: &str, case: &Case, n: usize, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "prompt": case.prompt,
        "max_tokens": case.max_bytes,
        "temperature": case.temperature,
        "top_k": case.top_k,
        "top_p": case.top_p,
        "seed": case.seed,
        "n": n,
        "stream": stream,
        "user": "ignored-extra-field",
    });
    if let Some(s) = case.stop {
        body["stop"] = json!([s]);
    }
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The bytes of each choice from a non-streaming answer, after checking its shape.
fn choices_of_json(v: &Value, model: &str, n: usize) -> Vec<Vec<u8>> {
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(v["created"].as_u64().is_some());
    assert_eq!(v["model"], model);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), n);
    let mut out = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let bytes = b64(c["bytes_b64"].as_str().unwrap());
        assert_eq!(c["text"], String::from_utf8_lossy(&bytes).as_ref());
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
        out.push(bytes);
    }
    let total: usize = out.iter().map(Vec::len).sum();
    assert_eq!(v["usage"]["completion_tokens"], total);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    out
}

/// Read a server-sent event stream to its end: the `data:` payloads in order.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// The bytes of each choice from a stream, after checking every chunk's shape, the text never
/// splitting a character, the final chunks and `[DONE]`.
fn choices_of_stream(events: &[String], model: &str, n: usize) -> Vec<Vec<u8>> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut bytes = vec![Vec::new(); n];
    let mut text = vec![String::new(); n];
    let mut finished = vec![false; n];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        assert!(v["usage"].is_null());
        for c in choices {
            let i = c["index"].as_u64().unwrap() as usize;
            assert!(!finished[i], "chunk after the final chunk of choice {i}");
            bytes[i].extend(b64(c["bytes_b64"].as_str().unwrap()));
            text[i].push_str(c["text"].as_str().unwrap());
            if let Some(r) = c["finish_reason"].as_str() {
                assert!(r == "stop" || r == "length");
                finished[i] = true;
            }
        }
    }
    assert!(
        finished.iter().all(|&f| f),
        "every choice has a final chunk"
    );
    for i in 0..n {
        assert_eq!(text[i], String::from_utf8_lossy(&bytes[i]));
    }
    let usage = usage.expect("a usage chunk was asked for");
    let total: usize = bytes.iter().map(Vec::len).sum();
    assert_eq!(usage["completion_tokens"], total);
    bytes
}

/// `clients` concurrent clients (even ones streaming, every seventh with n = 2) over
/// `n_cases` sampling settings each get exactly the bytes `mega generate` prints.
async fn matches_mega_generate(ck: &Path, clients: usize, n_cases: usize, extra: &[&str]) {
    let server = Server::start_on(ck, extra);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let cases: Vec<Case> = (0..n_cases)
        .map(|i| Case {
            prompt: PROMPTS[i % PROMPTS.len()],
            seed: rng.random_range(0..1000),
            max_bytes: rng.random_range(8..60),
            temperature: [0.0, 0.7, 1.0, 1.3][i % 4],
            top_k: [0, 5][(i / 8) % 2],
            top_p: [1.0, 0.9][(i / 4) % 2],
            stop: (i % 5 == 3).then_some("e"),
        })
        .collect();
    // Expected bytes for choice 0 and (n = 2) choice 1 with seed + 1.
    let expected: Vec<[Vec<u8>; 2]> = cases
        .iter()
        .map(|c| {
            let next = Case {
                seed: c.seed + 1,
                ..c.clone()
            };
            [generate_cli(ck, c), generate_cli(ck, &next)]
        })
        .collect();
    let http = client();
    let tasks = (0..clients).map(|k| {
        let case = cases[k % cases.len()].clone();
        let want = expected[k % cases.len()].clone();
        let http = http.clone();
        let url = server.url("/v1/completions");
        let model = server.model.clone();
        let stream = k % 2 == 0;
        let n = if k % 7 == 0 { 2 } else { 1 };
        tokio::spawn(async move {
            let resp = http
                .post(&url)
                .json(&request_body(&model, &case, n, stream))
                .send()
                .await
                .unwrap();
            let got = if stream {
                choices_of_stream(&sse_events(resp).await, &model, n)
            } else {
                assert_eq!(resp.status(), 200);
                choices_of_json(&resp.json().await.unwrap(), &model, n)
            };
            for (j, bytes) in got.iter().enumerate() {
                assert_eq!(
                    bytes,
                    &want[j],
                    "client {k} choice {j} {case:?}: server {:?} vs generate {:?}",
                    String::from_utf8_lossy(bytes),
                    String::from_utf8_lossy(&want[j])
                );
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        t.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_concurrent_clients_get_exactly_what_mega_generate_prints() {
    matches_mega_generate(checkpoint(), 64, 16, &["--max-running", "16"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megalodon_concurrent_clients_get_exactly_what_mega_generate_prints() {
    matches_mega_generate(megalodon_checkpoint(), 16, 8, &["--max-running", "4"]).await;
}

/// The value of an unlabelled metric line `name value`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

async fn metrics(http: &reqwest::Client, server: &Server) -> String {
    let resp = http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// Poll `/metrics` until `pred` holds (at most 20 s).
async fn wait_for_metrics(
    http: &reqwest::Client,
    server: &Server,
    what: &str,
    pred: impl Fn(&str) -> bool,
) {
    let start = Instant::now();
    loop {
        let m = metrics(http, server).await;
        if pred(&m) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RUNNING: &str = "mega_running_sequences";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_free_their_sequences() {
    let server = Server::start(&["--max-running", "2", "--max-total-bytes", "200000"]);
    let http = client();
    let long = json!({
        "prompt": "It was",
        "max_tokens": 100000,
        "temperature": 1.0,
        "seed": 5,
        "stream": true,
    });
    // A streaming client reads one chunk and goes away.
    let resp = http
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    // The engine publishes its gauges at the end of a scheduler step, just after it sent bytes.
    wait_for_metrics(&http, &server, "the streamed request runs", |m| {
        metric(m, RUNNING) == 1.0 && metric(m, "mega_http_requests_in_flight") == 1.0
    })
    .await;
    drop(stream);
    wait_for_metrics(&http, &server, "the streamed sequence is freed", |m| {
        metric(m, RUNNING) == 0.0
            && metric(m, "mega_cancellations_total") == 1.0
            && metric(m, "mega_cache_blocks_used") == 0.0
            && metric(m, "mega_http_requests_in_flight") == 0.0
            && metric(m, "mega_http_client_disconnects_total") == 1.0
    })
    .await;

    // A non-streaming client closes its connection while the answer is being generated.
    let mut body = long.clone();
    body["stream"] = json!(false);
    let body = body.to_string();
    let mut sock = std::net::TcpStream::connect(server.addr()).unwrap();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for_metrics(&http, &server, "the request runs", |m| {
        metric(m, RUNNING) == 1.0
    })
    .await;
    drop(sock);
    wait_for_metrics(&http, &server, "the non-streamed sequence is freed", |m| {
        metric(m, RUNNING) == 0.0
            && metric(m, "mega_cancellations_total") == 2.0
            && metric(m, "mega_cache_blocks_used") == 0.0
            && metric(m, "mega_http_client_disconnects_total") == 2.0
    })
    .await;

    // The slots are free: a short request completes.
    let resp = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "It", "max_tokens": 5, "seed": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(choices_of_json(&v, &server.model, 1)[0].len(), 5);
}

/// Check the OpenAI error body shape; returns the `code`.
fn assert_error_body(status: u16, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("{status}: not JSON: {:?}", String::from_utf8_lossy(body)));
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "{v}");
    let e = v["error"].as_object().unwrap();
    assert_eq!(e.len(), 4, "{v}");
    assert!(!e["message"].as_str().unwrap().is_empty());
    assert!(e["type"].is_string());
    assert!(e["param"].is_string() || e["param"].is_null());
    e["code"].as_str().unwrap().to_string()
}

/// A body that is broken by construction: never a valid completion request.
fn malformed_body(rng: &mut impl Rng, model: &str) -> Vec<u8> {
    let valid = json!({
        "model": model,
        "prompt": "It was",
        "max_tokens": 4,
        "temperature": 0.5,
        "stream": false,
    });
    let text = valid.to_string();
    let with = |field: &str, value: Value| {
        let mut v = valid.clone();
        v[field] = value;
        v.to_string().into_bytes()
    };
    let wrong_type = [
        ("prompt", json!(5)),
        ("prompt", json!(true)),
        ("prompt", json!({"a": 1})),
        ("prompt", json!([1.5])),
        ("prompt", json!([[-1]])),
        ("prompt", json!([[["a"]]])),
        ("prompt", json!([300])),
        ("prompt", json!(["a", 1])),
        ("prompt", json!([])),
        ("prompt", json!("")),
        ("max_tokens", json!("16")),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(2.5)),
        ("max_tokens", json!(1e300)),
        ("max_tokens", json!(u64::MAX)),
        ("temperature", json!("hot")),
        ("temperature", json!(-0.01)),
        ("temperature", json!(2.01)),
        ("temperature", json!(1e38)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_p", json!([0.5])),
        ("top_k", json!(-3)),
        ("top_k", json!(257)),
        ("n", json!(0)),
        ("n", json!(17)),
        ("n", json!(1_000_000)),
        ("n", json!("2")),
        ("stop", json!(5)),
        ("stop", json!([1])),
        ("stop", json!([""])),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("seed", json!(-1)),
        ("seed", json!(1.5)),
        ("seed", json!("7")),
        ("stream", json!("yes")),
        ("stream", json!(1)),
        ("stream_options", json!([])),
        ("stream_options", json!({"include_usage": true})),
        ("logprobs", json!(6)),
        ("logprobs", json!(-1)),
        ("logprobs", json!(true)),
        ("echo", json!("no")),
        ("model", json!(5)),
        ("model", json!("gpt-4")),
        ("model", json!([])),
        ("user", json!(3)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(-3)),
        ("logit_bias", json!({"65": 10})),
        ("logit_bias", json!(3)),
        ("suffix", json!("x")),
        ("best_of", json!(3)),
    ];
    match rng.random_range(0..7) {
        // A strict prefix of a JSON object never parses.
        0 => text.as_bytes()[..rng.random_range(0..text.len())].to_vec(),
        1 | 2 => {
            let (field, value) = &wrong_type[rng.random_range(0..wrong_type.len())];
            with(field, value.clone())
        }
        // Numbers beyond f64 do not parse.
        3 => {
            let field = ["max_tokens", "temperature", "n", "seed"][rng.random_range(0..4)];
            text.replacen(
                "{",
                &format!("{{\"{field}\":1e{},", rng.random_range(400..9999)),
                1,
            )
            .into_bytes()
        }
        // Invalid UTF-8 inside a string.
        4 => {
            let mut b = text.into_bytes();
            let at = b.windows(6).position(|w| w == b"It was").unwrap() + rng.random_range(0..6);
            b.insert(at, [0xff, 0xc3, 0x80 | 0x40, 0xfe][rng.random_range(0..4)]);
            b
        }
        // The right fields in the wrong container.
        5 => [
            format!("[{text}]"),
            format!("{{\"request\": {text}}}"),
            "null".into(),
            "42".into(),
            "\"prompt\"".into(),
            String::new(),
        ][rng.random_range(0..6)]
        .clone()
        .into_bytes(),
        // Random bytes behind an opening brace.
        _ => {
            let mut b = vec![b'{'];
            b.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
            b
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_server_keeps_serving() {
    let mut server = Server::start(&[]);
    let http = client();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let bodies: Vec<Vec<u8>> = (0..2000)
        .map(|_| malformed_body(&mut rng, &server.model))
        .collect();
    let url = server.url("/v1/completions");
    let results = futures_util::stream::iter(bodies.into_iter().enumerate())
        .map(|(i, body)| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let resp = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let bytes = resp.bytes().await.unwrap();
                (i, body, status, bytes)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut codes = std::collections::BTreeSet::new();
    for (i, body, status, resp) in results {
        assert!(
            (400..500).contains(&status),
            "body {i} {:?} got {status}: {:?}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&resp)
        );
        codes.insert((status, assert_error_body(status, &resp)));
    }
    for want in [
        (400, "invalid_json"),
        (400, "invalid_type"),
        (400, "invalid_value"),
        (400, "unsupported_parameter"),
        (404, "model_not_found"),
    ] {
        assert!(
            codes.contains(&(want.0, want.1.to_string())),
            "{want:?} not among {codes:?}"
        );
    }
    server.assert_alive();
    let health = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let m = metrics(&http, &server).await;
    assert_eq!(metric(&m, "mega_http_panics_total"), 0.0);
}

async fn status_and_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, assert_error_body(status, &body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_limits_and_error_codes() {
    let server = Server::start(&[
        "--max-concurrent-requests",
        "1",
        "--max-body-bytes",
        "4096",
        "--max-prompt-bytes",
        "100",
        "--max-total-bytes",
        "100000",
    ]);
    let http = client();
    let v: Value = http
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], server.model.as_str());
    assert_eq!(v["data"][0]["object"], "model");

    let get = http
        .get(server.url("/v1/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(get).await,
        (405, "method_not_allowed".into())
    );
    let nowhere = http.get(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(status_and_code(nowhere).await, (404, "unknown_url".into()));
    let big = http
        .post(server.url("/v1/completions"))
        .body(vec![b' '; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(big).await,
        (413, "request_too_large".into())
    );
    let long_prompt = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "x".repeat(101)}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(long_prompt).await,
        (400, "prompt_too_long".into())
    );

    // One request at a time: a second one while a stream runs gets 429 with Retry-After.
    let running = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "It", "max_tokens": 90000, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    let second = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "It", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.headers()["retry-after"], "1");
    assert_eq!(
        status_and_code(second).await,
        (429, "too_many_concurrent_requests".into())
    );
    drop(running);

    // Echo and logprobs: the prompt comes first with null logprobs, then one entry per byte.
    let start = Instant::now();
    let v: Value = loop {
        let resp = http
            .post(server.url("/v1/completions"))
            .json(
                &json!({"prompt": "It was", "max_tokens": 6, "seed": 3, "echo": true,
                          "logprobs": 2, "temperature": 0.0}),
            )
            .send()
            .await
            .unwrap();
        // The cancelled stream may still hold the only slot for a moment.
        if resp.status() == 429 && start.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(resp.status(), 200);
        break resp.json().await.unwrap();
    };
    let c = &v["choices"][0];
    let bytes = b64(c["bytes_b64"].as_str().unwrap());
    assert!(bytes.starts_with(b"It was"));
    assert_eq!(bytes.len(), 12);
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 12);
    for (i, &b) in bytes.iter().enumerate() {
        let want = if b.is_ascii() {
            char::from(b).to_string()
        } else {
            format!("\\x{b:02x}")
        };
        assert_eq!(tokens[i], want.as_str());
        assert_eq!(lp["text_offset"][i], i);
        let top = &lp["top_logprobs"][i];
        let own = &lp["token_logprobs"][i];
        if i < 6 {
            assert!(own.is_null() && top.is_null());
            continue;
        }
        // Greedy: the chosen byte is the most likely one, first in a top-2 map of
        // log-probabilities that are <= 0.
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 2);
        let best = top
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap();
        assert_eq!(best.0, &want);
        assert!((best.1.as_f64().unwrap() - own.as_f64().unwrap()).abs() < 1e-6);
        assert!(top.values().all(|x| x.as_f64().unwrap() <= 0.0));
    }
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_running_streams_with_an_error_event_and_exits() {
    let mut server = Server::start(&["--max-total-bytes", "200000"]);
    let http = client();
    let resp = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "It was", "max_tokens": 100000, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut body = stream.next().await.unwrap().unwrap().to_vec();
    let pid = server.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let error = events[events.len() - 2].strip_prefix("data: ").unwrap();
    assert_eq!(
        assert_error_body(503, error.as_bytes()),
        "shutting_down",
        "{text}"
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_engine_queue_is_429_with_retry_after() {
    let server = Server::start(&[
        "--max-running",
        "1",
        "--max-queued",
        "1",
        "--max-total-bytes",
        "200000",
    ]);
    let http = client();
    let long = json!({"prompt": "It", "max_tokens": 100000, "stream": true});
    // The first runs, the second waits in the queue; both stay open. A request counts as queued
    // until the engine thread admits it, so the second goes out once the first runs.
    let mut held = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(server.url("/v1/completions"))
            .json(&long)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        held.push(resp);
        wait_for_metrics(&http, &server, "the first request runs", |m| {
            metric(m, RUNNING) == 1.0
        })
        .await;
    }
    wait_for_metrics(&http, &server, "one running, one queued", |m| {
        metric(m, RUNNING) == 1.0 && metric(m, "mega_queue_depth") == 1.0
    })
    .await;
    let third = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "It", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert!(
        third.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(status_and_code(third).await, (429, "queue_full".into()));
    drop(held);
    wait_for_metrics(&http, &server, "both freed", |m| {
        metric(m, RUNNING) == 0.0 && metric(m, "mega_queue_depth") == 0.0
    })
    .await;
}
