//! MEGALODON's normalized chunk-local attention (`backend::cpu::megalodon_attention`):
//! (a) the fast path against the plain-loop reference at odd sizes, f32 and f64;
//! (b) the reference backward against central finite differences in f64;
//! (c) a hand-computed case (per-head normalization, adjacent-pair RoPE, chunk restart);
//! (d) structure: chunk locality, causality, RoPE restart, thread-count determinism;
//! (e) streaming against the full forward: token by token, mixed call sizes, rows at
//!     different offsets, multi-chunk prefill, and the call-size rules.
//!
//! Tolerances (normwise relative, `max|got − want| / max|want|`): fast vs reference 1e-5 in
//! f32 (the scores reach ~20 in magnitude, so an f32 rounding of a score moves a probability
//! by ~2e-6 relative; the RMSNorm backward subtracts terms of similar size) and 1e-12 in f64;
//! streaming vs full forward the same (different GEMM shapes reorder the sums); gradients
//! 1e-6 against central differences with step 1e-5 (`common::FD_TOL`).
//! Run with `--nocapture` to see the worst errors.

mod common;

use common::*;
use mega::backend::cpu::megalodon_attention::{
    self as ma, reference, ChunkCallError, ChunkKvCache, MegaAttnShape,
};
use mega::backend::cpu::Real;
use rand_chacha::ChaCha8Rng;

const TOL32: f64 = 1e-5;
const TOL64: f64 = 1e-12;

fn shape(b: usize, l: usize, heads: usize, dz: usize, dv: usize, chunk: usize) -> MegaAttnShape {
    MegaAttnShape {
        b,
        l,
        heads,
        dz,
        dv,
        chunk,
        rope_base: 10_000.0,
        eps: 1e-5,
    }
}

/// Random inputs in f64: `z`, `v`, `γ` (wide enough that the softmax is far from uniform), `β`.
struct Inputs {
    z: Vec<f64>,
    v: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
}

impl Inputs {
    fn random(r: &mut ChaCha8Rng, s: &MegaAttnShape) -> Self {
        Self {
            z: uniform(r, s.b * s.l * s.zdim(), -1.0, 1.0),
            v: uniform(r, s.b * s.l * s.vdim(), -1.0, 1.0),
            gamma: uniform(r, 2 * s.zdim(), -0.5, 2.0),
            beta: uniform(r, 2 * s.zdim(), -0.5, 0.5),
        }
    }
}

fn cast<F: Real>(x: &[f64]) -> Vec<F> {
    x.iter().map(|&v| F::from_f64(v).unwrap()).collect()
}

fn wide<F: Real>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64().unwrap()).collect()
}

type ForwardFn<F> = fn(&mut [F], &mut ma::MegaAttnSaved<F>, &[F], &[F], &[F], &[F], &MegaAttnShape);

/// `(out, saved)` of a forward implementation in `F`.
fn run_forward<F: Real>(
    f: ForwardFn<F>,
    x: &Inputs,
    s: &MegaAttnShape,
) -> (Vec<F>, ma::MegaAttnSaved<F>) {
    let mut out = vec![F::zero(); s.b * s.l * s.vdim()];
    let mut saved = ma::saved_new::<F>(s);
    f(
        &mut out,
        &mut saved,
        &cast(&x.z),
        &cast(&x.v),
        &cast(&x.gamma),
        &cast(&x.beta),
        s,
    );
    (out, saved)
}

