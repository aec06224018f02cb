//! The `mega` command line: train, eval, generate, serve, bench, info.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mega::backend::Backend;
use mega::config::{MegabyteConfig, MegalodonConfig, ModelConfig};
use mega::device::{DeviceSpec, Resolved};
use mega::infer::generate::{generate, GenerateRequest};
use mega::infer::sampler::SamplingParams;
use mega::model::ModelShape;
use mega::train::checkpoint::HostTensor;
use mega::train::eval::{evaluate, EvalMode, EvalResult};
use mega::train::trainer::{load_checkpoint, open_split, train, TrainHparams, TrainOptions};
use mega::{with_backend, with_model};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mega",
    version,
    about = "Train, evaluate and run byte-level MEGA-family language models",
    after_help = "Devices: train, eval, generate and bench take --device auto|cpu|cuda[:N] \
                  (default auto: CUDA device 0 when a driver and a GPU are usable, else the CPU, \
                  saying why in one line); `mega info` lists them. --precision bf16 runs the CUDA \
                  backend's GEMMs in bf16 (f32 accumulation and master weights).\n\
                  Debugging: --device emu runs the CUDA backend on the CPU emulator (the CUDA \
                  kernels compiled for the host): very slow, for checking the CUDA code path \
                  without a GPU."
)]
struct Cli {
    /// Worker threads (default: all logical cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum ModelKind {
    Megabyte,
    Megalodon,
    Hybrid,
}

/// `--device`, shared by every command that runs a model.
#[derive(clap::Args, Clone, Copy)]
struct DeviceArgs {
    /// Backend: auto (CUDA device 0 when usable, else the CPU), cpu, cuda, cuda:N.
    /// Debugging: emu runs the CUDA backend on the CPU emulator (very slow).
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    device: DeviceSpec,
    /// GEMM precision on a CUDA device: f32, or bf16 (bf16 operands on tensor cores with f32
    /// accumulation; weights keep an f32 master copy). The CPU backend computes in f32.
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// On a CUDA device, overlap MEGABYTE's global decode steps (side stream) with the other
    /// rows' local steps (main stream); off runs both in order on one stream.
    #[arg(long, value_enum, default_value = "on")]
    stream_overlap: OnOff,
}

/// `--stream-overlap`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

/// `--precision`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum PrecisionArg {
    F32,
    Bf16,
}

