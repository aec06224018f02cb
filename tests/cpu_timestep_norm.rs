//! TimestepNorm (MEGALODON §5) on the CPU backend:
//! (a) the fast path against the plain reference at odd shapes, with and without carried
//!     state, and its independence from the thread count;
//! (b) the forward against the definition (eq.4), computed directly by two passes over every
//!     group scalar up to each timestep, with no Welford merge; hand-computed cases;
//! (c) streaming: token-by-token `step` and split calls chained through the state equal one
//!     call, gradients included;
//! (d) the reference and fast backward against central finite differences in f64, for x, w,
//!     bias and the carried-in mean and variance, with an incoming gradient on the returned
//!     state.
//!
//! Tolerances (normwise relative, `max|got − want| / max|want|`): fast vs reference in f32
//! 1e-5 (f32 rounding, reordered sums); against the f64 definition 1e-10 in f64 and 1e-4 in
//! f32 (the running statistics pass through a few hundred f32 merges); gradients 1e-6 against
//! central differences. Run with `--nocapture` to see the worst errors.

mod common;

use common::*;
use mega::backend::cpu::timestep_norm::{self, reference, TsnState, TsnStateMut};
use mega::backend::cpu::Real;

const EPS: f64 = timestep_norm::EPS;

/// Fast path vs reference, f32.
const TOL: f64 = 1e-5;

fn report(what: &str, e: f64) {
    println!("{what:<40} worst normwise error {e:.3e}");
}

/// Runs `f` inside a rayon pool of `threads` threads.
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

fn cast<F: Real>(v: &[f64]) -> Vec<F> {
    v.iter().map(|&a| F::from_f64(a).unwrap()).collect()
}

fn wide<F: Real>(v: &[F]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64().unwrap()).collect()
}

/// Carried state `(count [b], mean [b, g], var [b, g])`, owned.
#[derive(Clone, Debug, PartialEq)]
struct State<F> {
    count: Vec<F>,
    mean: Vec<F>,
    var: Vec<F>,
}

impl<F: Real> State<F> {
    fn zeros(b: usize, g: usize) -> Self {
        Self {
            count: vec![F::zero(); b],
            mean: vec![F::zero(); b * g],
            var: vec![F::zero(); b * g],
        }
    }
    fn view(&self) -> TsnState<'_, F> {
        TsnState {
            count: &self.count,
            mean: &self.mean,
            var: &self.var,
        }
    }
    fn view_mut(&mut self) -> TsnStateMut<'_, F> {
        TsnStateMut {
            count: &mut self.count,
            mean: &mut self.mean,
            var: &mut self.var,
        }
    }
    fn cast<G: Real>(&self) -> State<G> {
        State {
            count: cast(&wide(&self.count)),
            mean: cast(&wide(&self.mean)),
            var: cast(&wide(&self.var)),
        }
    }
}

/// A random carried state: counts in 1..40 (row 0 may be given count 0), means in ±1,
/// variances in [0.3, 2).
fn random_state(r: &mut rand_chacha::ChaCha8Rng, b: usize, g: usize) -> State<f64> {
    State {
        count: ids(r, b, 40).iter().map(|&c| (c + 1) as f64).collect(),
        mean: uniform(r, b * g, -1.0, 1.0),
        var: uniform(r, b * g, 0.3, 2.0),
    }
}

/// Inputs `x [b, l, d]`, `w`, `bias [d]`; `x` drifts with time so the statistics move.
fn random_inputs(
    r: &mut rand_chacha::ChaCha8Rng,
    b: usize,
    l: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut x = uniform(r, b * l * d, -2.0, 2.5);
    for (i, v) in x.iter_mut().enumerate() {
        let t = (i / d) % l;
        *v += 0.01 * t as f64 + 0.3 * ((i % d) as f64 / d as f64);
    }
    let w = uniform(r, d, -0.5, 0.5);
    let bias = uniform(r, d, -0.5, 0.5);
    (x, w, bias)
}

