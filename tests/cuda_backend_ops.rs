//! Every op of the CUDA backend on the emulated device (`CudaBackend<EmulatedDevice>`) against
//! the CPU backend (`Cpu<f32>`) on the same random inputs. Each case is one generic function
//! run on both backends; outputs are compared element by element with
//! `|cuda − cpu| ≤ tol · (1 + |cpu|)`. Kernel ops get 2e-5 (different summation orders inside
//! the kernels, e.g. the norms' per-chunk partials); GEMM-backed and host-fallback ops are the
//! CPU code itself and must agree to 1e-6.

use mega::backend::cpu::Cpu;
use mega::backend::cuda::host_fallback::HOST_FALLBACKS;
use mega::backend::cuda::CudaBackend;
use mega::backend::{
    Activation, AdamW, Backend, CemaWeightGrads, CemaWeights, MegaAttnShape, TsnStats, PAD_ID,
};
use mega::emu::EmulatedDevice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Cuda = CudaBackend<EmulatedDevice>;

const KERNEL_TOL: f32 = 2e-5;
const EXACT_TOL: f32 = 1e-6;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(r: &mut ChaCha8Rng, n: usize, offset: f32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| offset + scale * r.random_range(-1.0f32..1.0))
        .collect()
}

fn ids(r: &mut ChaCha8Rng, n: usize, rows: usize) -> Vec<u32> {
    (0..n).map(|_| r.random_range(0..rows as u32)).collect()
}

/// Runs `case` on the CPU and the emulated CUDA backend and compares every returned tensor;
/// prints the worst error (with `--nocapture`: the figures docs/perf.md §8.1 quotes).
fn check(what: &str, tol: f32, case: impl Fn(&dyn Runner) -> Vec<Vec<f32>>) {
    let want = case(&OnCpu(Cpu::<f32>::new()));
    let got = case(&OnCuda(Cuda::new(EmulatedDevice::new())));
    match compare(what, tol, &want, &got) {
        Ok(worst) => eprintln!("worst error, {what}: {worst:.1e} (tol {tol:.0e})"),
        Err(failure) => panic!("{failure}"),
    }
}

/// The worst `|cuda − cpu| / (1 + |cpu|)` over every element of every output, or the first
/// element above `tol` (NaN only matches NaN).
fn compare(what: &str, tol: f32, want: &[Vec<f32>], got: &[Vec<f32>]) -> Result<f32, String> {
    if want.len() != got.len() {
        return Err(format!("{what}: {} outputs vs {}", got.len(), want.len()));
    }
    let mut worst = 0.0f32;
    for (t, (w, g)) in want.iter().zip(got).enumerate() {
        if w.len() != g.len() {
            return Err(format!(
                "{what}: output {t} length {} vs {}",
                g.len(),
                w.len()
            ));
        }
        for (i, (&w, &g)) in w.iter().zip(g).enumerate() {
            if w.is_nan() && g.is_nan() {
                continue;
            }
            let within = (w - g).abs() <= tol * (1.0 + w.abs());
            if !within {
                return Err(format!("{what}: output {t}[{i}]: cuda {g} vs cpu {w}"));
            }
            worst = worst.max((w - g).abs() / (1.0 + w.abs()));
        }
    }
    Ok(worst)
}

/// A generic case cannot be a closure over `B: Backend`; each case is a `Case` impl run by
/// both backends through this object-safe shim.
trait Runner {
    fn run(&self, case: &dyn Case) -> Vec<Vec<f32>>;
}
struct OnCpu(Cpu<f32>);
struct OnCuda(Cuda);
impl Runner for OnCpu {
    fn run(&self, case: &dyn Case) -> Vec<Vec<f32>> {
        case.cpu(&self.0)
    }
}
impl Runner for OnCuda {
    fn run(&self, case: &dyn Case) -> Vec<Vec<f32>> {
        case.cuda(&self.0)
    }
}
trait Case {
    fn cpu(&self, be: &Cpu<f32>) -> Vec<Vec<f32>>;
    fn cuda(&self, be: &Cuda) -> Vec<Vec<f32>>;
}

/// Defines a `Case` from one generic body `|be| -> Vec<Vec<f32>>`.
macro_rules! case {
    ($name:ident, $what:expr, $tol:expr, |$be:ident| $body:block) => {
        #[test]
        fn $name() {
            struct C;
            fn body<B: Backend>($be: &B) -> Vec<Vec<f32>> $body
            impl Case for C {
                fn cpu(&self, be: &Cpu<f32>) -> Vec<Vec<f32>> {
                    body(be)
                }
                fn cuda(&self, be: &Cuda) -> Vec<Vec<f32>> {
                    body(be)
                }
            }
            check($what, $tol, |r| r.run(&C));
        }
    };
}

case!(memory_ops, "memory", EXACT_TOL, |be| {
    let mut r = rng(1);
    let (n, d) = (7usize, 37usize);
    let a = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let b = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let mut c = be.zeros(n * d);
    let zeros = be.download(&c);
    be.copy(&mut c, &a);
    be.add_assign(&mut c, &b);
    be.scale(&mut c, 0.37);
    let rows = [3u32, 0, 6, 3];
    let mut g = be.zeros(rows.len() * d);
    be.gather_rows(&mut g, &a, &rows, d);
    let mut s = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    be.scatter_rows(&mut s, &g, &[1, 5, 2, 4], d);
    let mut z = be.upload(&[1.0, 2.0]);
    be.fill_zero(&mut z);
    let sums = vec![
        be.sum(&c) as f32,
        be.sum_squares(&c) as f32,
        be.len(&c) as f32,
    ];
    vec![
        zeros,
        be.download(&c),
        be.download(&g),
        be.download(&s),
        be.download(&z),
        sums,
    ]
});

