//! Whole-model checks of MEGALODON on the CPU backend: gradients against central finite
//! differences in f64, streaming (token by token, mixed call sizes, ragged rows, the
//! decoder) against the full forward, causality, initialization, and one-batch training.

use mega::backend::cpu::Cpu;
use mega::config::MegalodonConfig;
use mega::infer::megalodon_stream::{piece_len, Logits, MegalodonStream};
use mega::model::megalodon::Megalodon;
use mega::model::{Decoder, ModelShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "support/gradcheck.rs"]
mod gradcheck;
#[path = "support/overfit.rs"]
mod overfit;

fn tiny() -> MegalodonConfig {
    MegalodonConfig::preset("tiny").unwrap()
}

/// The other branch of every option: plain SiLU FFN, tied and scaled embedding, two groups,
/// chunks of 4, one head.
fn tiny_variant() -> MegalodonConfig {
    MegalodonConfig {
        swiglu: false,
        share_emb: true,
        scale_emb: true,
        norm_num_groups: 2,
        chunk_size: 4,
        num_heads: 1,
        ..tiny()
    }
}

/// Random parameters in the ranges of the golden fixtures (docs/megalodon-model.md), so that
/// no parameter sits at its init value and every path carries signal.
fn random_params(model: &Megalodon, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = model.cfg.model_dim as f32;
    model
        .layout
        .specs
        .iter()
        .map(|s| {
            let name = s.name.as_str();
            let is_norm = ["timenorm", "rmsnorm", "nffn.norm", "final_norm"]
                .iter()
                .any(|k| name.contains(k));
            let half_width = if name.ends_with("cema.alpha") || name.ends_with("cema.delta") {
                1.5
            } else if name.ends_with("cema.theta") {
                2.0
            } else if name.ends_with("cema.gamma") {
                1.5
            } else if name.ends_with("cema.omega") {
                0.8
            } else if is_norm {
                0.3
            } else if name.ends_with("mega.gamma") {
                0.8
            } else if name.ends_with("mega.beta") {
                0.5
            } else if name == "embed.weight" {
                1.7
            } else if name == "output.output.weight" {
                1.2 * (3.0 / d).sqrt()
            } else if name.ends_with(".bias") {
                0.3
            } else {
                // Linear weight (out, in): unit-variance outputs for unit inputs.
                (3.0 / s.shape[1] as f32).sqrt()
            };
            (0..s.numel())
                .map(|_| rng.random_range(-half_width..half_width))
                .collect()
        })
        .collect()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

/// Full-forward logits `[b·t, 256]` of `inputs` in `F`.
fn full_logits<F: mega::backend::cpu::Real>(
    model: &Megalodon,
    params: &[Vec<F>],
    inputs: &[u8],
    b: usize,
    t: usize,
) -> Vec<F> {
    let be = Cpu::<F>::new();
    let mut ws = model.workspace(&be, b, t, false);
    model.forward_inputs(&be, params, &mut ws, inputs);
    ws.logits.clone()
}

fn check_gradients(cfg: &MegalodonConfig) {
    let model = Megalodon::new(cfg);
    let host = random_params(&model, 7);
    // Two whole chunks and a partial third, so attention sees several chunks and
    // TimestepNorm/CEMA run across them.
    let (b, t) = (2, 2 * cfg.chunk_size + 3);
    let windows = random_bytes(b * (t + 1), 11);
    let params = model.layout.upload(&Cpu::<f64>::new(), &host);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    gradcheck::check_model_gradients(&model, &params, &windows, (b, t), 1e-3, |i, g| {
        let spec = &model.layout.specs[i];
        // Three random entries and the tensor's largest gradient.
        let largest = (0..g.len())
            .max_by(|&x, &y| g[x].abs().total_cmp(&g[y].abs()))
            .unwrap();
        assert!(g[largest] != 0.0, "{}: gradient is all zero", spec.name);
        let mut probes: Vec<usize> = (0..3).map(|_| rng.random_range(0..spec.numel())).collect();
        probes.push(largest);
        probes
    });
}

#[test]
fn tiny_model_gradients_match_finite_differences() {
    check_gradients(&tiny());
}

#[test]
fn variant_gradients_match_finite_differences() {
    check_gradients(&tiny_variant());
}

/// With `ffn_hidden_dim = value_dim` the FFN's backward buffers are the attention's
/// (`LayerScratch`): both FFN forms must still get every gradient right.
#[test]
fn gradients_match_finite_differences_when_ffn_and_value_widths_agree() {
    for base in [tiny(), tiny_variant()] {
        check_gradients(&MegalodonConfig {
            ffn_hidden_dim: base.value_dim,
            ..base
        });
    }
}

/// Feed every row its own schedule of call sizes (a 0 skips the row that round) and return
/// each row's streamed logits.
fn stream_rows<F: mega::backend::cpu::Real>(
    model: &Megalodon,
    params: &[Vec<F>],
    seqs: &[&[u8]],
    schedules: &[Vec<usize>],
) -> Vec<Vec<f32>> {
    let be = Cpu::<F>::new();
    let mut stream = MegalodonStream::new(model, &be, params, seqs.len());
    let rounds = schedules.iter().map(Vec::len).max().unwrap();
    let mut at = vec![0usize; seqs.len()];
    let mut out = vec![Vec::new(); seqs.len()];
    for round in 0..rounds {
        let calls: Vec<&[u8]> = (0..seqs.len())
            .map(|r| {
                let len = schedules[r].get(round).copied().unwrap_or(0);
                &seqs[r][at[r]..at[r] + len]
            })
            .collect();
        for (r, l) in stream.feed(&calls, Logits::All).into_iter().enumerate() {
            assert_eq!(l.len(), calls[r].len() * 256);
            out[r].extend(l);
            at[r] += calls[r].len();
        }
    }
    for (r, s) in seqs.iter().enumerate() {
        assert_eq!(
            at[r],
            s.len(),
            "schedule of row {r} does not cover its sequence"
        );
        assert_eq!(stream.consumed()[r], s.len());
    }
    out
}

fn max_abs_diff<T: Copy + Into<f64>, U: Copy + Into<f64>>(a: &[T], b: &[U]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x.into() - y.into()).abs())
        .fold(0.0, f64::max)
}

