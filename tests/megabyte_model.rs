//! Whole-model checks of MEGABYTE on the CPU backend: input construction (the paper's worked
//! example), gradients against finite differences in f64, causality, and KV-cached
//! incremental decoding against the full forward.

use mega::backend::cpu::Cpu;
use mega::backend::{Backend, PAD_ID};
use mega::config::{FeedForward, MegabyteConfig};
use mega::infer::megabyte_decoder::MegabyteDecoder;
use mega::model::megabyte::Megabyte;
use rand::{Rng, SeedableRng};

#[path = "support/gradcheck.rs"]
mod gradcheck;
#[path = "support/overfit.rs"]
mod overfit;

fn tiny() -> MegabyteConfig {
    MegabyteConfig::preset("tiny").unwrap()
}

/// Random parameters large enough that every path matters (unlike the 0.006 init).
fn random_params(model: &Megabyte, seed: u64, std: f32) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    model
        .layout
        .specs
        .iter()
        .map(|s| {
            let is_norm_weight = s.name.ends_with("ln1.weight")
                || s.name.ends_with("ln2.weight")
                || s.name.ends_with("ln_f.weight");
            (0..s.numel())
                .map(|_| {
                    let u: f32 = rng.random_range(-1.0..1.0);
                    if is_norm_weight {
                        1.0 + 0.3 * u
                    } else {
                        std * u
                    }
                })
                .collect()
        })
        .collect()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