/// Outputs of one forward call.
#[derive(Clone, Debug)]
struct Fwd<F> {
    y: Vec<F>,
    mean: Vec<F>,
    rstd: Vec<F>,
    state: State<F>,
}

#[allow(clippy::too_many_arguments)]
fn run_forward<F: Real>(
    fast: bool,
    x: &[F],
    w: &[F],
    bias: &[F],
    state_in: Option<&State<F>>,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) -> Fwd<F> {
    let mut y = vec![F::nan(); b * l * d];
    let mut mean = vec![F::nan(); b * l * g];
    let mut rstd = vec![F::nan(); b * l * g];
    let mut state = State::zeros(b, g);
    let eps = F::from_f64(EPS).unwrap();
    let f = if fast {
        timestep_norm::forward::<F>
    } else {
        reference::forward::<F>
    };
    f(
        &mut y,
        &mut mean,
        &mut rstd,
        Some(state.view_mut()),
        x,
        w,
        bias,
        state_in.map(|s| s.view()),
        b,
        l,
        d,
        g,
        eps,
    );
    Fwd {
        y,
        mean,
        rstd,
        state,
    }
}

/// Gradients of one backward call: `dx`, `dw`/`db` as accumulated onto the given starting
/// values, `(dmean_in, dvar_in)`.
#[derive(Clone, Debug)]
struct Bwd<F> {
    dx: Vec<F>,
    dw: Vec<F>,
    db: Vec<F>,
    dmean_in: Vec<F>,
    dvar_in: Vec<F>,
}

#[allow(clippy::too_many_arguments)]
fn run_backward<F: Real>(
    fast: bool,
    dy: &[F],
    dstate_out: Option<(&[F], &[F])>,
    x: &[F],
    w: &[F],
    fwd: &Fwd<F>,
    state_in: Option<&State<F>>,
    dw0: &[F],
    db0: &[F],
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) -> Bwd<F> {
    // NaN-filled outputs: anything the backward fails to overwrite shows up.
    let mut dx = vec![F::nan(); b * l * d];
    let (mut dw, mut db) = (dw0.to_vec(), db0.to_vec());
    let (mut dmean_in, mut dvar_in) = (vec![F::nan(); b * g], vec![F::nan(); b * g]);
    let f = if fast {
        timestep_norm::backward::<F>
    } else {
        reference::backward::<F>
    };
    f(
        &mut dx,
        &mut dw,
        &mut db,
        Some((&mut dmean_in, &mut dvar_in)),
        dy,
        dstate_out,
        x,
        w,
        &fwd.mean,
        &fwd.rstd,
        state_in.map(|s| s.view()),
        b,
        l,
        d,
        g,
    );
    Bwd {
        dx,
        dw,
        db,
        dmean_in,
        dvar_in,
    }
}

/// Timesteps `t0..t1` of a `[b, l, width]` buffer.
fn time_slice<F: Copy>(v: &[F], b: usize, l: usize, width: usize, t0: usize, t1: usize) -> Vec<F> {
    (0..b)
        .flat_map(|bi| {
            v[(bi * l + t0) * width..(bi * l + t1) * width]
                .iter()
                .copied()
        })
        .collect()
}

/// Concatenates two `[b, l_a, width]`, `[b, l_b, width]` buffers along time.
fn time_concat<F: Copy>(a: &[F], bb: &[F], b: usize, width: usize) -> Vec<F> {
    let (la, lb) = (a.len() / (b * width), bb.len() / (b * width));
    (0..b)
        .flat_map(|bi| {
            a[bi * la * width..(bi + 1) * la * width]
                .iter()
                .chain(&bb[bi * lb * width..(bi + 1) * lb * width])
                .copied()
        })
        .collect()
}

// ---- (a) fast path vs reference -------------------------------------------------------------

