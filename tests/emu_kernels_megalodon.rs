//! MEGALODON's sequence kernels (`kernels/cema.cu`, `kernels/timestep_norm.cu`) on the CPU
//! emulator against their Rust twins (`backend::cpu::cema`, `backend::cpu::timestep_norm`).
//!
//! The twins run in f64 on the same f32 inputs, so they give the exact answer to ~1e-16 and
//! the comparison measures the kernels' own f32 error (tolerances: tests/support/emu_check.rs).
//! Every launch runs under the forward, greedy_low and greedy_high schedules, into exact-size
//! NaN-filled outputs. Lengths straddle the kernels' chunks (CEMA: 256 tokens, TimestepNorm
//! scan: 1024) and channel tiles (CEMA: 8 channels per block), with carried state in and out.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use mega::backend::cpu::cema::{self, CemaGrads, CemaParams};
use mega::backend::cpu::timestep_norm::{self as tsn, TsnState, TsnStateMut};
use mega::cuda::launch::{cema as cema_shape, timestep_norm as tsn_shape};
use mega::emu::HostBuffer;
use rand_chacha::ChaCha8Rng;

// ---- CEMA ------------------------------------------------------------------------------------

/// One layer's CEMA parameters (f32, as the kernels take them) at a size.
struct Cema {
    b: usize,
    l: usize,
    d: usize,
    n: usize,
    alpha: Vec<f32>,
    delta: Vec<f32>,
    theta: Vec<f32>,
    gamma: Vec<f32>,
    omega: Vec<f32>,
}

impl Cema {
    /// Random parameters; alpha and delta around 0 give |q| ≈ 0.75, the init regime, and
    /// theta spans the whole angle range.
    fn new(rng: &mut ChaCha8Rng, b: usize, l: usize, d: usize, n: usize) -> Self {
        Self {
            b,
            l,
            d,
            n,
            alpha: uniform(rng, d * n, 0.0, 2.0),
            delta: uniform(rng, d * n, 0.0, 2.0),
            theta: uniform(rng, d, 0.0, 3.0),
            gamma: uniform(rng, d * n * 2, 0.0, 1.0),
            omega: uniform(rng, d, 0.0, 1.0),
        }
    }

    fn bufs(&self) -> [HostBuffer<f32>; 5] {
        [
            HostBuffer::from_slice(&self.alpha),
            HostBuffer::from_slice(&self.delta),
            HostBuffer::from_slice(&self.theta),
            HostBuffer::from_slice(&self.gamma),
            HostBuffer::from_slice(&self.omega),
        ]
    }

    fn wide(&self) -> [Vec<f64>; 5] {
        [
            widen(&self.alpha),
            widen(&self.delta),
            widen(&self.theta),
            widen(&self.gamma),
            widen(&self.omega),
        ]
    }

    /// The same layer over a call of `l` tokens.
    fn with_len(&self, l: usize) -> Self {
        Self {
            l,
            alpha: self.alpha.clone(),
            delta: self.delta.clone(),
            theta: self.theta.clone(),
            gamma: self.gamma.clone(),
            omega: self.omega.clone(),
            ..*self
        }
    }

    fn act_len(&self) -> usize {
        self.b * self.l * self.d
    }

    fn state_len(&self) -> usize {
        self.b * self.d * self.n * 2
    }

    /// The f64 twin's forward: (y, h_out).
    fn twin_forward(&self, x: &[f32], h0: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
        let [alpha, delta, theta, gamma, omega] = self.wide();
        let p = CemaParams {
            alpha: &alpha,
            delta: &delta,
            theta: &theta,
            gamma: &gamma,
            omega: &omega,
        };
        let mut y = vec![0.0; self.act_len()];
        let mut h_out = vec![0.0; self.state_len()];
        let h0 = h0.map(widen);
        cema::forward(
            &mut y,
            Some(&mut h_out),
            &widen(x),
            &p,
            h0.as_deref(),
            self.b,
            self.l,
            self.d,
            self.n,
        );
        (y, h_out)
    }