case!(matmul_all_transposes, "matmul", EXACT_TOL, |be| {
    let mut r = rng(2);
    let (m, k, n) = (5usize, 33usize, 17usize);
    let mut outs = Vec::new();
    for (ta, tb, acc) in [
        (false, false, false),
        (true, false, true),
        (false, true, false),
        (true, true, true),
    ] {
        let a = be.upload(&uniform(&mut r, m * k, 0.0, 1.0));
        let b = be.upload(&uniform(&mut r, k * n, 0.0, 1.0));
        let mut out = be.upload(&uniform(&mut r, m * n, 0.0, 1.0));
        be.matmul(&mut out, &a, &b, m, k, n, ta, tb, acc);
        outs.push(be.download(&out));
    }
    outs
});

case!(bias_ops, "bias", EXACT_TOL, |be| {
    let mut r = rng(3);
    let (n, d) = (13usize, 29usize);
    let mut out = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let bias = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    be.add_bias(&mut out, &bias, n, d);
    let mut db = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    be.bias_backward(&mut db, &out, n, d);
    vec![be.download(&out), be.download(&db)]
});

case!(layernorm, "layernorm", KERNEL_TOL, |be| {
    let mut r = rng(4);
    let (n, d) = (9usize, 257usize);
    let x = be.upload(&uniform(&mut r, n * d, 0.5, 2.0));
    let w = be.upload(&uniform(&mut r, d, 1.0, 0.5));
    let b = be.upload(&uniform(&mut r, d, 0.0, 0.5));
    let (mut out, mut mean, mut rstd) = (be.zeros(n * d), be.zeros(n), be.zeros(n));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, d, 1e-5);
    let dout = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let mut dx = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let mut dw = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    let mut db = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    be.layernorm_backward(&mut dx, &mut dw, &mut db, &dout, &x, &w, &mean, &rstd, n, d);
    [out, mean, rstd, dx, dw, db]
        .iter()
        .map(|t| be.download(t))
        .collect()
});

case!(rmsnorm, "rmsnorm", KERNEL_TOL, |be| {
    let mut r = rng(5);
    let (n, d) = (6usize, 131usize);
    let x = be.upload(&uniform(&mut r, n * d, 0.2, 2.0));
    let w = be.upload(&uniform(&mut r, d, 1.0, 0.5));
    let (mut out, mut rstd) = (be.zeros(n * d), be.zeros(n));
    be.rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, d, 1e-5);
    let dout = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let mut dx = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let mut dw = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    be.rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &w, &rstd, n, d);
    [out, rstd, dx, dw].iter().map(|t| be.download(t)).collect()
});

case!(pointwise, "pointwise", KERNEL_TOL, |be| {
    let mut r = rng(6);
    let n = 1009usize;
    let x = be.upload(&uniform(&mut r, n, 0.0, 4.0));
    let dout = be.upload(&uniform(&mut r, n, 0.0, 1.0));
    let mut outs = Vec::new();
    for act in [Activation::Relu, Activation::Gelu, Activation::Silu] {
        let mut y = be.zeros(n);
        be.activation_forward(act, &mut y, &x);
        let mut dx = be.upload(&uniform(&mut r, n, 0.0, 1.0));
        be.activation_backward(act, &mut dx, &x, &dout);
        outs.push(be.download(&y));
        outs.push(be.download(&dx));
    }
    let mut m = be.zeros(n);
    be.mul(&mut m, &x, &dout);
    let mut s = be.zeros(n);
    be.add_scalar(&mut s, &x, 1.0);
    let (rows, h) = (5usize, 131usize);
    let sx = be.upload(&uniform(&mut r, rows * 2 * h, 0.0, 3.0));
    let mut sy = be.zeros(rows * h);
    be.swiglu_forward(&mut sy, &sx, rows, h);
    let sd = be.upload(&uniform(&mut r, rows * h, 0.0, 1.0));
    let mut sdx = be.upload(&uniform(&mut r, rows * 2 * h, 0.0, 1.0));
    be.swiglu_backward(&mut sdx, &sx, &sd, rows, h);
    outs.extend([m, s, sy, sdx].iter().map(|t| be.download(t)));
    outs
});

// Training attention runs as GEMMs + softmax kernels on the device (a different summation
// order from the CPU kernels): KERNEL_TOL. So does the paged decode (kernels/paged_attention.cu,
// partitions of 256 positions combined in order); the cache append is a row copy.
case!(attention_family, "attention", KERNEL_TOL, |be| {
    let mut r = rng(7);
    let (b, t, c, h) = (2usize, 9usize, 16usize, 2usize);
    let scale = 1.0 / ((c / h) as f32).sqrt();
    let qkv = be.upload(&uniform(&mut r, b * t * 3 * c, 0.0, 1.0));
    let (mut out, mut att) = (be.zeros(b * t * c), be.zeros(b * h * t * t));
    be.attention_forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
    let dout = be.upload(&uniform(&mut r, b * t * c, 0.0, 1.0));
    let mut dqkv = be.upload(&uniform(&mut r, b * t * 3 * c, 0.0, 1.0));
    be.attention_backward(&mut dqkv, &dout, &qkv, &att, b, t, c, h, scale);
    let t_max = 6;
    let (mut kc, mut vc) = (be.zeros(b * t_max * c), be.zeros(b * t_max * c));
    let step = be.upload(&uniform(&mut r, b * 3 * c, 0.0, 1.0));
    be.kv_append(&mut kc, &mut vc, &step, &[2, t_max as u32 + 4], c);
    let mut dec = be.zeros(b * c);
    // Paged in blocks of 2 positions, row 0 in blocks 2, 0, 1 and row 1 in blocks 5, 3, 4.
    be.attention_decode(
        &mut dec,
        &step,
        &kc,
        &vc,
        &[3, 5],
        &[2, 0, 1, 5, 3, 4],
        2,
        c,
        h,
        scale,
    );
    [out, att, dqkv, kc, vc, dec]
        .iter()
        .map(|x| be.download(x))
        .collect()
});

