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
fn bench_reports_json_for_both_model_families_and_the_backend_that_ran_it() {
    for (model, device, backend) in [
        ("megabyte", "cpu", "cpu"),
        ("megalodon", "cpu", "cpu"),
        ("megabyte", "emu", "cuda (CPU emulator)"),
    ] {
        let o = mega(&[
            "bench",
            "train",
            "--model",
            model,
            "--preset",
            "tiny",
            "--device",
            device,
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
        assert!(o.status.success(), "{model} on {device}: {}", stderr(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            r["bytes_per_s_median"].as_f64().unwrap() > 0.0,
            "{model}: {r}"
        );
        assert_eq!(r["config"]["model"], model);
        assert_eq!(r["device"], backend, "{r}");
    }
}

// ---- device selection (docs/cuda-backend.md, "Selecting the device") ----------------------

fn driver_present() -> bool {
    // Independent of mega's own check, so the tests see which branch the binary should take.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The `device: ...` lines a command printed.
fn device_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("device:"))
        .map(str::to_string)
        .collect()
}

/// Tolerances of the emulated CUDA backend against the CPU through the CLI
/// (docs/cuda-backend.md): per-step training loss and validation bits per byte, and the
/// parameters after the run.
const CLI_LOSS_TOL: f32 = 1e-4;
const CLI_PARAM_ABS_TOL: f32 = 1e-4;
const CLI_PARAM_REL_TOL: f32 = 1e-4;

fn tiny_train_args<'a>(
    model: &'a str,
    device: &'a str,
    data: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--preset",
        "tiny",
        "--device",
        device,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "1",
        "--eval-windows",
        "2",
        "--warmup",
        "1",
        "--lr",
        "1e-2",
        "--quiet",
        "--sample-bytes",
        "0",
        "--threads",
        "1",
    ]
}