/// Gradients `(dz, dv, dγ, dβ)` in f64 from the fast (`fast = true`) or reference backward,
/// with `dγ`, `dβ` starting from `acc0` to check that they accumulate.
fn run_backward<F: Real>(
    fast: bool,
    x: &Inputs,
    dout: &[f64],
    acc0: &[f64],
    s: &MegaAttnShape,
) -> [Vec<f64>; 4] {
    let (z, v, g, bt) = (
        cast::<F>(&x.z),
        cast::<F>(&x.v),
        cast(&x.gamma),
        cast(&x.beta),
    );
    let mut out = vec![F::zero(); s.b * s.l * s.vdim()];
    let mut saved = ma::saved_new::<F>(s);
    let mut dz = vec![F::from_f64(7.0).unwrap(); z.len()];
    let mut dv = vec![F::from_f64(7.0).unwrap(); v.len()];
    let mut dg: Vec<F> = cast(acc0);
    let mut db: Vec<F> = cast(acc0);
    let dout: Vec<F> = cast(dout);
    if fast {
        ma::forward(&mut out, &mut saved, &z, &v, &g, &bt, s);
        ma::backward(
            &mut dz, &mut dv, &mut dg, &mut db, &dout, &z, &v, &g, &bt, &saved, s,
        );
    } else {
        reference::forward(&mut out, &mut saved, &z, &v, &g, &bt, s);
        reference::backward(
            &mut dz, &mut dv, &mut dg, &mut db, &dout, &z, &v, &g, &bt, &saved, s,
        );
    }
    [wide(&dz), wide(&dv), wide(&dg), wide(&db)]
}

/// Every test size of the brief: l ∈ {1, 7, 8, 9, 24} with chunk 8, H ∈ {1, 2},
/// dz ∈ {4, 8}, dv ∈ {3, 6}, b ∈ {1, 3}.
fn odd_shapes() -> Vec<MegaAttnShape> {
    let mut v = Vec::new();
    for &l in &[1, 7, 8, 9, 24] {
        for &heads in &[1, 2] {
            for &dz in &[4, 8] {
                for &dv in &[3, 6] {
                    for &b in &[1, 3] {
                        v.push(shape(b, l, heads, dz, dv, 8));
                    }
                }
            }
        }
    }
    // Longer than one causal row block (64 rows): several blocks per chunk, a partial last
    // chunk, and a sequence shorter than its chunk.
    v.push(shape(2, 300, 2, 8, 6, 128));
    v.push(shape(1, 150, 1, 16, 5, 256));
    v
}

// ---- (a) fast vs reference ------------------------------------------------------------------

#[test]
fn forward_fast_matches_reference() {
    let mut r = rng(1);
    let (mut w32, mut w64) = (0.0f64, 0.0f64);
    for s in odd_shapes() {
        let x = Inputs::random(&mut r, &s);
        let (got, _) = run_forward::<f32>(ma::forward, &x, &s);
        let (want, _) = run_forward::<f32>(reference::forward, &x, &s);
        let what = format!("{s:?}");
        w32 = w32.max(assert_close32(
            &format!("out f32 {what}"),
            &got,
            &want,
            TOL32,
        ));
        let (got, _) = run_forward::<f64>(ma::forward, &x, &s);
        let (want, _) = run_forward::<f64>(reference::forward, &x, &s);
        w64 = w64.max(assert_close(&format!("out f64 {what}"), &got, &want, TOL64));
    }
    println!("fast-vs-ref forward: worst f32 {w32:.3e}, worst f64 {w64:.3e}");
}

#[test]
fn backward_fast_matches_reference() {
    let mut r = rng(2);
    let (mut w32, mut w64) = (0.0f64, 0.0f64);
    let names = ["dz", "dv", "dgamma", "dbeta"];
    for s in odd_shapes() {
        let x = Inputs::random(&mut r, &s);
        let dout = uniform(&mut r, s.b * s.l * s.vdim(), -1.0, 1.0);
        let acc0 = uniform(&mut r, 2 * s.zdim(), -1.0, 1.0);
        let got = run_backward::<f32>(true, &x, &dout, &acc0, &s);
        let want = run_backward::<f32>(false, &x, &dout, &acc0, &s);
        for ((g, w), n) in got.iter().zip(&want).zip(names) {
            w32 = w32.max(assert_close(&format!("{n} f32 {s:?}"), g, w, TOL32));
        }
        let got = run_backward::<f64>(true, &x, &dout, &acc0, &s);
        let want = run_backward::<f64>(false, &x, &dout, &acc0, &s);
        for ((g, w), n) in got.iter().zip(&want).zip(names) {
            w64 = w64.max(assert_close(&format!("{n} f64 {s:?}"), g, w, TOL64));
        }
    }
    println!("fast-vs-ref backward: worst f32 {w32:.3e}, worst f64 {w64:.3e}");
}