case!(timestep_norm, "timestep_norm", KERNEL_TOL, |be| {
    let mut r = rng(8);
    let (b, l, d, g) = (2usize, 37usize, 12usize, 3usize);
    let x = be.upload(&uniform(&mut r, b * l * d, 0.3, 2.0));
    let w = be.upload(&uniform(&mut r, d, 0.0, 0.3));
    let bias = be.upload(&uniform(&mut r, d, 0.0, 0.3));
    let mut outs = Vec::new();
    for carried in [false, true] {
        let state_in = TsnStats {
            count: be.upload(&[5.0, 2.0]),
            mean: be.upload(&uniform(&mut r, b * g, 0.3, 0.5)),
            var: be.upload(&uniform(&mut r, b * g, 1.0, 0.5)),
        };
        let state_in = carried.then_some(&state_in);
        let (mut y, mut sm, mut sr) = (
            be.zeros(b * l * d),
            be.zeros(b * l * g),
            be.zeros(b * l * g),
        );
        let mut out = TsnStats::fresh(be, b, g);
        be.timestep_norm_forward(
            &mut y,
            &mut sm,
            &mut sr,
            Some(&mut out),
            &x,
            &w,
            &bias,
            state_in,
            b,
            l,
            d,
            g,
            1e-5,
        );
        let dy = be.upload(&uniform(&mut r, b * l * d, 0.0, 1.0));
        let (dmo, dvo) = (
            be.upload(&uniform(&mut r, b * g, 0.0, 1.0)),
            be.upload(&uniform(&mut r, b * g, 0.0, 1.0)),
        );
        let mut dx = be.zeros(b * l * d);
        let mut dw = be.upload(&uniform(&mut r, d, 0.0, 1.0));
        let mut db = be.upload(&uniform(&mut r, d, 0.0, 1.0));
        let (mut dmi, mut dvi) = (be.zeros(b * g), be.zeros(b * g));
        be.timestep_norm_backward(
            &mut dx,
            &mut dw,
            &mut db,
            Some((&mut dmi, &mut dvi)),
            &dy,
            Some((&dmo, &dvo)),
            &x,
            &w,
            &sm,
            &sr,
            state_in,
            b,
            l,
            d,
            g,
        );
        outs.extend(
            [
                y, sm, sr, out.count, out.mean, out.var, dx, dw, db, dmi, dvi,
            ]
            .iter()
            .map(|t| be.download(t)),
        );
    }
    let mut state = TsnStats {
        count: be.upload(&[4.0, 9.0]),
        mean: be.upload(&uniform(&mut r, b * g, 0.3, 0.5)),
        var: be.upload(&uniform(&mut r, b * g, 1.0, 0.5)),
    };
    let xs = be.upload(&uniform(&mut r, b * d, 0.3, 2.0));
    let mut ys = be.zeros(b * d);
    be.timestep_norm_step(&mut ys, &mut state, &xs, &w, &bias, b, d, g, 1e-5);
    outs.extend(
        [ys, state.count, state.mean, state.var]
            .iter()
            .map(|t| be.download(t)),
    );
    outs
});

case!(cema, "cema", KERNEL_TOL, |be| {
    let mut r = rng(9);
    let (b, l, d, n) = (2usize, 300usize, 10usize, 16usize);
    let alpha = be.upload(&uniform(&mut r, d * n, 0.0, 1.0));
    let delta = be.upload(&uniform(&mut r, d * n, 0.0, 1.0));
    let theta = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    let gamma = be.upload(&uniform(&mut r, d * n * 2, 0.0, 1.0));
    let omega = be.upload(&uniform(&mut r, d, 0.0, 1.0));
    let p = CemaWeights {
        alpha: &alpha,
        delta: &delta,
        theta: &theta,
        gamma: &gamma,
        omega: &omega,
    };
    let x = be.upload(&uniform(&mut r, b * l * d, 0.0, 1.0));
    let mut outs = Vec::new();
    for with_state in [false, true] {
        let h0 = be.upload(&uniform(&mut r, b * d * n * 2, 0.0, 0.5));
        let h0 = with_state.then_some(&h0);
        let (mut y, mut h_out) = (be.zeros(b * l * d), be.zeros(b * d * n * 2));
        be.cema_forward(&mut y, Some(&mut h_out), &x, &p, h0, b, l, d, n);
        let dy = be.upload(&uniform(&mut r, b * l * d, 0.0, 1.0));
        let dh_out = be.upload(&uniform(&mut r, b * d * n * 2, 0.0, 1.0));
        let mut grads = [d * n, d * n, d, d * n * 2, d].map(|k| be.zeros(k));
        let mut dx = be.zeros(b * l * d);
        let mut dh0 = be.zeros(b * d * n * 2);
        {
            let [ga, gd, gt, gg, go] = &mut grads;
            let mut g = CemaWeightGrads {
                alpha: ga,
                delta: gd,
                theta: gt,
                gamma: gg,
                omega: go,
            };
            be.cema_backward(
                &mut dx,
                &mut g,
                with_state.then_some(&mut dh0),
                &dy,
                with_state.then_some(&dh_out),
                &x,
                &p,
                h0,
                b,
                l,
                d,
                n,
            );
        }
        outs.extend([&y, &h_out, &dx, &dh0].iter().map(|t| be.download(t)));
        outs.extend(grads.iter().map(|t| be.download(t)));
    }
    let xs = be.upload(&uniform(&mut r, b * d, 0.0, 1.0));
    let mut h = be.upload(&uniform(&mut r, b * d * n * 2, 0.0, 0.5));
    let mut ys = be.zeros(b * d);
    be.cema_step(&mut ys, &mut h, &xs, &p, b, d, n);
    outs.extend([ys, h].iter().map(|t| be.download(t)));
    outs
});

