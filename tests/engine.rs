//! The serving engine end to end through its public API: results equal `generate()` run
//! alone for every request (continuous batching, chunked prefill, preemption and
//! recomputation change nothing), cancellation frees the cache, limits are enforced.

#[path = "support/checkpoint.rs"]
mod checkpoint;

use std::time::{Duration, Instant};

use mega::backend::cpu::Cpu;
use mega::config::{FeedForward, MegabyteConfig, MegalodonConfig, ModelConfig};
use mega::infer::generate::{generate, GenerateRequest};
use mega::infer::megabyte_decoder::MegabyteDecoder;
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::LanguageModel;
use mega::serve::{
    ByteLogprob, Engine, EngineConfig, Event, FinishReason, Request, RequestHandle, SamplingParams,
    SubmitError,
};

const SEED: u64 = 3;

fn megabyte_cfg() -> MegabyteConfig {
    MegabyteConfig {
        vocab_size: 256,
        patch_size: 4,
        max_seq_len: 32,
        global_byte_dim: 16,
        global_dim: 64,
        global_layers: 2,
        global_heads: 2,
        local_dim: 32,
        local_layers: 2,
        local_heads: 2,
        ffn_mult: 4,
        activation: FeedForward::Relu,
        init_std: 0.1,
        head_bias: true,
    }
}

fn megalodon_cfg() -> MegalodonConfig {
    MegalodonConfig::preset("tiny").unwrap()
}

/// A checkpoint of the test MEGABYTE in a fresh directory, and the model it holds.
fn megabyte_checkpoint() -> (tempfile::TempDir, Megabyte) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = megabyte_cfg();
    let model = Megabyte::new(&cfg);
    checkpoint::write_checkpoint(dir.path(), &ModelConfig::Megabyte(cfg), &model, SEED);
    (dir, model)
}

/// A checkpoint of the test MEGALODON in a fresh directory, and the model it holds.
fn megalodon_checkpoint() -> (tempfile::TempDir, Megalodon) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = megalodon_cfg();
    let model = Megalodon::new(&cfg);
    checkpoint::write_checkpoint(dir.path(), &ModelConfig::Megalodon(cfg), &model, SEED);
    (dir, model)
}

fn text(seed: usize, len: usize) -> Vec<u8> {
    let src = b"It was the best of times, it was the worst of times; the age of wisdom. ";
    (0..len)
        .map(|i| src[(i * 5 + seed * 11) % src.len()])
        .collect()
}

fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

/// A varied set of requests: empty, short and over-long prompts, greedy and sampled.
fn requests() -> Vec<Request> {
    let mk = |prompt: Vec<u8>, max_bytes, s| Request {
        prompt,
        max_bytes,
        sampling: s,
        stop: Vec::new(),
        logprobs: None,
    };
    vec![
        mk(Vec::new(), 20, sampling(1.0, 0, 1.0, 1)),
        mk(text(1, 5), 45, sampling(0.0, 0, 1.0, 0)),
        mk(text(2, 29), 30, sampling(0.8, 20, 1.0, 7)),
        mk(text(3, 70), 25, sampling(1.0, 0, 0.9, 9)),
        mk(text(4, 12), 60, sampling(1.2, 0, 1.0, 11)),
        mk(text(5, 3), 1, sampling(1.0, 0, 1.0, 12)),
    ]
}

struct Outcome {
    bytes: Vec<u8>,
    finish: FinishReason,
    logprobs: Vec<ByteLogprob>,
}

fn collect(mut h: RequestHandle) -> Result<Outcome, String> {
    let mut bytes = Vec::new();
    let mut logprobs = Vec::new();
    loop {
        match h.events.blocking_recv() {
            Some(Event::Bytes {
                bytes: b,
                logprobs: l,
            }) => {
                if let Some(l) = l {
                    assert_eq!(l.len(), b.len(), "one logprob entry per byte");
                    logprobs.extend(l);
                }
                bytes.extend(b);
            }
            Some(Event::Done {
                finish_reason,
                completion_bytes,
                ..
            }) => {
                assert_eq!(completion_bytes, bytes.len());
                return Ok(Outcome {
                    bytes,
                    finish: finish_reason,
                    logprobs,
                });
            }
            Some(Event::Error(e)) => return Err(e),
            None => return Err("channel closed without Done".into()),
        }
    }
}

