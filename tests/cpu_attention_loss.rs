//! CPU attention and loss ops: fast paths against the plain references, the references
//! against central finite differences (f64), causality, decode against the training form,
//! and hand-computed loss values.

use mega::backend::cpu::attention::{self, reference as attn_ref};
use mega::backend::cpu::loss::{self, reference as loss_ref};
use mega::backend::cpu::Real;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Attention shapes `(b, t, c, h)`: single positions, odd lengths, one head, odd head
/// sizes, lengths around the tile sizes (4, 8, 16) and around the switch between the
/// short-sequence and tiled kernels (24 forward, 32 backward), and both regimes in miniature.
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 4, 1),
    (3, 7, 12, 3),
    (2, 8, 16, 2),
    (1, 9, 6, 2),
    (4, 5, 8, 1),
    (2, 17, 32, 2),
    (1, 33, 64, 4),
    (2, 16, 40, 2),
    (5, 8, 64, 4),
    (1, 25, 24, 3),
    (2, 33, 20, 2),
];

fn random<F: Real>(rng: &mut ChaCha8Rng, n: usize, amp: f64) -> Vec<F> {
    (0..n)
        .map(|_| F::from_f64(rng.random_range(-amp..amp)).unwrap())
        .collect()
}

/// `max |a − b| / (1 + max |b|)`: absolute error relative to the magnitude of the data.
/// Any NaN or infinity on either side counts as an infinite error (`f64::max` alone would
/// skip NaNs).
fn rel_err<F: Real>(a: &[F], b: &[F]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut scale = 0.0f64;
    let mut diff = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.to_f64().unwrap(), y.to_f64().unwrap());
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        scale = scale.max(y.abs());
        diff = diff.max((x - y).abs());
    }
    diff / (1.0 + scale)
}

fn scale_for(c: usize, h: usize) -> f64 {
    1.0 / ((c / h) as f64).sqrt()
}

/// Returns the worst error seen.
fn fast_forward_matches_reference_in<F: Real>(tol: f64) -> f64 {
    let mut worst = 0.0f64;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(b, t, c, h) in SHAPES {
        // Amplitude 3 makes the softmax peaked, exercising the max subtraction.
        let qkv = random::<F>(&mut rng, b * t * 3 * c, 3.0);
        let scale = F::from_f64(scale_for(c, h)).unwrap();
        let (mut out, mut att) = (vec![F::nan(); b * t * c], vec![F::nan(); b * h * t * t]);
        let (mut out_ref, mut att_ref) =
            (vec![F::zero(); b * t * c], vec![F::zero(); b * h * t * t]);
        attention::forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
        attn_ref::forward(&mut out_ref, &mut att_ref, &qkv, b, t, c, h, scale);
        let (e_out, e_att) = (rel_err(&out, &out_ref), rel_err(&att, &att_ref));
        assert!(
            e_out < tol && e_att < tol,
            "{b}x{t}x{c}/{h}: out {e_out:e}, att {e_att:e}"
        );
        worst = worst.max(e_out).max(e_att);
    }
    worst
}

#[test]
fn fast_attention_forward_matches_reference() {
    let e32 = fast_forward_matches_reference_in::<f32>(2e-6);
    let e64 = fast_forward_matches_reference_in::<f64>(1e-13);
    println!("attention forward fast vs reference: worst rel err f32 {e32:e}, f64 {e64:e}");
}

