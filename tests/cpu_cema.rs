//! CEMA (MEGALODON spec §4) on the CPU backend:
//! (a) the fast chunked scan against the plain reference, forward and backward, at odd sizes,
//!     with and without a carried-in state, with automatic and forced chunk lengths;
//! (b) the single-token step and a sequence split into calls against one call;
//! (c) the reference backward (and the fast one) against central finite differences in f64,
//!     for x, every parameter, h0 and an incoming gradient on h_out;
//! (d) the convolution-kernel form of §4.4, written here from the parameters with
//!     `q^m = exp(m·log q)`, against the forward.
//!
//! Error measure: normwise relative, `max|got − want| / max|want|`, always against the f64
//! reference (or f64 kernel form), so the f32 numbers are the true error of the f32 path.
//! Tolerances: f32 fast path 1e-5, f64 fast path 1e-12, finite differences 1e-6 (step 1e-5).
//! The f32 error of a linear recurrence can grow towards ε/(1−|q|) (rounding q to f32
//! perturbs the filter), so the random parameters keep |q| ≤ 0.992 (memory ≈ 100 tokens) for the
//! 1e-5 checks; a long-memory case (|q| up to 0.9999) checks f64 and reports f32.
//! Run with `--nocapture` to see the worst errors.

mod common;

use common::*;
use mega::backend::cpu::cema::{self, reference, CemaGrads, CemaParams, Coefficients};
use rand_chacha::ChaCha8Rng;

const TOL32: f64 = 1e-5;
const TOL64: f64 = 1e-12;

/// Owned CEMA parameters in the official layout.
#[derive(Clone)]
struct Params<F> {
    alpha: Vec<F>,
    delta: Vec<F>,
    theta: Vec<F>,
    gamma: Vec<F>,
    omega: Vec<F>,
}

impl<F: Copy> Params<F> {
    fn view(&self) -> CemaParams<'_, F> {
        CemaParams {
            alpha: &self.alpha,
            delta: &self.delta,
            theta: &self.theta,
            gamma: &self.gamma,
            omega: &self.omega,
        }
    }
}

impl Params<f64> {
    /// Random parameters; `long_memory` lets `|q|` reach ≈ 0.9999.
    fn random(r: &mut ChaCha8Rng, d: usize, n: usize, long_memory: bool) -> Self {
        let delta_lo = if long_memory { -9.0 } else { -3.0 };
        Self {
            alpha: uniform(r, d * n, -1.5, 1.5),
            delta: uniform(r, d * n, delta_lo, 1.0),
            theta: uniform(r, d, -3.0, 3.0),
            gamma: uniform(r, d * n * 2, -1.5, 1.5),
            omega: uniform(r, d, -1.0, 1.0),
        }
    }

    fn to32(&self) -> Params<f32> {
        Params {
            alpha: to_f32(&self.alpha),
            delta: to_f32(&self.delta),
            theta: to_f32(&self.theta),
            gamma: to_f32(&self.gamma),
            omega: to_f32(&self.omega),
        }
    }

    /// The f32-rounded parameters back in f64, so f64 references see exactly the f32 inputs.
    fn rounded(&self) -> Self {
        let p = self.to32();
        Self {
            alpha: to_f64(&p.alpha),
            delta: to_f64(&p.delta),
            theta: to_f64(&p.theta),
            gamma: to_f64(&p.gamma),
            omega: to_f64(&p.omega),
        }
    }
}

/// Gradient buffers for parameters of shape (d, n).
#[derive(Clone, Debug)]
struct Grads<F> {
    alpha: Vec<F>,
    delta: Vec<F>,
    theta: Vec<F>,
    gamma: Vec<F>,
    omega: Vec<F>,
}

impl<F: Copy + Default> Grads<F> {
    fn filled(d: usize, n: usize, v: F) -> Self {
        Self {
            alpha: vec![v; d * n],
            delta: vec![v; d * n],
            theta: vec![v; d],
            gamma: vec![v; d * n * 2],
            omega: vec![v; d],
        }
    }

    fn view(&mut self) -> CemaGrads<'_, F> {
        CemaGrads {
            alpha: &mut self.alpha,
            delta: &mut self.delta,
            theta: &mut self.theta,
            gamma: &mut self.gamma,
            omega: &mut self.omega,
        }
    }

    fn parts(&self) -> [(&'static str, &Vec<F>); 5] {
        [
            ("alpha", &self.alpha),
            ("delta", &self.delta),
            ("theta", &self.theta),
            ("gamma", &self.gamma),
            ("omega", &self.omega),
        ]
    }
}