/// Fast path vs reference on one shape, f32; returns the worst forward and backward errors.
fn compare_fast_and_reference(
    r: &mut rand_chacha::ChaCha8Rng,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
    with_state: bool,
) -> (f64, f64) {
    let tag = format!("b={b} l={l} d={d} g={g} state={with_state}");
    let (x, w, bias) = random_inputs(r, b, l, d);
    let (x, w, bias) = (to_f32(&x), to_f32(&w), to_f32(&bias));
    let carried = random_state(r, b, g).cast::<f32>();
    let st = with_state.then_some(&carried);
    let fast = run_forward(true, &x, &w, &bias, st, b, l, d, g);
    let refr = run_forward(false, &x, &w, &bias, st, b, l, d, g);
    let mut worst_f: f64 = 0.0;
    for (name, got, want) in [
        ("y", &fast.y, &refr.y),
        ("saved mean", &fast.mean, &refr.mean),
        ("saved rstd", &fast.rstd, &refr.rstd),
        ("mean out", &fast.state.mean, &refr.state.mean),
        ("var out", &fast.state.var, &refr.state.var),
    ] {
        worst_f = worst_f.max(assert_close32(&format!("{tag} {name}"), got, want, TOL));
    }
    assert_eq!(fast.state.count, refr.state.count, "{tag} count");

    let dy = to_f32(&uniform(r, b * l * d, -1.0, 1.0));
    let dm = to_f32(&uniform(r, b * g, -1.0, 1.0));
    let dv = to_f32(&uniform(r, b * g, -1.0, 1.0));
    let dw0 = to_f32(&uniform(r, d, -1.0, 1.0));
    let db0 = to_f32(&uniform(r, d, -1.0, 1.0));
    let mut worst_b: f64 = 0.0;
    for dstate_out in [None, Some((&dm[..], &dv[..]))] {
        let [f, rf] = [true, false].map(|fast| {
            run_backward(
                fast, &dy, dstate_out, &x, &w, &refr, st, &dw0, &db0, b, l, d, g,
            )
        });
        let tag = format!("{tag} dstate_out={}", dstate_out.is_some());
        for (name, got, want) in [
            ("dx", &f.dx, &rf.dx),
            ("dw", &f.dw, &rf.dw),
            ("db", &f.db, &rf.db),
            ("dmean_in", &f.dmean_in, &rf.dmean_in),
            ("dvar_in", &f.dvar_in, &rf.dvar_in),
        ] {
            worst_b = worst_b.max(assert_close32(&format!("{tag} {name}"), got, want, TOL));
        }
    }
    (worst_f, worst_b)
}

#[test]
fn fast_matches_reference() {
    let mut r = rng(500);
    let (mut worst_f, mut worst_b): (f64, f64) = (0.0, 0.0);
    for b in [1usize, 3] {
        for l in [1usize, 5, 300] {
            for (d, g) in [8usize, 24]
                .into_iter()
                .flat_map(|d| [1usize, 2, 4, 8].map(|g| (d, g)))
            {
                for with_state in [false, true] {
                    let (ef, eb) = compare_fast_and_reference(&mut r, b, l, d, g, with_state);
                    worst_f = worst_f.max(ef);
                    worst_b = worst_b.max(eb);
                }
            }
        }
    }
    report("fast-vs-ref forward (f32)", worst_f);
    report("fast-vs-ref backward (f32)", worst_b);
}