// ---- (b) reference backward vs finite differences -------------------------------------------

fn fd_check(s: &MegaAttnShape, seed: u64) {
    let mut r = rng(seed);
    let x = Inputs::random(&mut r, s);
    let probe_w = uniform(&mut r, s.b * s.l * s.vdim(), -1.0, 1.0);
    let zero = vec![0.0; 2 * s.zdim()];
    let [dz, dv, dg, db] = run_backward::<f64>(false, &x, &probe_w, &zero, s);
    let loss = |x: &Inputs| {
        let (out, _) = run_forward::<f64>(reference::forward, x, s);
        probe(&probe_w, &out)
    };
    let tag = format!("l={} C={} H={}", s.l, s.chunk, s.heads);
    let fd_z = fd_grad(&x.z, |z| {
        loss(&Inputs {
            z: z.to_vec(),
            v: x.v.clone(),
            gamma: x.gamma.clone(),
            beta: x.beta.clone(),
        })
    });
    check_fd(&format!("dz {tag}"), &dz, &fd_z);
    let fd_v = fd_grad(&x.v, |v| {
        loss(&Inputs {
            z: x.z.clone(),
            v: v.to_vec(),
            gamma: x.gamma.clone(),
            beta: x.beta.clone(),
        })
    });
    check_fd(&format!("dv {tag}"), &dv, &fd_v);
    let fd_g = fd_grad(&x.gamma, |g| {
        loss(&Inputs {
            z: x.z.clone(),
            v: x.v.clone(),
            gamma: g.to_vec(),
            beta: x.beta.clone(),
        })
    });
    check_fd(&format!("dgamma {tag}"), &dg, &fd_g);
    let fd_b = fd_grad(&x.beta, |bt| {
        loss(&Inputs {
            z: x.z.clone(),
            v: x.v.clone(),
            gamma: x.gamma.clone(),
            beta: bt.to_vec(),
        })
    });
    check_fd(&format!("dbeta {tag}"), &db, &fd_b);
}

#[test]
fn reference_backward_matches_finite_differences() {
    // Three chunks, the last one partial, two heads, two batch rows.
    fd_check(&shape(2, 11, 2, 4, 3, 4), 3);
    // Shorter than one chunk, one head, wider heads.
    fd_check(&shape(1, 6, 1, 8, 5, 8), 4);
}

// ---- (c) hand-computed case -----------------------------------------------------------------

/// softmax(scores) · values, in f64.
fn mix(scores: &[f64], values: &[[f64; 2]]) -> [f64; 2] {
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut o = [0.0; 2];
    for (w, v) in e.iter().zip(values) {
        o[0] += w / sum * v[0];
        o[1] += w / sum * v[1];
    }
    o
}

