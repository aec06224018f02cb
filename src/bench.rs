//! `mega bench`: reproducible throughput figures (JSON) for training and generation on any
//! backend, with the backend's f32 GEMM rate measured in the same run so that every figure can
//! be read as a fraction of the hardware's matmul peak.

use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::model::{LanguageModel, ModelShape};
use crate::train::trainer::{optimizer_step, TrainHparams, TrainState};
use serde::Serialize;
use std::time::Instant;

/// The machine a figure was taken on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub logical_cores: usize,
    pub threads: usize,
}

impl Machine {
    /// Describe this machine and the rayon pool size in use.
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            logical_cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            threads: rayon::current_num_threads(),
        }
    }
}

/// Median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// f32 GEMM rate of the CPU backend on an `n³` product with `threads` threads, GFLOP/s
/// (median of `runs` after one warm-up).
pub fn gemm_gflops(n: usize, threads: usize, runs: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    pool.install(|| {
        let be = Cpu::<f32>::new();
        let a = be.upload(&vec![0.5; n * n]);
        let b = be.upload(&vec![0.25; n * n]);
        let mut c = be.zeros(n * n);
        be.matmul(&mut c, &a, &b, n, n, n, false, false, false);
        let rates: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                be.matmul(&mut c, &a, &b, n, n, n, false, false, false);
                2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        median(&rates)
    })
}

/// Blocks until the work issued on `be` so far has finished: a one-float download, which on a
/// device with one stream returns only after everything before it (a no-op cost on the CPU).
fn wait_for<B: Backend>(be: &B, fence: &B::Buf) {
    be.download(fence);
}

/// f32 GEMM rate of backend `be` on an `n³` product, GFLOP/s (median of `runs` after one
/// warm-up); on the CPU backend this uses the global rayon pool.
pub fn backend_gemm_gflops<B: Backend>(be: &B, n: usize, runs: usize) -> f64 {
    let a = be.upload(&vec![0.5; n * n]);
    let b = be.upload(&vec![0.25; n * n]);
    let mut c = be.zeros(n * n);
    let fence = be.zeros(1);
    be.matmul(&mut c, &a, &b, n, n, n, false, false, false);
    wait_for(be, &fence);
    let rates: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            be.matmul(&mut c, &a, &b, n, n, n, false, false, false);
            wait_for(be, &fence);
            2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&rates)
}

/// Result of `mega bench train`.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub bench: &'static str,
    /// The backend that ran it ([`Backend::name`]: `cpu`, `cuda:0`, ...).
    pub device: String,
    pub config: serde_json::Value,
    pub batch_size: usize,
    pub seq_len: usize,
    pub params: usize,
    pub threads: usize,
    pub warmup: usize,
    /// Bytes per second of each timed step (forward, backward, clip, AdamW).
    pub runs: Vec<f64>,
    pub bytes_per_s_median: f64,
    /// Analytic training FLOPs per byte (3 × forward).
    pub train_flops_per_byte: f64,
    pub achieved_gflops: f64,
    /// f32 GEMM rate (2048³) of the CPU on one thread, and of the benchmarked backend (all
    /// threads on the CPU), measured in this run.
    pub gemm_gflops_1t: f64,
    pub gemm_gflops: f64,
    pub fraction_of_gemm: f64,
    pub machine: Machine,
}

/// Time full training steps of a randomly initialized model on `be`; `config` is echoed in the
/// report.
pub fn bench_train<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    config: serde_json::Value,
    batch: usize,
    seq_len: usize,
    warmup: usize,
    runs: usize,
) -> TrainBench {
    let layout = model.layout();
    let mut st = TrainState {
        params: layout.upload(be, &layout.init_host(0)),
        grads: layout.zeros(be),
        m: layout.zeros(be),
        v: layout.zeros(be),
    };
    let fence = be.zeros(1);
    let hp = TrainHparams {
        batch_size: batch,
        seq_len,
        total_steps: 1000,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        grad_clip: 1.0,
        seed: 0,
        valid_fraction: 0.0,
    };
    let mut ws = model.workspace(be, batch, seq_len, true);
    // A model may read more bytes per window than it scores (MEGALODON reads t + 1).
    let window = model.window_len(seq_len);
    let bytes: Vec<u8> = (0..batch * window)
        .map(|i| (i * 7919 % 251) as u8)
        .collect();
    let mut rates = Vec::new();
    for step in 0..warmup + runs {
        let t = Instant::now();
        st.grads.iter_mut().for_each(|g| be.fill_zero(g));
        model.forward(be, &st.params, &mut ws, &bytes);
        model.backward(be, &st.params, &mut st.grads, &mut ws);
        optimizer_step(be, model, &mut st, &hp, 1e-4, step as u64);
        wait_for(be, &fence);
        if step >= warmup {
            rates.push((batch * seq_len) as f64 / t.elapsed().as_secs_f64());
        }
    }
    // The GEMM yardstick below allocates its own matrices: free the training state first so
    // they do not add to the step's peak memory.
    drop(ws);
    drop(st);
    let med = median(&rates);
    let train_flops_per_byte = 3.0 * model.forward_flops_per_byte();
    let achieved = med * train_flops_per_byte / 1e9;
    let threads = rayon::current_num_threads();
    let gemm_1t = gemm_gflops(2048, 1, 3);
    let gemm_all = backend_gemm_gflops(be, 2048, 3);
    TrainBench {
        bench: "train",
        device: be.name(),
        config,
        batch_size: batch,
        seq_len,
        params: layout.numel(),
        threads,
        warmup,
        runs: rates,
        bytes_per_s_median: med,
        train_flops_per_byte,
        achieved_gflops: achieved,
        gemm_gflops_1t: gemm_1t,
        gemm_gflops: gemm_all,
        fraction_of_gemm: achieved / gemm_all,
        machine: Machine::detect(),
    }
}