/// Three rows at different offsets: token by token; mixed sizes crossing chunk boundaries
/// (split by the stream); a late starter with calls of several chunks.
fn ragged_schedules(t: usize) -> Vec<Vec<usize>> {
    let s = vec![
        vec![1; t],
        vec![3, 7, 1, 8, 16, 2, 5, 3],
        vec![0, 0, 13, 0, 20, 12],
    ];
    for sched in &s {
        assert_eq!(sched.iter().sum::<usize>(), t);
    }
    s
}

fn check_streaming<F: mega::backend::cpu::Real + Into<f64>>(tol: f64) {
    let cfg = tiny();
    let model = Megalodon::new(&cfg);
    let host = random_params(&model, 21);
    let be = Cpu::<F>::new();
    let params = model.layout.upload(&be, &host);
    let (b, t) = (3, 45);
    let inputs = random_bytes(b * t, 5);
    let full = full_logits(&model, &params, &inputs, b, t);
    let seqs: Vec<&[u8]> = inputs.chunks(t).collect();
    let streamed = stream_rows(&model, &params, &seqs, &ragged_schedules(t));
    let mut worst = 0.0f64;
    for r in 0..b {
        // The stream hands out f32 logits: compare with the full forward's, rounded alike.
        let want: Vec<f32> = full[r * t * 256..(r + 1) * t * 256]
            .iter()
            .map(|&x| Into::<f64>::into(x) as f32)
            .collect();
        let d = max_abs_diff(&streamed[r], &want);
        println!("row {r}: streamed vs full max |Δlogits| = {d:.3e}");
        worst = worst.max(d);
    }
    assert!(
        worst <= tol,
        "streamed logits differ from the full forward by {worst}"
    );
}

