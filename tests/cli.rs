//! The `mega` binary end to end: training, resume, generation and evaluation on a small
//! corpus, and clear one-line errors (never a panic) on bad input.

use std::path::Path;
use std::process::{Command, Output};

fn mega(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mega"))
        .args(args)
        .output()
        .expect("run mega")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line: {err}");
    assert!(
        errors[0].contains(needle),
        "error should mention '{needle}': {err}"
    );
    assert_eq!(
        err.trim().lines().last(),
        Some(errors[0]),
        "the error should be the last line: {err}"
    );
}

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness.\n"
        .repeat(40);
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        steps,
        "--batch-size",
        "4",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--quiet",
        "--sample-bytes",
        "0",
        "--threads",
        "1",
    ]
}

#[test]
fn resume_continues_the_run_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let data = data.to_str().unwrap();
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    let o = mega(&train_args(data, straight.to_str().unwrap(), "8"));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut first_half = train_args(data, split.to_str().unwrap(), "8");
    first_half.extend(["--stop-at-step", "4"]);
    let o = mega(&first_half);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        mega::train::checkpoint::load(&split)
            .unwrap()
            .trainer
            .unwrap()
            .step,
        4
    );
    let mut resume = train_args(data, split.to_str().unwrap(), "8");
    resume.push("--resume");
    let o = mega(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = mega::train::checkpoint::load(&straight).unwrap();
    let b = mega::train::checkpoint::load(&split).unwrap();
    assert_eq!(a.trainer.as_ref().unwrap().step, 8);
    assert_eq!(b.trainer.as_ref().unwrap().step, 8);
    for (x, y) in a.model.iter().zip(&b.model) {
        assert_eq!(x.name, y.name);
        let same = x
            .data
            .iter()
            .zip(&y.data)
            .all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same,
            "{} differs between the straight and the resumed run",
            x.name
        );
    }
    assert!(straight.join("loss.svg").exists());
}

#[test]
fn trained_checkpoint_generates_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let o = mega(&train_args(
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "3",
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = out.to_str().unwrap();
    let o = mega(&[
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "It was",
        "--max-bytes",
        "40",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.starts_with(b"It was"));
    assert_eq!(
        o.stdout.len(),
        "It was".len() + 40 + 1,
        "prompt + 40 bytes + newline"
    );
    let again = mega(&[
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "It was",
        "--max-bytes",
        "40",
        "--seed",
        "3",
    ]);
    assert_eq!(o.stdout, again.stdout, "same seed, same bytes");
    let o = mega(&[
        "eval",
        "--checkpoint",
        ck,
        "--data",
        data.to_str().unwrap(),
        "--strided",
        "--sliding-window",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bpb = r["bits_per_byte"].as_f64().unwrap();
    assert!(bpb > 0.0 && bpb < 9.0, "bits per byte {bpb}");
}

#[test]
fn bad_input_gives_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    assert_clean_error(
        &mega(&[
            "train",
            "--preset",
            "tiny",
            "--data",
            "/nonexistent/x",
            "--out",
            out,
            "--steps",
            "1",
        ]),
        "/nonexistent/x",
    );
    assert_clean_error(
        &mega(&[
            "train", "--preset", "huge", "--data", "x", "--out", out, "--steps", "1",
        ]),
        "unknown preset",
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"model":"megabyte","vocab_size":256,"patch_size":3,"max_seq_len":16,"global_byte_dim":8,"global_dim":24,"global_layers":1,"global_heads":2,"local_dim":8,"local_layers":1,"local_heads":2,"ffn_mult":4,"activation":"relu","init_std":0.02}"#).unwrap();
    assert_clean_error(
        &mega(&[
            "train",
            "--config",
            bad.to_str().unwrap(),
            "--data",
            "x",
            "--out",
            out,
            "--steps",
            "1",
        ]),
        "multiple of patch_size",
    );
    assert_clean_error(
        &mega(&[
            "generate",
            "--checkpoint",
            "/nonexistent/ck",
            "--prompt",
            "a",
        ]),
        "/nonexistent/ck",
    );
    assert_clean_error(
        &mega(&[
            "train", "--preset", "tiny", "--data", "x", "--out", out, "--device", "cuda",
        ]),
        "cuda",
    );
}

#[test]
fn truncated_checkpoint_is_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let o = mega(&train_args(
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "1",
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let model_file = find_file(&out, "model.safetensors").expect("a model file");
    let bytes = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let o = mega(&[
        "generate",
        "--checkpoint",
        out.to_str().unwrap(),
        "--prompt",
        "a",
    ]);
    assert_clean_error(&o, "model.safetensors");
}

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

#[test]
fn megalodon_trains_resumes_generates_and_evaluates_through_the_same_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let data = data.to_str().unwrap();
    let out = dir.path().join("m");
    let ck = out.to_str().unwrap();
    let args = |steps: &'static str| {
        vec![
            "train",
            "--model",
            "megalodon",
            "--preset",
            "tiny",
            "--data",
            data,
            "--out",
            ck,
            "--steps",
            steps,
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-every",
            "2",
            "--warmup",
            "1",
            "--quiet",
            "--sample-bytes",
            "0",
            "--threads",
            "1",
        ]
    };
    let mut first = args("4");
    first.extend(["--stop-at-step", "2"]);
    let o = mega(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut resume = args("4");
    resume.push("--resume");
    let o = mega(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        mega::train::checkpoint::load(&out)
            .unwrap()
            .trainer
            .unwrap()
            .step,
        4
    );
    let o = mega(&[
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "It was",
        "--max-bytes",
        "20",
        "--top-k",
        "5",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout.len(), "It was".len() + 20 + 1);
    let o = mega(&[
        "eval",
        "--checkpoint",
        ck,
        "--data",
        data,
        "--seq-len",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mega(&[
        "eval",
        "--checkpoint",
        ck,
        "--data",
        data,
        "--seq-len",
        "16",
        "--strided",
    ]);
    assert_clean_error(&o, "strided");
}

#[test]
fn bench_reports_json_for_both_model_families() {
    for model in ["megabyte", "megalodon"] {
        let o = mega(&[
            "bench",
            "train",
            "--model",
            model,
            "--preset",
            "tiny",
            "--batch-size",
            "1",
            "--seq-len",
            "16",
            "--warmup",
            "0",
            "--runs",
            "1",
            "--threads",
            "1",
        ]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            r["bytes_per_s_median"].as_f64().unwrap() > 0.0,
            "{model}: {r}"
        );
        assert_eq!(r["config"]["model"], model);
    }
}