/// Returns the worst error seen.
fn fast_backward_matches_reference_in<F: Real>(tol: f64) -> f64 {
    let mut worst = 0.0f64;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(b, t, c, h) in SHAPES {
        let qkv = random::<F>(&mut rng, b * t * 3 * c, 3.0);
        let dout = random::<F>(&mut rng, b * t * c, 1.0);
        let scale = F::from_f64(scale_for(c, h)).unwrap();
        let (mut out, mut att) = (vec![F::zero(); b * t * c], vec![F::zero(); b * h * t * t]);
        attn_ref::forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
        // Both start from the same nonzero gradient, checking that backward accumulates.
        let start = random::<F>(&mut rng, b * t * 3 * c, 1.0);
        let (mut fast, mut slow) = (start.clone(), start);
        attention::backward(&mut fast, &dout, &qkv, &att, b, t, c, h, scale);
        attn_ref::backward(&mut slow, &dout, &qkv, &att, b, t, c, h, scale);
        let e = rel_err(&fast, &slow);
        assert!(e < tol, "{b}x{t}x{c}/{h}: dqkv {e:e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn fast_attention_backward_matches_reference() {
    let e32 = fast_backward_matches_reference_in::<f32>(4e-6);
    let e64 = fast_backward_matches_reference_in::<f64>(1e-13);
    println!("attention backward fast vs reference: worst rel err f32 {e32:e}, f64 {e64:e}");
}

/// `Σ out ⊙ w` for the reference forward (the loss whose gradient w.r.t. `out` is `w`).
fn weighted_attention_sum(qkv: &[f64], w: &[f64], b: usize, t: usize, c: usize, h: usize) -> f64 {
    let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
    attn_ref::forward(&mut out, &mut att, qkv, b, t, c, h, scale_for(c, h));
    out.iter().zip(w).map(|(o, w)| o * w).sum()
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut worst = 0.0f64;
    for &(b, t, c, h) in &[(2, 4, 6, 2), (1, 5, 4, 1), (1, 1, 4, 2), (2, 3, 9, 3)] {
        let qkv = random::<f64>(&mut rng, b * t * 3 * c, 1.5);
        let w = random::<f64>(&mut rng, b * t * c, 1.0);
        let scale = scale_for(c, h);
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
        attn_ref::forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
        let mut grad_ref = vec![0.0; qkv.len()];
        attn_ref::backward(&mut grad_ref, &w, &qkv, &att, b, t, c, h, scale);
        let mut grad_fast = vec![0.0; qkv.len()];
        attention::backward(&mut grad_fast, &w, &qkv, &att, b, t, c, h, scale);
        let eps = 1e-6;
        for i in 0..qkv.len() {
            let (mut plus, mut minus) = (qkv.clone(), qkv.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (weighted_attention_sum(&plus, &w, b, t, c, h)
                - weighted_attention_sum(&minus, &w, b, t, c, h))
                / (2.0 * eps);
            for g in [grad_ref[i], grad_fast[i]] {
                let err = (g - fd).abs() / (1.0 + fd.abs());
                worst = worst.max(err);
                assert!(
                    err < 1e-8,
                    "{b}x{t}x{c}/{h} entry {i}: analytic {g}, fd {fd}"
                );
            }
        }
    }
    println!("attention backward vs central FD (f64, eps 1e-6): worst rel err {worst:e}");
}

#[test]
fn attention_is_causal() {
    let (b, t, c, h) = (2, 11, 16, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let qkv = random::<f32>(&mut rng, b * t * 3 * c, 2.0);
    let scale = scale_for(c, h) as f32;
    type Forward = fn(&mut [f32], &mut [f32], &[f32], usize, usize, usize, usize, f32);
    for forward in [
        attention::forward::<f32> as Forward,
        attn_ref::forward::<f32>,
    ] {
        let run = |qkv: &[f32]| {
            let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
            forward(&mut out, &mut att, qkv, b, t, c, h, scale);
            out
        };
        let base = run(&qkv);
        for s in 0..t {
            let mut perturbed = qkv.clone();
            let row = (b - 1) * t + s;
            for x in &mut perturbed[row * 3 * c..(row + 1) * 3 * c] {
                *x += 0.75;
            }
            let out = run(&perturbed);
            let first_changed =
                (0..b * t).find(|&r| out[r * c..(r + 1) * c] != base[r * c..(r + 1) * c]);
            // Rows before `s` of the perturbed sequence, and the other sequence, are untouched
            // bit for bit; row `s` itself must change (its own q, k, v moved).
            assert_eq!(first_changed, Some(row), "perturbing position {s}");
        }
    }
}

#[test]
fn decode_matches_training_forward_last_row() {
    let (t_max, c, h) = (21, 24, 3);
    let lens: Vec<u32> = vec![1, 7, 21, 4, 16, 9];
    let b = lens.len();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let full = random::<f32>(&mut rng, b * t_max * 3 * c, 2.0);
    let scale = scale_for(c, h) as f32;

    // Caches filled one step at a time; NaN proves nothing past a row's length is read.
    let (mut k_cache, mut v_cache) = (vec![f32::NAN; b * t_max * c], vec![f32::NAN; b * t_max * c]);
    let max_len = *lens.iter().max().unwrap();
    for step in 0..max_len {
        let pos: Vec<u32> = lens.iter().map(|&l| step.min(l - 1)).collect();
        let step_qkv: Vec<f32> = (0..b)
            .flat_map(|r| {
                let at = (r * t_max + pos[r] as usize) * 3 * c;
                full[at..at + 3 * c].to_vec()
            })
            .collect();
        let entries: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * t_max) as u32 + p)
            .collect();
        mega::backend::cpu::kv_cache::append(&mut k_cache, &mut v_cache, &step_qkv, &entries, c);
    }

    let last_q: Vec<f32> = (0..b)
        .flat_map(|r| full[(r * t_max + lens[r] as usize - 1) * 3 * c..][..3 * c].to_vec())
        .collect();
    let mut out = vec![0.0f32; b * c];
    let mut out_ref = vec![0.0f32; b * c];
    let table = rows_table(b);
    let pages = contiguous(&k_cache, &v_cache, &table, t_max, c);
    attention::decode(&mut out, &last_q, &pages, &lens, h, scale);
    attn_ref::decode(&mut out_ref, &last_q, &pages, &lens, h, scale);

    let (mut train_out, mut att) = (
        vec![0.0f32; b * t_max * c],
        vec![0.0f32; b * h * t_max * t_max],
    );
    attn_ref::forward(&mut train_out, &mut att, &full, b, t_max, c, h, scale);
    let expected: Vec<f32> = (0..b)
        .flat_map(|r| train_out[(r * t_max + lens[r] as usize - 1) * c..][..c].to_vec())
        .collect();
    let (e_fast, e_ref) = (rel_err(&out, &expected), rel_err(&out_ref, &expected));
    assert!(
        e_fast < 2e-6 && e_ref < 2e-6,
        "decode vs forward: fast {e_fast:e}, reference {e_ref:e}"
    );
}

/// Block ids `0..b`: a contiguous `[b, t_max, c]` cache is one `t_max`-position block per row.
fn rows_table(b: usize) -> Vec<u32> {
    (0..b as u32).collect()
}

/// The paged view of a contiguous `[b, t_max, c]` cache.
fn contiguous<'a>(
    k: &'a [f32],
    v: &'a [f32],
    table: &'a [u32],
    t_max: usize,
    c: usize,
) -> attention::KvPages<'a, f32> {
    attention::KvPages {
        k,
        v,
        block_table: table,
        block_size: t_max,
        c,
    }
}