#[test]
fn streaming_ragged_rows_matches_the_full_forward_f32() {
    check_streaming::<f32>(1e-5);
}

#[test]
fn streaming_ragged_rows_matches_the_full_forward_f64() {
    // In f64 the two paths agree far below f32 rounding, so the f32 logits the stream hands
    // out match the full forward's rounded ones to (at most) one f32 ulp.
    check_streaming::<f64>(1e-6);
}

#[test]
fn decoder_prefills_ragged_prompts_then_steps_like_the_full_forward() {
    let cfg = tiny_variant();
    let model = Megalodon::new(&cfg);
    let host = random_params(&model, 9);
    let be = Cpu::<f32>::new();
    let params = model.layout.upload(&be, &host);
    let t = 30;
    let seqs: Vec<Vec<u8>> = (0..4).map(|r| random_bytes(t, 100 + r)).collect();
    let full: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| full_logits(&model, &params, s, 1, t))
        .collect();
    // Prompts of 0, 3, 4 (a whole chunk) and 11 bytes; then every row steps one byte at a time.
    let prompt_lens = [0usize, 3, 4, 11];
    let prompts: Vec<&[u8]> = seqs.iter().zip(prompt_lens).map(|(s, n)| &s[..n]).collect();
    let mut dec = MegalodonStream::with_prompts(&model, &be, &params, &prompts);
    let mut worst = 0.0f64;
    let mut lens = prompt_lens.to_vec();
    loop {
        let logits = dec.logits().to_vec();
        for (r, &n) in lens.iter().enumerate() {
            let row = &logits[r * 256..(r + 1) * 256];
            if n == 0 {
                assert!(row.iter().all(|&x| x == 0.0), "no byte yet: uniform logits");
            } else {
                worst = worst.max(max_abs_diff(row, &full[r][(n - 1) * 256..n * 256]));
            }
        }
        if lens.contains(&t) {
            break;
        }
        let next: Vec<u8> = lens.iter().enumerate().map(|(r, &n)| seqs[r][n]).collect();
        dec.step(&next);
        lens.iter_mut().for_each(|n| *n += 1);
    }
    println!("decoder vs full forward: max |Δlogits| = {worst:.3e}");
    assert!(worst <= 1e-5, "decoder logits differ by {worst}");
}

#[test]
fn piece_lengths_follow_the_official_call_rules() {
    let c = 8;
    assert_eq!(piece_len(3, 10, c), 5, "never straddles a boundary");
    assert_eq!(piece_len(3, 2, c), 2);
    assert_eq!(
        piece_len(0, 5, c),
        5,
        "shorter than a chunk from a boundary"
    );
    assert_eq!(piece_len(0, 21, c), 16, "whole chunks from a boundary");
    assert_eq!(piece_len(0, 8, c), 8);
    let big = piece_len(0, 1 << 20, 256);
    assert!(big % 256 == 0 && big <= mega::infer::megalodon_stream::MAX_CALL_TOKENS);
}

#[test]
fn changing_a_byte_never_changes_earlier_logits() {
    let cfg = tiny();
    let model = Megalodon::new(&cfg);
    let be = Cpu::<f32>::new();
    let params = model.layout.upload(&be, &random_params(&model, 4));
    let t = 24;
    let a = random_bytes(t, 8);
    for k in [0, 5, 8, 13, 23] {
        let mut b = a.clone();
        b[k] = b[k].wrapping_add(77);
        let la = full_logits(&model, &params, &a, 1, t);
        let lb = full_logits(&model, &params, &b, 1, t);
        let before = max_abs_diff(&la[..k * 256], &lb[..k * 256]);
        let at = max_abs_diff(&la[k * 256..(k + 1) * 256], &lb[k * 256..(k + 1) * 256]);
        assert!(
            before <= 1e-6,
            "byte {k} changed earlier logits by {before}"
        );
        assert!(
            at > 1e-3,
            "byte {k} did not change its own prediction ({at})"
        );
        if k + 9 < t {
            // The next chunk sees the change only through TimestepNorm and CEMA.
            let later = max_abs_diff(
                &la[(k + 9) * 256..(k + 10) * 256],
                &lb[(k + 9) * 256..(k + 10) * 256],
            );
            assert!(
                later > 1e-4,
                "byte {k} did not reach the next chunk ({later})"
            );
        }
    }
}