#[test]
fn fast_path_is_independent_of_thread_count() {
    let (b, l, d, g) = (3usize, 200usize, 256usize, 8usize);
    let mut r = rng(501);
    let (x, w, bias) = random_inputs(&mut r, b, l, d);
    let (x, w, bias) = (to_f32(&x), to_f32(&w), to_f32(&bias));
    let st = random_state(&mut r, b, g).cast::<f32>();
    let dy = to_f32(&uniform(&mut r, b * l * d, -1.0, 1.0));
    let dm = to_f32(&uniform(&mut r, b * g, -1.0, 1.0));
    let dv = to_f32(&uniform(&mut r, b * g, -1.0, 1.0));
    let zeros = vec![0.0f32; d];
    let run = || {
        let fwd = run_forward(true, &x, &w, &bias, Some(&st), b, l, d, g);
        let bwd = run_backward(
            true,
            &dy,
            Some((&dm, &dv)),
            &x,
            &w,
            &fwd,
            Some(&st),
            &zeros,
            &zeros,
            b,
            l,
            d,
            g,
        );
        (fwd, bwd)
    };
    let (f1, b1) = in_pool(1, run);
    for threads in [2, 5] {
        let (f, bw) = in_pool(threads, run);
        assert_eq!(f.y, f1.y, "y with {threads} threads");
        assert_eq!(f.mean, f1.mean);
        assert_eq!(f.rstd, f1.rstd);
        assert_eq!(f.state, f1.state);
        assert_eq!(bw.dx, b1.dx, "dx with {threads} threads");
        assert_eq!(bw.dw, b1.dw, "dw with {threads} threads");
        assert_eq!(bw.db, b1.db);
        assert_eq!(bw.dmean_in, b1.dmean_in);
        assert_eq!(bw.dvar_in, b1.dvar_in);
    }
}

// ---- (b) the definition ---------------------------------------------------------------------

/// Eq.4 directly: for every `t ≥ p`, the mean and population variance (two passes) of all
/// group scalars at timesteps `0..=t` of `x_all [b, p + l, d]`; returns `y`, `μ`, `rstd` for
/// timesteps `p..p+l` and the statistics `(count, mean, var)` over the whole of `x_all`.
#[allow(clippy::too_many_arguments)]
fn definition(
    x_all: &[f64],
    w: &[f64],
    bias: &[f64],
    b: usize,
    p: usize,
    l: usize,
    d: usize,
    g: usize,
) -> (Fwd<f64>, State<f64>) {
    let dg = d / g;
    let total = p + l;
    let stats = |bi: usize, gi: usize, upto: usize| {
        let vals: Vec<f64> = (0..=upto)
            .flat_map(|s| {
                let base = (bi * total + s) * d + gi * dg;
                x_all[base..base + dg].iter().copied()
            })
            .collect();
        let mu = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / vals.len() as f64;
        (mu, var)
    };
    let mut out = Fwd {
        y: vec![0.0; b * l * d],
        mean: vec![0.0; b * l * g],
        rstd: vec![0.0; b * l * g],
        state: State::zeros(b, g),
    };
    let mut prefix = State::zeros(b, g);
    for bi in 0..b {
        prefix.count[bi] = p as f64;
        out.state.count[bi] = total as f64;
        for gi in 0..g {
            if p > 0 {
                (prefix.mean[bi * g + gi], prefix.var[bi * g + gi]) = stats(bi, gi, p - 1);
            }
            for t in 0..l {
                let (mu, var) = stats(bi, gi, p + t);
                let rs = 1.0 / (var + EPS).sqrt();
                out.mean[(bi * l + t) * g + gi] = mu;
                out.rstd[(bi * l + t) * g + gi] = rs;
                for j in gi * dg..(gi + 1) * dg {
                    let xv = x_all[(bi * total + p + t) * d + j];
                    out.y[(bi * l + t) * d + j] = (xv - mu) * rs * (w[j] + 1.0) + bias[j];
                }
                if t == l - 1 {
                    out.state.mean[bi * g + gi] = mu;
                    out.state.var[bi * g + gi] = var;
                }
            }
        }
    }
    (out, prefix)
}