// MEGALODON's chunk attention: the device path (kernels/mega_attention.cu + strided-batched
// GEMMs + softmax kernels) against the CPU twin, at shapes with a partial last chunk, one
// chunk longer than the call, a chunk of one token, several heads, dz ≠ dv, and head widths
// above one warp's lanes (lanes take several pairs).
case!(mega_attention, "mega attention", KERNEL_TOL, |be| {
    let mut r = rng(10);
    let base = MegaAttnShape {
        b: 2,
        l: 10,
        heads: 2,
        dz: 4,
        dv: 6,
        chunk: 4,
        rope_base: 1e4,
        eps: 1e-5,
    };
    let shapes = [
        base,
        MegaAttnShape { chunk: 16, ..base },
        MegaAttnShape { chunk: 1, ..base },
        MegaAttnShape {
            l: 8,
            chunk: 4,
            ..base
        },
        MegaAttnShape {
            b: 1,
            l: 13,
            heads: 3,
            dz: 70,
            dv: 33,
            chunk: 5,
            ..base
        },
        MegaAttnShape {
            b: 3,
            l: 7,
            heads: 1,
            dz: 2,
            dv: 1,
            chunk: 7,
            ..base
        },
    ];
    let mut outs = Vec::new();
    for s in shapes {
        let z = be.upload(&uniform(&mut r, s.b * s.l * s.heads * s.dz, 0.0, 1.0));
        let v = be.upload(&uniform(&mut r, s.b * s.l * s.heads * s.dv, 0.0, 1.0));
        let gamma = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 0.3));
        let beta = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 0.3));
        let mut saved = be.mega_attention_saved(&s);
        // NaN-filled outputs: every element must be written.
        let mut out = be.upload(&vec![f32::NAN; s.b * s.l * s.heads * s.dv]);
        be.mega_attention_forward(&mut out, &mut saved, &z, &v, &gamma, &beta, &s);
        let dout = be.upload(&uniform(&mut r, s.b * s.l * s.heads * s.dv, 0.0, 1.0));
        let (mut dz, mut dv) = (
            be.upload(&vec![f32::NAN; s.b * s.l * s.heads * s.dz]),
            be.upload(&vec![f32::NAN; s.b * s.l * s.heads * s.dv]),
        );
        let mut dg = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 1.0));
        let mut dbeta = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 1.0));
        be.mega_attention_backward(
            &mut dz, &mut dv, &mut dg, &mut dbeta, &dout, &z, &v, &gamma, &beta, &saved, &s,
        );
        outs.extend([out, dz, dv, dg, dbeta].iter().map(|t| be.download(t)));
    }
    // Streaming: calls of 3, 1 (filling the chunk of 4), 2, 1 tokens, a whole-chunk call of
    // 8 from position 0, then row 0's cache copied over row 1 and one more token (row 1 must
    // now continue row 0's chunk).
    let s = MegaAttnShape { dz: 6, ..base };
    let gamma = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 0.3));
    let beta = be.upload(&uniform(&mut r, 2 * s.heads * s.dz, 0.0, 0.3));
    let mut cache = be.chunk_cache(s.b, s.heads, s.dz, s.dv, s.chunk);
    let stream = |be: &B, cache: &mut B::ChunkCache, l: usize, r: &mut _| {
        let sc = MegaAttnShape { l, ..s };
        let zc = be.upload(&uniform(r, s.b * l * s.heads * s.dz, 0.0, 1.0));
        let vc = be.upload(&uniform(r, s.b * l * s.heads * s.dv, 0.0, 1.0));
        let mut oc = be.upload(&vec![f32::NAN; s.b * l * s.heads * s.dv]);
        be.mega_attention_forward_cached(&mut oc, cache, &zc, &vc, &gamma, &beta, &sc)
            .unwrap();
        be.download(&oc)
    };
    for l in [3, 1, 2, 1] {
        outs.push(stream(be, &mut cache, l, &mut r));
    }
    // Rows at position 3 of 4: two more tokens would straddle the boundary.
    let sc = MegaAttnShape { l: 2, ..s };
    let zc = be.upload(&uniform(&mut r, s.b * 2 * s.heads * s.dz, 0.0, 1.0));
    let vc = be.upload(&uniform(&mut r, s.b * 2 * s.heads * s.dv, 0.0, 1.0));
    let mut oc = be.zeros(s.b * 2 * s.heads * s.dv);
    assert!(be
        .mega_attention_forward_cached(&mut oc, &mut cache, &zc, &vc, &gamma, &beta, &sc)
        .is_err());
    outs.push(stream(be, &mut cache, 1, &mut r));
    outs.push(stream(be, &mut cache, 8, &mut r));
    outs.push(stream(be, &mut cache, 3, &mut r));
    let mut other = be.chunk_cache(s.b, s.heads, s.dz, s.dv, s.chunk);
    outs.push(stream(be, &mut other, 2, &mut r));
    be.chunk_cache_copy_row(&mut other, 1, &cache, 0);
    be.chunk_cache_copy_row(&mut other, 0, &cache, 1);
    outs.push(stream(be, &mut other, 1, &mut r));
    outs
});

