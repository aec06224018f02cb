//! Tests of next-byte sampling and stop-sequence handling.

use mega::infer::{
    log_probs, Sampler, SamplingError, SamplingParams, StopError, StopFilter, StopMatcher,
    StopState,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

fn random_logits(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

/// Index of the first maximum, written independently of the sampler.
fn first_max(logits: &[f32]) -> usize {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().position(|&x| x == max).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Sampling

#[test]
fn greedy_picks_the_argmax_and_the_lowest_index_on_ties() {
    let mut s = Sampler::new(params(0.0, 0, 1.0, 0)).unwrap();
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
    assert_eq!(s.sample(&[3.0, 1.0, 3.0, 3.0]), 0);
    assert_eq!(s.sample(&[-1.0, f32::NAN, 5.0, 5.0]), 2);
    assert_eq!(s.sample(&[f32::NEG_INFINITY, -100.0]), 1);
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut top_k = Sampler::new(params(1.5, 1, 1.0, 7)).unwrap();
    let mut top_p = Sampler::new(params(1.5, 0, 1e-6, 7)).unwrap();
    for _ in 0..500 {
        let logits = random_logits(&mut rng, 256);
        let expected = first_max(&logits);
        assert_eq!(top_k.sample(&logits), expected);
        assert_eq!(top_p.sample(&logits), expected);
    }
}

/// softmax(logits / t), then top-k, then top-p, renormalized: the textbook definition, kept
/// deliberately naive (full sort by value, ties by index).
fn expected_distribution(logits: &[f64], t: f64, k: usize, p: f64) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| ((l - max) / t).exp()).sum();
    let probs: Vec<f64> = logits.iter().map(|l| ((l - max) / t).exp() / z).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
    if k > 0 {
        order.truncate(k);
    }
    let mass: f64 = order.iter().map(|&i| probs[i]).sum();
    let mut kept = Vec::new();
    let mut cumulative = 0.0;
    for &i in &order {
        kept.push(i);
        cumulative += probs[i] / mass;
        if cumulative >= p {
            break;
        }
    }
    let kept_mass: f64 = kept.iter().map(|&i| probs[i]).sum();
    let mut out = vec![0.0; logits.len()];
    for i in kept {
        out[i] = probs[i] / kept_mass;
    }
    out
}

fn check_empirical_frequencies(p: SamplingParams, logits: &[f32]) {
    let logits64: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
    let expected = expected_distribution(
        &logits64,
        f64::from(p.temperature),
        p.top_k,
        f64::from(p.top_p),
    );
    let mut sampler = Sampler::new(p).unwrap();
    let draws = 20_000;
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[sampler.sample(logits)] += 1;
    }
    let mut chi_square = 0.0;
    let mut support = 0;
    for (i, (&c, &e)) in counts.iter().zip(&expected).enumerate() {
        let freq = c as f64 / draws as f64;
        if e == 0.0 {
            assert_eq!(c, 0, "{p:?}: token {i} is filtered out but was drawn");
            continue;
        }
        support += 1;
        // 4.5 standard deviations of a binomial frequency.
        let sd = (e * (1.0 - e) / draws as f64).sqrt();
        assert!(
            (freq - e).abs() < 4.5 * sd + 1e-9,
            "{p:?}: token {i}: {freq} vs {e}"
        );
        let expected_count = e * draws as f64;
        chi_square += (c as f64 - expected_count).powi(2) / expected_count;
    }
    // For the degrees of freedom used here (<= 7) the 99.9% quantile is below 24.4.
    assert!(support <= 8);
    assert!(
        chi_square < 24.4,
        "{p:?}: chi-square {chi_square} over {support} tokens"
    );

    // The sampler's own view of the distribution agrees with the naive one.
    let probs = Sampler::new(p).unwrap().probabilities(logits);
    for (got, want) in probs.iter().zip(&expected) {
        assert!(
            (f64::from(*got) - want).abs() < 1e-6,
            "{probs:?} vs {expected:?}"
        );
    }
}

