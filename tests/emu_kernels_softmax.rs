//! kernels/softmax.cu on the CPU emulator against its twins: double-precision naive causal
//! softmax forward/backward, and the CPU backend's log-softmax. Row lengths 1, tile−1, tile,
//! tile+1 and primes (the tile is the 32 columns a warp covers per pass), row counts that leave
//! partial blocks and make a two-block grid stride, NaN-filled exact-size outputs and NaN above
//! the causal diagonal of the inputs (which the kernels must never read), under every schedule
//! of `Schedule::TEST_MATRIX`, out of place and in place.

mod emu_support;

use emu_support::{assert_close, for_each_schedule, rng, uniform};
use mega::backend::cpu::loss;
use mega::emu::{launch, HostBuffer, LaunchConfig};

/// Columns one warp covers per pass.
const TILE: usize = 32;
/// Rows per block, as in `launch::softmax::ROWS_PER_BLOCK`.
const ROWS_PER_BLOCK: u32 = 8;
/// The f32-path tolerance of the issue: `|got − want| ≤ TOL·(1 + |want|)`.
const TOL: f32 = 1e-5;

/// (matrices, t): the rows are `matrices · t`, query `r mod t` of each.
const CAUSAL_SHAPES: [(usize, usize); 6] = [
    (3, 1),
    (2, TILE - 1),
    (1, TILE),
    (2, TILE + 1),
    (5, 7),
    (1, 67),
];

/// Two blocks: rows beyond 2·ROWS_PER_BLOCK are reached by the grid stride.
fn config() -> LaunchConfig {
    LaunchConfig::new(2, (32, ROWS_PER_BLOCK), 0)
}

/// [`assert_close`] at [`TOL`], also raising `worst` to this comparison's largest
/// `|got − want| / (1 + |want|)` (printed with `--nocapture` for docs/perf.md §8.1).
fn check(got: &[f32], want: &[f32], what: &str, worst: &mut f32) {
    assert_close(got, want, TOL, what);
    for (&g, &w) in got.iter().zip(want) {
        *worst = worst.max((g - w).abs() / (1.0 + w.abs()));
    }
}

/// Scores with NaN above the diagonal of every `[t, t]` matrix.
fn causal_scores(values: Vec<f32>, t: usize) -> Vec<f32> {
    values
        .into_iter()
        .enumerate()
        .map(|(e, x)| if e % t > (e / t) % t { f32::NAN } else { x })
        .collect()
}