case!(embeddings, "embeddings", KERNEL_TOL, |be| {
    let mut r = rng(11);
    let (vocab, d, n) = (19usize, 33usize, 23usize);
    let table = be.upload(&uniform(&mut r, vocab * d, 0.0, 1.0));
    let tok = ids(&mut r, n, vocab);
    let mut out = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    be.embedding_forward(&mut out, &table, &tok, d, true);
    let mut out2 = be.zeros(n * d);
    be.embedding_forward(&mut out2, &table, &tok, d, false);
    let mut dtable = be.upload(&uniform(&mut r, vocab * d, 0.0, 1.0));
    be.embedding_backward(&mut dtable, &out, &tok, d);
    // MEGABYTE embedders, a quarter of the ids pads.
    let (p, dg, rows, tok_rows, pos_rows) = (4usize, 7usize, 5usize, 11usize, 17usize);
    let with_pads = |r: &mut ChaCha8Rng, k: usize| -> Vec<u32> {
        (0..k)
            .map(|_| {
                if r.random_range(0..4) == 0 {
                    PAD_ID
                } else {
                    r.random_range(0..tok_rows as u32)
                }
            })
            .collect()
    };
    let pid = with_pads(&mut r, rows * p);
    let ppos = ids(&mut r, rows * p, pos_rows);
    let tokt = be.upload(&uniform(&mut r, tok_rows * dg, 0.0, 1.0));
    let post = be.upload(&uniform(&mut r, pos_rows * dg, 0.0, 1.0));
    let padt = be.upload(&uniform(&mut r, p * dg, 0.0, 1.0));
    let mut pe = be.zeros(rows * p * dg);
    be.patch_embed_forward(&mut pe, &tokt, &post, &padt, &pid, &ppos, p, dg);
    let mut grads = [tok_rows * dg, pos_rows * dg, p * dg].map(|k| be.zeros(k));
    {
        let [a, b2, c] = &mut grads;
        be.patch_embed_backward(a, b2, c, &pe, &pid, &ppos, p, dg);
    }
    let ld = 9usize;
    let lid = with_pads(&mut r, n);
    let slots: Vec<u32> = (0..n).map(|i| (i % 8) as u32).collect();
    let ltok = be.upload(&uniform(&mut r, tok_rows * ld, 0.0, 1.0));
    let lpos = be.upload(&uniform(&mut r, 8 * ld, 0.0, 1.0));
    let lpad = be.upload(&uniform(&mut r, ld, 0.0, 1.0));
    let mut lo = be.upload(&uniform(&mut r, n * ld, 0.0, 1.0));
    be.local_embed_forward(&mut lo, &ltok, &lpos, &lpad, &lid, &slots, ld);
    let mut lg = [tok_rows * ld, 8 * ld, ld].map(|k| be.zeros(k));
    {
        let [a, b2, c] = &mut lg;
        be.local_embed_backward(a, b2, c, &lo, &lid, &slots, ld);
    }
    let mut v = vec![
        be.download(&out),
        be.download(&out2),
        be.download(&dtable),
        be.download(&pe),
    ];
    v.extend(grads.iter().chain(&lg).map(|t| be.download(t)));
    v.push(be.download(&lo));
    v
});

case!(loss_and_softmax, "loss", KERNEL_TOL, |be| {
    let mut r = rng(12);
    let (rows, v) = (13usize, 256usize);
    let logits = be.upload(&uniform(&mut r, rows * v, 0.0, 8.0));
    let targets = ids(&mut r, rows, v);
    let mut losses = be.zeros(rows);
    be.cross_entropy_forward(&mut losses, &logits, &targets, v);
    let mut dl = be.upload(&uniform(&mut r, rows * v, 0.0, 1.0));
    be.cross_entropy_backward(&mut dl, &logits, &targets, v, 1.0 / rows as f32);
    let mut ls = be.zeros(rows * v);
    be.log_softmax(&mut ls, &logits, v);
    vec![be.download(&losses), be.download(&dl), be.download(&ls)]
});