/// `generate()` for each request alone (a batch of one), as `mega generate` runs it.
fn reference<M: LanguageModel<Cpu<f32>>>(
    model: &M,
    reqs: &[Request],
) -> Vec<(Vec<u8>, FinishReason)> {
    let be = Cpu::<f32>::new();
    let params = model.layout().upload(&be, &model.layout().init_host(SEED));
    reqs.iter()
        .map(|r| {
            let g = GenerateRequest {
                prompt: r.prompt.clone(),
                max_bytes: r.max_bytes,
                sampling: r.sampling,
                stop: r.stop.clone(),
            };
            let out = generate(model, &be, &params, &[g], |_, _| {}).unwrap();
            (out[0].bytes.clone(), out[0].finish_reason)
        })
        .collect()
}

/// Adds to each request a stop sequence taken from the middle of its reference output, so
/// stops really fire.
fn with_stops<M: LanguageModel<Cpu<f32>>>(model: &M, mut reqs: Vec<Request>) -> Vec<Request> {
    let plain = reference(model, &reqs);
    for (r, (bytes, _)) in reqs.iter_mut().zip(&plain).skip(1).step_by(2) {
        if bytes.len() >= 12 {
            r.stop = vec![b"\x00\x01never".to_vec(), bytes[8..10].to_vec()];
        }
    }
    reqs
}

fn run_all(engine: &Engine, reqs: &[Request]) -> Vec<Outcome> {
    let handles: Vec<RequestHandle> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("accepted"))
        .collect();
    handles.into_iter().map(|h| collect(h).unwrap()).collect()
}

fn assert_same(got: &[Outcome], want: &[(Vec<u8>, FinishReason)]) {
    for (i, (g, (bytes, finish))) in got.iter().zip(want).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(&g.bytes),
            String::from_utf8_lossy(bytes),
            "request {i}: bytes"
        );
        assert_eq!(g.finish, *finish, "request {i}: finish reason");
    }
}

fn batching_config() -> EngineConfig {
    EngineConfig {
        max_running: 3,
        max_queued: 64,
        memory_budget_bytes: 64 << 20,
        block_size: 2,
        prefill_chunk: 7,
        max_prompt_bytes: 1000,
        max_total_bytes: 2000,
    }
}

#[test]
fn megabyte_engine_matches_generate_alone() {
    let (dir, model) = megabyte_checkpoint();
    let reqs = with_stops(&model, requests());
    assert!(reqs.iter().any(|r| !r.stop.is_empty()));
    let want = reference(&model, &reqs);
    assert!(
        want.iter().any(|w| w.1 == FinishReason::Stop),
        "a stop fires"
    );
    let engine = Engine::start(dir.path(), batching_config()).unwrap();
    assert_eq!(engine.model_kind(), "megabyte");
    let got = run_all(&engine, &reqs);
    assert_same(&got, &want);
    let m = engine.render_metrics();
    assert!(m.contains("mega_requests_finished_total{finish_reason=\"stop\"}"));
    let sampled: u64 = want.iter().map(|w| w.0.len() as u64).sum();
    let total = metric(&m, "mega_generated_bytes_total");
    assert!(
        total >= sampled as f64,
        "{total} sampled bytes counted, {sampled} released"
    );
    engine.shutdown();
}

#[test]
fn megalodon_engine_matches_generate_alone() {
    let (dir, model) = megalodon_checkpoint();
    let reqs = with_stops(&model, requests());
    let want = reference(&model, &reqs);
    let engine = Engine::start(dir.path(), batching_config()).unwrap();
    assert_eq!(engine.model_kind(), "megalodon");
    let got = run_all(&engine, &reqs);
    assert_same(&got, &want);
    engine.shutdown();
}

#[test]
fn megalodon_engine_with_one_slot_matches_generate_alone() {
    // One slot: every call runs the whole (padded) state in place, sequence after sequence.
    let (dir, model) = megalodon_checkpoint();
    let reqs = requests();
    let want = reference(&model, &reqs);
    let mut ecfg = batching_config();
    ecfg.max_running = 1;
    let engine = Engine::start(dir.path(), ecfg).unwrap();
    let got = run_all(&engine, &reqs);
    assert_same(&got, &want);
    engine.shutdown();
}