/// Result of `mega bench generate`.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateBench {
    pub bench: &'static str,
    /// The backend that ran it.
    pub device: String,
    pub config: serde_json::Value,
    pub params: usize,
    pub batch_size: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub threads: usize,
    /// Generated bytes per second (all rows) of each timed run, prefill included.
    pub runs: Vec<f64>,
    pub bytes_per_s_median: f64,
    pub machine: Machine,
}

/// Time KV-cached generation of `gen_len` bytes after `prompt_len`-byte prompts on `be`.
#[allow(clippy::too_many_arguments)]
pub fn bench_generate<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    config: serde_json::Value,
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
    warmup: usize,
    runs: usize,
) -> GenerateBench {
    let params = model.layout().upload(be, &model.layout().init_host(0));
    let prompts: Vec<Vec<u8>> = (0..batch)
        .map(|r| {
            (0..prompt_len)
                .map(|i| b"the quick brown fox "[(i + r) % 20])
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = prompts.iter().map(|p| p.as_slice()).collect();
    let mut rates = Vec::new();
    for run in 0..warmup + runs {
        let t = Instant::now();
        let mut dec = model.decoder(be, &params, &refs);
        let mut samplers: Vec<Sampler> = (0..batch)
            .map(|r| {
                Sampler::new(SamplingParams {
                    seed: r as u64,
                    ..SamplingParams::default()
                })
                .expect("valid sampling")
            })
            .collect();
        for _ in 0..gen_len {
            let next: Vec<u8> = dec
                .logits()
                .chunks(256)
                .zip(samplers.iter_mut())
                .map(|(l, s)| s.sample(l) as u8)
                .collect();
            dec.step(&next);
        }
        if run >= warmup {
            rates.push((batch * gen_len) as f64 / t.elapsed().as_secs_f64());
        }
    }
    GenerateBench {
        bench: "generate",
        device: be.name(),
        config,
        params: model.layout().numel(),
        batch_size: batch,
        prompt_len,
        gen_len,
        threads: rayon::current_num_threads(),
        bytes_per_s_median: median(&rates),
        runs: rates,
        machine: Machine::detect(),
    }
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes; 0 where /proc is absent.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One point of a streaming run: bytes consumed so far, wall time, and peak RSS.
#[derive(Clone, Debug, Serialize)]
pub struct StreamPoint {
    pub bytes: usize,
    pub elapsed_s: f64,
    pub peak_rss_bytes: u64,
}

/// Result of `mega bench stream`.
#[derive(Clone, Debug, Serialize)]
pub struct StreamBench {
    pub bench: &'static str,
    /// The backend that ran it.
    pub device: String,
    pub config: serde_json::Value,
    pub params: usize,
    pub call_len: usize,
    pub points: Vec<StreamPoint>,
    /// Wall time to stream 65,536 bytes over the time for 8,192 (linear cost ⇒ ≈ 8).
    pub time_ratio_65536_over_8192: Option<f64>,
    /// Largest peak RSS over smallest, across the points at 10K, 100K and 1M bytes.
    pub rss_ratio_10k_100k_1m: Option<f64>,
    pub bytes_per_s: f64,
    pub machine: Machine,
}

/// Stream `total` pseudo-text bytes through a MEGALODON model on `be` in calls of `call_len`
/// bytes (one row), recording time and peak memory at fixed byte counts.
pub fn bench_stream<B: Backend>(
    be: &B,
    cfg: &crate::config::MegalodonConfig,
    config: serde_json::Value,
    total: usize,
    call_len: usize,
) -> StreamBench {
    use crate::infer::megalodon_stream::{Logits, MegalodonStream};
    let model = crate::model::megalodon::Megalodon::new(cfg);
    let params = model.layout().upload(be, &model.layout().init_host(0));
    let marks = [8_192usize, 10_000, 65_536, 100_000, 1_000_000];
    let text = b"It was the best of times, it was the worst of times, it was the age of wisdom. ";
    let mut stream = MegalodonStream::new(&model, be, &params, 1);
    let mut points = Vec::new();
    let t0 = Instant::now();
    let mut done = 0usize;
    while done < total {
        let next_mark = marks
            .iter()
            .copied()
            .find(|&m| m > done)
            .unwrap_or(usize::MAX);
        let n = call_len.min(total - done).min(next_mark - done);
        let bytes: Vec<u8> = (done..done + n).map(|i| text[i % text.len()]).collect();
        stream.feed(&[&bytes], Logits::Last);
        done += n;
        if marks.contains(&done) {
            points.push(StreamPoint {
                bytes: done,
                elapsed_s: t0.elapsed().as_secs_f64(),
                peak_rss_bytes: peak_rss_bytes(),
            });
        }
    }
    let at = |b: usize| points.iter().find(|p| p.bytes == b);
    let time_ratio = match (at(8_192), at(65_536)) {
        (Some(a), Some(b)) => Some(b.elapsed_s / a.elapsed_s),
        _ => None,
    };
    let rss: Vec<u64> = [10_000, 100_000, 1_000_000]
        .iter()
        .filter_map(|&b| at(b))
        .map(|p| p.peak_rss_bytes)
        .collect();
    let rss_ratio = (rss.len() == 3)
        .then(|| *rss.iter().max().unwrap() as f64 / *rss.iter().min().unwrap() as f64);
    StreamBench {
        bench: "stream",
        device: be.name(),
        config,
        params: model.layout().numel(),
        call_len,
        points,
        time_ratio_65536_over_8192: time_ratio,
        rss_ratio_10k_100k_1m: rss_ratio,
        bytes_per_s: total as f64 / t0.elapsed().as_secs_f64(),
        machine: Machine::detect(),
    }
}