impl DeviceArgs {
    /// Resolves the request, printing the one-line reason for the choice (to stderr).
    fn select(self) -> Result<Resolved> {
        let precision = match self.precision {
            PrecisionArg::F32 => mega::backend::cuda::Precision::F32,
            PrecisionArg::Bf16 => mega::backend::cuda::Precision::Bf16Gemm,
        };
        let resolved = mega::device::resolve(self.device)?
            .with_precision(self.device, precision)?
            .with_stream_overlap(self.stream_overlap == OnOff::On);
        eprintln!("device: {}", resolved.reason());
        Ok(resolved)
    }
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model family.
    #[arg(long, value_enum, default_value = "megabyte")]
    model: ModelKind,
    /// Named preset: megabyte tiny, small, bench, paper-758m, paper-1.3b; megalodon tiny,
    /// small, bench, mega200M, mega1.3B, mega7.3B, paper-7b (see `mega info`).
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// Model config JSON file (see docs/megabyte-model.md).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ModelArgs {
    fn resolve(&self, default_preset: &str) -> Result<ModelConfig> {
        let preset = self.preset.as_deref().unwrap_or(default_preset);
        let cfg = match (&self.config, self.model) {
            (Some(path), _) => ModelConfig::from_file(path)?,
            (None, ModelKind::Megabyte) => ModelConfig::Megabyte(MegabyteConfig::preset(preset)?),
            (None, ModelKind::Megalodon) => {
                ModelConfig::Megalodon(MegalodonConfig::preset(preset)?)
            }
            (None, ModelKind::Hybrid) => {
                bail!("--model hybrid is not available in this version; use megabyte or megalodon")
            }
        };
        let family = match &cfg {
            ModelConfig::Megabyte(_) => ModelKind::Megabyte,
            ModelConfig::Megalodon(_) => ModelKind::Megalodon,
        };
        if self.config.is_some() && family != self.model && self.model != ModelKind::Megabyte {
            bail!(
                "--model {:?} does not match the config file's model",
                self.model
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on raw bytes.
    ///
    /// Example: mega train --preset small --data data/shakespeare.txt --out runs/small --time-budget 10m
    Train {
        #[command(flatten)]
        model: ModelArgs,
        /// Training data: a file or a directory of files (raw bytes).
        #[arg(long)]
        data: PathBuf,
        /// Validation data (default: the last 5% of --data).
        #[arg(long)]
        valid: Option<PathBuf>,
        /// Output directory for checkpoints and the loss plot.
        #[arg(long)]
        out: PathBuf,
        /// Number of optimizer steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Wall-clock budget, e.g. 90s, 10m, 1h (sizes the LR schedule when --steps is absent).
        #[arg(long, value_parser = parse_duration)]
        time_budget: Option<Duration>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Bytes per training window (default: the model's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        #[arg(long, default_value_t = 2e-3)]
        lr: f32,
        #[arg(long, default_value_t = 50)]
        warmup: u64,
        #[arg(long, default_value_t = 0.1)]
        weight_decay: f32,
        #[arg(long, default_value_t = 1.0)]
        grad_clip: f32,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Validate every N steps.
        #[arg(long, default_value_t = 100)]
        eval_every: u64,
        /// Validation windows per evaluation.
        #[arg(long, default_value_t = 32)]
        eval_windows: usize,
        /// Checkpoint every N steps (and at the end).
        #[arg(long, default_value_t = 200)]
        checkpoint_every: u64,
        /// Continue the run saved in --out.
        #[arg(long)]
        resume: bool,
        /// Stop at this step (with a checkpoint) without changing the schedule; continue later
        /// with --resume.
        #[arg(long)]
        stop_at_step: Option<u64>,
        #[command(flatten)]
        device: DeviceArgs,
        /// After training, generate this many bytes from the start of the validation text.
        #[arg(long, default_value_t = 300)]
        sample_bytes: usize,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Bits per byte of a checkpoint on a file.
    ///
    /// Example: mega eval --checkpoint runs/small --data data/shakespeare.txt --strided
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// The paper's strided inference (two passes offset by P/2).
        #[arg(long)]
        strided: bool,
        /// Sliding windows with stride T/2 (only the second half of later windows is scored).
        #[arg(long)]
        sliding_window: bool,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Window length (default: the model's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Only evaluate the first N bytes.
        #[arg(long)]
        max_bytes: Option<usize>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Generate bytes from a checkpoint, streaming them to stdout.
    ///
    /// Example: mega generate --checkpoint runs/small --prompt "ROMEO:" --max-bytes 200
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, conflicts_with = "prompt_file")]
        prompt: Option<String>,
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        max_bytes: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Keep the K most likely bytes (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling mass (1 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop sequence (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Generate for every line of a JSONL file through the serving engine; resumable.
    ///
    /// Example: mega batch --checkpoint runs/quick --input prompts.jsonl --output results.jsonl
    Batch {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Requests, one JSON object per line: {"id", "prompt", "max_tokens", "temperature",
        /// "top_p", "top_k", "seed", "stop", "logprobs"}.
        #[arg(long)]
        input: PathBuf,
        /// Results, one JSON object per line, keyed by id; appended to when it exists.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        engine: mega::serve::EngineArgs,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Throughput benchmarks, printed as JSON.
    ///
    /// Example: mega bench train --preset bench --json
    Bench {
        #[arg(value_enum)]
        what: BenchKind,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        seq_len: Option<usize>,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        #[arg(long, default_value_t = 512)]
        gen_len: usize,
        /// Bytes to stream (`bench stream`).
        #[arg(long, default_value_t = 1_000_000)]
        bytes: usize,
        /// Print JSON only (always JSON; kept for scripts that pass it).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Make a checkpoint from a safetensors file of weights (MEGALODON: the official
    /// state-dict names and shapes) and its hyper-parameters (config JSON).
    ///
    /// Example: mega convert --weights model.safetensors --config config.json --out runs/imported
    Convert {
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/models,
    /// /health, /metrics) with continuous batching.
    ///
    /// Example: mega serve --checkpoint runs/small --port 8080
    Serve {
        /// Checkpoint directory written by `mega train` (MEGABYTE or MEGALODON); its name is
        /// the served model id.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// TCP port (0 picks a free one; the bound address is printed on stderr).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[command(flatten)]
        engine: mega::serve::EngineArgs,
        /// Completion requests served at once; more get 429 with Retry-After.
        #[arg(long, default_value_t = 256)]
        max_concurrent_requests: usize,
        /// Largest request body in bytes (larger: 413).
        #[arg(long, default_value_t = 4 << 20)]
        max_body_bytes: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Devices, kernel build and presets.
    Info,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchKind {
    Train,
    Generate,
    /// MEGALODON only: stream bytes through the model, reporting time and peak memory at
    /// 8,192 / 10K / 65,536 / 100K / 1M bytes (constant memory, linear cost).
    Stream,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("'{s}' must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0
            || rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .is_err()
        {
            eprintln!("error: --threads must be a positive number");
            std::process::exit(2);
        }
    }
    if let Err(e) = run(cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train {
            model,
            data,
            valid,
            out,
            steps,
            time_budget,
            batch_size,
            seq_len,
            lr,
            warmup,
            weight_decay,
            grad_clip,
            seed,
            eval_every,
            eval_windows,
            checkpoint_every,
            resume,
            stop_at_step,
            device,
            sample_bytes,
            quiet,
        } => {
            let cfg = if resume {
                let json = mega::train::checkpoint::load_config(&out)
                    .with_context(|| format!("--resume needs a checkpoint in {}", out.display()))?;
                let cfg: ModelConfig = serde_json::from_value(json).with_context(|| {
                    format!("the checkpoint config in {} is invalid", out.display())
                })?;
                cfg.validate()?;
                cfg
            } else {
                model.resolve("small")?
            };
            let max_seq_len = with_model!(&cfg, |m| m.max_seq_len());
            let opts = TrainOptions {
                data: data.clone(),
                valid,
                out: out.clone(),
                steps,
                time_budget,
                hp: TrainHparams {
                    batch_size,
                    seq_len: seq_len.unwrap_or(max_seq_len),
                    total_steps: steps.unwrap_or(0),
                    lr,
                    min_lr: lr / 10.0,
                    warmup_steps: warmup,
                    weight_decay,
                    beta1: 0.9,
                    beta2: 0.98,
                    eps: 1e-8,
                    grad_clip,
                    seed,
                    valid_fraction: 0.05,
                },
                eval_every: eval_every.max(1),
                eval_windows,
                checkpoint_every: checkpoint_every.max(1),
                resume,
                stop_at_step,
                progress: !quiet,
                max_skipped: 20,
            };
            if batch_size == 0 {
                bail!("--batch-size must be positive");
            }
            let resolved = device.select()?;
            with_backend!(resolved, |be| train_and_report(
                &be,
                &cfg,
                &opts,
                sample_bytes
            ))
        }
        Command::Eval {
            checkpoint,
            data,
            strided,
            sliding_window,
            batch_size,
            seq_len,
            max_bytes,
            device,
        } => {
            let (cfg, tensors) = load_checkpoint(&checkpoint)?;
            let corpus = mega::train::data::ByteCorpus::open(&data)?;
            let n = max_bytes.unwrap_or(corpus.len()).min(corpus.len());
            let bytes = corpus.bytes(0..n);
            let resolved = device.select()?;
            let mode = EvalMode {
                strided,
                sliding_window,
            };
            let r = with_backend!(resolved, |be| evaluate_checkpoint(
                &be, &cfg, &tensors, &bytes, &data, mode, batch_size, seq_len
            ))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Generate {
            checkpoint,
            prompt,
            prompt_file,
            max_bytes,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            device,
        } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (None, None) => Vec::new(),
            };
            let stops: Vec<Vec<u8>> = stop.into_iter().map(String::into_bytes).collect();
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
            };
            params.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (cfg, tensors) = load_checkpoint(&checkpoint)?;
            let resolved = device.select()?;
            with_backend!(resolved, |be| sample(
                &be, &cfg, &tensors, &prompt, max_bytes, params, &stops
            ))
        }
        Command::Batch {
            checkpoint,
            input,
            output,
            engine,
            quiet,
            device,
        } => {
            let cfg = engine.to_config();
            let engine = with_backend!(device.select()?, |be| mega::serve::Engine::start_on(
                be,
                &checkpoint,
                cfg.clone()
            ))?;
            let s = mega::serve::batch::run_batch(engine, &input, &output, cfg, !quiet)?;
            eprintln!(
                "batch: {} results written ({} errors), {} already done, {} bytes generated in {:.1} s ({:.0} bytes/s)",
                s.written,
                s.errors,
                s.skipped,
                s.generated_bytes,
                s.elapsed_s,
                s.generated_bytes as f64 / s.elapsed_s.max(1e-9)
            );
            Ok(())
        }
        Command::Bench {
            what,
            model,
            batch_size,
            seq_len,
            warmup,
            runs,
            prompt_len,
            gen_len,
            bytes,
            json: _,
            device,
        } => {
            let cfg = model.resolve("bench")?;
            if runs == 0 {
                bail!("--runs must be positive");
            }
            let resolved = device.select()?;
            let report = with_backend!(resolved, |be| bench(
                &be,
                &cfg,
                what,
                BenchSizes {
                    batch_size,
                    seq_len,
                    warmup,
                    runs,
                    prompt_len,
                    gen_len,
                    bytes,
                }
            ))?;
            println!("{report}");
            Ok(())
        }
        Command::Convert {
            weights,
            config,
            out,
        } => {
            let n = mega::convert::convert(&weights, &config, &out)?;
            println!("wrote {n} tensors to {}", out.display());
            Ok(())
        }
        Command::Serve {
            checkpoint,
            host,
            port,
            engine,
            max_concurrent_requests,
            max_body_bytes,
            device,
        } => serve(
            &checkpoint,
            &host,
            port,
            engine.to_config(),
            max_concurrent_requests,
            max_body_bytes,
            device,
        ),
        Command::Info => {
            let m = mega::bench::Machine::detect();
            println!("mega {}", env!("CARGO_PKG_VERSION"));
            println!(
                "cpu: {} ({} logical cores, {} worker threads)",
                m.cpu, m.logical_cores, m.threads
            );
            println!("devices:");
            for d in mega::device::describe_devices() {
                println!("  {d}");
            }
            println!("kernels: {}", mega::kernels::build_info());
            println!("presets (megabyte):");
            for name in MegabyteConfig::PRESETS {
                let cfg = MegabyteConfig::preset(name)?;
                let model = mega::model::megabyte::Megabyte::new(&cfg);
                println!(
                    "  {:<11} {:>14} parameters, P={}, context {} bytes, {:.2} MFLOP/byte forward",
                    name,
                    model.layout.numel(),
                    cfg.patch_size,
                    cfg.max_seq_len,
                    model.forward_flops_per_byte() / 1e6
                );
            }
            println!("presets (megalodon):");
            for name in MegalodonConfig::PRESETS {
                let cfg = MegalodonConfig::preset(name)?;
                let model = mega::model::megalodon::Megalodon::new(&cfg);
                println!(
                    "  {:<14} {:>14} parameters, chunk {}, {:.2} MFLOP/byte forward",
                    name,
                    model.layout().numel(),
                    cfg.chunk_size,
                    model.forward_flops_per_byte() / 1e6
                );
            }
            Ok(())
        }
    }
}

/// `mega serve`: start the engine, bind, serve until SIGINT/SIGTERM.
fn serve(
    checkpoint: &std::path::Path,
    host: &str,
    port: u16,
    cfg: mega::serve::EngineConfig,
    max_concurrent_requests: usize,
    max_body_bytes: usize,
    device: DeviceArgs,
) -> Result<()> {
    use mega::serve::http::{serve, AppState, HttpConfig};
    if max_concurrent_requests == 0 || max_body_bytes == 0 {
        bail!("--max-concurrent-requests and --max-body-bytes must be positive");
    }
    let http = HttpConfig {
        max_concurrent_requests,
        max_body_bytes,
        max_prompt_bytes: cfg.max_prompt_bytes,
        max_total_bytes: cfg.max_total_bytes,
    };
    // The engine thread owns the backend: weights and caches live in its buffers (device
    // memory on a GPU).
    let engine = with_backend!(device.select()?, |be| mega::serve::Engine::start_on(
        be, checkpoint, cfg
    ))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("binding {host}:{port}"))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {} ({}) on http://{addr}/v1 (Ctrl-C to stop)",
            engine.model_id(),
            engine.model_kind()
        );
        let app = std::sync::Arc::new(AppState::new(engine, http));
        serve(listener, app).await.context("serving HTTP")
    })
}

/// `mega train` on backend `be`: train, print the summary, and sample from the result.
fn train_and_report<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    opts: &TrainOptions,
    sample_bytes: usize,
) -> Result<()> {
    let s = train(be, cfg, opts)?;
    println!(
        "trained {} steps in {:.0}s ({:.0} bytes/s, {} parameters)",
        s.steps, s.elapsed_s, s.bytes_per_s, s.params
    );
    println!(
        "validation: {:.3} bits per byte (unigram entropy of the corpus: {:.3} bits per byte)",
        s.final_valid_bpb, s.unigram_entropy_bits
    );
    println!(
        "checkpoint: {}   loss curve: {}",
        opts.out.display(),
        opts.out.join("loss.svg").display()
    );
    if sample_bytes > 0 {
        let split = open_split(&opts.data, opts.valid.as_deref(), 0.05)?;
        let prompt: Vec<u8> = split
            .valid_windows(64, 1)
            .into_iter()
            .next()
            .unwrap_or_default();
        println!("--- sample (prompt from the validation text, temperature 0.8) ---");
        let (cfg, tensors) = load_checkpoint(&opts.out)?;
        let sampling = SamplingParams {
            temperature: 0.8,
            ..Default::default()
        };
        sample(be, &cfg, &tensors, &prompt, sample_bytes, sampling, &[])?;
    }
    Ok(())
}

/// `mega eval` on backend `be`.
#[allow(clippy::too_many_arguments)]
fn evaluate_checkpoint<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    tensors: &[HostTensor],
    bytes: &[u8],
    data: &std::path::Path,
    mode: EvalMode,
    batch_size: usize,
    seq_len: Option<usize>,
) -> Result<EvalResult> {
    with_model!(cfg, |model| {
        if mode.strided && model.patch_size().is_none() {
            bail!("--strided needs a patch-based model (MEGABYTE)");
        }
        let host = model
            .layout()
            .host_from_named(tensors)
            .map_err(anyhow::Error::msg)?;
        let params = model.layout().upload(be, &host);
        let t = seq_len.unwrap_or_else(|| model.max_seq_len());
        model
            .check_seq_len(t)
            .map_err(|e| anyhow::anyhow!("--seq-len: {e}"))?;
        if bytes.len() < model.window_len(t) {
            bail!(
                "{} has {} bytes; one window needs {}",
                data.display(),
                bytes.len(),
                model.window_len(t)
            );
        }
        let mut ws = model.workspace(be, batch_size.max(1), t, false);
        Ok(evaluate(be, &model, &params, &mut ws, bytes, mode))
    })
}

/// The sizes `mega bench` takes from the command line.
struct BenchSizes {
    batch_size: Option<usize>,
    seq_len: Option<usize>,
    warmup: usize,
    runs: usize,
    prompt_len: usize,
    gen_len: usize,
    bytes: usize,
}

/// `mega bench` on backend `be`: the report as pretty JSON.
fn bench<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    what: BenchKind,
    sizes: BenchSizes,
) -> Result<String> {
    let config = cfg.to_json();
    if let BenchKind::Stream = what {
        let ModelConfig::Megalodon(m) = cfg else {
            bail!("bench stream needs --model megalodon");
        };
        let r = mega::bench::bench_stream(be, m, config, sizes.bytes, m.chunk_size);
        return Ok(serde_json::to_string_pretty(&r)?);
    }
    if sizes.runs == 0 {
        bail!("--runs must be positive");
    }
    let BenchSizes {
        warmup,
        runs,
        prompt_len,
        gen_len,
        ..
    } = sizes;
    with_model!(cfg, |m| Ok(match what {
        BenchKind::Train => {
            let t = sizes.seq_len.unwrap_or_else(|| m.max_seq_len());
            m.check_seq_len(t)
                .map_err(|e| anyhow::anyhow!("--seq-len: {e}"))?;
            let b = sizes.batch_size.unwrap_or(4).max(1);
            serde_json::to_string_pretty(&mega::bench::bench_train(
                be, &m, config, b, t, warmup, runs,
            ))?
        }
        BenchKind::Stream => unreachable!("handled above"),
        BenchKind::Generate => {
            if prompt_len + gen_len >= m.max_seq_len() {
                eprintln!("note: prompt + generation exceed the context; the window slides");
            }
            let b = sizes.batch_size.unwrap_or(1).max(1);
            serde_json::to_string_pretty(&mega::bench::bench_generate(
                be, &m, config, b, prompt_len, gen_len, warmup, runs,
            ))?
        }
    }))
}

/// Generate from a checkpoint's tensors on backend `be` and stream the bytes to stdout.
fn sample<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    tensors: &[HostTensor],
    prompt: &[u8],
    max_bytes: usize,
    sampling: SamplingParams,
    stop: &[Vec<u8>],
) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.write_all(prompt)?;
    out.flush()?;
    let req = GenerateRequest {
        prompt: prompt.to_vec(),
        max_bytes,
        sampling,
        stop: stop.to_vec(),
    };
    let mut io_err = None;
    with_model!(cfg, |model| {
        let host = model
            .layout()
            .host_from_named(tensors)
            .map_err(anyhow::Error::msg)?;
        let params = model.layout().upload(be, &host);
        generate(&model, be, &params, &[req], |_, bytes| {
            if let Err(e) = out.write_all(bytes).and_then(|_| out.flush()) {
                io_err.get_or_insert(e);
            }
        })
        .map_err(anyhow::Error::msg)?;
    });
    if let Some(e) = io_err {
        return Err(e.into());
    }
    writeln!(out)?;
    Ok(())
}