/// Inputs of one call: x, h0, dy, dh_out (f64, already representable in f32).
struct Inputs {
    x: Vec<f64>,
    h0: Option<Vec<f64>>,
    dy: Vec<f64>,
    dh_out: Option<Vec<f64>>,
}

fn round32(v: Vec<f64>) -> Vec<f64> {
    to_f64(&to_f32(&v))
}

impl Inputs {
    #[allow(clippy::too_many_arguments)]
    fn random(
        r: &mut ChaCha8Rng,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
        with_h0: bool,
        with_dh_out: bool,
    ) -> Self {
        let x = round32(uniform(r, b * l * d, -1.0, 1.0));
        let h0 = with_h0.then(|| round32(uniform(r, b * d * n * 2, -2.0, 2.0)));
        let dy = round32(uniform(r, b * l * d, -1.0, 1.0));
        let dh_out = with_dh_out.then(|| round32(uniform(r, b * d * n * 2, -1.0, 1.0)));
        Self { x, h0, dy, dh_out }
    }
}

/// Forward outputs `(y, h_out)`.
type Fwd<F> = (Vec<F>, Vec<F>);

fn ref_forward(p: &Params<f64>, x: &[f64], h0: Option<&[f64]>, s: [usize; 4]) -> Fwd<f64> {
    let [b, l, d, n] = s;
    let mut y = vec![0.0; b * l * d];
    let mut h = vec![0.0; b * d * n * 2];
    reference::forward(&mut y, Some(&mut h), x, &p.view(), h0, b, l, d, n);
    (y, h)
}

/// The fast forward in `F` (automatic chunking when `chunk` is `None`).
fn fast_forward<F: mega::backend::cpu::Real>(
    p: &Params<F>,
    x: &[F],
    h0: Option<&[F]>,
    s: [usize; 4],
    chunk: Option<usize>,
) -> Fwd<F> {
    let [b, l, d, n] = s;
    let mut y = vec![F::from(7.0).unwrap(); b * l * d];
    let mut h = vec![F::from(7.0).unwrap(); b * d * n * 2];
    match chunk {
        None => cema::forward(&mut y, Some(&mut h), x, &p.view(), h0, b, l, d, n),
        Some(c) => cema::forward_chunked(&mut y, Some(&mut h), x, &p.view(), h0, b, l, d, n, c),
    }
    (y, h)
}

/// Backward outputs `(dx, dh0, grads)`.
type Bwd<F> = (Vec<F>, Vec<F>, Grads<F>);

fn ref_backward(p: &Params<f64>, io: &Inputs, s: [usize; 4]) -> Bwd<f64> {
    let [b, l, d, n] = s;
    let mut dx = vec![0.0; b * l * d];
    let mut dh0 = vec![0.0; b * d * n * 2];
    let mut g = Grads::filled(d, n, 0.0);
    reference::backward(
        &mut dx,
        &mut g.view(),
        Some(&mut dh0),
        &io.dy,
        io.dh_out.as_deref(),
        &io.x,
        &p.view(),
        io.h0.as_deref(),
        b,
        l,
        d,
        n,
    );
    (dx, dh0, g)
}

fn fast_backward<F: mega::backend::cpu::Real>(
    p: &Params<F>,
    io: &Inputs,
    s: [usize; 4],
    chunk: Option<usize>,
) -> Bwd<F> {
    let [b, l, d, n] = s;
    let cv = |v: &[f64]| -> Vec<F> { v.iter().map(|&a| F::from(a).unwrap()).collect() };
    let (x, dy) = (cv(&io.x), cv(&io.dy));
    let h0 = io.h0.as_deref().map(cv);
    let dh_out = io.dh_out.as_deref().map(cv);
    let garbage = F::from(7.0).unwrap();
    let mut dx = vec![garbage; b * l * d];
    let mut dh0 = vec![garbage; b * d * n * 2];
    let mut g = Grads::filled(d, n, F::zero());
    let chunk_len = chunk.unwrap_or_else(|| cema::auto_chunk_len(b, l, d));
    cema::backward_chunked(
        &mut dx,
        &mut g.view(),
        Some(&mut dh0),
        &dy,
        dh_out.as_deref(),
        &x,
        &p.view(),
        h0.as_deref(),
        b,
        l,
        d,
        n,
        chunk_len,
    );
    (dx, dh0, g)
}