    /// The f64 twin's backward from parameter gradients `g0` (accumulated into):
    /// (dx, [dα, dδ, dθ, dγ, dω], dh0 — asked for exactly when `h0` is given).
    #[allow(clippy::type_complexity)]
    fn twin_backward(
        &self,
        dy: &[f32],
        x: &[f32],
        h0: Option<&[f32]>,
        dh_out: Option<&[f32]>,
        g0: &[Vec<f32>; 5],
    ) -> (Vec<f64>, [Vec<f64>; 5], Option<Vec<f64>>) {
        let [alpha, delta, theta, gamma, omega] = self.wide();
        let p = CemaParams {
            alpha: &alpha,
            delta: &delta,
            theta: &theta,
            gamma: &gamma,
            omega: &omega,
        };
        let mut g = g0.clone().map(|v| widen(&v));
        let mut dx = vec![0.0; self.act_len()];
        let mut dh0 = h0.map(|_| vec![0.0; self.state_len()]);
        let [ga, gd, gt, gg, go] = &mut g;
        let mut grads = CemaGrads {
            alpha: ga,
            delta: gd,
            theta: gt,
            gamma: gg,
            omega: go,
        };
        cema::backward(
            &mut dx,
            &mut grads,
            dh0.as_deref_mut(),
            &widen(dy),
            dh_out.map(widen).as_deref(),
            &widen(x),
            &p,
            h0.map(widen).as_deref(),
            self.b,
            self.l,
            self.d,
            self.n,
        );
        (dx, g, dh0)
    }

    /// Launches cema_forward_f32; returns (y, h_out, chunk_states).
    fn kernel_forward(
        &self,
        x: &[f32],
        h0: Option<&[f32]>,
        schedule: mega::emu::Schedule,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (b, l, d, n) = (self.b, self.l, self.d, self.n);
        let y = nan_buf(self.act_len());
        let h_out = nan_buf(self.state_len());
        let states = nan_buf(cema_shape::chunk_states_len(b, l, d, n));
        let xb = HostBuffer::from_slice(x);
        let [alpha, delta, theta, gamma, omega] = self.bufs();
        let (bi, li, di, ni) = (b as i32, l as i32, d as i32, n as i32);
        let shape = cema_shape::forward(b, d, n).unwrap();
        match h0 {
            Some(h0) => {
                let h0 = HostBuffer::from_slice(h0);
                run(
                    "cema_forward_f32",
                    shape,
                    &[
                        &y, &h_out, &states, &xb, &alpha, &delta, &theta, &gamma, &omega, &h0, &bi,
                        &li, &di, &ni,
                    ],
                    schedule,
                );
            }
            None => run(
                "cema_forward_f32",
                shape,
                &[
                    &y,
                    &h_out,
                    &states,
                    &xb,
                    &alpha,
                    &delta,
                    &theta,
                    &gamma,
                    &omega,
                    &Null::<f32>::new(),
                    &bi,
                    &li,
                    &di,
                    &ni,
                ],
                schedule,
            ),
        }
        (y.to_vec(), h_out.to_vec(), states.to_vec())
    }
}

/// (b, l, d, n): single tokens, lengths around the 256-token chunk and a prime, channel counts
/// around the 8-channel block, an empty call, and N other than 16.
const CEMA_CASES: [(usize, usize, usize, usize); 8] = [
    (1, 1, 1, 16),
    (2, 255, 7, 16),
    (1, 256, 8, 16),
    (3, 257, 9, 16),
    (1, 521, 13, 16),
    (2, 0, 5, 16),
    (1, 3, 8, 4),
    (2, 37, 17, 1),
];

/// One CEMA test case: the seed of its inputs, its shape, and whether h0 is given.
#[derive(Debug, Clone, Copy)]
struct CemaCase {
    seed: u64,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
    h0: bool,
}

/// Every shape of [`CEMA_CASES`] (seeds `seed0 + index`) with each of `h0` in turn.
fn cema_cases(seed0: u64, h0: &'static [bool]) -> impl Iterator<Item = CemaCase> {
    CEMA_CASES
        .iter()
        .enumerate()
        .flat_map(move |(i, &(b, l, d, n))| {
            h0.iter().map(move |&h0| CemaCase {
                seed: seed0 + i as u64,
                b,
                l,
                d,
                n,
                h0,
            })
        })
}

/// Two CEMA calls of `l1` then `l2` tokens.
#[derive(Debug)]
struct Chain {
    seed: u64,
    b: usize,
    d: usize,
    n: usize,
    l1: usize,
    l2: usize,
}