/// One head, dz = 4, chunk 3, eps 0, base 100: only the second RoPE pair (features 2, 3,
/// frequency 100^(−1/2) = 0.1) is non-zero, so with RMS normalization and the 1/√dz scale
/// each q and k is a unit vector at angle θ_t + 0.1·pos (θ = 0 for (1, 0), π/2 for (0, 1))
/// and each score is the cosine of an angle difference, times (γ0+1) on the query side.
/// The row scales (3, 0.5, 7, 2) must not matter. Token 3 starts a new chunk at position 0.
#[test]
fn hand_computed_rope_pairs_normalization_and_chunk_restart() {
    let z = [
        [0.0, 0.0, 3.0, 0.0],
        [0.0, 0.0, 0.0, 0.5],
        [0.0, 0.0, 7.0, 0.0],
        [0.0, 0.0, 0.0, 2.0],
    ];
    let v = [[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25], [2.0, 4.0]];
    let s = MegaAttnShape {
        b: 1,
        l: 4,
        heads: 1,
        dz: 4,
        dv: 2,
        chunk: 3,
        rope_base: 100.0,
        eps: 0.0,
    };
    let zf: Vec<f64> = z.iter().flatten().cloned().collect();
    let vf: Vec<f64> = v.iter().flatten().cloned().collect();
    for qscale in [1.0, 2.0] {
        let mut gamma = vec![0.0; 8];
        gamma[..4].fill(qscale - 1.0);
        let x = Inputs {
            z: zf.clone(),
            v: vf.clone(),
            gamma,
            beta: vec![0.0; 8],
        };
        let sn = 0.1f64.sin();
        let want = [
            v[0],
            mix(&[-sn * qscale, qscale], &v[..2]),
            mix(&[0.2f64.cos() * qscale, sn * qscale, qscale], &v[..3]),
            v[3],
        ];
        let want: Vec<f64> = want.iter().flatten().cloned().collect();
        for (name, f) in [
            ("fast", ma::forward as ForwardFn<f64>),
            ("reference", reference::forward as ForwardFn<f64>),
        ] {
            let (got, _) = run_forward::<f64>(f, &x, &s);
            assert_close(
                &format!("hand case {name} qscale={qscale}"),
                &got,
                &want,
                1e-14,
            );
        }
    }
}

// ---- (d) structure --------------------------------------------------------------------------

/// Perturbing token `t` of batch row `br` (in `z` or in `v`) changes no output of another
/// batch row, another chunk, or an earlier token, and does change a later one of its chunk.
#[test]
fn chunks_are_independent_and_causal() {
    let s = shape(2, 24, 2, 8, 6, 8);
    let mut r = rng(5);
    let x = Inputs::random(&mut r, &s);
    for f in [ma::forward as ForwardFn<f64>, reference::forward] {
        let (base, _) = run_forward::<f64>(f, &x, &s);
        for (br, t) in [(1usize, 11usize), (0, 0), (0, 23), (1, 16)] {
            for in_z in [true, false] {
                let mut y = Inputs {
                    z: x.z.clone(),
                    v: x.v.clone(),
                    gamma: x.gamma.clone(),
                    beta: x.beta.clone(),
                };
                let (buf, width) = if in_z {
                    (&mut y.z, s.zdim())
                } else {
                    (&mut y.v, s.vdim())
                };
                for e in &mut buf[(br * s.l + t) * width..][..width] {
                    *e += 0.5;
                }
                let (got, _) = run_forward::<f64>(f, &y, &s);
                let vd = s.vdim();
                // The first token of a chunk outputs its own value whatever its z, so a z
                // change there shows up one token later.
                let must_change = if in_z && t % s.chunk == 0 { t + 1 } else { t };
                for row in 0..s.b {
                    for u in 0..s.l {
                        let same_chunk = u / s.chunk == t / s.chunk;
                        let may_change = row == br && same_chunk && u >= t;
                        let a = &got[(row * s.l + u) * vd..][..vd];
                        let b = &base[(row * s.l + u) * vd..][..vd];
                        if !may_change {
                            assert_eq!(a, b, "row {row} token {u} changed (perturbed {br},{t})");
                        } else if u == must_change {
                            assert_ne!(a, b, "token {u} ignored token {t}");
                        }
                    }
                }
            }
        }
    }
}