fn as64<F: mega::backend::cpu::Real>(v: &[F]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64().unwrap()).collect()
}

/// Worst errors seen by a test, printed at the end.
#[derive(Default)]
struct Worst(Vec<(String, f64)>);

impl Worst {
    #[track_caller]
    fn check(&mut self, what: &str, got: &[f64], want: &[f64], tol: f64, case: &str) {
        let e = normwise_err(got, want);
        assert!(
            e <= tol,
            "{what} [{case}]: normwise error {e:.3e} > {tol:.1e}"
        );
        match self.0.iter_mut().find(|(w, _)| w == what) {
            Some((_, m)) => *m = m.max(e),
            None => self.0.push((what.to_string(), e)),
        }
    }

    fn print(&self, title: &str) {
        for (what, e) in &self.0 {
            println!("{title:<22} {what:<18} worst normwise error {e:.3e}");
        }
    }
}

const LS: [usize; 4] = [1, 7, 64, 1000];
const DS: [usize; 2] = [3, 32];
const NS: [usize; 3] = [1, 4, 16];
const BS: [usize; 2] = [1, 3];

#[test]
fn forward_fast_matches_reference() {
    let mut r = rng(11);
    let mut worst = Worst::default();
    for &l in &LS {
        for &d in &DS {
            for &n in &NS {
                for &b in &BS {
                    for with_h0 in [false, true] {
                        let s = [b, l, d, n];
                        let case = format!("b={b} l={l} d={d} n={n} h0={with_h0}");
                        let p = Params::random(&mut r, d, n, false).rounded();
                        let io = Inputs::random(&mut r, b, l, d, n, with_h0, false);
                        let (y, h) = ref_forward(&p, &io.x, io.h0.as_deref(), s);

                        let (y64, h64) = fast_forward(&p, &io.x, io.h0.as_deref(), s, None);
                        worst.check("y f64", &y64, &y, TOL64, &case);
                        worst.check("h_out f64", &h64, &h, TOL64, &case);

                        let h0_32 = io.h0.as_deref().map(to_f32);
                        let (y32, h32) =
                            fast_forward(&p.to32(), &to_f32(&io.x), h0_32.as_deref(), s, None);
                        worst.check("y f32", &to_f64(&y32), &y, TOL32, &case);
                        worst.check("h_out f32", &to_f64(&h32), &h, TOL32, &case);
                    }
                }
            }
        }
    }
    worst.print("forward fast-vs-ref");
}

#[test]
fn forward_forced_chunks_match_reference() {
    let mut r = rng(12);
    let mut worst = Worst::default();
    for &(b, l, d, n) in &[
        (2usize, 100usize, 5usize, 4usize),
        (1, 64, 33, 16),
        (3, 9, 2, 3),
    ] {
        for &chunk in &[1usize, 2, 5, 16, 63, 64, 99, 1000] {
            let s = [b, l, d, n];
            let case = format!("b={b} l={l} d={d} n={n} chunk={chunk}");
            let p = Params::random(&mut r, d, n, false).rounded();
            let io = Inputs::random(&mut r, b, l, d, n, true, false);
            let (y, h) = ref_forward(&p, &io.x, io.h0.as_deref(), s);
            let (y64, h64) = fast_forward(&p, &io.x, io.h0.as_deref(), s, Some(chunk));
            worst.check("y f64", &y64, &y, TOL64, &case);
            worst.check("h_out f64", &h64, &h, TOL64, &case);
            let h0_32 = io.h0.as_deref().map(to_f32);
            let (y32, h32) =
                fast_forward(&p.to32(), &to_f32(&io.x), h0_32.as_deref(), s, Some(chunk));
            worst.check("y f32", &to_f64(&y32), &y, TOL32, &case);
            worst.check("h_out f32", &to_f64(&h32), &h, TOL32, &case);
        }
    }
    worst.print("forward forced chunks");
}