#[test]
fn decode_long_cache_matches_reference() {
    let (t_max, c, h) = (300, 64, 2);
    let lens: Vec<u32> = vec![300, 1, 157];
    let b = lens.len();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let qkv = random::<f32>(&mut rng, b * 3 * c, 2.0);
    let k_cache = random::<f32>(&mut rng, b * t_max * c, 2.0);
    let v_cache = random::<f32>(&mut rng, b * t_max * c, 2.0);
    let (mut out, mut out_ref) = (vec![0.0f32; b * c], vec![0.0f32; b * c]);
    let scale = scale_for(c, h) as f32;
    let table = rows_table(b);
    let pages = contiguous(&k_cache, &v_cache, &table, t_max, c);
    attention::decode(&mut out, &qkv, &pages, &lens, h, scale);
    attn_ref::decode(&mut out_ref, &qkv, &pages, &lens, h, scale);
    let e = rel_err(&out, &out_ref);
    assert!(e < 2e-6, "decode fast vs reference {e:e}");
}

/// Vocabulary sizes: trivial, odd, the byte vocabulary, and one past a lane multiple.
const VOCABS: &[usize] = &[1, 3, 256, 259];

fn random_targets(rng: &mut ChaCha8Rng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..v as u32)).collect()
}

/// Largest `|a − b| / (1 + |b|)` over elements; NaN or infinity anywhere counts as infinite.
fn elementwise_err<F: Real>(a: &[F], b: &[F]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let (x, y) = (x.to_f64().unwrap(), y.to_f64().unwrap());
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        m.max((x - y).abs() / (1.0 + y.abs()))
    })
}

/// Returns the worst elementwise error of the fast loss ops against the references. The
/// logits carry a common offset of 100 (`e^100` overflows f32, so this needs the max
/// subtraction); `logit − logsumexp` then cannot be more exact than a few ulps of 100, so
/// the tolerance is a few ulps of that magnitude.
fn fast_losses_match_reference_in<F: Real>() -> f64 {
    const OFFSET: f64 = 100.0;
    const AMP: f64 = 8.0;
    let tol = 16.0 * F::epsilon().to_f64().unwrap() * (OFFSET + AMP);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut worst = 0.0f64;
    for &v in VOCABS {
        for n in [1, 5, 200] {
            let logits: Vec<F> = random::<F>(&mut rng, n * v, AMP)
                .into_iter()
                .map(|x| x + F::from_f64(OFFSET).unwrap())
                .collect();
            let targets = random_targets(&mut rng, n, v);
            let (mut fast, mut slow) = (vec![F::nan(); n], vec![F::zero(); n]);
            loss::cross_entropy_forward(&mut fast, &logits, &targets, v);
            loss_ref::cross_entropy_forward(&mut slow, &logits, &targets, v);
            let e_fwd = elementwise_err(&fast, &slow);

            let dloss = F::from_f64(1.0 / n as f64).unwrap();
            let (mut fast, mut slow) = (vec![F::nan(); n * v], vec![F::zero(); n * v]);
            loss::cross_entropy_backward(&mut fast, &logits, &targets, v, dloss);
            loss_ref::cross_entropy_backward(&mut slow, &logits, &targets, v, dloss);
            let e_bwd = elementwise_err(&fast, &slow);

            let (mut fast, mut slow) = (vec![F::nan(); n * v], vec![F::zero(); n * v]);
            loss::log_softmax(&mut fast, &logits, v);
            loss_ref::log_softmax(&mut slow, &logits, v);
            let e_lsm = elementwise_err(&fast, &slow);
            assert!(
                e_fwd < tol && e_bwd < tol && e_lsm < tol,
                "v={v} n={n}: forward {e_fwd:e}, backward {e_bwd:e}, log_softmax {e_lsm:e} (tol {tol:e})"
            );
            worst = worst.max(e_fwd).max(e_bwd).max(e_lsm);
        }
    }
    worst
}