/// The op on a two-chunk sequence equals the op on each chunk as a sequence of its own:
/// positions restart at 0 and nothing crosses the boundary.
#[test]
fn rope_positions_restart_per_chunk() {
    let whole = shape(2, 16, 2, 8, 6, 8);
    let part = shape(1, 8, 2, 8, 6, 8);
    let mut r = rng(6);
    let x = Inputs::random(&mut r, &whole);
    let (zd, vd) = (whole.zdim(), whole.vdim());
    let mut worst = 0.0f64;
    for f in [ma::forward as ForwardFn<f64>, reference::forward] {
        let (full, _) = run_forward::<f64>(f, &x, &whole);
        for row in 0..whole.b {
            for c in 0..2 {
                let t0 = row * whole.l + c * 8;
                let piece = Inputs {
                    z: x.z[t0 * zd..(t0 + 8) * zd].to_vec(),
                    v: x.v[t0 * vd..(t0 + 8) * vd].to_vec(),
                    gamma: x.gamma.clone(),
                    beta: x.beta.clone(),
                };
                let (got, _) = run_forward::<f64>(f, &piece, &part);
                let want = &full[t0 * vd..(t0 + 8) * vd];
                worst = worst.max(assert_close("chunk alone", &got, want, TOL64));
            }
        }
    }
    println!("chunk-alone vs whole sequence: worst {worst:.3e}");
}

/// The same bits whatever the size of the thread pool.
#[test]
fn deterministic_across_thread_counts() {
    let s = shape(3, 300, 2, 8, 6, 128);
    let mut r = rng(7);
    let x = Inputs::random(&mut r, &s);
    let dout = uniform(&mut r, s.b * s.l * s.vdim(), -1.0, 1.0);
    let acc0 = vec![0.0; 2 * s.zdim()];
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let (out, _) = run_forward::<f32>(ma::forward, &x, &s);
                (wide(&out), run_backward::<f32>(true, &x, &dout, &acc0, &s))
            })
    };
    let one = run(1);
    let many = run(4);
    assert!(one == many, "results depend on the thread count");
}

// ---- (e) streaming --------------------------------------------------------------------------

/// Streams row-major `z`, `v` (`[b, total, ·]`) through `cache` in calls of the given sizes;
/// returns the outputs `[b, Σ sizes, dv·H]`.
fn stream<F: Real>(
    fast: bool,
    cache: &mut ChunkKvCache<F>,
    x: &Inputs,
    s: &MegaAttnShape,
    total: usize,
    start: usize,
    sizes: &[usize],
) -> Vec<F> {
    let (zd, vd) = (s.zdim(), s.vdim());
    let n: usize = sizes.iter().sum();
    let mut out = vec![F::zero(); s.b * n * vd];
    let mut t = start;
    let mut done = 0;
    for &len in sizes {
        let cs = MegaAttnShape { l: len, ..*s };
        let mut zc = Vec::new();
        let mut vc = Vec::new();
        for row in 0..s.b {
            zc.extend_from_slice(&x.z[(row * total + t) * zd..(row * total + t + len) * zd]);
            vc.extend_from_slice(&x.v[(row * total + t) * vd..(row * total + t + len) * vd]);
        }
        let mut o = vec![F::zero(); s.b * len * vd];
        let call = if fast {
            ma::forward_cached
        } else {
            reference::forward_cached
        };
        call(
            &mut o,
            cache,
            &cast(&zc),
            &cast(&vc),
            &cast(&x.gamma),
            &cast(&x.beta),
            &cs,
        )
        .expect("legal call");
        for row in 0..s.b {
            out[(row * n + done) * vd..(row * n + done + len) * vd]
                .copy_from_slice(&o[row * len * vd..(row + 1) * len * vd]);
        }
        t += len;
        done += len;
    }
    out
}

/// Rows `from[r]..from[r]+n` of each batch row `r` of a `[from.len(), total, d]` buffer.
fn rows<F: Copy>(x: &[F], total: usize, d: usize, from: &[usize], n: usize) -> Vec<F> {
    let mut v = Vec::new();
    for (row, &f) in from.iter().enumerate() {
        let t0 = row * total + f;
        v.extend_from_slice(&x[t0 * d..(t0 + n) * d]);
    }
    v
}