#[test]
fn forward_matches_the_definition() {
    let mut r = rng(502);
    let (mut worst64, mut worst32): (f64, f64) = (0.0, 0.0);
    for &(b, p, l, d, g) in &[
        (1usize, 0usize, 1usize, 8usize, 1usize),
        (2, 0, 5, 8, 2),
        (3, 0, 300, 24, 4),
        (2, 7, 40, 24, 8),
        (1, 1, 1, 8, 4),
        (3, 130, 170, 24, 2),
    ] {
        let (x_all, w, bias) = random_inputs(&mut r, b, p + l, d);
        let (want, prefix) = definition(&x_all, &w, &bias, b, p, l, d, g);
        // The state carried in is the prefix's statistics, computed directly too.
        let st = (p > 0).then_some(&prefix);
        let x = time_slice(&x_all, b, p + l, d, p, p + l);
        let tag = format!("b={b} prefix={p} l={l} d={d} g={g}");
        for fast in [true, false] {
            let got = run_forward(fast, &x, &w, &bias, st, b, l, d, g);
            for (name, gv, wv) in [
                ("y", &got.y, &want.y),
                ("saved mean", &got.mean, &want.mean),
                ("saved rstd", &got.rstd, &want.rstd),
                ("mean out", &got.state.mean, &want.state.mean),
                ("var out", &got.state.var, &want.state.var),
            ] {
                worst64 = worst64.max(assert_close(
                    &format!("{tag} fast={fast} f64 {name}"),
                    gv,
                    wv,
                    1e-10,
                ));
            }
            assert_eq!(got.state.count, want.state.count, "{tag} count");

            let st32 = st.map(|s| s.cast::<f32>());
            let got = run_forward(
                fast,
                &to_f32(&x),
                &to_f32(&w),
                &to_f32(&bias),
                st32.as_ref(),
                b,
                l,
                d,
                g,
            );
            for (name, gv, wv) in [
                ("y", &got.y, &want.y),
                ("saved mean", &got.mean, &want.mean),
                ("saved rstd", &got.rstd, &want.rstd),
                ("mean out", &got.state.mean, &want.state.mean),
                ("var out", &got.state.var, &want.state.var),
            ] {
                worst32 = worst32.max(assert_close(
                    &format!("{tag} fast={fast} f32 {name}"),
                    &to_f64(gv),
                    wv,
                    1e-4,
                ));
            }
        }
    }
    report("forward vs definition (f64)", worst64);
    report("forward vs definition (f32)", worst32);
}

#[test]
fn first_and_second_token_by_hand() {
    // One row, two groups of two channels, two timesteps.
    //   group 0: t0 = [1, 3]  → μ 2, σ² 1;   t1 = [5, 7] → over {1,3,5,7}: μ 4, σ² 5.
    //   group 1: t0 = [2, 2]  → μ 2, σ² 0;   t1 = [4, 0] → over {2,2,4,0}: μ 2, σ² 2.
    let x = vec![1.0f64, 3.0, 2.0, 2.0, 5.0, 7.0, 4.0, 0.0];
    let w = vec![0.0, 1.0, -0.5, 0.0]; // applied as w + 1 = [1, 2, 0.5, 1]
    let bias = vec![0.0, 0.0, 1.0, -1.0];
    let rs = |v: f64| 1.0 / (v + EPS).sqrt();
    let want = [
        -rs(1.0),
        2.0 * rs(1.0),
        1.0,
        -1.0,
        rs(5.0),
        2.0 * 3.0 * rs(5.0),
        0.5 * 2.0 * rs(2.0) + 1.0,
        -2.0 * rs(2.0) - 1.0,
    ];
    // A carried state with count 0 has no effect, whatever its mean and variance.
    let stale = State {
        count: vec![0.0],
        mean: vec![100.0, -3.0],
        var: vec![50.0, 0.0],
    };
    for fast in [true, false] {
        for st in [None, Some(&stale)] {
            let got = run_forward(fast, &x, &w, &bias, st, 1, 2, 4, 2);
            for (gv, wv) in got.y.iter().zip(&want) {
                assert!(
                    (gv - wv).abs() < 1e-12,
                    "fast={fast}: {:?} vs {want:?}",
                    got.y
                );
            }
            assert_eq!(got.mean, vec![2.0, 2.0, 4.0, 2.0]);
            assert_eq!(got.state.count, vec![2.0]);
            assert_eq!(got.state.mean, vec![4.0, 2.0]);
            assert_eq!(got.state.var, vec![5.0, 2.0]);
        }
    }
    // The same tokens one by one through `step`.
    let mut st = State {
        count: vec![0.0],
        mean: vec![9.0, 9.0],
        var: vec![9.0, 9.0],
    };
    let mut y = vec![0.0; 8];
    for t in 0..2 {
        let mut yt = vec![0.0; 4];
        timestep_norm::step(
            &mut yt,
            st.view_mut(),
            &x[t * 4..t * 4 + 4],
            &w,
            &bias,
            1,
            4,
            2,
            EPS,
        );
        y[t * 4..t * 4 + 4].copy_from_slice(&yt);
    }
    for (gv, wv) in y.iter().zip(&want) {
        assert!((gv - wv).abs() < 1e-12, "step: {y:?} vs {want:?}");
    }
    assert_eq!(
        st,
        State {
            count: vec![2.0],
            mean: vec![4.0, 2.0],
            var: vec![5.0, 2.0]
        }
    );
}