#[test]
fn fast_losses_match_reference() {
    let e32 = fast_losses_match_reference_in::<f32>();
    let e64 = fast_losses_match_reference_in::<f64>();
    println!("loss fast vs reference: worst elementwise err f32 {e32:e}, f64 {e64:e}");
}

#[test]
fn log_softmax_rows_are_normalised_and_match_naive() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &v in VOCABS {
        let n = 33;
        let logits = random::<f32>(&mut rng, n * v, 20.0);
        let mut out = vec![0.0f32; n * v];
        loss::log_softmax(&mut out, &logits, v);
        for (orow, row) in out.chunks(v).zip(logits.chunks(v)) {
            let total: f64 = orow.iter().map(|&x| (x as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "row sums to {total}");
            // Naive in f64 without max subtraction (safe at this amplitude).
            let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            for (&o, &x) in orow.iter().zip(row) {
                assert!(
                    (o as f64 - (x as f64 - z)).abs() < 2e-5,
                    "{o} vs {}",
                    x as f64 - z
                );
            }
        }
    }
}

#[test]
fn cross_entropy_three_class_by_hand() {
    // logits (1, 2, 3), target 0: loss = ln(e + e² + e³) − 1 = 2 + ln(1 + e⁻¹ + e⁻²).
    let e = std::f64::consts::E;
    let expected = 2.0 + (1.0 + 1.0 / e + 1.0 / (e * e)).ln();
    assert!((expected - 2.407_605_964_444_38).abs() < 1e-12);
    let logits = [1.0f32, 2.0, 3.0];
    let mut losses = [0.0f32];
    loss::cross_entropy_forward(&mut losses, &logits, &[0], 3);
    assert!(
        (losses[0] as f64 - expected).abs() < 1e-6,
        "loss {}",
        losses[0]
    );

    // softmax = (1, e, e²)/(1 + e + e²); gradient = (softmax − onehot)·dloss.
    let z = 1.0 + e + e * e;
    let dloss = 0.5;
    let expected_grad = [(1.0 / z - 1.0) * dloss, e / z * dloss, e * e / z * dloss];
    let mut dlogits = [f32::NAN; 3];
    loss::cross_entropy_backward(&mut dlogits, &logits, &[0], 3, dloss as f32);
    for (g, want) in dlogits.iter().zip(expected_grad) {
        assert!((*g as f64 - want).abs() < 1e-6, "{g} vs {want}");
    }
    assert!((expected_grad[0] - (-0.454_984_7)).abs() < 1e-6);
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut worst = 0.0f64;
    for &v in &[1usize, 3, 17] {
        let n = 4;
        let logits = random::<f64>(&mut rng, n * v, 3.0);
        let targets = random_targets(&mut rng, n, v);
        let dloss = 0.37;
        let total = |x: &[f64]| {
            let mut losses = vec![0.0; n];
            loss_ref::cross_entropy_forward(&mut losses, x, &targets, v);
            dloss * losses.iter().sum::<f64>()
        };
        let (mut g_ref, mut g_fast) = (vec![0.0; n * v], vec![0.0; n * v]);
        loss_ref::cross_entropy_backward(&mut g_ref, &logits, &targets, v, dloss);
        loss::cross_entropy_backward(&mut g_fast, &logits, &targets, v, dloss);
        let eps = 1e-6;
        for i in 0..n * v {
            let (mut plus, mut minus) = (logits.clone(), logits.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (total(&plus) - total(&minus)) / (2.0 * eps);
            for g in [g_ref[i], g_fast[i]] {
                let err = (g - fd).abs() / (1.0 + fd.abs());
                worst = worst.max(err);
                assert!(err < 1e-8, "v={v} entry {i}: analytic {g}, fd {fd}");
            }
        }
    }
    println!("cross-entropy backward vs central FD (f64, eps 1e-6): worst rel err {worst:e}");
}