#[test]
fn streaming_token_by_token_and_multi_chunk_calls_match_full_forward() {
    let s = shape(3, 24, 2, 8, 6, 8);
    let mut r = rng(8);
    let x = Inputs::random(&mut r, &s);
    let plans: [&[usize]; 3] = [&[1; 24], &[16, 5, 1, 1, 1], &[5, 1, 1, 1, 8, 3, 4, 1]];
    let (mut w32, mut w64) = (0.0f64, 0.0f64);
    for fast in [true, false] {
        let (full64, _) = run_forward::<f64>(ma::forward, &x, &s);
        let (full32, _) = run_forward::<f32>(ma::forward, &x, &s);
        for plan in plans {
            let mut cache = ChunkKvCache::<f64>::new(s.b, s.heads, s.dz, s.dv, s.chunk);
            let got = stream(fast, &mut cache, &x, &s, s.l, 0, plan);
            assert_eq!(
                cache.count,
                vec![0; s.b],
                "24 tokens end on a chunk boundary"
            );
            w64 = w64.max(assert_close(
                &format!("stream f64 {plan:?}"),
                &got,
                &full64,
                TOL64,
            ));
            let mut cache = ChunkKvCache::<f32>::new(s.b, s.heads, s.dz, s.dv, s.chunk);
            let got = stream(fast, &mut cache, &x, &s, s.l, 0, plan);
            w32 = w32.max(assert_close32(
                &format!("stream f32 {plan:?}"),
                &got,
                &full32,
                TOL32,
            ));
        }
    }
    println!("streaming vs full forward: worst f32 {w32:.3e}, worst f64 {w64:.3e}");
}

/// Calls longer than one causal row block, from a boundary and from inside a chunk.
#[test]
fn streaming_long_calls_match_full_forward() {
    let s = shape(2, 300, 2, 8, 6, 128);
    let mut r = rng(11);
    let x = Inputs::random(&mut r, &s);
    let plan = [128usize, 10, 100, 18, 44];
    let (full, _) = run_forward::<f64>(ma::forward, &x, &s);
    let mut worst = 0.0f64;
    for fast in [true, false] {
        let mut cache = ChunkKvCache::<f64>::new(s.b, s.heads, s.dz, s.dv, s.chunk);
        let got = stream(fast, &mut cache, &x, &s, s.l, 0, &plan);
        assert_eq!(cache.count, vec![44; s.b]);
        worst = worst.max(assert_close("long calls", &got, &full, TOL64));
    }
    println!("streaming long calls vs full forward: worst {worst:.3e}");
}