#[test]
fn cema_forward_matches_the_twin_with_carried_state() {
    let cases = cema_cases(100, &[true, false]);
    sweep(
        "cema_forward_matches_the_twin_with_carried_state",
        cases,
        |case, schedules| {
            let (b, l, d, n, with_h0) = (case.b, case.l, case.d, case.n, case.h0);
            let mut r = rng(case.seed);
            let c = Cema::new(&mut r, b, l, d, n);
            let x = uniform(&mut r, c.act_len(), 0.0, 1.0);
            let h0 = uniform(&mut r, c.state_len(), 0.0, 1.0);
            let h0 = with_h0.then_some(&h0[..]);
            let (y_want, h_want) = c.twin_forward(&x, h0);
            schedules.each(|schedule, checks| {
                let (y, h_out, _) = c.kernel_forward(&x, h0, schedule);
                checks.close("y", &y, &y_want, F32_TOL);
                checks.close("h_out", &h_out, &h_want, F32_TOL);
            });
        },
    );
}

/// The chunk states the forward saves for the backward are the twin's state after each
/// multiple of 256 tokens.
#[test]
fn cema_chunk_states_are_the_states_before_each_chunk() {
    let (b, l, d, n) = (2, 600, 9, 16);
    let mut r = rng(7);
    let c = Cema::new(&mut r, b, l, d, n);
    let x = uniform(&mut r, c.act_len(), 0.0, 1.0);
    let h0 = uniform(&mut r, c.state_len(), 0.0, 1.0);
    let (_, _, states) = c.kernel_forward(&x, Some(&h0), SCHEDULES[0]);
    let chunks = cema_shape::chunks(l);
    let row = d * n * 2;
    for ci in 0..chunks {
        // The twin over the first ci·256 tokens of every row.
        let lp = ci * cema_shape::CHUNK;
        let prefix = c.with_len(lp);
        let xp: Vec<f32> = (0..b)
            .flat_map(|bi| x[bi * l * d..(bi * l + lp) * d].iter().copied())
            .collect();
        let (_, want) = prefix.twin_forward(&xp, Some(&h0));
        for bi in 0..b {
            let got = &states[(bi * chunks + ci) * row..][..row];
            assert_close(
                &format!("chunk state {ci} of row {bi}"),
                got,
                &want[bi * row..(bi + 1) * row],
                F32_TOL,
            );
        }
    }
    print_worst("cema_chunk_states_are_the_states_before_each_chunk");
}

/// Two calls chained through h_out → h0 give the one-call result (streaming).
#[test]
fn cema_calls_chain_through_the_carried_state() {
    sweep(
        "cema_calls_chain_through_the_carried_state",
        [Chain {
            seed: 8,
            b: 2,
            d: 11,
            n: 16,
            l1: 300,
            l2: 211,
        }],
        |case, schedules| {
            let (b, d, n, l1, l2) = (case.b, case.d, case.n, case.l1, case.l2);
            let mut r = rng(case.seed);
            let whole = Cema::new(&mut r, b, l1 + l2, d, n);
            let x = uniform(&mut r, whole.act_len(), 0.0, 1.0);
            let (y_want, h_want) = whole.twin_forward(&x, None);
            let (first, second) = (whole.with_len(l1), whole.with_len(l2));
            let split = |lo: usize, len: usize| -> Vec<f32> {
                (0..b)
                    .flat_map(|bi| {
                        x[(bi * (l1 + l2) + lo) * d..(bi * (l1 + l2) + lo + len) * d]
                            .iter()
                            .copied()
                    })
                    .collect()
            };
            schedules.each(|schedule, checks| {
                let (y1, h1, _) = first.kernel_forward(&split(0, l1), None, schedule);
                let (y2, h2, _) = second.kernel_forward(&split(l1, l2), Some(&h1), schedule);
                let mut y = Vec::new();
                for bi in 0..b {
                    y.extend_from_slice(&y1[bi * l1 * d..(bi + 1) * l1 * d]);
                    y.extend_from_slice(&y2[bi * l2 * d..(bi + 1) * l2 * d]);
                }
                checks.close("y", &y, &y_want, F32_TOL);
                checks.close("h", &h2, &h_want, F32_TOL);
            });
        },
    );
}

