//! `mega batch` through the real binary: a job killed with SIGKILL mid-run and restarted
//! ends with exactly one result per input line, each equal to an uninterrupted run's.

#[path = "support/checkpoint.rs"]
mod checkpoint;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mega::config::{FeedForward, MegabyteConfig, ModelConfig};
use mega::model::megabyte::Megabyte;
use serde_json::Value;

/// Wide enough that the job runs for a while on two cores.
fn cfg() -> MegabyteConfig {
    MegabyteConfig {
        vocab_size: 256,
        patch_size: 4,
        max_seq_len: 128,
        global_byte_dim: 64,
        global_dim: 256,
        global_layers: 2,
        global_heads: 4,
        local_dim: 64,
        local_layers: 2,
        local_heads: 2,
        ffn_mult: 4,
        activation: FeedForward::Relu,
        init_std: 0.05,
        head_bias: true,
    }
}

const REQUESTS: usize = 40;

fn input() -> String {
    let mut lines = Vec::new();
    for i in 0..REQUESTS {
        let prompt = "Once upon a time ".repeat(i % 4 + 1);
        let line = serde_json::json!({
            "id": format!("r{i}"),
            "prompt": prompt,
            "max_tokens": 300 + 10 * (i % 5),
            "temperature": if i % 3 == 0 { 0.0 } else { 0.9 },
            "top_k": if i % 2 == 0 { 0 } else { 40 },
            "seed": i,
            "stop": ["\u{0}\u{0}"],
        });
        lines.push(line.to_string());
        if i == 5 {
            lines.push("{not json".to_string());
        }
        if i == 9 {
            lines.push(r#"{"id": "bad-temp", "prompt": "x", "temperature": -1}"#.to_string());
        }
    }
    lines.join("\n") + "\n"
}

fn batch(ckpt: &Path, input: &Path, output: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mega"));
    c.args([
        "batch",
        "--quiet",
        "--max-running",
        "4",
        "--prefill-chunk",
        "16",
    ])
    .arg("--checkpoint")
    .arg(ckpt)
    .arg("--input")
    .arg(input)
    .arg("--output")
    .arg(output)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn complete_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|t| t.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0)
}

/// Results by id; panics on a duplicate.
fn results(path: &Path) -> HashMap<String, Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "output ends with a complete line");
    let mut map = HashMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("every output line is JSON");
        let id = v["id"]
            .as_str()
            .expect("every result has an id")
            .to_string();
        assert!(
            map.insert(id.clone(), v).is_none(),
            "duplicate result for {id}"
        );
    }
    map
}

#[test]
fn a_killed_job_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let model = Megabyte::new(&cfg());
    checkpoint::write_checkpoint(&ckpt, &ModelConfig::Megabyte(cfg()), &model, 7);
    let input_path = dir.path().join("prompts.jsonl");
    std::fs::write(&input_path, input()).unwrap();
    let total = REQUESTS + 2;

    // Interrupted run: SIGKILL once a few results are out, while the job still runs.
    let killed = dir.path().join("killed.jsonl");
    let mut child = batch(&ckpt, &input_path, &killed).spawn().unwrap();
    let start = Instant::now();
    while complete_lines(&killed) < 4 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before it could be interrupted"
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = complete_lines(&killed);
    assert!(
        before < total,
        "killed mid-run ({before} of {total} written)"
    );
    // As if the kill had torn a write in half.
    let mut torn = std::fs::read(&killed).unwrap();
    torn.extend_from_slice(b"{\"id\": \"r3\", \"text\": \"half a li");
    std::fs::write(&killed, torn).unwrap();

    let out = batch(&ckpt, &input_path, &killed).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restart failed: {log}");
    assert!(log.contains("resuming"), "{log}");
    assert!(log.contains("partial last line"), "{log}");

    let whole = dir.path().join("whole.jsonl");
    let out = batch(&ckpt, &input_path, &whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let resumed = results(&killed);
    let reference = results(&whole);
    assert_eq!(resumed.len(), total, "one result per input line");
    assert_eq!(reference.len(), total);
    for (id, want) in &reference {
        assert_eq!(resumed.get(id), Some(want), "result for {id}");
    }
    // The bad lines are reported with their line numbers, the good ones generated.
    let bad_json = &reference["line-7"];
    assert_eq!(bad_json["line"], 7);
    assert!(bad_json["error"]
        .as_str()
        .unwrap()
        .contains("line 7: invalid JSON"));
    let bad_temp = reference["bad-temp"]["error"].as_str().unwrap();
    assert!(bad_temp.contains("temperature"), "{bad_temp}");
    let r0 = &reference["r0"];
    assert_eq!(r0["finish_reason"], "length");
    assert_eq!(r0["usage"]["completion_bytes"], 300);
    assert_eq!(r0["usage"]["prompt_bytes"], 17);
}

/// `mega batch --device emu` runs the engine on the CUDA backend (over the CPU emulator):
/// weights and caches in device buffers, the same results as on the CPU.
#[test]
fn the_emulated_cuda_backend_batches_like_the_cpu() {
    let small = MegabyteConfig {
        global_dim: 32,
        global_byte_dim: 16,
        global_heads: 2,
        local_dim: 16,
        local_heads: 2,
        max_seq_len: 64,
        ..cfg()
    };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let model = Megabyte::new(&small);
    checkpoint::write_checkpoint(&ckpt, &ModelConfig::Megabyte(small), &model, 3);
    let input_path = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({
                "id": format!("q{i}"),
                "prompt": "To be, or not ".repeat(i + 1),
                "max_tokens": 10,
                "temperature": if i == 0 { 0.0 } else { 0.8 },
                "seed": i,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&input_path, lines.join("\n") + "\n").unwrap();
    let run = |device: &str| {
        let output = dir.path().join(format!("{device}.jsonl"));
        let out = batch(&ckpt, &input_path, &output)
            .args(["--device", device])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "--device {device}: {log}");
        (results(&output), log)
    };
    let (cpu, _) = run("cpu");
    let (emu, log) = run("emu");
    assert!(log.contains("emulator"), "{log}");
    assert_eq!(cpu.len(), 3);
    for (id, want) in &cpu {
        let got = &emu[id];
        assert_eq!(got["usage"]["completion_bytes"], 10, "{id}");
        assert!(want["bytes_base64"].is_string(), "{id}: {want}");
        assert_eq!(
            got["bytes_base64"], want["bytes_base64"],
            "{id}: generated bytes"
        );
    }
}