#[test]
fn preempted_sequences_are_recomputed_to_the_same_bytes() {
    let (dir, model) = megabyte_checkpoint();
    // Room for one full context (8 patches = 4 blocks of 2) and one more block, for four
    // running sequences that each grow to the full context; the budget also covers the
    // decoder's padding row (one more slot and block).
    let mut ecfg = batching_config();
    ecfg.max_running = 4;
    let slot = MegabyteDecoder::<Cpu<f32>>::slot_bytes(&model);
    let block = MegabyteDecoder::<Cpu<f32>>::global_bytes_per_position(&model) * ecfg.block_size;
    ecfg.memory_budget_bytes = (4 + 1) * slot + (5 + 1) * block;
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request {
            prompt: text(i, 6 + 3 * i),
            max_bytes: 150,
            sampling: sampling(1.0, 0, 1.0, 100 + i as u64),
            stop: Vec::new(),
            logprobs: None,
        })
        .collect();
    let want = reference(&model, &reqs);
    let engine = Engine::start(dir.path(), ecfg).unwrap();
    let got = run_all(&engine, &reqs);
    assert_same(&got, &want);
    let preemptions = metric(&engine.render_metrics(), "mega_preemptions_total");
    assert!(preemptions > 0.0, "the budget forces preemption");
    wait_for(&engine, "finished sequences free their blocks", |m| {
        metric(m, "mega_cache_blocks_used") == 0.0
    });
    engine.shutdown();
}

#[test]
fn too_small_a_budget_is_refused_at_start() {
    let (dir, _) = megabyte_checkpoint();
    let mut ecfg = batching_config();
    ecfg.memory_budget_bytes = 1024;
    let err = Engine::start(dir.path(), ecfg).err().expect("refused");
    assert!(err.to_string().contains("too small"), "{err}");
}

/// Polls `cond` on the metrics text until it holds (the engine thread updates them).
fn wait_for(engine: &Engine, what: &str, cond: impl Fn(&str) -> bool) {
    let start = Instant::now();
    while !cond(&engine.render_metrics()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never happened: {what}\n{}",
            engine.render_metrics()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn dropping_the_handle_cancels_and_frees_the_blocks() {
    let (dir, _) = megabyte_checkpoint();
    let engine = Engine::start(dir.path(), batching_config()).unwrap();
    let mut h = engine
        .submit(Request {
            prompt: text(0, 10),
            max_bytes: 1900,
            sampling: sampling(1.0, 0, 1.0, 5),
            stop: Vec::new(),
            logprobs: None,
        })
        .unwrap();
    match h.events.blocking_recv() {
        Some(Event::Bytes { .. }) => {}
        other => panic!("expected bytes first, got {other:?}"),
    }
    assert!(metric(&engine.render_metrics(), "mega_cache_blocks_used") > 0.0);
    drop(h);
    wait_for(&engine, "cancellation frees the blocks", |m| {
        metric(m, "mega_cancellations_total") == 1.0
            && metric(m, "mega_cache_blocks_used") == 0.0
            && metric(m, "mega_running_sequences") == 0.0
    });
    engine.shutdown();
}

#[test]
fn limits_are_enforced_and_shutdown_aborts_running_sequences() {
    let (dir, _) = megalodon_checkpoint();
    let mut ecfg = batching_config();
    ecfg.max_running = 1;
    ecfg.max_queued = 1;
    let engine = Engine::start(dir.path(), ecfg).unwrap();
    let long = Request {
        prompt: text(0, 4),
        max_bytes: 1990,
        sampling: sampling(1.0, 0, 1.0, 5),
        stop: Vec::new(),
        logprobs: None,
    };
    let mut a = engine.submit(long.clone()).unwrap();
    // One slot and one queue place: of two more requests at least one is refused.
    let b = engine.submit(long.clone());
    let c = engine.submit(long.clone());
    let refused = [&b, &c]
        .iter()
        .filter(|r| matches!(r, Err(SubmitError::QueueFull { .. })))
        .count();
    assert!(refused >= 1, "{b:?} {c:?}");
    let bad = |f: &dyn Fn(&mut Request)| {
        let mut r = long.clone();
        f(&mut r);
        engine.submit(r).expect_err("refused")
    };
    assert_eq!(
        bad(&|r| r.prompt = vec![b'x'; 1001]),
        SubmitError::PromptTooLong { max: 1000 }
    );
    assert!(matches!(
        bad(&|r| r.sampling.temperature = -1.0),
        SubmitError::Invalid(_)
    ));
    assert!(matches!(
        bad(&|r| r.sampling.top_p = 0.0),
        SubmitError::Invalid(_)
    ));
    assert!(matches!(
        bad(&|r| r.stop = vec![Vec::new()]),
        SubmitError::Invalid(_)
    ));
    assert!(matches!(
        bad(&|r| r.logprobs = Some(6)),
        SubmitError::Invalid(_)
    ));
    assert!(matches!(
        bad(&|r| r.max_bytes = 1997),
        SubmitError::Invalid(_)
    ));
    let m = engine.render_metrics();
    assert_eq!(metric(&m, "mega_rejections_total{reason=\"invalid\"}"), 5.0);
    assert_eq!(
        metric(&m, "mega_rejections_total{reason=\"prompt_too_long\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "mega_rejections_total{reason=\"queue_full\"}"),
        refused as f64
    );
    // Shutdown ends the running sequence with an error, after the bytes it had released.
    match a.events.blocking_recv() {
        Some(Event::Bytes { .. }) => {}
        other => panic!("expected bytes first, got {other:?}"),
    }
    engine.shutdown();
    let last = std::iter::from_fn(|| a.events.blocking_recv()).last();
    assert!(matches!(last, Some(Event::Error(_))), "{last:?}");
    assert_eq!(engine.submit(long).err(), Some(SubmitError::ShuttingDown));
}

#[test]
fn logprobs_describe_the_released_bytes() {
    let (dir, _) = megabyte_checkpoint();
    let engine = Engine::start(dir.path(), batching_config()).unwrap();
    // Greedy: every released byte is the most likely one.
    let out = collect(
        engine
            .submit(Request {
                prompt: text(0, 9),
                max_bytes: 30,
                sampling: sampling(0.0, 0, 1.0, 0),
                stop: vec![b"zz".to_vec()],
                logprobs: Some(3),
            })
            .unwrap(),
    )
    .unwrap();
    assert_eq!(out.logprobs.len(), out.bytes.len());
    for (lp, &b) in out.logprobs.iter().zip(&out.bytes) {
        assert_eq!(lp.byte, b);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0], (b, lp.logprob), "greedy picks the top byte");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "sorted");
        let mass: f32 = lp.top.iter().map(|t| t.1.exp()).sum();
        assert!(lp.logprob <= 0.0 && mass <= 1.0 + 1e-5);
    }
    engine.shutdown();
}