#[test]
fn cema_backward_matches_the_twin() {
    let cases = cema_cases(200, &[true]);
    sweep(
        "cema_backward_matches_the_twin",
        cases,
        |case, schedules| {
            let (b, l, d, n) = (case.b, case.l, case.d, case.n);
            let mut r = rng(case.seed);
            let c = Cema::new(&mut r, b, l, d, n);
            let x = uniform(&mut r, c.act_len(), 0.0, 1.0);
            let dy = uniform(&mut r, c.act_len(), 0.0, 1.0);
            let h0 = uniform(&mut r, c.state_len(), 0.0, 1.0);
            let dh_out = uniform(&mut r, c.state_len(), 0.0, 1.0);
            // Parameter gradients accumulate: start them from non-zero values.
            let g0 = [
                uniform(&mut r, d * n, 0.0, 1.0),
                uniform(&mut r, d * n, 0.0, 1.0),
                uniform(&mut r, d, 0.0, 1.0),
                uniform(&mut r, d * n * 2, 0.0, 1.0),
                uniform(&mut r, d, 0.0, 1.0),
            ];

            let (want_dx, want_g, want_dh0) =
                c.twin_backward(&dy, &x, Some(&h0), Some(&dh_out), &g0);
            let want_dh0 = want_dh0.expect("h0 given");

            schedules.each(|schedule, checks| {
                let (_, _, states) = c.kernel_forward(&x, Some(&h0), schedule);
                let states = HostBuffer::from_slice(&states);
                let dx = nan_buf(c.act_len());
                let dh0 = nan_buf(c.state_len());
                let grads = g0.clone().map(|v| HostBuffer::from_slice(&v));
                let [ga, gd, gt, gg, go] = &grads;
                let [alpha, delta, theta, gamma, omega] = c.bufs();
                let (xb, dyb, dhb) = (
                    HostBuffer::from_slice(&x),
                    HostBuffer::from_slice(&dy),
                    HostBuffer::from_slice(&dh_out),
                );
                let (bi, li, di, ni) = (b as i32, l as i32, d as i32, n as i32);
                run(
                    "cema_backward_f32",
                    cema_shape::backward(d, n).unwrap(),
                    &[
                        &dx, ga, gd, gt, gg, go, &dh0, &dyb, &dhb, &xb, &alpha, &delta, &theta,
                        &gamma, &omega, &states, &bi, &li, &di, &ni,
                    ],
                    schedule,
                );
                checks.close("dx", &dx.to_vec(), &want_dx, F32_TOL);
                checks.close("dh0", &dh0.to_vec(), &want_dh0, F32_TOL);
                for (name, (got, want)) in ["alpha", "delta", "theta", "gamma", "omega"]
                    .iter()
                    .zip(grads.iter().zip(&want_g))
                {
                    checks.close(&format!("d{name}"), &got.to_vec(), want, F32_TOL);
                }
            });
        },
    );
}

/// Without dh_out and dh0 (the training case of a fresh sequence) the backward still
/// matches, and writes nothing it was not given.
#[test]
fn cema_backward_without_optional_state() {
    sweep(
        "cema_backward_without_optional_state",
        [CemaCase {
            seed: 9,
            b: 2,
            l: 300,
            d: 10,
            n: 16,
            h0: false,
        }],
        |case, schedules| {
            let (b, l, d, n) = (case.b, case.l, case.d, case.n);
            let mut r = rng(case.seed);
            let c = Cema::new(&mut r, b, l, d, n);
            let x = uniform(&mut r, c.act_len(), 0.0, 1.0);
            let dy = uniform(&mut r, c.act_len(), 0.0, 1.0);
            let zeros = [d * n, d * n, d, d * n * 2, d].map(|k| vec![0.0f32; k]);
            let (want_dx, want_g, _) = c.twin_backward(&dy, &x, None, None, &zeros);
            schedules.each(|schedule, checks| {
                let (_, _, states) = c.kernel_forward(&x, None, schedule);
                let states = HostBuffer::from_slice(&states);
                let dx = nan_buf(c.act_len());
                let grads = [d * n, d * n, d, d * n * 2, d].map(|k| HostBuffer::filled(k, 0.0f32));
                let [ga, gd, gt, gg, go] = &grads;
                let [alpha, delta, theta, gamma, omega] = c.bufs();
                let (xb, dyb) = (HostBuffer::from_slice(&x), HostBuffer::from_slice(&dy));
                let (bi, li, di, ni) = (b as i32, l as i32, d as i32, n as i32);
                let null = Null::<f32>::new();
                run(
                    "cema_backward_f32",
                    cema_shape::backward(d, n).unwrap(),
                    &[
                        &dx, ga, gd, gt, gg, go, &null, &dyb, &null, &xb, &alpha, &delta, &theta,
                        &gamma, &omega, &states, &bi, &li, &di, &ni,
                    ],
                    schedule,
                );
                checks.close("dx", &dx.to_vec(), &want_dx, F32_TOL);
                for (got, want) in grads.iter().zip(&want_g) {
                    checks.close("param grad", &got.to_vec(), want, F32_TOL);
                }
            });
        },
    );
}