#[test]
fn long_memory_forward() {
    // |q| up to ≈ 0.9999 over 4000 tokens split into 16 chunks.
    let mut r = rng(13);
    let s @ [b, l, d, n] = [1usize, 4000usize, 8usize, 16usize];
    let p = Params::random(&mut r, d, n, true).rounded();
    let io = Inputs::random(&mut r, b, l, d, n, true, false);
    let (y, h) = ref_forward(&p, &io.x, io.h0.as_deref(), s);
    let (y64, h64) = fast_forward(&p, &io.x, io.h0.as_deref(), s, Some(250));
    let e_y = assert_close("long-memory y f64", &y64, &y, 1e-11);
    let e_h = assert_close("long-memory h_out f64", &h64, &h, 1e-11);
    let h0_32 = io.h0.as_deref().map(to_f32);
    let (y32, _) = fast_forward(&p.to32(), &to_f32(&io.x), h0_32.as_deref(), s, Some(250));
    // Conditioning, not the algorithm, limits f32 here (module docs): report, and check that
    // it is still a sane approximation.
    let e32 = assert_close("long-memory y f32", &to_f64(&y32), &y, 5e-5);
    println!("long memory: y f64 {e_y:.3e}, h_out f64 {e_h:.3e}, y f32 {e32:.3e}");
}

#[test]
fn backward_fast_matches_reference() {
    let mut r = rng(21);
    let mut worst = Worst::default();
    for &l in &LS {
        for &d in &DS {
            for &n in &NS {
                for &b in &BS {
                    for with_state in [false, true] {
                        let s = [b, l, d, n];
                        let case = format!("b={b} l={l} d={d} n={n} state={with_state}");
                        let p = Params::random(&mut r, d, n, false).rounded();
                        let io = Inputs::random(&mut r, b, l, d, n, with_state, with_state);
                        let want = ref_backward(&p, &io, s);
                        let got64 = fast_backward(&p, &io, s, None);
                        let got32 = fast_backward(&p.to32(), &io, s, None);
                        compare_backward(&mut worst, &got64, &want, TOL64, "f64", &case);
                        let got32 = (as64(&got32.0), as64(&got32.1), grads64(&got32.2));
                        compare_backward(&mut worst, &got32, &want, TOL32, "f32", &case);
                    }
                }
            }
        }
    }
    worst.print("backward fast-vs-ref");
}

#[test]
fn backward_forced_chunks_match_reference() {
    let mut r = rng(22);
    let mut worst = Worst::default();
    for &(b, l, d, n) in &[
        (2usize, 100usize, 5usize, 4usize),
        (1, 64, 33, 16),
        (3, 9, 2, 3),
    ] {
        for &chunk in &[1usize, 2, 5, 16, 63, 64, 99, 1000] {
            let s = [b, l, d, n];
            let case = format!("b={b} l={l} d={d} n={n} chunk={chunk}");
            let p = Params::random(&mut r, d, n, false).rounded();
            let io = Inputs::random(&mut r, b, l, d, n, true, true);
            let want = ref_backward(&p, &io, s);
            let got64 = fast_backward(&p, &io, s, Some(chunk));
            compare_backward(&mut worst, &got64, &want, TOL64, "f64", &case);
            let got32 = fast_backward(&p.to32(), &io, s, Some(chunk));
            let got32 = (as64(&got32.0), as64(&got32.1), grads64(&got32.2));
            compare_backward(&mut worst, &got32, &want, TOL32, "f32", &case);
        }
    }
    worst.print("backward forced chunks");
}

fn grads64(g: &Grads<f32>) -> Grads<f64> {
    Grads {
        alpha: to_f64(&g.alpha),
        delta: to_f64(&g.delta),
        theta: to_f64(&g.theta),
        gamma: to_f64(&g.gamma),
        omega: to_f64(&g.omega),
    }
}

fn compare_backward(
    worst: &mut Worst,
    got: &Bwd<f64>,
    want: &Bwd<f64>,
    tol: f64,
    ty: &str,
    case: &str,
) {
    worst.check(&format!("dx {ty}"), &got.0, &want.0, tol, case);
    worst.check(&format!("dh0 {ty}"), &got.1, &want.1, tol, case);
    for ((name, g), (_, w)) in got.2.parts().into_iter().zip(want.2.parts()) {
        worst.check(&format!("d{name} {ty}"), g, w, tol, case);
    }
}