#[test]
fn empirical_frequencies_match_the_filtered_softmax() {
    let logits = [1.0f32, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7];
    check_empirical_frequencies(params(1.0, 0, 1.0, 11), &logits);
    check_empirical_frequencies(params(0.7, 0, 1.0, 12), &logits);
    check_empirical_frequencies(params(1.3, 4, 1.0, 13), &logits);
    check_empirical_frequencies(params(1.0, 0, 0.8, 14), &logits);
    check_empirical_frequencies(params(0.9, 5, 0.7, 15), &logits);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_the_mass() {
    // Probabilities 0.5, 0.3, 0.2 (logits are their logs).
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let kept = |top_p: f32| -> Vec<bool> {
        Sampler::new(params(1.0, 0, top_p, 0))
            .unwrap()
            .probabilities(&logits)
            .iter()
            .map(|&p| p > 0.0)
            .collect()
    };
    assert_eq!(kept(0.49), [true, false, false]);
    assert_eq!(kept(0.51), [true, true, false]);
    assert_eq!(kept(0.79), [true, true, false]);
    assert_eq!(kept(0.81), [true, true, true]);
    assert_eq!(kept(1.0), [true, true, true]);
}

#[test]
fn same_seed_same_sequence_different_seed_different_sequence() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let logit_rows: Vec<Vec<f32>> = (0..200).map(|_| random_logits(&mut rng, 256)).collect();
    let run = |seed: u64| -> Vec<usize> {
        let mut s = Sampler::new(params(1.0, 40, 0.95, seed)).unwrap();
        logit_rows.iter().map(|l| s.sample(l)).collect()
    };
    assert_eq!(run(99), run(99));
    assert_ne!(run(99), run(100));
}

#[test]
fn invalid_parameters_are_rejected_with_the_field_named() {
    for t in [-0.1, f32::NAN, f32::INFINITY] {
        let err = params(t, 0, 1.0, 0).validate().unwrap_err();
        assert!(matches!(err, SamplingError::Temperature { .. }));
        assert!(err.to_string().contains("temperature"), "{err}");
        assert!(Sampler::new(params(t, 0, 1.0, 0)).is_err());
    }
    for p in [0.0, -0.5, 1.01, f32::NAN] {
        let err = params(1.0, 0, p, 0).validate().unwrap_err();
        assert!(matches!(err, SamplingError::TopP { .. }));
        assert!(err.to_string().contains("top_p"), "{err}");
    }
    assert!(params(0.0, 3, 1.0, 0).validate().is_ok());
    assert!(params(2.0, 0, 0.01, 0).validate().is_ok());
}