// ---- (c) streaming --------------------------------------------------------------------------

#[test]
fn step_by_step_matches_forward() {
    let mut r = rng(503);
    let mut worst: f64 = 0.0;
    for &(b, l, d, g) in &[
        (1usize, 5usize, 8usize, 2usize),
        (3, 300, 24, 8),
        (8, 20, 512, 64),
    ] {
        let (x, w, bias) = random_inputs(&mut r, b, l, d);
        let (x, w, bias) = (to_f32(&x), to_f32(&w), to_f32(&bias));
        for with_state in [false, true] {
            let carried = random_state(&mut r, b, g).cast::<f32>();
            let st_in = with_state.then_some(&carried);
            let want = run_forward(true, &x, &w, &bias, st_in, b, l, d, g);
            // A fresh stepping state is count 0 with arbitrary statistics.
            let mut st = match st_in {
                Some(s) => s.clone(),
                None => State {
                    count: vec![0.0; b],
                    mean: vec![0.0; b * g],
                    var: vec![1.0; b * g],
                },
            };
            let mut y = vec![0.0f32; b * l * d];
            for t in 0..l {
                let xt = time_slice(&x, b, l, d, t, t + 1);
                let mut yt = vec![f32::NAN; b * d];
                timestep_norm::step(&mut yt, st.view_mut(), &xt, &w, &bias, b, d, g, EPS as f32);
                for bi in 0..b {
                    y[(bi * l + t) * d..(bi * l + t + 1) * d]
                        .copy_from_slice(&yt[bi * d..(bi + 1) * d]);
                }
            }
            let tag = format!("b={b} l={l} d={d} g={g} state={with_state}");
            worst = worst.max(assert_close32(&format!("{tag} y"), &y, &want.y, 1e-6));
            worst = worst.max(assert_close32(
                &format!("{tag} mean"),
                &st.mean,
                &want.state.mean,
                1e-6,
            ));
            worst = worst.max(assert_close32(
                &format!("{tag} var"),
                &st.var,
                &want.state.var,
                1e-6,
            ));
            assert_eq!(st.count, want.state.count, "{tag} count");
        }
    }
    report("step-by-step vs forward (f32)", worst);
}