#[test]
fn step_matches_forward() {
    let mut r = rng(31);
    for &(b, l, d, n) in &[
        (3usize, 40usize, 5usize, 4usize),
        (2, 1000, 32, 16),
        (1, 3, 1, 1),
    ] {
        let p = Params::random(&mut r, d, n, false).to32();
        let x = to_f32(&uniform(&mut r, b * l * d, -1.0, 1.0));
        let h0 = to_f32(&uniform(&mut r, b * d * n * 2, -1.0, 1.0));
        let s = [b, l, d, n];
        // One chunk: the step performs the forward's exact operations.
        let (y_one, h_one) = fast_forward(&p, &x, Some(&h0), s, Some(l));
        let (y_auto, h_auto) = fast_forward(&p, &x, Some(&h0), s, None);

        let coef = Coefficients::new(&p.view(), d, n);
        let mut h = h0.clone();
        let mut y = vec![0.0f32; b * l * d];
        let mut xt = vec![0.0f32; b * d];
        let mut yt = vec![0.0f32; b * d];
        for t in 0..l {
            for bi in 0..b {
                xt[bi * d..(bi + 1) * d].copy_from_slice(&x[(bi * l + t) * d..][..d]);
            }
            if t % 2 == 0 {
                cema::step(&mut yt, &mut h, &xt, &p.view(), b, d, n);
            } else {
                cema::step_with(&mut yt, &mut h, &xt, &coef, b);
            }
            for bi in 0..b {
                y[(bi * l + t) * d..][..d].copy_from_slice(&yt[bi * d..(bi + 1) * d]);
            }
        }
        assert_eq!(
            y, y_one,
            "step vs one-chunk forward y, b={b} l={l} d={d} n={n}"
        );
        assert_eq!(
            h, h_one,
            "step vs one-chunk forward h, b={b} l={l} d={d} n={n}"
        );
        let e = assert_close32("step vs auto forward y", &y, &y_auto, TOL32);
        let eh = assert_close32("step vs auto forward h", &h, &h_auto, TOL32);
        println!("step vs auto-chunked forward b={b} l={l} d={d} n={n}: y {e:.3e}, h {eh:.3e}");
    }
}

#[test]
fn split_calls_match_one_call() {
    let mut r = rng(41);
    let s @ [b, l, d, n] = [2usize, 700usize, 9usize, 16usize];
    let p = Params::random(&mut r, d, n, false);
    let x = uniform(&mut r, b * l * d, -1.0, 1.0);
    let h0 = uniform(&mut r, b * d * n * 2, -1.0, 1.0);
    let (y_all, h_all) = fast_forward(&p, &x, Some(&h0), s, None);
    let p32 = p.to32();
    let (y_all32, h_all32) = fast_forward(&p32, &to_f32(&x), Some(&to_f32(&h0)), s, None);
    for &k in &[0usize, 1, 255, 256, 513, 699, 700] {
        // Tokens k.. of every batch row.
        let take = |v: &[f64], from: usize, to: usize| -> Vec<f64> {
            (0..b)
                .flat_map(|bi| v[(bi * l + from) * d..(bi * l + to) * d].to_vec())
                .collect()
        };
        let (x1, x2) = (take(&x, 0, k), take(&x, k, l));
        let (y1, h1) = fast_forward(&p, &x1, Some(&h0), [b, k, d, n], None);
        let (y2, h2) = fast_forward(&p, &x2, Some(&h1), [b, l - k, d, n], None);
        let y: Vec<f64> = (0..b)
            .flat_map(|bi| {
                let mut row = y1[bi * k * d..(bi + 1) * k * d].to_vec();
                row.extend_from_slice(&y2[bi * (l - k) * d..(bi + 1) * (l - k) * d]);
                row
            })
            .collect();
        assert_close(&format!("split at {k}: y f64"), &y, &y_all, TOL64);
        assert_close(&format!("split at {k}: h f64"), &h2, &h_all, TOL64);

        let (x1, x2) = (to_f32(&x1), to_f32(&x2));
        let (y1, h1) = fast_forward(&p32, &x1, Some(&to_f32(&h0)), [b, k, d, n], None);
        let (y2, h2) = fast_forward(&p32, &x2, Some(&h1), [b, l - k, d, n], None);
        let mut e = 0.0f64;
        for bi in 0..b {
            let (a1, a2) = (
                &y1[bi * k * d..(bi + 1) * k * d],
                &y2[bi * (l - k) * d..][..(l - k) * d],
            );
            let joined: Vec<f32> = a1.iter().chain(a2).copied().collect();
            e = e.max(err32(&joined, &y_all32[bi * l * d..(bi + 1) * l * d]));
        }
        assert!(e <= TOL32, "split at {k}: y f32 error {e:.3e}");
        let eh = assert_close32(&format!("split at {k}: h f32"), &h2, &h_all32, TOL32);
        println!("split at {k}: f32 y {e:.3e}, h {eh:.3e}");
    }
}