case!(adamw, "adamw", KERNEL_TOL, |be| {
    let mut r = rng(13);
    let n = 777usize;
    let mut p = be.upload(&uniform(&mut r, n, 0.0, 1.0));
    let g = be.upload(&uniform(&mut r, n, 0.0, 1.0));
    let mut m = be.upload(&uniform(&mut r, n, 0.0, 0.1));
    let mut v = be.upload(&uniform(&mut r, n, 0.02, 0.01));
    for step in [1u64, 2, 7] {
        let hp = AdamW {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        be.adamw_step(&mut p, &g, &mut m, &mut v, &hp);
    }
    vec![be.download(&p), be.download(&m), be.download(&v)]
});

/// Ops with kernels never leave the device; the host-fallback list names exactly the ops the
/// backend counts.
#[test]
fn kernel_ops_stay_on_the_device_and_fallbacks_are_counted() {
    let be = Cuda::new(EmulatedDevice::new());
    let mut r = rng(14);
    let (n, d) = (4usize, 32usize);
    let x = be.upload(&uniform(&mut r, n * d, 0.0, 1.0));
    let w = be.upload(&uniform(&mut r, d, 1.0, 0.1));
    let (mut y, mut rstd) = (be.zeros(n * d), be.zeros(n));
    be.rmsnorm_forward(&mut y, &mut rstd, &x, &w, n, d, 1e-5);
    let mut a = be.zeros(n * d);
    be.activation_forward(Activation::Gelu, &mut a, &y);
    // Serving's paged decode attention: one row over a 3-block table of 2-position blocks.
    let (c, h) = (8usize, 2usize);
    let (kc, vc) = (be.zeros(4 * 2 * c), be.zeros(4 * 2 * c));
    let qkv = be.upload(&uniform(&mut r, 3 * c, 0.0, 1.0));
    let mut dec = be.zeros(c);
    be.attention_decode(&mut dec, &qkv, &kc, &vc, &[5], &[3, 0, 2], 2, c, h, 0.5);
    assert!(
        be.host_fallback_calls().is_empty(),
        "{:?}",
        be.host_fallback_calls()
    );
    // The memory-side ops run on the device too.
    be.add_assign(&mut a, &y);
    be.scale(&mut a, 0.5);
    let _ = be.sum(&a);
    let _ = be.sum_squares(&a);
    let mut c = be.zeros(n * d);
    be.copy(&mut c, &a);
    be.fill_zero(&mut c);
    assert!(
        be.host_fallback_calls().is_empty(),
        "{:?}",
        be.host_fallback_calls()
    );
    // A LayerNorm wider than the backward kernel's shared-memory partials falls back.
    let wide = 6200usize;
    let xw = be.upload(&uniform(&mut r, wide, 0.0, 1.0));
    let ww = be.upload(&uniform(&mut r, wide, 1.0, 0.1));
    let bw = be.zeros(wide);
    let (mut yw, mut mean, mut rstd_w) = (be.zeros(wide), be.zeros(1), be.zeros(1));
    be.layernorm_forward(
        &mut yw,
        &mut mean,
        &mut rstd_w,
        &xw,
        &ww,
        &bw,
        1,
        wide,
        1e-5,
    );
    let (mut dx, mut dw, mut db) = (be.zeros(wide), be.zeros(wide), be.zeros(wide));
    for _ in 0..2 {
        be.layernorm_backward(
            &mut dx, &mut dw, &mut db, &yw, &xw, &ww, &mean, &rstd_w, 1, wide,
        );
    }
    let calls = be.host_fallback_calls();
    assert_eq!(calls.get("layernorm_backward"), Some(&2), "{calls:?}");
    for op in calls.keys() {
        assert!(
            HOST_FALLBACKS.iter().any(|h| h.op == *op),
            "{op} not listed"
        );
    }
    be.reset_host_fallback_calls();
    assert!(be.host_fallback_calls().is_empty());
}

/// Buffers dropped between steps go back to the pool and are handed out again: a second
/// identical "step" allocates nothing new from the device.
#[test]
fn repeated_steps_reuse_pooled_memory() {
    let be = Cuda::new(EmulatedDevice::new());
    let step = |be: &Cuda| {
        let x = be.upload(&vec![1.0; 1000]);
        let mut y = be.zeros(1000);
        be.activation_forward(Activation::Relu, &mut y, &x);
        let w = be.zeros(300);
        be.download(&y).len() + be.len(&w)
    };
    step(&be);
    let first = be.pool_stats();
    step(&be);
    let second = be.pool_stats();
    assert_eq!(
        second.misses, first.misses,
        "second step allocated: {second:?}"
    );
    assert!(second.hits > first.hits);
    assert_eq!(second.allocated, first.allocated);
    assert_eq!(second.in_use, 0, "every buffer returned");
}

/// Opening a GPU never panics: without a driver it is an error naming the missing library,
/// with one it opens device 0 or reports the driver's error.
#[test]
fn cudarc_device_fails_cleanly_without_a_driver() {
    use mega::backend::cuda::cudarc_device::CudarcDevice;
    use mega::emu::DeviceApi;
    match (mega::device::driver_present(), CudarcDevice::new(0)) {
        (false, Err(e)) => assert!(e.to_string().contains("libcuda.so.1"), "{e}"),
        (false, Ok(_)) => panic!("opened a device without a driver"),
        (true, Ok(dev)) => assert!(dev.name().starts_with("cuda:0")),
        (true, Err(e)) => assert!(e.to_string().starts_with("CUDA: "), "{e}"),
    }
}

/// The comparison above can fail: planted errors are reported (by output and element) and an
/// error just inside the tolerance is not. An RMSNorm launched with a wrong `eps` on the CUDA
/// side stands for a kernel given a wrong argument; the other plants edit one downloaded
/// element of a correct run.
#[test]
fn comparison_reports_planted_errors() {
    fn rmsnorm_with<B: Backend>(be: &B, eps: f32) -> Vec<Vec<f32>> {
        let mut r = rng(5);
        let (n, d) = (6usize, 131usize);
        let x = be.upload(&uniform(&mut r, n * d, 0.2, 2.0));
        let w = be.upload(&uniform(&mut r, d, 1.0, 0.5));
        let (mut out, mut rstd) = (be.zeros(n * d), be.zeros(n));
        be.rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, d, eps);
        vec![be.download(&out), be.download(&rstd)]
    }
    /// Correct on the CPU, `eps` 1e-3 instead of 1e-5 in the CUDA launch.
    struct WrongEps;
    impl Case for WrongEps {
        fn cpu(&self, be: &Cpu<f32>) -> Vec<Vec<f32>> {
            rmsnorm_with(be, 1e-5)
        }
        fn cuda(&self, be: &Cuda) -> Vec<Vec<f32>> {
            rmsnorm_with(be, 1e-3)
        }
    }
    let cpu = Cpu::<f32>::new();
    let cuda = Cuda::new(EmulatedDevice::new());
    let want = rmsnorm_with(&cpu, 1e-5);
    let got = rmsnorm_with(&cuda, 1e-5);
    let clean = compare("rmsnorm", KERNEL_TOL, &want, &got).expect("the real run matches");

    let wrong_eps = OnCuda(Cuda::new(EmulatedDevice::new())).run(&WrongEps);
    let failure = compare("wrong eps", KERNEL_TOL, &want, &wrong_eps).unwrap_err();
    assert!(failure.starts_with("wrong eps: output 0["), "{failure}");

    // One element of `rstd` moved to 1.5× and to 0.5× the tolerance from the CPU value.
    let (t, i) = (1usize, 4usize);
    let w = want[t][i];
    let planted = |by: f32| {
        let mut got = got.clone();
        got[t][i] = w + by * KERNEL_TOL * (1.0 + w.abs());
        got
    };
    let failure = compare("over", KERNEL_TOL, &want, &planted(1.5)).unwrap_err();
    assert!(failure.starts_with("over: output 1[4]: cuda"), "{failure}");
    let inside = compare("inside", KERNEL_TOL, &want, &planted(0.5)).expect("inside tolerance");
    assert!(
        inside >= clean && inside < KERNEL_TOL,
        "{inside} vs {clean}"
    );
    let mut nan = got.clone();
    nan[0][7] = f32::NAN;
    let failure = compare("nan", KERNEL_TOL, &want, &nan).unwrap_err();
    assert!(
        failure.starts_with("nan: output 0[7]: cuda NaN"),
        "{failure}"
    );
    let mut short = got;
    short[0].pop();
    assert!(compare("short", KERNEL_TOL, &want, &short).is_err());
}