/// The value printed on the `validation: X bits per byte` line.
fn printed_validation(o: &Output) -> f32 {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("validation: "))
        .unwrap_or_else(|| panic!("no validation line in {stdout}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn auto_without_a_driver_trains_on_the_cpu_and_says_why_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("auto");
    let o = mega(&tiny_train_args(
        "megabyte",
        "auto",
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = device_lines(&o);
    assert_eq!(lines.len(), 1, "exactly one device line: {}", stderr(&o));
    if !driver_present() {
        assert_eq!(
            lines[0],
            "device: no NVIDIA driver (libcuda.so.1) found; using the CPU backend"
        );
    }
    assert_eq!(
        mega::train::checkpoint::load(&out)
            .unwrap()
            .trainer
            .unwrap()
            .step,
        2
    );
}

#[test]
fn unusable_cuda_requests_fail_in_one_line_and_bad_specs_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let data = data.to_str().unwrap();
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let requests: &[&str] = if driver_present() {
        // Only the ordinal no host has is certain to fail where a driver exists.
        &["cuda:1000"]
    } else {
        &["cuda", "cuda:3"]
    };
    for &device in requests {
        let o = mega(&tiny_train_args("megabyte", device, data, out));
        let needle = if driver_present() {
            "--device cuda:1000".to_string()
        } else {
            let ordinal = if device == "cuda" { "cuda:0" } else { device };
            assert!(stderr(&o).contains("libcuda.so.1"), "{}", stderr(&o));
            format!("--device {ordinal} needs the NVIDIA driver")
        };
        assert_clean_error(&o, &needle);
        assert_eq!(o.status.code(), Some(1));
        assert!(!out_exists(out), "nothing was trained");
    }
    for args in [
        vec!["train", "--preset", "tiny", "--data", data, "--out", out],
        vec!["eval", "--checkpoint", out, "--data", data],
        vec!["generate", "--checkpoint", out, "--prompt", "a"],
        vec!["bench", "train", "--preset", "tiny"],
    ] {
        let mut args = args.clone();
        args.extend(["--device", "gpu"]);
        let o = mega(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "clap's usage-error status: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.starts_with("error: invalid value 'gpu' for '--device"),
            "{err}"
        );
        assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    }
}

fn out_exists(out: &str) -> bool {
    Path::new(out).exists()
}

#[test]
fn info_lists_the_devices_and_the_kernel_build() {
    let o = mega(&["info"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = |prefix: &str| {
        stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {stdout}"))
            .to_string()
    };
    if !driver_present() {
        assert!(line("cuda: ").contains("no NVIDIA driver"), "{stdout}");
    }
    assert!(
        line("emu: ").contains("available for debugging"),
        "{stdout}"
    );
    // The kernel line names what the committed PTX headers say: ISA, target and compiler.
    let kernels = line("kernels: ");
    let ptx = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/ptx/adamw.ptx"),
    )
    .unwrap();
    let header = |directive: &str| {
        ptx.lines()
            .find_map(|l| l.trim().strip_prefix(directive))
            .unwrap_or_else(|| panic!("adamw.ptx has no {directive}"))
            .trim()
            .to_string()
    };
    assert!(
        kernels.contains(&format!("PTX ISA {}", header(".version"))),
        "{kernels}"
    );
    assert!(kernels.contains(&header(".target")), "{kernels}");
    let nvcc = ptx
        .lines()
        .find_map(|l| l.split_once("Cuda compilation tools, "))
        .map(|(_, v)| v.rsplit(", ").next().unwrap().trim().to_string())
        .expect("adamw.ptx names its compiler");
    assert!(kernels.contains(&nvcc), "{kernels} should name {nvcc}");
}

#[test]
fn help_documents_the_device_flag_and_the_debugging_emulator() {
    let o = mega(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--device auto|cpu|cuda[:N]"), "{help}");
    assert!(help.contains("Debugging: --device emu"), "{help}");
    for cmd in ["train", "eval", "generate", "bench"] {
        let o = mega(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains("--device <auto|cpu|cuda[:N]>"),
            "{cmd}: {help}"
        );
        assert!(help.contains("emu"), "{cmd}: {help}");
        assert!(help.contains("--stream-overlap"), "{cmd}: {help}");
    }
}

/// Largest `|a − b| / (abs + rel·|b|)` over two checkpoints' parameters (≤ 1 passes).
fn worst_param_ratio(a: &Path, b: &Path) -> f32 {
    let a = mega::train::checkpoint::load(a).unwrap();
    let b = mega::train::checkpoint::load(b).unwrap();
    assert_eq!(a.model.len(), b.model.len());
    let mut worst = 0.0f32;
    for (x, y) in a.model.iter().zip(&b.model) {
        assert_eq!(x.name, y.name);
        for (p, q) in x.data.iter().zip(&y.data) {
            let ratio = (p - q).abs() / (CLI_PARAM_ABS_TOL + CLI_PARAM_REL_TOL * q.abs());
            assert!(ratio.is_finite(), "{}: {p} vs {q}", x.name);
            worst = worst.max(ratio);
        }
    }
    worst
}

#[test]
fn emulated_cuda_backend_trains_evaluates_and_generates_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let data = data.to_str().unwrap();
    for model in ["megabyte", "megalodon"] {
        let run = |device: &str| {
            let out = dir.path().join(format!("{model}-{device}"));
            let o = mega(&tiny_train_args(model, device, data, out.to_str().unwrap()));
            assert!(o.status.success(), "{model} on {device}: {}", stderr(&o));
            (o, out)
        };
        let (cpu, cpu_dir) = run("cpu");
        let (emu, emu_dir) = run("emu");
        assert_eq!(
            device_lines(&emu),
            ["device: using the CUDA backend on the CPU emulator (--device emu, a debugging mode: very slow)"]
        );

        // Printed with three decimals: equal up to one unit in the last place.
        let (a, b) = (printed_validation(&cpu), printed_validation(&emu));
        assert!((a - b).abs() <= 1.0001e-3, "{model}: printed {a} vs {b}");
        let history = |dir: &Path| {
            mega::train::checkpoint::load(dir)
                .unwrap()
                .trainer
                .unwrap()
                .history
        };
        let (hc, he) = (history(&cpu_dir), history(&emu_dir));
        assert_eq!(hc.len(), 2);
        assert_eq!(he.len(), 2);
        for (c, e) in hc.iter().zip(&he) {
            let (lc, le) = (c.train_loss.unwrap(), e.train_loss.unwrap());
            let (vc, ve) = (c.valid_bpb.unwrap(), e.valid_bpb.unwrap());
            assert!(
                (lc - le).abs() <= CLI_LOSS_TOL,
                "{model} step {}: loss {lc} vs {le}",
                c.step
            );
            assert!(
                (vc - ve).abs() <= CLI_LOSS_TOL,
                "{model} step {}: valid {vc} vs {ve}",
                c.step
            );
        }
        // The run did learn something, so the comparison is not of two untouched models.
        assert!(
            hc[1].train_loss.unwrap() < hc[0].train_loss.unwrap(),
            "{hc:?}"
        );
        let worst = worst_param_ratio(&emu_dir, &cpu_dir);
        assert!(
            worst <= 1.0,
            "{model}: parameters differ by {worst}× the tolerance"
        );
        // The kernels reduce in other orders than the CPU loops, so bit-identical parameters
        // would mean `--device emu` never reached the CUDA backend.
        assert!(
            worst > 0.0,
            "{model}: the emulated run matched the CPU bit for bit"
        );

        // The CPU-trained checkpoint, evaluated and sampled on both backends.
        let ck = cpu_dir.to_str().unwrap();
        let evaluate = |device: &str| {
            let o = mega(&[
                "eval",
                "--device",
                device,
                "--checkpoint",
                ck,
                "--data",
                data,
                "--seq-len",
                "16",
                "--max-bytes",
                "96",
            ]);
            assert!(
                o.status.success(),
                "{model} eval on {device}: {}",
                stderr(&o)
            );
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            r["bits_per_byte"].as_f64().unwrap()
        };
        let (ec, ee) = (evaluate("cpu"), evaluate("emu"));
        assert!(
            (ec - ee).abs() <= CLI_LOSS_TOL as f64,
            "{model} eval: {ec} vs {ee}"
        );
        let generate_on = |device: &[&str], extra: &[&str]| {
            let mut args = vec!["generate"];
            args.extend(device);
            args.extend([
                "--checkpoint",
                ck,
                "--prompt",
                "It was",
                "--max-bytes",
                "16",
            ]);
            args.extend(extra);
            let o = mega(&args);
            assert!(
                o.status.success(),
                "{model} generate on {device:?}: {}",
                stderr(&o)
            );
            o
        };
        let generate =
            |device: &str, extra: &[&str]| generate_on(&["--device", device], extra).stdout;
        for sampling in [
            &["--seed", "5", "--top-k", "40"][..],
            &["--temperature", "0"],
        ] {
            let (gc, ge) = (generate("cpu", sampling), generate("emu", sampling));
            assert_eq!(gc.len(), "It was".len() + 16 + 1);
            assert_eq!(
                String::from_utf8_lossy(&gc),
                String::from_utf8_lossy(&ge),
                "{model} {sampling:?}"
            );
            // One stream instead of two changes when work runs, not what it computes.
            let o = generate_on(&["--device", "emu", "--stream-overlap", "off"], sampling);
            assert_eq!(o.stdout, ge, "{model} {sampling:?}");
            assert!(
                device_lines(&o)[0].ends_with("(--stream-overlap off: one stream)"),
                "{:?}",
                device_lines(&o)
            );
        }
    }
}

/// `--precision bf16`: the CUDA backend's bf16 GEMMs (here on the emulator) train within the
/// bf16 bound of the CPU's f32 run and differ from the f32 device run (so the flag reached the
/// backend); the CPU backend, asked for by name, refuses it in one line; `auto` falling back
/// to the CPU says the flag is ignored.
#[test]
fn precision_bf16_reaches_the_cuda_backend_and_is_refused_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let data = data.to_str().unwrap();
    let run = |device: &str, precision: &str| {
        let out = dir.path().join(format!("{device}-{precision}"));
        let mut args = tiny_train_args("megabyte", device, data, out.to_str().unwrap());
        args.extend(["--precision", precision]);
        (mega(&args), out)
    };

    let (o, out) = run("cpu", "bf16");
    assert_clean_error(&o, "--precision bf16 needs the CUDA backend");
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.exists(), "nothing was trained");

    let (cpu, cpu_dir) = run("cpu", "f32");
    let (f32_run, f32_dir) = run("emu", "f32");
    let (bf16_run, bf16_dir) = run("emu", "bf16");
    for o in [&cpu, &f32_run, &bf16_run] {
        assert!(o.status.success(), "{}", stderr(o));
    }
    let history = |dir: &Path| {
        mega::train::checkpoint::load(dir)
            .unwrap()
            .trainer
            .unwrap()
            .history
    };
    // The training-step bound of docs/cuda-backend.md for bf16 GEMMs: 2u nats, u = 2⁻⁸.
    let bf16_loss_bound = 2.0 / 256.0;
    for (c, b) in history(&cpu_dir).iter().zip(&history(&bf16_dir)) {
        let (lc, lb) = (c.train_loss.unwrap(), b.train_loss.unwrap());
        assert!(
            (lc - lb).abs() <= bf16_loss_bound,
            "step {}: CPU f32 loss {lc} vs emulated bf16 {lb}",
            c.step
        );
    }
    let (f32_params, bf16_params) = (
        mega::train::checkpoint::load(&f32_dir).unwrap().model,
        mega::train::checkpoint::load(&bf16_dir).unwrap().model,
    );
    let differs = f32_params
        .iter()
        .zip(&bf16_params)
        .any(|(a, b)| a.data.iter().zip(&b.data).any(|(x, y)| x != y));
    assert!(differs, "--precision bf16 trained exactly like f32");

    if !driver_present() {
        let (o, _) = run("auto", "bf16");
        assert!(o.status.success(), "{}", stderr(&o));
        let lines = device_lines(&o);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].ends_with("(--precision bf16 ignored: the CPU backend computes in f32)"),
            "{lines:?}"
        );
    }
}