/// Loss `Σ ry·y + Σ rh·h_out` of the reference forward.
fn probe_loss(
    p: &Params<f64>,
    x: &[f64],
    h0: &[f64],
    ry: &[f64],
    rh: &[f64],
    s: [usize; 4],
) -> f64 {
    let (y, h) = ref_forward(p, x, Some(h0), s);
    probe(ry, &y) + probe(rh, &h)
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng(51);
    let s @ [b, l, d, n] = [2usize, 9usize, 3usize, 4usize];
    let p = Params::random(&mut r, d, n, false);
    let io = Inputs::random(&mut r, b, l, d, n, true, true);
    let h0 = io.h0.clone().unwrap();
    let (ry, rh) = (io.dy.clone(), io.dh_out.clone().unwrap());

    let fd_x = fd_grad(&io.x, |x| probe_loss(&p, x, &h0, &ry, &rh, s));
    let fd_h0 = fd_grad(&h0, |h| probe_loss(&p, &io.x, h, &ry, &rh, s));
    let fd_param = |pick: fn(&mut Params<f64>) -> &mut Vec<f64>| {
        let base = pick(&mut p.clone()).clone();
        fd_grad(&base, |v| {
            let mut q = p.clone();
            *pick(&mut q) = v.to_vec();
            probe_loss(&q, &io.x, &h0, &ry, &rh, s)
        })
    };
    let fd = Grads {
        alpha: fd_param(|q| &mut q.alpha),
        delta: fd_param(|q| &mut q.delta),
        theta: fd_param(|q| &mut q.theta),
        gamma: fd_param(|q| &mut q.gamma),
        omega: fd_param(|q| &mut q.omega),
    };

    let checks: [(&str, Bwd<f64>); 3] = [
        ("reference", ref_backward(&p, &io, s)),
        ("fast chunk=4", fast_backward(&p, &io, s, Some(4))),
        ("fast one chunk", fast_backward(&p, &io, s, None)),
    ];
    for (name, (dx, dh0, g)) in &checks {
        check_fd(&format!("{name} x"), dx, &fd_x);
        check_fd(&format!("{name} h0"), dh0, &fd_h0);
        for ((pn, got), (_, want)) in g.parts().into_iter().zip(fd.parts()) {
            check_fd(&format!("{name} {pn}"), got, want);
        }
    }
}

#[test]
fn backward_accumulates_parameters_and_overwrites_dx_dh0() {
    let mut r = rng(61);
    let s @ [b, l, d, n] = [2usize, 50usize, 5usize, 4usize];
    let p = Params::random(&mut r, d, n, false);
    let io = Inputs::random(&mut r, b, l, d, n, true, true);
    let (dx, dh0, fresh) = fast_backward(&p, &io, s, None);
    let mut g = Grads::filled(d, n, 0.0);
    let before = Grads {
        alpha: uniform(&mut r, d * n, -1.0, 1.0),
        delta: uniform(&mut r, d * n, -1.0, 1.0),
        theta: uniform(&mut r, d, -1.0, 1.0),
        gamma: uniform(&mut r, d * n * 2, -1.0, 1.0),
        omega: uniform(&mut r, d, -1.0, 1.0),
    };
    g.clone_from(&before);
    let mut dx2 = vec![f64::NAN; b * l * d];
    let mut dh02 = vec![f64::NAN; b * d * n * 2];
    cema::backward(
        &mut dx2,
        &mut g.view(),
        Some(&mut dh02),
        &io.dy,
        io.dh_out.as_deref(),
        &io.x,
        &p.view(),
        io.h0.as_deref(),
        b,
        l,
        d,
        n,
    );
    assert_eq!(dx2, dx, "dx is overwritten");
    assert_eq!(dh02, dh0, "dh0 is overwritten");
    for (((name, after), (_, was)), (_, want)) in
        g.parts().into_iter().zip(before.parts()).zip(fresh.parts())
    {
        assert_close(
            &format!("accumulated d{name}"),
            &added(after, was),
            want,
            1e-12,
        );
    }
    // Without dh0 and with zero state the call still runs and matches.
    let mut g2 = Grads::filled(d, n, 0.0);
    let mut dx3 = vec![0.0; b * l * d];
    cema::backward(
        &mut dx3,
        &mut g2.view(),
        None,
        &io.dy,
        None,
        &io.x,
        &p.view(),
        None,
        b,
        l,
        d,
        n,
    );
    let io0 = Inputs {
        x: io.x.clone(),
        h0: None,
        dy: io.dy.clone(),
        dh_out: None,
    };
    let (dx_ref, _, g_ref) = ref_backward(&p, &io0, s);
    assert_close("dx without state", &dx3, &dx_ref, TOL64);
    for ((name, got), (_, want)) in g2.parts().into_iter().zip(g_ref.parts()) {
        assert_close(&format!("d{name} without state"), got, want, TOL64);
    }
}