// ---- attention through strided GEMMs + softmax kernels, log-softmax (issue 5) -------------

/// [`compare`] at the kernel tolerance for one output whose CPU values are all finite, so a
/// NaN or ∞ on the device fails too; returns the worst error.
fn worst_error(what: &str, cuda: &[f32], cpu: &[f32]) -> f32 {
    assert!(
        cpu.iter().all(|x| x.is_finite()),
        "{what}: cpu output not finite"
    );
    compare(what, KERNEL_TOL, &[cpu.to_vec()], &[cuda.to_vec()]).unwrap_or_else(|e| panic!("{e}"))
}

/// Forward (out, att) and backward (dqkv accumulated onto random values) of causal attention.
fn attention_outputs<B: Backend>(be: &B, shape: (usize, usize, usize, usize)) -> [Vec<f32>; 3] {
    let (b, t, c, h) = shape;
    let mut r = rng(100 + (b * 1000 + t * 10 + h) as u64);
    let scale = 1.0 / ((c / h) as f32).sqrt();
    let qkv = be.upload(&uniform(&mut r, b * t * 3 * c, 0.0, 1.5));
    let (mut out, mut att) = (be.zeros(b * t * c), be.zeros(b * h * t * t));
    be.attention_forward(&mut out, &mut att, &qkv, b, t, c, h, scale);
    let dout = be.upload(&uniform(&mut r, b * t * c, 0.0, 1.0));
    let mut dqkv = be.upload(&uniform(&mut r, b * t * 3 * c, 0.0, 1.0));
    be.attention_backward(&mut dqkv, &dout, &qkv, &att, b, t, c, h, scale);
    [be.download(&out), be.download(&att), be.download(&dqkv)]
}

/// Shapes `(b, t, c, h)`: t = 1, around and past the CPU's short/tiled switch and the kernels'
/// 32-column warp pass, primes; h ≤ b (one GEMM call per head, batched over b) and h > b
/// (one call per batch row, batched over the heads).
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 4, 1),
    (2, 9, 16, 2),
    (3, 17, 12, 3),
    (5, 8, 16, 2),
    (2, 33, 32, 4),
    (1, 40, 64, 8),
    (1, 67, 24, 3),
];

#[test]
fn attention_on_device_matches_cpu_without_host_fallbacks() {
    let cpu = Cpu::<f32>::new();
    let cuda = Cuda::new(EmulatedDevice::new());
    let mut worst = [0.0f32; 3];
    for shape in ATTENTION_SHAPES {
        let want = attention_outputs(&cpu, shape);
        let got = attention_outputs(&cuda, shape);
        for (i, name) in ["out", "att", "dqkv"].iter().enumerate() {
            let e = worst_error(&format!("{name} {shape:?}"), &got[i], &want[i]);
            worst[i] = worst[i].max(e);
        }
    }
    println!(
        "attention worst |cuda − cpu|/(1+|cpu|): out {:.1e}, att {:.1e}, dqkv {:.1e}",
        worst[0], worst[1], worst[2]
    );
    assert!(
        cuda.host_fallback_calls().is_empty(),
        "{:?}",
        cuda.host_fallback_calls()
    );
}

#[test]
fn attention_probabilities_are_causal_rows_summing_to_one() {
    // Independent of the CPU backend: each row of att is a distribution over keys j ≤ i.
    let cuda = Cuda::new(EmulatedDevice::new());
    let (b, t, c, h) = (2usize, 37usize, 8usize, 2usize);
    let [_, att, _] = attention_outputs(&cuda, (b, t, c, h));
    for (r, row) in att.chunks(t).enumerate() {
        let i = r % t;
        assert!(
            row[i + 1..].iter().all(|&p| p == 0.0),
            "row {r}: mass above the diagonal"
        );
        let sum: f32 = row[..=i].iter().sum();
        assert!((sum - 1.0).abs() <= 1e-5, "row {r}: sums to {sum}");
    }
}