/// Rows start at chunk positions 0, 3 and 2 (each primed with its own prefix through a
/// one-row cache), then stream calls of 5, 1, 1, 1, 5, 1, 1, 1 together.
#[test]
fn streaming_rows_at_different_offsets_match_full_forward() {
    let s = shape(3, 24, 2, 8, 6, 8);
    let offsets = [0usize, 3, 2];
    let plan = [5usize, 1, 1, 1, 5, 1, 1, 1];
    let n: usize = plan.iter().sum();
    let mut r = rng(9);
    let x = Inputs::random(&mut r, &s);
    let (zd, vd) = (s.zdim(), s.vdim());
    let (full, _) = run_forward::<f64>(ma::forward, &x, &s);
    let mut worst = 0.0f64;
    for fast in [true, false] {
        let mut cache = ChunkKvCache::<f64>::new(s.b, s.heads, s.dz, s.dv, s.chunk);
        for (row, &off) in offsets.iter().enumerate() {
            if off == 0 {
                continue;
            }
            let one = MegaAttnShape { b: 1, ..s };
            let mut c1 = ChunkKvCache::<f64>::new(1, s.heads, s.dz, s.dv, s.chunk);
            let prefix = Inputs {
                z: x.z[row * s.l * zd..(row * s.l + s.l) * zd].to_vec(),
                v: x.v[row * s.l * vd..(row * s.l + s.l) * vd].to_vec(),
                gamma: x.gamma.clone(),
                beta: x.beta.clone(),
            };
            stream(fast, &mut c1, &prefix, &one, s.l, 0, &[off]);
            let (kw, vw) = (s.heads * s.chunk * s.dz, s.heads * s.chunk * s.dv);
            cache.k[row * kw..(row + 1) * kw].copy_from_slice(&c1.k);
            cache.v[row * vw..(row + 1) * vw].copy_from_slice(&c1.v);
            cache.count[row] = c1.count[0];
        }
        assert_eq!(cache.count, offsets.to_vec());
        // Each row streams from its own offset: gather per-row windows into one batch.
        let window = Inputs {
            z: rows(&x.z, s.l, zd, &offsets, n),
            v: rows(&x.v, s.l, vd, &offsets, n),
            gamma: x.gamma.clone(),
            beta: x.beta.clone(),
        };
        let got = stream(fast, &mut cache, &window, &s, n, 0, &plan);
        let want = rows(&full, s.l, vd, &offsets, n);
        worst = worst.max(assert_close("offset rows", &got, &want, TOL64));
        assert_eq!(
            cache.count,
            offsets.to_vec(),
            "16 tokens later, same chunk positions"
        );
    }
    println!("streaming at row offsets vs full forward: worst {worst:.3e}");
}

#[test]
fn streaming_rejects_calls_that_break_the_chunk_rules() {
    let s = shape(2, 4, 1, 4, 3, 8);
    let mut r = rng(10);
    let x = Inputs::random(&mut r, &shape(2, 16, 1, 4, 3, 8));
    for fast in [true, false] {
        let call = if fast {
            ma::forward_cached::<f64>
        } else {
            reference::forward_cached::<f64>
        };
        let mut cache = ChunkKvCache::<f64>::new(2, 1, 4, 3, 8);
        cache.count = vec![0, 5];
        let before = cache.clone();
        let mut out = vec![0.0; 2 * 4 * 3];
        let err = call(
            &mut out,
            &mut cache,
            &x.z[..2 * 4 * 4],
            &x.v[..2 * 4 * 3],
            &x.gamma,
            &x.beta,
            &s,
        );
        assert_eq!(
            err,
            Err(ChunkCallError::Straddles {
                row: 1,
                count: 5,
                len: 4,
                chunk: 8
            })
        );
        assert_eq!(cache, before, "a rejected call must leave the cache alone");
        cache.count = vec![0, 0];
        let s12 = MegaAttnShape { l: 12, ..s };
        let mut out = vec![0.0; 2 * 12 * 3];
        let err = call(
            &mut out,
            &mut cache,
            &x.z[..2 * 12 * 4],
            &x.v[..2 * 12 * 3],
            &x.gamma,
            &x.beta,
            &s12,
        );
        assert_eq!(
            err,
            Err(ChunkCallError::Ragged {
                row: 0,
                len: 12,
                chunk: 8
            })
        );
        // A full chunk from a boundary, and a call that exactly fills a partial chunk, pass.
        let s8 = MegaAttnShape { l: 8, ..s };
        let mut out = vec![0.0; 2 * 8 * 3];
        call(
            &mut out,
            &mut cache,
            &x.z[..2 * 8 * 4],
            &x.v[..2 * 8 * 3],
            &x.gamma,
            &x.beta,
            &s8,
        )
        .expect("one whole chunk");
        assert_eq!(cache.count, vec![0, 0]);
        cache.count = vec![4, 4];
        let mut out = vec![0.0; 2 * 4 * 3];
        call(
            &mut out,
            &mut cache,
            &x.z[..2 * 4 * 4],
            &x.v[..2 * 4 * 3],
            &x.gamma,
            &x.beta,
            &s,
        )
        .expect("fills the chunk exactly");
        assert_eq!(cache.count, vec![0, 0]);
    }
}