#[test]
fn input_construction_matches_the_papers_worked_example() {
    // spec/megabyte.md §2.5: P = 4, "megabyte transformer".
    let mut cfg = tiny();
    cfg.patch_size = 4;
    let model = Megabyte::new(&cfg);
    let text = b"megabyte transformer";
    let bytes = &text[..16];
    let (gids, gpos) = model.global_inputs(bytes, 1, 16);
    let as_str = |ids: &[u32]| -> String {
        ids.iter()
            .map(|&i| if i == PAD_ID { '_' } else { i as u8 as char })
            .collect()
    };
    assert_eq!(as_str(&gids), "____megabyte tra");
    assert_eq!(&gpos[4..8], &[0, 1, 2, 3]);
    let (lids, slots) = model.local_inputs(bytes, 1, 16);
    assert_eq!(as_str(&lids), "_meg_byt_ tr_nsf");
    assert_eq!(slots, vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
}

fn check_gradients(cfg: &MegabyteConfig) {
    let model = Megabyte::new(cfg);
    let host = random_params(&model, 7, 0.3);
    let (b, t) = (2, cfg.max_seq_len);
    let bytes = random_bytes(b * t, 11);
    let params = model.layout.upload(&Cpu::<f64>::new(), &host);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    gradcheck::check_model_gradients(&model, &params, &bytes, (b, t), 1e-4, |i, _| {
        let spec = &model.layout.specs[i];
        let mut probes: Vec<usize> = (0..4).map(|_| rng.random_range(0..spec.numel())).collect();
        // Embedding tables only receive gradient at rows that occur, so probe one of those.
        if spec.name.ends_with("tok_emb") {
            let d = spec.shape[1];
            probes.push(bytes[0] as usize * d + rng.random_range(0..d));
        }
        probes
    });
}

#[test]
fn tiny_model_gradients_match_finite_differences() {
    check_gradients(&tiny());
}

#[test]
fn projected_gelu_and_swiglu_variants_have_correct_gradients() {
    let mut cfg = tiny();
    cfg.global_dim = 24;
    cfg.global_heads = 3;
    cfg.activation = FeedForward::Gelu;
    check_gradients(&cfg);
    cfg.activation = FeedForward::Swiglu;
    cfg.head_bias = true;
    check_gradients(&cfg);
}

fn logits_f32(model: &Megabyte, params: &[Vec<f32>], bytes: &[u8], b: usize, t: usize) -> Vec<f32> {
    let be = Cpu::<f32>::new();
    let p = model.layout.upload(&be, params);
    let mut ws = model.workspace(&be, b, t, false);
    model.forward(&be, &p, &mut ws, bytes);
    be.download(&ws.logits)
}

#[test]
fn changing_a_byte_never_changes_earlier_or_same_position_logits() {
    let cfg = tiny();
    let model = Megabyte::new(&cfg);
    let host = random_params(&model, 5, 0.3);
    let t = cfg.max_seq_len;
    let bytes = random_bytes(t, 1);
    let base = logits_f32(&model, &host, &bytes, 1, t);
    let v = cfg.vocab_size;
    for pos in 0..t {
        let mut changed = bytes.clone();
        changed[pos] = changed[pos].wrapping_add(101);
        let out = logits_f32(&model, &host, &changed, 1, t);
        for q in 0..=pos {
            assert_eq!(
                &out[q * v..(q + 1) * v],
                &base[q * v..(q + 1) * v],
                "byte {pos} leaked into position {q}"
            );
        }
        if pos + 1 < t {
            let later = &out[(pos + 1) * v..];
            assert!(
                later != &base[(pos + 1) * v..],
                "byte {pos} does not influence later positions"
            );
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn incremental_decoding_matches_the_full_forward_at_every_prompt_length() {
    let cfg = tiny();
    let model = Megabyte::new(&cfg);
    let host = random_params(&model, 9, 0.3);
    let be = Cpu::<f32>::new();
    let params = model.layout.upload(&be, &host);
    let t = cfg.max_seq_len;
    let v = cfg.vocab_size;
    let bytes = random_bytes(t, 2);
    let full = logits_f32(&model, &host, &bytes, 1, t);
    let p = cfg.patch_size;
    let mut worst = 0.0f32;
    for prompt_len in 0..=3 * p {
        let mut dec = MegabyteDecoder::new(&model, &be, &params, &[&bytes[..prompt_len]]);
        for pos in prompt_len..t {
            let d = max_abs_diff(dec.logits(), &full[pos * v..(pos + 1) * v]);
            worst = worst.max(d);
            assert!(
                d <= 1e-5,
                "prompt {prompt_len}, position {pos}: max diff {d}"
            );
            if pos + 1 < t {
                dec.step(&[bytes[pos]]);
            }
        }
    }
    println!("worst |incremental − full| = {worst:e}");
}

#[test]
fn batched_rows_at_mixed_phases_decode_like_the_full_forward() {
    let cfg = tiny();
    let model = Megabyte::new(&cfg);
    let host = random_params(&model, 21, 0.3);
    let be = Cpu::<f32>::new();
    let params = model.layout.upload(&be, &host);
    let (t, v) = (cfg.max_seq_len, cfg.vocab_size);
    let rows = 5;
    let data: Vec<Vec<u8>> = (0..rows).map(|r| random_bytes(t, 100 + r as u64)).collect();
    let fulls: Vec<Vec<f32>> = data
        .iter()
        .map(|d| logits_f32(&model, &host, d, 1, t))
        .collect();
    let prompt_lens = [0usize, 1, 3, 4, 6];
    let prompts: Vec<&[u8]> = data.iter().zip(prompt_lens).map(|(d, n)| &d[..n]).collect();
    let mut dec = MegabyteDecoder::new(&model, &be, &params, &prompts);
    let steps = t - 1 - prompt_lens.iter().max().unwrap();
    for s in 0..=steps {
        for r in 0..rows {
            let pos = prompt_lens[r] + s;
            let d = max_abs_diff(
                &dec.logits()[r * v..(r + 1) * v],
                &fulls[r][pos * v..(pos + 1) * v],
            );
            assert!(d <= 1e-5, "row {r} at position {pos}: max diff {d}");
        }
        if s < steps {
            let next: Vec<u8> = (0..rows).map(|r| data[r][prompt_lens[r] + s]).collect();
            dec.step(&next);
        }
    }
}

#[test]
fn overfits_one_batch() {
    let model = Megabyte::new(&tiny());
    let windows = b"hello world, hello megabyte model".repeat(2)[..32].to_vec();
    let (first, last) = overfit::memorise_one_batch(&model, &windows, 300);
    assert!(
        (first - (256f64).ln()).abs() < 0.05,
        "initial loss {first} should be ≈ ln 256"
    );
    assert!(last < 0.2, "one batch not memorised: loss {first} → {last}");
}

/// The f32 fast paths (SIMD attention tiles, threaded GEMMs) agree with the f64 computation on
/// a model large enough to take them (global sequence > 24 patches, wide matmuls).
#[test]
fn f32_fast_paths_match_f64_on_a_mid_sized_model() {
    let mut cfg = tiny();
    cfg.patch_size = 8;
    cfg.max_seq_len = 512;
    cfg.global_byte_dim = 16;
    cfg.global_dim = 128;
    cfg.global_heads = 2;
    cfg.local_dim = 64;
    cfg.local_heads = 2;
    let model = Megabyte::new(&cfg);
    let host = random_params(&model, 17, 0.1);
    let (b, t) = (3, cfg.max_seq_len);
    let bytes = random_bytes(b * t, 5);
    let run32 = {
        let be = Cpu::<f32>::new();
        let p = model.layout.upload(&be, &host);
        let mut g = model.layout.zeros(&be);
        let mut ws = model.workspace(&be, b, t, true);
        let loss = model.forward(&be, &p, &mut ws, &bytes);
        model.backward(&be, &p, &mut g, &mut ws);
        (
            loss,
            be.download(&ws.logits),
            g.iter().map(|x| be.download(x)).collect::<Vec<_>>(),
        )
    };
    let run64 = {
        let be = Cpu::<f64>::new();
        let p = model.layout.upload(&be, &host);
        let mut g = model.layout.zeros(&be);
        let mut ws = model.workspace(&be, b, t, true);
        let loss = model.forward(&be, &p, &mut ws, &bytes);
        model.backward(&be, &p, &mut g, &mut ws);
        (
            loss,
            be.download(&ws.logits),
            g.iter().map(|x| be.download(x)).collect::<Vec<_>>(),
        )
    };
    assert!(
        (run32.0 - run64.0).abs() < 1e-4,
        "loss {} vs {}",
        run32.0,
        run64.0
    );
    assert!(
        max_abs_diff(&run32.1, &run64.1) < 1e-3,
        "logits differ by {}",
        max_abs_diff(&run32.1, &run64.1)
    );
    for (i, s) in model.layout.specs.iter().enumerate() {
        let scale = run64.2[i]
            .iter()
            .fold(0.0f32, |m, x| m.max(x.abs()))
            .max(1e-6);
        let d = max_abs_diff(&run32.2[i], &run64.2[i]) / scale;
        assert!(
            d < 1e-3,
            "{}: f32 gradient differs from f64 by {d} (relative to its max)",
            s.name
        );
    }
}