#[test]
fn params_default_and_partial_json() {
    let d = SamplingParams::default();
    assert_eq!((d.temperature, d.top_k, d.top_p, d.seed), (1.0, 0, 1.0, 0));
    let p: SamplingParams = serde_json::from_str(r#"{"top_k": 5, "seed": 9}"#).unwrap();
    assert_eq!(p, params(1.0, 5, 1.0, 9));
}

#[test]
fn log_probs_are_a_stable_log_softmax() {
    let logits = [1.0f32, 2.0, 3.0];
    let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
    for (lp, &x) in log_probs(&logits).iter().zip(&logits) {
        let expected = (f64::from(x).exp() / z).ln();
        assert!((f64::from(*lp) - expected).abs() < 1e-6);
    }
    // Large logits would overflow a naive exp: log(1/(1+e^-1)) and log(e^-1/(1+e^-1)).
    let big = log_probs(&[1000.0, 999.0]);
    assert!((big[0] - -0.313_261_7).abs() < 1e-6, "{big:?}");
    assert!((big[1] - -1.313_261_7).abs() < 1e-6, "{big:?}");
    let masked = log_probs(&[0.0, f32::NEG_INFINITY]);
    assert_eq!(masked, [0.0, f32::NEG_INFINITY]);
}

// ---------------------------------------------------------------------------------------------
// Stop sequences

fn stops(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Feeds `text` and returns the state after each byte.
fn feed(m: &mut StopMatcher, text: &str) -> Vec<StopState> {
    text.bytes().map(|b| m.push(b)).collect()
}

#[test]
fn stop_sequence_is_detected_at_its_last_byte_with_pending_prefix() {
    let mut m = StopMatcher::new(stops(&["END"])).unwrap();
    let states = feed(&mut m, "abcEN");
    assert!(states.iter().all(|s| *s == StopState::Continue));
    assert_eq!(m.pending_len(), 2);
    assert_eq!(m.push(b'x'), StopState::Continue);
    assert_eq!(m.pending_len(), 0);
    feed(&mut m, "EN");
    assert_eq!(m.push(b'D'), StopState::Stopped { index: 0, len: 3 });
}

#[test]
fn self_overlapping_stops_are_found() {
    // After "aaa" the suffix "aa" is still a prefix of "aab".
    let mut m = StopMatcher::new(stops(&["aab"])).unwrap();
    let states = feed(&mut m, "aaab");
    assert_eq!(states[3], StopState::Stopped { index: 0, len: 3 });

    let mut m = StopMatcher::new(stops(&["abab"])).unwrap();
    let states = feed(&mut m, "abaabab");
    assert_eq!(states[6], StopState::Stopped { index: 0, len: 4 });
    assert!(states[..6].iter().all(|s| *s == StopState::Continue));
}

#[test]
fn when_several_stops_end_together_the_longest_is_reported() {
    let mut m = StopMatcher::new(stops(&["b", "xab", "ab"])).unwrap();
    let states = feed(&mut m, "zxab");
    assert_eq!(states[3], StopState::Stopped { index: 1, len: 3 });
    // A stop that is a prefix of another fires first.
    let mut m = StopMatcher::new(stops(&["abc", "ab"])).unwrap();
    assert_eq!(
        feed(&mut m, "ab")[1],
        StopState::Stopped { index: 1, len: 2 }
    );
}

#[test]
fn empty_stop_sequences_are_rejected() {
    let err = StopMatcher::new(stops(&["ok", ""])).unwrap_err();
    assert_eq!(err, StopError::Empty { index: 1 });
    assert!(err.to_string().contains("#1"), "{err}");
    let mut none = StopMatcher::new(Vec::new()).unwrap();
    assert!(feed(&mut none, "anything")
        .iter()
        .all(|s| *s == StopState::Continue));
    assert_eq!(none.pending_len(), 0);
}

/// The longest suffix of `out` that is a proper prefix of some stop: the naive definition.
fn naive_pending(out: &[u8], stops: &[Vec<u8>]) -> usize {
    stops
        .iter()
        .flat_map(|s| (1..s.len()).filter(move |&k| k <= out.len() && out.ends_with(&s[..k])))
        .max()
        .unwrap_or(0)
}

/// The generated text with everything from the first stop sequence on removed, and whether a
/// stop occurred. At the first position where some stop ends, the earliest-starting one is cut.
fn naive_final_text(text: &[u8], stops: &[Vec<u8>]) -> (Vec<u8>, bool) {
    for end in 1..=text.len() {
        let prefix = &text[..end];
        if let Some(len) = stops
            .iter()
            .filter(|s| prefix.ends_with(s))
            .map(|s| s.len())
            .max()
        {
            return (prefix[..end - len].to_vec(), true);
        }
    }
    (text.to_vec(), false)
}

#[test]
fn streaming_never_shows_bytes_of_a_stop_sequence() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let alphabet = b"abc";
    for case in 0..2000 {
        let stop_count = rng.random_range(1..=3);
        let stop_list: Vec<Vec<u8>> = (0..stop_count)
            .map(|_| {
                let len = rng.random_range(1..=4);
                (0..len).map(|_| alphabet[rng.random_range(0..3)]).collect()
            })
            .collect();
        let text_len = rng.random_range(0..=24);
        let text: Vec<u8> = (0..text_len)
            .map(|_| alphabet[rng.random_range(0..3)])
            .collect();
        let (final_text, should_stop) = naive_final_text(&text, &stop_list);

        let mut matcher = StopMatcher::new(stop_list.clone()).unwrap();
        let mut filter = StopFilter::new(stop_list.clone()).unwrap();
        let mut shown = Vec::new();
        let mut stopped = false;
        for (i, &b) in text.iter().enumerate() {
            let state = matcher.push(b);
            stopped = filter.push(b, &mut shown);
            assert_eq!(stopped, state != StopState::Continue, "case {case}");
            assert!(
                final_text.starts_with(&shown),
                "case {case}: stops {stop_list:?}, text {text:?}: showed {shown:?}, final {final_text:?}"
            );
            if stopped {
                break;
            }
            assert_eq!(
                matcher.pending_len(),
                naive_pending(&text[..=i], &stop_list),
                "case {case}"
            );
            assert_eq!(filter.held().len(), matcher.pending_len());
        }
        if !stopped {
            filter.finish(&mut shown);
        }
        assert_eq!(stopped, should_stop, "case {case}");
        assert_eq!(
            shown, final_text,
            "case {case}: stops {stop_list:?}, text {text:?}"
        );
    }
}