#[test]
fn empty_call_passes_state_through() {
    let mut r = rng(71);
    let (b, d, n) = (2usize, 3usize, 4usize);
    let p = Params::random(&mut r, d, n, false);
    let h0 = uniform(&mut r, b * d * n * 2, -1.0, 1.0);
    let (y, h) = fast_forward(&p, &[], Some(&h0), [b, 0, d, n], None);
    assert!(y.is_empty());
    assert_eq!(h, h0, "zero tokens: h_out = h0");
    let (_, hz) = fast_forward(&p, &[], None, [b, 0, d, n], None);
    assert!(
        hz.iter().all(|&v| v == 0.0),
        "zero tokens, no h0: h_out = 0"
    );
    let io = Inputs {
        x: vec![],
        h0: Some(h0),
        dy: vec![],
        dh_out: Some(uniform(&mut r, b * d * n * 2, -1.0, 1.0)),
    };
    let (_, dh0, g) = fast_backward(&p, &io, [b, 0, d, n], None);
    assert_eq!(
        &dh0,
        io.dh_out.as_ref().unwrap(),
        "zero tokens: dh0 = dh_out"
    );
    for (name, v) in g.parts() {
        assert!(v.iter().all(|&a| a == 0.0), "zero tokens: d{name} = 0");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut r = rng(81);
    let s @ [b, l, d, n] = [1usize, 2000usize, 40usize, 16usize];
    let p = Params::random(&mut r, d, n, false).to32();
    let io = Inputs::random(&mut r, b, l, d, n, true, true);
    let run = || {
        let f = fast_forward(
            &p,
            &to_f32(&io.x),
            io.h0.as_deref().map(to_f32).as_deref(),
            s,
            None,
        );
        let g = fast_backward(&p, &io, s, None);
        (f, g.0, g.1, g.2.alpha, g.2.theta, g.2.gamma)
    };
    let pool = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .expect("thread pool")
    };
    let one = pool(1).install(run);
    let three = pool(3).install(run);
    assert!(one == three, "results differ between 1 and 3 threads");
}