#[test]
fn split_calls_match_one_call() {
    let mut r = rng(504);
    let (mut worst_f, mut worst_b): (f64, f64) = (0.0, 0.0);
    for &(b, l, d, g, split) in &[
        (1usize, 5usize, 8usize, 2usize, 1usize),
        (3, 300, 24, 4, 150),
        (3, 300, 24, 8, 299),
        (2, 64, 512, 64, 17),
    ] {
        let (x, w, bias) = random_inputs(&mut r, b, l, d);
        let (x, w, bias) = (to_f32(&x), to_f32(&w), to_f32(&bias));
        let dy = to_f32(&uniform(&mut r, b * l * d, -1.0, 1.0));
        let dm = to_f32(&uniform(&mut r, b * g, -1.0, 1.0));
        let dv = to_f32(&uniform(&mut r, b * g, -1.0, 1.0));
        let zeros = vec![0.0f32; d];
        for with_state in [false, true] {
            let carried = random_state(&mut r, b, g).cast::<f32>();
            let st0 = with_state.then_some(&carried);
            let tag = format!("b={b} l={l} d={d} g={g} split={split} state={with_state}");
            for fast in [true, false] {
                let whole = run_forward(fast, &x, &w, &bias, st0, b, l, d, g);
                let (xa, xb) = (
                    time_slice(&x, b, l, d, 0, split),
                    time_slice(&x, b, l, d, split, l),
                );
                let fa = run_forward(fast, &xa, &w, &bias, st0, b, split, d, g);
                let fb = run_forward(fast, &xb, &w, &bias, Some(&fa.state), b, l - split, d, g);
                for (name, got, want) in [
                    ("y", time_concat(&fa.y, &fb.y, b, d), &whole.y),
                    (
                        "saved mean",
                        time_concat(&fa.mean, &fb.mean, b, g),
                        &whole.mean,
                    ),
                    (
                        "saved rstd",
                        time_concat(&fa.rstd, &fb.rstd, b, g),
                        &whole.rstd,
                    ),
                    ("mean out", fb.state.mean.clone(), &whole.state.mean),
                    ("var out", fb.state.var.clone(), &whole.state.var),
                ] {
                    worst_f = worst_f.max(assert_close32(
                        &format!("{tag} fast={fast} {name}"),
                        &got,
                        want,
                        1e-6,
                    ));
                }
                assert_eq!(fb.state.count, whole.state.count, "{tag} count");

                // Gradients flow back through the state from the second call to the first.
                let bw = run_backward(
                    fast,
                    &dy,
                    Some((&dm, &dv)),
                    &x,
                    &w,
                    &whole,
                    st0,
                    &zeros,
                    &zeros,
                    b,
                    l,
                    d,
                    g,
                );
                let dyb = time_slice(&dy, b, l, d, split, l);
                let gb = run_backward(
                    fast,
                    &dyb,
                    Some((&dm, &dv)),
                    &xb,
                    &w,
                    &fb,
                    Some(&fa.state),
                    &zeros,
                    &zeros,
                    b,
                    l - split,
                    d,
                    g,
                );
                let dya = time_slice(&dy, b, l, d, 0, split);
                let ga = run_backward(
                    fast,
                    &dya,
                    Some((&gb.dmean_in, &gb.dvar_in)),
                    &xa,
                    &w,
                    &fa,
                    st0,
                    &gb.dw,
                    &gb.db,
                    b,
                    split,
                    d,
                    g,
                );
                for (name, got, want) in [
                    ("dx", time_concat(&ga.dx, &gb.dx, b, d), &bw.dx),
                    ("dw", ga.dw.clone(), &bw.dw),
                    ("db", ga.db.clone(), &bw.db),
                    ("dmean_in", ga.dmean_in.clone(), &bw.dmean_in),
                    ("dvar_in", ga.dvar_in.clone(), &bw.dvar_in),
                ] {
                    worst_b = worst_b.max(assert_close32(
                        &format!("{tag} fast={fast} {name}"),
                        &got,
                        want,
                        TOL,
                    ));
                }
            }
        }
    }
    report("split calls vs one call, forward (f32)", worst_f);
    report("split calls vs one call, backward (f32)", worst_b);
}

// ---- (d) gradients --------------------------------------------------------------------------