#[test]
fn cema_step_matches_the_twin() {
    let cases = [(1, 1, 16), (3, 33, 16), (2, 8, 5)]
        .iter()
        .enumerate()
        .map(|(i, &(b, d, n))| CemaCase {
            seed: 300 + i as u64,
            b,
            l: 1,
            d,
            n,
            h0: true,
        });
    sweep("cema_step_matches_the_twin", cases, |case, schedules| {
        let (b, d, n) = (case.b, case.d, case.n);
        let mut r = rng(case.seed);
        let c = Cema::new(&mut r, b, 1, d, n);
        let x = uniform(&mut r, b * d, 0.0, 1.0);
        let h = uniform(&mut r, c.state_len(), 0.0, 1.0);
        let [alpha, delta, theta, gamma, omega] = c.wide();
        let p = CemaParams {
            alpha: &alpha,
            delta: &delta,
            theta: &theta,
            gamma: &gamma,
            omega: &omega,
        };
        let mut want_y = vec![0.0; b * d];
        let mut want_h = widen(&h);
        cema::step(&mut want_y, &mut want_h, &widen(&x), &p, b, d, n);
        schedules.each(|schedule, checks| {
            let coef = nan_buf(d * n * cema_shape::STEP_COEF_FLOATS);
            let [alpha, delta, theta, gamma, omega] = c.bufs();
            let (di, ni, bi) = (d as i32, n as i32, b as i32);
            run(
                "cema_coefficients_f32",
                cema_shape::coefficients(d, n),
                &[&coef, &alpha, &delta, &theta, &gamma, &di, &ni],
                schedule,
            );
            let y = nan_buf(b * d);
            let hb = HostBuffer::from_slice(&h);
            let xb = HostBuffer::from_slice(&x);
            run(
                "cema_step_f32",
                cema_shape::step(b, d),
                &[&y, &hb, &xb, &coef, &omega, &bi, &di, &ni],
                schedule,
            );
            checks.close("y", &y.to_vec(), &want_y, F32_TOL);
            checks.close("h", &hb.to_vec(), &want_h, F32_TOL);
        });
    });
}

// ---- TimestepNorm ------------------------------------------------------------------------------

/// A TimestepNorm call: shape, affine parameters and an optional carried state.
struct Tsn {
    b: usize,
    l: usize,
    d: usize,
    g: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
    /// (count, mean, var) carried in.
    state: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

const EPS: f32 = 1e-5;

impl Tsn {
    fn new(r: &mut ChaCha8Rng, b: usize, l: usize, d: usize, g: usize, carried: bool) -> Self {
        let state = carried.then(|| {
            let count = (0..b).map(|i| (3 + 17 * i) as f32).collect();
            (
                count,
                uniform(r, b * g, 0.5, 1.0),
                uniform(r, b * g, 1.0, 0.5),
            )
        });
        Self {
            b,
            l,
            d,
            g,
            w: uniform(r, d, 0.0, 0.5),
            bias: uniform(r, d, 0.0, 0.5),
            state,
        }
    }

    fn rows(&self) -> usize {
        self.b * self.l
    }