#[test]
fn sequence_lengths_follow_the_chunk_rule() {
    let model = Megalodon::new(&tiny());
    for t in [1, 7, 8, 16, 64] {
        assert!(model.check_seq_len(t).is_ok(), "{t}");
    }
    for t in [0, 9, 12, 20] {
        assert!(model.check_seq_len(t).is_err(), "{t}");
    }
    assert_eq!(model.window_len(16), 17);
    assert!(model.check_seq_len(model.max_seq_len()).is_ok());
}

#[test]
fn initialization_follows_the_official_code() {
    let cfg = tiny();
    let model = Megalodon::new(&cfg);
    let host = model.layout.init_host(5);
    let get = |name: &str| &host[model.layout.index(name).unwrap()];
    let d = cfg.model_dim;
    // theta = logit of a permutation of exp(−i·ln D / D), i = 1..D (spec §4.1).
    let mut f: Vec<f64> = get("layers.0.mega.cema.theta")
        .iter()
        .map(|&x| 1.0 / (1.0 + (-(x as f64)).exp()))
        .collect();
    f.sort_by(|a, b| b.total_cmp(a));
    for (i, &fi) in f.iter().enumerate() {
        let want = (-((i + 1) as f64) * (d as f64).ln() / d as f64).exp();
        assert!(
            (fi - want).abs() < 1e-5,
            "theta frequency {i}: {fi} vs {want}"
        );
    }
    assert_ne!(
        get("layers.0.mega.cema.theta"),
        get("layers.1.mega.cema.theta"),
        "each layer draws its own permutation"
    );
    let gamma = get("layers.0.mega.cema.gamma");
    assert!(
        gamma.chunks(2).all(|c| c[1] == 0.0 && c[0] != 0.0),
        "η starts real"
    );
    assert!(get("layers.0.mega.cema.omega")
        .iter()
        .all(|x| x.abs() <= 1.0));
    let emb_bound = 3.0 / (d as f32).sqrt();
    assert!(get("embed.weight").iter().all(|x| x.abs() <= emb_bound));
    for zero in [
        "layers.0.mega.timenorm.weight",
        "layers.0.mega.rmsnorm.weight",
        "layers.0.mega.gamma",
        "layers.0.mega.beta",
        "layers.0.mega.wz.bias",
        "layers.0.nffn.norm.weight",
        "output.final_norm.weight",
    ] {
        assert!(get(zero).iter().all(|&x| x == 0.0), "{zero} starts at 0");
    }
    // "he" init: N(0, 1/(3·fan_in)); fc1 has 1536 draws, so its sample std is within ~4%.
    let w = get("layers.0.nffn.fc1.weight");
    let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    let want = (1.0 / (3.0 * d as f64)).sqrt();
    assert!((std / want - 1.0).abs() < 0.1, "fc1 std {std} vs {want}");
    let a = get("layers.0.mega.cema.alpha");
    let std = (a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    assert!((std / 0.2 - 1.0).abs() < 0.15, "alpha std {std} vs 0.2");
}

#[test]
fn overfits_one_batch() {
    let model = Megalodon::new(&tiny());
    let windows = b"hello world, hello megalodon model!".repeat(2)[..34].to_vec();
    let (first, last) = overfit::memorise_one_batch(&model, &windows, 200);
    println!("one-batch loss {first:.3} → {last:.3}");
    assert!(first > 4.0, "initial loss {first} should be near ln 256");
    assert!(last < 0.2, "one batch not memorised: loss {first} → {last}");
}