/// The probe loss `Σ ry·y + Σ rm·mean_out + Σ rv·var_out` through the reference forward.
#[allow(clippy::too_many_arguments)]
fn probe_loss(
    x: &[f64],
    w: &[f64],
    bias: &[f64],
    st: Option<&State<f64>>,
    ry: &[f64],
    rm: &[f64],
    rv: &[f64],
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) -> f64 {
    let f = run_forward(false, x, w, bias, st, b, l, d, g);
    probe(ry, &f.y) + probe(rm, &f.state.mean) + probe(rv, &f.state.var)
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng(505);
    let mut worst: f64 = 0.0;
    for &(b, l, d, g, with_state, with_dout) in &[
        (2usize, 6usize, 8usize, 2usize, true, true),
        (1, 1, 8, 4, true, true),
        (2, 5, 24, 8, true, false),
        (3, 4, 8, 1, false, true),
        (1, 7, 8, 8, false, false),
    ] {
        let (x, w, bias) = random_inputs(&mut r, b, l, d);
        let mut st = random_state(&mut r, b, g);
        if b > 1 {
            // A row whose carried count is 0: its carried statistics get zero gradient.
            st.count[1] = 0.0;
        }
        let st_in = with_state.then_some(&st);
        let ry = uniform(&mut r, b * l * d, -1.0, 1.0);
        let (rm, rv) = if with_dout {
            (
                uniform(&mut r, b * g, -1.0, 1.0),
                uniform(&mut r, b * g, -1.0, 1.0),
            )
        } else {
            (vec![0.0; b * g], vec![0.0; b * g])
        };
        let dstate_out = with_dout.then_some((&rm[..], &rv[..]));
        let loss = |x: &[f64], w: &[f64], bias: &[f64], st: Option<&State<f64>>| {
            probe_loss(x, w, bias, st, &ry, &rm, &rv, b, l, d, g)
        };
        let fd_x = fd_grad(&x, |v| loss(v, &w, &bias, st_in));
        let fd_w = fd_grad(&w, |v| loss(&x, v, &bias, st_in));
        let fd_b = fd_grad(&bias, |v| loss(&x, &w, v, st_in));
        let fd_mean = fd_grad(&st.mean, |v| {
            let s = State {
                mean: v.to_vec(),
                ..st.clone()
            };
            loss(&x, &w, &bias, with_state.then_some(&s))
        });
        let fd_var = fd_grad(&st.var, |v| {
            let s = State {
                var: v.to_vec(),
                ..st.clone()
            };
            loss(&x, &w, &bias, with_state.then_some(&s))
        });
        let fwd = run_forward(false, &x, &w, &bias, st_in, b, l, d, g);
        let dw0 = uniform(&mut r, d, -1.0, 1.0);
        let db0 = uniform(&mut r, d, -1.0, 1.0);
        let tag = format!("b={b} l={l} d={d} g={g} state={with_state} dout={with_dout}");
        for fast in [false, true] {
            let gr = run_backward(
                fast, &ry, dstate_out, &x, &w, &fwd, st_in, &dw0, &db0, b, l, d, g,
            );
            let which = if fast { "fast" } else { "ref" };
            worst = worst.max(check_fd(&format!("{which} {tag} dx"), &gr.dx, &fd_x));
            worst = worst.max(check_fd(
                &format!("{which} {tag} dw"),
                &added(&gr.dw, &dw0),
                &fd_w,
            ));
            worst = worst.max(check_fd(
                &format!("{which} {tag} db"),
                &added(&gr.db, &db0),
                &fd_b,
            ));
            if with_state {
                worst = worst.max(check_fd(
                    &format!("{which} {tag} dmean_in"),
                    &gr.dmean_in,
                    &fd_mean,
                ));
                worst = worst.max(check_fd(
                    &format!("{which} {tag} dvar_in"),
                    &gr.dvar_in,
                    &fd_var,
                ));
                if b > 1 {
                    assert_eq!(
                        gr.dmean_in[g..2 * g],
                        vec![0.0; g][..],
                        "{tag}: count-0 row"
                    );
                    assert_eq!(gr.dvar_in[g..2 * g], vec![0.0; g][..], "{tag}: count-0 row");
                }
            } else {
                // A fresh sequence's starting statistics do not matter.
                assert!(
                    gr.dmean_in.iter().chain(&gr.dvar_in).all(|&v| v == 0.0),
                    "{tag}"
                );
            }
        }
    }
    report("backward vs finite differences (f64)", worst);
}