/// The engine is generic over the backend: on the CUDA backend over the emulated device (its
/// weights and caches in that backend's buffers) it gives what `generate()` gives on the same
/// backend. MEGABYTE runs two slots over its paged KV pool, so rows at different phases take
/// their global steps on the side stream while the others decode (the emulator's hazard
/// checker fails any unordered access); MEGALODON two slots, so its stream state (CEMA,
/// TimestepNorm, the chunk KV cache) is copied between device slots.
#[test]
fn engine_on_the_emulated_cuda_backend_matches_generate_there() {
    let (dir, model) = megabyte_checkpoint();
    engine_matches_generate_on_the_emulator(dir.path(), &model, 2);
    let (dir, model) = megalodon_checkpoint();
    engine_matches_generate_on_the_emulator(dir.path(), &model, 2);
}

fn engine_matches_generate_on_the_emulator<M>(dir: &std::path::Path, model: &M, slots: usize)
where
    M: LanguageModel<mega::backend::cuda::CudaBackend<mega::emu::EmulatedDevice>>,
{
    use mega::backend::cuda::CudaBackend;
    use mega::emu::EmulatedDevice;
    let reqs: Vec<Request> = (0..2)
        .map(|i| Request {
            prompt: text(i, 5 + 4 * i),
            max_bytes: 12,
            sampling: sampling(1.0, 0, 1.0, 40 + i as u64),
            stop: Vec::new(),
            logprobs: None,
        })
        .collect();
    let be = CudaBackend::new(EmulatedDevice::new());
    let params = model.layout().upload(&be, &model.layout().init_host(SEED));
    let want: Vec<(Vec<u8>, FinishReason)> = reqs
        .iter()
        .map(|r| {
            let g = GenerateRequest {
                prompt: r.prompt.clone(),
                max_bytes: r.max_bytes,
                sampling: r.sampling,
                stop: r.stop.clone(),
            };
            let out = generate(model, &be, &params, &[g], |_, _| {}).unwrap();
            (out[0].bytes.clone(), out[0].finish_reason)
        })
        .collect();
    let mut ecfg = batching_config();
    ecfg.max_running = slots;
    let engine = Engine::start_on(CudaBackend::new(EmulatedDevice::new()), dir, ecfg).unwrap();
    let got = run_all(&engine, &reqs);
    assert_same(&got, &want);
    engine.shutdown();
}