#[test]
fn log_softmax_on_device_matches_cpu_without_host_fallbacks() {
    let cpu = Cpu::<f32>::new();
    let cuda = Cuda::new(EmulatedDevice::new());
    let mut worst = 0.0f32;
    for (rows, v) in [
        (1usize, 1usize),
        (3, 31),
        (9, 32),
        (2, 33),
        (5, 256),
        (2, 257),
    ] {
        let logits = uniform(&mut rng(200 + v as u64), rows * v, 0.0, 10.0);
        let run = |be: &dyn Fn(&[f32]) -> Vec<f32>| be(&logits);
        let want = run(&|x| {
            let (l, mut o) = (cpu.upload(x), cpu.zeros(x.len()));
            cpu.log_softmax(&mut o, &l, v);
            cpu.download(&o)
        });
        let got = run(&|x| {
            let (l, mut o) = (cuda.upload(x), cuda.zeros(x.len()));
            cuda.log_softmax(&mut o, &l, v);
            cuda.download(&o)
        });
        let e = worst_error(&format!("log_softmax rows={rows} v={v}"), &got, &want);
        worst = worst.max(e);
    }
    println!("log_softmax worst |cuda − cpu|/(1+|cpu|): {worst:.1e}");
    assert!(cuda.host_fallback_calls().is_empty());
}

// The memory-side ops that moved onto the device (kernels/elementwise.cu, kernels/reduce.cu,
// device copies and memsets) on awkward sizes: repeated scatter rows (the last one wins),
// KV appends with a repeated entry, sums over several reduction blocks. The elementwise ops
// are the CPU's arithmetic, one operation per element, so they must agree exactly; the sums
// are f64 in another order, so to f64 rounding (far below the f32 output tolerance).
case!(memory_ops_on_device, "memory on device", EXACT_TOL, |be| {
    let mut r = rng(21);
    let mut outs = Vec::new();
    for n in [1usize, 255, 256, 257, 4099, 70_001] {
        let a = be.upload(&uniform(&mut r, n, 0.0, 1.0));
        let b = be.upload(&uniform(&mut r, n, 0.5, 1.0));
        let mut c = be.upload(&uniform(&mut r, n, 0.0, 1.0));
        be.add_assign(&mut c, &a);
        be.scale(&mut c, -1.7);
        let mut m = be.zeros(n);
        be.mul(&mut m, &c, &b);
        let mut s = be.zeros(n);
        be.add_scalar(&mut s, &m, 0.25);
        let mut k = be.zeros(n);
        be.copy(&mut k, &s);
        outs.push(be.download(&k));
        let (sum, sq) = (be.sum(&s), be.sum_squares(&s));
        // Relative to the sum's own scale, to f64 rounding.
        outs.push(vec![(sum / n as f64) as f32, (sq / n as f64) as f32]);
    }
    let d = 19usize;
    let src = be.upload(&uniform(&mut r, 6 * d, 0.0, 1.0));
    let mut dst = be.upload(&uniform(&mut r, 9 * d, 0.0, 1.0));
    be.scatter_rows(&mut dst, &src, &[4, 0, 4, 8, 2, 4], d);
    outs.push(be.download(&dst));
    let c = 13usize;
    let qkv = be.upload(&uniform(&mut r, 5 * 3 * c, 0.0, 1.0));
    let (mut kc, mut vc) = (
        be.upload(&uniform(&mut r, 7 * c, 0.0, 1.0)),
        be.upload(&uniform(&mut r, 7 * c, 0.0, 1.0)),
    );
    be.kv_append(&mut kc, &mut vc, &qkv, &[6, 1, 3, 1, 0], c);
    outs.push(be.download(&kc));
    outs.push(be.download(&vc));
    outs
});

/// Buffers allocated together share one allocation on the CUDA backend, each view reads and
/// writes only its own range, and the arena is freed when its last view drops.
#[test]
fn zeros_many_and_upload_many_share_one_arena() {
    let be = Cuda::new(EmulatedDevice::new());
    let lens = [5usize, 0, 300, 1, 64];
    let hosts: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 1000 + j) as f32).collect())
        .collect();
    let slices: Vec<&[f32]> = hosts.iter().map(Vec::as_slice).collect();
    let before = be.pool_stats();
    let mut up = be.upload_many(&slices);
    let zs = be.zeros_many(&lens);
    let after = be.pool_stats();
    assert_eq!(after.misses - before.misses, 2, "one allocation per call");
    assert_eq!(after.arenas, 2);
    for v in [&up, &zs] {
        let first = v[0].allocation_address();
        assert!(v.iter().all(|b| b.allocation_address() == first));
    }
    for (i, b) in up.iter().enumerate() {
        assert_eq!(be.download(b), hosts[i], "view {i}");
        assert_eq!(be.download(&zs[i]), vec![0.0; lens[i]]);
    }
    // Ops on one view leave its neighbours alone.
    let add = be.upload(&vec![1.0; 300]);
    be.add_assign(&mut up[2], &add);
    be.fill_zero(&mut up[3]);
    let fresh: Vec<f32> = (0..64).map(|j| -(j as f32)).collect();
    let src = be.upload(&fresh);
    be.copy(&mut up[4], &src);
    let want2: Vec<f32> = hosts[2].iter().map(|x| x + 1.0).collect();
    assert_eq!(be.download(&up[0]), hosts[0]);
    assert_eq!(be.download(&up[2]), want2);
    assert_eq!(be.download(&up[3]), vec![0.0]);
    assert_eq!(be.download(&up[4]), fresh);
    // A matmul on views inside one arena.
    let mut out = be.zeros(5);
    be.matmul(&mut out, &up[0], &up[3], 5, 1, 1, false, false, false);
    assert_eq!(be.download(&out), vec![0.0; 5]);
    drop(up);
    drop(zs);
    assert_eq!(
        be.pool_stats().arenas,
        0,
        "arenas freed with their last view"
    );
}