    /// The f64 twin: (y, saved_mean, saved_rstd, (count, mean, var) out).
    #[allow(clippy::type_complexity)]
    fn twin_forward(&self, x: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>, [Vec<f64>; 3]) {
        let (b, l, d, g) = (self.b, self.l, self.d, self.g);
        let mut y = vec![0.0; b * l * d];
        let mut sm = vec![0.0; b * l * g];
        let mut sr = vec![0.0; b * l * g];
        let mut out = [vec![0.0; b], vec![0.0; b * g], vec![0.0; b * g]];
        let wide = self
            .state
            .as_ref()
            .map(|(c, m, v)| (widen(c), widen(m), widen(v)));
        let state_in = wide.as_ref().map(|(c, m, v)| TsnState {
            count: c,
            mean: m,
            var: v,
        });
        {
            let [c, m, v] = &mut out;
            tsn::forward(
                &mut y,
                &mut sm,
                &mut sr,
                Some(TsnStateMut {
                    count: c,
                    mean: m,
                    var: v,
                }),
                &widen(x),
                &widen(&self.w),
                &widen(&self.bias),
                state_in,
                b,
                l,
                d,
                g,
                EPS as f64,
            );
        }
        (y, sm, sr, out)
    }

    /// The three forward launches; returns (y, saved_mean, saved_rstd, [count, mean, var]).
    #[allow(clippy::type_complexity)]
    fn kernel_forward(
        &self,
        x: &[f32],
        schedule: mega::emu::Schedule,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, [Vec<f32>; 3]) {
        let (b, l, d, g) = (self.b, self.l, self.d, self.g);
        let rows = self.rows();
        let (ri, li, di, gi, bi) = (rows as i32, l as i32, d as i32, g as i32, b as i32);
        let y = nan_buf(rows * d);
        let sm = nan_buf(rows * g);
        let sr = nan_buf(rows * g);
        let out = [nan_buf(b), nan_buf(b * g), nan_buf(b * g)];
        let xb = HostBuffer::from_slice(x);
        let (wb, bb) = (
            HostBuffer::from_slice(&self.w),
            HostBuffer::from_slice(&self.bias),
        );
        run(
            "tsn_group_moments_f32",
            tsn_shape::group_pass(rows, d, g).unwrap(),
            &[&sm, &sr, &xb, &ri, &di, &gi],
            schedule,
        );
        let null = Null::<f32>::new();
        let state = self.state.as_ref().map(|(c, m, v)| {
            [
                HostBuffer::from_slice(c),
                HostBuffer::from_slice(m),
                HostBuffer::from_slice(v),
            ]
        });
        let [co, mo, vo] = &out;
        let shape = tsn_shape::scan(b, g).unwrap();
        match &state {
            Some([c, m, v]) => run(
                "tsn_scan_f32",
                shape,
                &[&sm, &sr, co, mo, vo, c, m, v, &bi, &li, &gi, &EPS],
                schedule,
            ),
            None => run(
                "tsn_scan_f32",
                shape,
                &[
                    &sm, &sr, co, mo, vo, &null, &null, &null, &bi, &li, &gi, &EPS,
                ],
                schedule,
            ),
        }
        run(
            "tsn_normalize_f32",
            tsn_shape::normalize(rows, d),
            &[&y, &xb, &wb, &bb, &sm, &sr, &ri, &di, &gi],
            schedule,
        );
        (
            y.to_vec(),
            sm.to_vec(),
            sr.to_vec(),
            out.map(|o| o.to_vec()),
        )
    }
}

/// (b, l, d, g): lengths around the 1024-token scan chunk and primes, one group and several,
/// several batch rows, and an empty call. (Emulated cost grows with b·l·g, one warp per
/// (row, group) in the moment passes, so the long cases keep b·g small.)
const TSN_CASES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 8, 1),
    (1, 1023, 12, 1),
    (1, 1024, 16, 2),
    (2, 1025, 6, 1),
    (3, 67, 35, 7),
    (1, 0, 8, 2),
    (1, 2053, 4, 1),
];

/// One TimestepNorm test case: the seed of its inputs, its shape, and whether statistics are
/// carried in.
#[derive(Debug, Clone, Copy)]
struct TsnCase {
    seed: u64,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
    carried: bool,
}

/// Every shape of [`TSN_CASES`] (seeds `seed0 + index`), with and without carried state.
fn tsn_cases(seed0: u64) -> impl Iterator<Item = TsnCase> {
    TSN_CASES
        .iter()
        .enumerate()
        .flat_map(move |(i, &(b, l, d, g))| {
            [true, false].map(move |carried| TsnCase {
                seed: seed0 + i as u64,
                b,
                l,
                d,
                g,
                carried,
            })
        })
}