/// `(re, im)` complex helpers for the kernel-form expectation.
fn cmul(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 * b.0 - a.1 * b.1, a.0 * b.1 + a.1 * b.0)
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// §4.4 written from the parameters: `q^m = exp(m·(ln|q| + iφ))`,
/// `k[d,m] = Σ_n Re(p·γ̃·q^m)`, `bias[b,d,j] = Σ_n Re(γ̃·q^{j+1}·h0)`,
/// `y = Σ_{i≤j} k[j−i]·x_i + bias + omega·x`, `h_L = p·Σ_j q^{L−1−j}·x_j + q^L·h0`.
fn kernel_form(p: &Params<f64>, x: &[f64], h0: &[f64], s: [usize; 4]) -> Fwd<f64> {
    let [b, l, d, n] = s;
    let qpow = |di: usize, k: usize, m: usize| -> (f64, f64) {
        let i = di * n + k;
        let r = 1.0 - sigmoid(p.alpha[i]) * sigmoid(p.delta[i]);
        let phi = sigmoid(p.theta[di]) * 2.0 * std::f64::consts::PI * (k + 1) as f64 / n as f64;
        let mag = (m as f64 * r.ln()).exp();
        let ang = m as f64 * phi;
        (mag * ang.cos(), mag * ang.sin())
    };
    let gt = |di: usize, k: usize| {
        let i = di * n + k;
        let sc = 1.0 / (n as f64).sqrt();
        (p.gamma[2 * i] * sc, p.gamma[2 * i + 1] * sc)
    };
    let pa = |di: usize, k: usize| sigmoid(p.alpha[di * n + k]);
    let mut y = vec![0.0; b * l * d];
    let mut h = vec![0.0; b * d * n * 2];
    for di in 0..d {
        let kern: Vec<f64> = (0..l)
            .map(|m| {
                (0..n)
                    .map(|k| pa(di, k) * cmul(gt(di, k), qpow(di, k, m)).0)
                    .sum()
            })
            .collect();
        for bi in 0..b {
            let xs: Vec<f64> = (0..l).map(|t| x[(bi * l + t) * d + di]).collect();
            let hz = |k: usize| {
                let i = ((bi * d + di) * n + k) * 2;
                (h0[i], h0[i + 1])
            };
            for j in 0..l {
                let conv: f64 = (0..=j).map(|i| kern[j - i] * xs[i]).sum();
                let bias: f64 = (0..n)
                    .map(|k| cmul(gt(di, k), cmul(qpow(di, k, j + 1), hz(k))).0)
                    .sum();
                y[(bi * l + j) * d + di] = conv + bias + p.omega[di] * xs[j];
            }
            for k in 0..n {
                let mut acc = cmul(qpow(di, k, l), hz(k));
                for (j, &xv) in xs.iter().enumerate() {
                    let w = qpow(di, k, l - 1 - j);
                    acc.0 += pa(di, k) * w.0 * xv;
                    acc.1 += pa(di, k) * w.1 * xv;
                }
                let i = ((bi * d + di) * n + k) * 2;
                h[i] = acc.0;
                h[i + 1] = acc.1;
            }
        }
    }
    (y, h)
}

#[test]
fn forward_matches_convolution_kernel_form() {
    let mut r = rng(91);
    let s @ [b, l, d, n] = [2usize, 300usize, 5usize, 16usize];
    let p = Params::random(&mut r, d, n, false).rounded();
    let x = round32(uniform(&mut r, b * l * d, -1.0, 1.0));
    let h0 = round32(uniform(&mut r, b * d * n * 2, -1.0, 1.0));
    let (y_k, h_k) = kernel_form(&p, &x, &h0, s);
    let mut worst = Worst::default();
    for chunk in [None, Some(37)] {
        let case = format!("chunk={chunk:?}");
        let (y64, h64) = fast_forward(&p, &x, Some(&h0), s, chunk);
        worst.check("y f64", &y64, &y_k, TOL64, &case);
        worst.check("h_out f64", &h64, &h_k, TOL64, &case);
        let (y32, h32) = fast_forward(&p.to32(), &to_f32(&x), Some(&to_f32(&h0)), s, chunk);
        worst.check("y f32", &to_f64(&y32), &y_k, TOL32, &case);
        worst.check("h_out f32", &to_f64(&h32), &h_k, TOL32, &case);
    }
    let (y_ref, h_ref) = ref_forward(&p, &x, Some(&h0), s);
    worst.check("reference y", &y_ref, &y_k, TOL64, "");
    worst.check("reference h_out", &h_ref, &h_k, TOL64, "");
    worst.print("kernel form");
}

#[test]
fn portable_and_wide_kernels_agree_bitwise() {
    // Both instruction-set copies of the kernels run the same per-channel operations, so they
    // must agree exactly (on a CPU without AVX2 both runs take the portable copy).
    let mut r = rng(101);
    let s @ [b, l, d, n] = [2usize, 600usize, 45usize, 16usize];
    let p = Params::random(&mut r, d, n, false);
    let io = Inputs::random(&mut r, b, l, d, n, true, true);
    let run = || {
        let p32 = p.to32();
        let h0 = io.h0.as_deref().map(to_f32);
        let f32_out = fast_forward(&p32, &to_f32(&io.x), h0.as_deref(), s, Some(128));
        let b32 = fast_backward(&p32, &io, s, Some(128));
        let f64_out = fast_forward(&p, &io.x, io.h0.as_deref(), s, Some(128));
        let b64 = fast_backward(&p, &io, s, Some(128));
        (
            f32_out,
            b32.0,
            b32.1,
            b32.2.gamma,
            f64_out,
            b64.0,
            b64.1,
            b64.2.theta,
        )
    };
    let wide = run();
    cema::force_portable_kernels(true);
    let portable = run();
    cema::force_portable_kernels(false);
    assert!(wide == portable, "AVX2 and portable kernels differ");
}