/// Naive f64 causal softmax of `scale · scores`, zeros above the diagonal.
fn softmax_reference(scores: &[f32], t: usize, scale: f32) -> Vec<f32> {
    let mut p = vec![0.0f32; scores.len()];
    for (r, (row, out)) in scores.chunks(t).zip(p.chunks_mut(t)).enumerate() {
        let keys = r % t + 1;
        let s: Vec<f64> = row[..keys]
            .iter()
            .map(|&x| x as f64 * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for (o, x) in out.iter_mut().zip(&s) {
            *o = ((x - m).exp() / sum) as f32;
        }
    }
    p
}

/// Naive f64 softmax backward `scale · P ⊙ (dP − Σ P·dP)` over `j ≤ i`, zeros above.
fn softmax_backward_reference(p: &[f32], dp: &[f32], t: usize, scale: f32) -> Vec<f32> {
    let mut ds = vec![0.0f32; p.len()];
    for (r, out) in ds.chunks_mut(t).enumerate() {
        let keys = r % t + 1;
        let (p, dp) = (&p[r * t..r * t + keys], &dp[r * t..r * t + keys]);
        let dot: f64 = p.iter().zip(dp).map(|(&a, &b)| a as f64 * b as f64).sum();
        for (o, (&a, &b)) in out.iter_mut().zip(p.iter().zip(dp)) {
            *o = (scale as f64 * a as f64 * (b as f64 - dot)) as f32;
        }
    }
    ds
}

#[test]
fn causal_softmax_forward_matches_reference() {
    let mut worst = 0.0f32;
    let mut r = rng(31);
    let scale = 0.35f32;
    for (matrices, t) in CAUSAL_SHAPES {
        let rows = matrices * t;
        let scores = causal_scores(uniform(&mut r, rows * t, -6.0, 6.0), t);
        let want = softmax_reference(&scores, t, scale);
        let scores_buf = HostBuffer::from_slice(&scores);
        let (rows_i, t_i) = (rows as i32, t as i32);
        for_each_schedule(|schedule| {
            let what = format!("rows={rows} t={t} {schedule:?}");
            let probs = HostBuffer::filled(rows * t, f32::NAN);
            launch(
                "causal_softmax_forward_f32",
                config(),
                &[&probs, &scores_buf, &rows_i, &t_i, &scale],
            )
            .unwrap();
            check(&probs.to_vec(), &want, &what, &mut worst);
            let in_place = HostBuffer::from_slice(&scores);
            launch(
                "causal_softmax_forward_f32",
                config(),
                &[&in_place, &in_place, &rows_i, &t_i, &scale],
            )
            .unwrap();
            check(
                &in_place.to_vec(),
                &want,
                &format!("in place {what}"),
                &mut worst,
            );
        });
    }
    println!("causal softmax forward: worst |kernel − twin|/(1 + |twin|) = {worst:.1e}");
}

#[test]
fn causal_softmax_forward_is_stable_for_large_scores() {
    // exp(1000) overflows f32: only the max-subtracted form gives finite probabilities.
    let t = 5usize;
    let scores: Vec<f32> = (0..t * t).map(|e| 1000.0 + (e % t) as f32).collect();
    let want = softmax_reference(&scores, t, 1.0);
    let probs = HostBuffer::filled(t * t, f32::NAN);
    launch(
        "causal_softmax_forward_f32",
        config(),
        &[
            &probs,
            &HostBuffer::from_slice(&scores),
            &(t as i32),
            &(t as i32),
            &1.0f32,
        ],
    )
    .unwrap();
    assert_close(&probs.to_vec(), &want, TOL, "large scores");
    assert_eq!(probs.to_vec()[0], 1.0, "a single key gets probability 1");
}

#[test]
fn causal_softmax_backward_matches_reference() {
    let mut worst = 0.0f32;
    let mut r = rng(32);
    let scale = 0.35f32;
    for (matrices, t) in CAUSAL_SHAPES {
        let rows = matrices * t;
        let p = causal_scores(
            softmax_reference(&uniform(&mut r, rows * t, -3.0, 3.0), t, 1.0),
            t,
        );
        let dp = causal_scores(uniform(&mut r, rows * t, -2.0, 2.0), t);
        let want = softmax_backward_reference(&p, &dp, t, scale);
        let (p_buf, dp_buf) = (HostBuffer::from_slice(&p), HostBuffer::from_slice(&dp));
        let (rows_i, t_i) = (rows as i32, t as i32);
        for_each_schedule(|schedule| {
            let what = format!("rows={rows} t={t} {schedule:?}");
            let ds = HostBuffer::filled(rows * t, f32::NAN);
            launch(
                "causal_softmax_backward_f32",
                config(),
                &[&ds, &p_buf, &dp_buf, &rows_i, &t_i, &scale],
            )
            .unwrap();
            check(&ds.to_vec(), &want, &what, &mut worst);
            let in_place = HostBuffer::from_slice(&dp);
            launch(
                "causal_softmax_backward_f32",
                config(),
                &[&in_place, &p_buf, &in_place, &rows_i, &t_i, &scale],
            )
            .unwrap();
            check(
                &in_place.to_vec(),
                &want,
                &format!("in place {what}"),
                &mut worst,
            );
        });
    }
    println!("causal softmax backward: worst |kernel − twin|/(1 + |twin|) = {worst:.1e}");
}

#[test]
fn log_softmax_matches_cpu() {
    let mut worst = 0.0f32;
    let mut r = rng(33);
    for (rows, v) in [
        (1usize, 1usize),
        (3, TILE - 1),
        (17, TILE),
        (2, TILE + 1),
        (5, 67),
        (4, 257),
    ] {
        let logits = uniform(&mut r, rows * v, -8.0, 8.0);
        let mut want = vec![0.0f32; rows * v];
        loss::log_softmax(&mut want, &logits, v);
        let logits_buf = HostBuffer::from_slice(&logits);
        let (rows_i, v_i) = (rows as i32, v as i32);
        for_each_schedule(|schedule| {
            let what = format!("rows={rows} v={v} {schedule:?}");
            let out = HostBuffer::filled(rows * v, f32::NAN);
            launch(
                "log_softmax_f32",
                config(),
                &[&out, &logits_buf, &rows_i, &v_i],
            )
            .unwrap();
            check(&out.to_vec(), &want, &what, &mut worst);
            let in_place = HostBuffer::from_slice(&logits);
            launch(
                "log_softmax_f32",
                config(),
                &[&in_place, &in_place, &rows_i, &v_i],
            )
            .unwrap();
            check(
                &in_place.to_vec(),
                &want,
                &format!("in place {what}"),
                &mut worst,
            );
        });
    }
    println!("log-softmax: worst |kernel − twin|/(1 + |twin|) = {worst:.1e}");
}