#[test]
fn timestep_norm_forward_matches_the_twin() {
    sweep(
        "timestep_norm_forward_matches_the_twin",
        tsn_cases(400),
        |case, schedules| {
            let (b, l, d, g, carried) = (case.b, case.l, case.d, case.g, case.carried);
            let mut r = rng(case.seed);
            let t = Tsn::new(&mut r, b, l, d, g, carried);
            let x = uniform(&mut r, b * l * d, 0.3, 2.0);
            let (y_want, sm_want, sr_want, out_want) = t.twin_forward(&x);
            schedules.each(|schedule, checks| {
                let (y, sm, sr, out) = t.kernel_forward(&x, schedule);
                checks.close("y", &y, &y_want, F32_TOL);
                checks.close("mean", &sm, &sm_want, F32_TOL);
                checks.close("rstd", &sr, &sr_want, F32_TOL);
                for (name, (got, want)) in ["count", "mean_out", "var_out"]
                    .iter()
                    .zip(out.iter().zip(&out_want))
                {
                    checks.close(name, got, want, F32_TOL);
                }
            });
        },
    );
}

#[test]
fn timestep_norm_backward_matches_the_twin() {
    sweep(
        "timestep_norm_backward_matches_the_twin",
        tsn_cases(500),
        |case, schedules| {
            let (b, l, d, g, carried) = (case.b, case.l, case.d, case.g, case.carried);
            let mut r = rng(case.seed);
            let t = Tsn::new(&mut r, b, l, d, g, carried);
            let x = uniform(&mut r, b * l * d, 0.3, 2.0);
            let dy = uniform(&mut r, b * l * d, 0.0, 1.0);
            let dmean_out = uniform(&mut r, b * g, 0.0, 1.0);
            let dvar_out = uniform(&mut r, b * g, 0.0, 1.0);
            let dw0 = uniform(&mut r, d, 0.0, 1.0);
            let db0 = uniform(&mut r, d, 0.0, 1.0);

            let (_, sm_w, sr_w, _) = t.twin_forward(&x);
            let wide = t
                .state
                .as_ref()
                .map(|(c, m, v)| (widen(c), widen(m), widen(v)));
            let state_in = wide.as_ref().map(|(c, m, v)| TsnState {
                count: c,
                mean: m,
                var: v,
            });
            let mut dx_w = vec![0.0; b * l * d];
            let (mut dw_w, mut db_w) = (widen(&dw0), widen(&db0));
            let (mut dmi_w, mut dvi_w) = (vec![0.0; b * g], vec![0.0; b * g]);
            tsn::backward(
                &mut dx_w,
                &mut dw_w,
                &mut db_w,
                Some((&mut dmi_w, &mut dvi_w)),
                &widen(&dy),
                Some((&widen(&dmean_out), &widen(&dvar_out))),
                &widen(&x),
                &widen(&t.w),
                &sm_w,
                &sr_w,
                state_in,
                b,
                l,
                d,
                g,
            );

            schedules.each(|schedule, checks| {
                let (_, sm, sr, _) = t.kernel_forward(&x, schedule);
                let rows = t.rows();
                let (ri, li, di, gi, bi) = (rows as i32, l as i32, d as i32, g as i32, b as i32);
                let (smb, srb) = (HostBuffer::from_slice(&sm), HostBuffer::from_slice(&sr));
                let (xb, dyb, wb) = (
                    HostBuffer::from_slice(&x),
                    HostBuffer::from_slice(&dy),
                    HostBuffer::from_slice(&t.w),
                );
                let sums = nan_buf(tsn_shape::sums_len(rows, g));
                run(
                    "tsn_backward_group_sums_f32",
                    tsn_shape::group_pass(rows, d, g).unwrap(),
                    &[&sums, &dyb, &xb, &wb, &smb, &ri, &di, &gi],
                    schedule,
                );
                let (dmi, dvi) = (nan_buf(b * g), nan_buf(b * g));
                let (dmo, dvo) = (
                    HostBuffer::from_slice(&dmean_out),
                    HostBuffer::from_slice(&dvar_out),
                );
                let null = Null::<f32>::new();
                let state = t
                    .state
                    .as_ref()
                    .map(|(c, m, _)| (HostBuffer::from_slice(c), HostBuffer::from_slice(m)));
                let shape = tsn_shape::scan(b, g).unwrap();
                match &state {
                    Some((c, m)) => run(
                        "tsn_backward_scan_f32",
                        shape,
                        &[
                            &sums, &dmi, &dvi, &dmo, &dvo, &smb, &srb, c, m, &bi, &li, &gi,
                        ],
                        schedule,
                    ),
                    None => run(
                        "tsn_backward_scan_f32",
                        shape,
                        &[
                            &sums, &dmi, &dvi, &dmo, &dvo, &smb, &srb, &null, &null, &bi, &li, &gi,
                        ],
                        schedule,
                    ),
                }
                let dx = nan_buf(rows * d);
                let partials = nan_buf(tsn_shape::dx_partials_len(rows, d));
                let rpc = tsn_shape::dx_rows_per_chunk(rows, d) as i32;
                run(
                    "tsn_backward_dx_f32",
                    tsn_shape::backward_dx(rows, d).unwrap(),
                    &[
                        &dx, &partials, &dyb, &xb, &wb, &smb, &srb, &sums, &ri, &di, &gi, &rpc,
                    ],
                    schedule,
                );
                let (dw, db) = (HostBuffer::from_slice(&dw0), HostBuffer::from_slice(&db0));
                let chunks = tsn_shape::dx_chunks(rows, d) as i32;
                run(
                    "tsn_backward_param_reduce_f32",
                    tsn_shape::param_reduce(d),
                    &[&dw, &db, &partials, &chunks, &di],
                    schedule,
                );
                checks.close("dx", &dx.to_vec(), &dx_w, F32_TOL);
                checks.close("dw", &dw.to_vec(), &dw_w, F32_TOL);
                checks.close("db", &db.to_vec(), &db_w, F32_TOL);
                checks.close("dmean_in", &dmi.to_vec(), &dmi_w, F32_TOL);
                checks.close("dvar_in", &dvi.to_vec(), &dvi_w, F32_TOL);
            });
        },
    );
}

#[test]
fn timestep_norm_step_matches_the_twin() {
    let cases = [(1, 8, 1), (3, 12, 3), (2, 320, 10)]
        .iter()
        .enumerate()
        .map(|(i, &(b, d, g))| TsnCase {
            seed: 600 + i as u64,
            b,
            l: 1,
            d,
            g,
            carried: true,
        });
    sweep(
        "timestep_norm_step_matches_the_twin",
        cases,
        |case, schedules| {
            let (b, d, g) = (case.b, case.d, case.g);
            let mut r = rng(case.seed);
            let t = Tsn::new(&mut r, b, 1, d, g, true);
            let x = uniform(&mut r, b * d, 0.3, 2.0);
            let (c, m, v) = t.state.clone().unwrap();
            let (mut cw, mut mw, mut vw) = (widen(&c), widen(&m), widen(&v));
            let mut y_want = vec![0.0; b * d];
            tsn::step(
                &mut y_want,
                TsnStateMut {
                    count: &mut cw,
                    mean: &mut mw,
                    var: &mut vw,
                },
                &widen(&x),
                &widen(&t.w),
                &widen(&t.bias),
                b,
                d,
                g,
                EPS as f64,
            );
            schedules.each(|schedule, checks| {
                let y = nan_buf(b * d);
                let (cb, mb, vb) = (
                    HostBuffer::from_slice(&c),
                    HostBuffer::from_slice(&m),
                    HostBuffer::from_slice(&v),
                );
                let (xb, wb, bb) = (
                    HostBuffer::from_slice(&x),
                    HostBuffer::from_slice(&t.w),
                    HostBuffer::from_slice(&t.bias),
                );
                let (bi, di, gi) = (b as i32, d as i32, g as i32);
                run(
                    "tsn_step_f32",
                    tsn_shape::step(b),
                    &[&y, &cb, &mb, &vb, &xb, &wb, &bb, &bi, &di, &gi, &EPS],
                    schedule,
                );
                checks.close("y", &y.to_vec(), &y_want, F32_TOL);
                checks.close("count", &cb.to_vec(), &cw, 0.0);
                checks.close("mean", &mb.to_vec(), &mw, F32_TOL);
                checks.close("var", &vb.to_vec(), &vw, F32_TOL);
            });
        },
    );
}
