//! kernels/mega_attention.cu on the CPU emulator against f64 twins written here from the
//! equations of spec/megalodon.md §6 (per-head RMSNorm, the Q/K affine, RoPE inside chunks)
//! and their adjoints:
//! - `mega_attn_project_forward_f32`: Q, K head-major and the rstd;
//! - `mega_attn_project_backward_f32`: dz and the per-token affine-gradient terms;
//! - `mega_attn_to_heads_f32` / `mega_attn_from_heads_f32`: bit-exact layout moves.
//!
//! Head widths 2, tile−1, tile, tile+1 pairs and a prime number of pairs (a warp's 32 lanes
//! take one pair each per pass), partial last chunks, a chunk of one token, a grid that must
//! stride; NaN-filled exact-size outputs, whose padding rows must stay NaN (never written);
//! every launch under the forward, greedy_low and greedy_high schedules.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use mega::cuda::launch::{self as shapes, LaunchShape};
use mega::emu::HostBuffer;

const EPS: f64 = 1e-5;
const BASE: f64 = 1e4;

#[derive(Debug, Clone, Copy)]
struct Case {
    seed: u64,
    b: usize,
    l: usize,
    heads: usize,
    dz: usize,
    span: usize,
    /// Launch one block only, so the warps stride over the rows.
    one_block: bool,
}

impl Case {
    fn lpad(&self) -> usize {
        self.l.div_ceil(self.span) * self.span
    }
    fn zdim(&self) -> usize {
        self.heads * self.dz
    }
    fn rows(&self) -> usize {
        self.b * self.l * self.heads
    }
    fn head_major_len(&self, d: usize) -> usize {
        self.b * self.heads * self.lpad() * d
    }
    /// Index in `[b, H, lpad, d]` of (batch row, token, head).
    fn hm(&self, bi: usize, ti: usize, hi: usize, d: usize) -> usize {
        ((bi * self.heads + hi) * self.lpad() + ti) * d
    }
    fn shape(&self) -> LaunchShape {
        if self.one_block {
            LaunchShape {
                grid: (1, 1, 1),
                block: (32, shapes::mega_attention::ROWS_PER_BLOCK, 1),
                shared_mem_bytes: 0,
            }
        } else {
            shapes::mega_attention::rows(self.rows())
        }
    }
    fn dims(&self) -> [i32; 6] {
        [self.b, self.l, self.heads, self.dz, self.span, self.lpad()].map(|x| x as i32)
    }
}

fn cases() -> Vec<Case> {
    let c = |seed, b, l, heads, dz, span, one_block| Case {
        seed,
        b,
        l,
        heads,
        dz,
        span,
        one_block,
    };
    vec![
        c(1, 1, 1, 1, 2, 1, false),
        c(2, 2, 10, 2, 4, 4, false),
        c(3, 1, 7, 3, 62, 3, false),
        c(4, 2, 5, 1, 64, 5, false),
        c(5, 1, 9, 2, 66, 4, false),
        c(6, 3, 6, 2, 14, 1, false),
        c(7, 2, 11, 3, 8, 4, true),
    ]
}

/// cos and sin of the RoPE angle of pair `p` at position `pos`, in f64.
fn rope(pos: usize, p: usize, dz: usize) -> (f64, f64) {
    let a = pos as f64 / BASE.powf((2 * p) as f64 / dz as f64);
    (a.cos(), a.sin())
}

struct Inputs {
    z: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

fn inputs(c: &Case) -> Inputs {
    let mut r = rng(c.seed);
    Inputs {
        z: uniform(&mut r, c.rows() * c.dz, 0.0, 1.0),
        gamma: uniform(&mut r, 2 * c.zdim(), 0.0, 0.3),
        beta: uniform(&mut r, 2 * c.zdim(), 0.0, 0.3),
    }
}

/// Per-head RMSNorm of `z`'s row (bi, ti, hi): (ẑ, rs).
fn normalized(c: &Case, z: &[f32], bi: usize, ti: usize, hi: usize) -> (Vec<f64>, f64) {
    let at = ((bi * c.l + ti) * c.heads + hi) * c.dz;
    let row = widen(&z[at..at + c.dz]);
    let ms = row.iter().map(|x| x * x).sum::<f64>() / c.dz as f64;
    let rs = 1.0 / (ms + EPS).sqrt();
    (row.iter().map(|x| x * rs).collect(), rs)
}

/// The forward twin: (Q, K) head-major with NaN padding rows, and rstd.
fn forward_twin(c: &Case, x: &Inputs) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (zdim, dz) = (c.zdim(), c.dz);
    let inv_sqrt = 1.0 / (dz as f64).sqrt();
    let mut q = vec![f64::NAN; c.head_major_len(dz)];
    let mut k = q.clone();
    let mut rstd = vec![0.0; c.rows()];
    for bi in 0..c.b {
        for ti in 0..c.l {
            for hi in 0..c.heads {
                let (zh, rs) = normalized(c, &x.z, bi, ti, hi);
                rstd[(bi * c.l + ti) * c.heads + hi] = rs;
                let at = c.hm(bi, ti, hi, dz);
                for (which, out) in [(0, &mut q), (1, &mut k)] {
                    let affine = |j: usize| {
                        let ch = which * zdim + hi * dz + j;
                        zh[j] * (x.gamma[ch] as f64 + 1.0) * inv_sqrt + x.beta[ch] as f64
                    };
                    for p in 0..dz / 2 {
                        let (cs, sn) = rope(ti % c.span, p, dz);
                        let (a0, a1) = (affine(2 * p), affine(2 * p + 1));
                        out[at + 2 * p] = a0 * cs - a1 * sn;
                        out[at + 2 * p + 1] = a0 * sn + a1 * cs;
                    }
                }
            }
        }
    }
    (q, k, rstd)
}

/// The backward twin from head-major dQ, dK: (dz, gsum, bsum).
fn backward_twin(c: &Case, x: &Inputs, dq: &[f32], dk: &[f32]) -> [Vec<f64>; 3] {
    let (zdim, dz) = (c.zdim(), c.dz);
    let inv_sqrt = 1.0 / (dz as f64).sqrt();
    let tokens = c.b * c.l;
    let mut dzv = vec![0.0; c.rows() * dz];
    let mut gsum = vec![0.0; tokens * 2 * zdim];
    let mut bsum = vec![0.0; tokens * 2 * zdim];
    for bi in 0..c.b {
        for ti in 0..c.l {
            let token = bi * c.l + ti;
            for hi in 0..c.heads {
                let (zh, rs) = normalized(c, &x.z, bi, ti, hi);
                let at = c.hm(bi, ti, hi, dz);
                let mut dzh = vec![0.0; dz];
                for (which, grad) in [(0, dq), (1, dk)] {
                    for p in 0..dz / 2 {
                        let (cs, sn) = rope(ti % c.span, p, dz);
                        let (g0, g1) = (grad[at + 2 * p] as f64, grad[at + 2 * p + 1] as f64);
                        // Rᵀ·g: the gradient before the rotation.
                        let pre = [g0 * cs + g1 * sn, -g0 * sn + g1 * cs];
                        for (e, &d) in pre.iter().enumerate() {
                            let j = 2 * p + e;
                            let ch = which * zdim + hi * dz + j;
                            gsum[token * 2 * zdim + ch] = d * zh[j] * inv_sqrt;
                            bsum[token * 2 * zdim + ch] = d;
                            dzh[j] += d * (x.gamma[ch] as f64 + 1.0) * inv_sqrt;
                        }
                    }
                }
                let dot = dzh.iter().zip(&zh).map(|(a, b)| a * b).sum::<f64>() / dz as f64;
                let row = ((bi * c.l + ti) * c.heads + hi) * dz;
                for j in 0..dz {
                    dzv[row + j] = rs * (dzh[j] - zh[j] * dot);
                }
            }
        }
    }
    [dzv, gsum, bsum]
}

/// The rows `< l` of a head-major buffer, and whether every padding element is still NaN.
fn real_rows<T: Copy>(c: &Case, hm: &[T], d: usize, is_nan: impl Fn(T) -> bool) -> (Vec<T>, bool) {
    let mut rows = Vec::new();
    let mut pad_untouched = true;
    for bh in 0..c.b * c.heads {
        for ti in 0..c.lpad() {
            let at = (bh * c.lpad() + ti) * d;
            if ti < c.l {
                rows.extend_from_slice(&hm[at..at + d]);
            } else {
                pad_untouched &= hm[at..at + d].iter().all(|&x| is_nan(x));
            }
        }
    }
    (rows, pad_untouched)
}

#[test]
fn project_forward_matches_the_f64_twin() {
    sweep(
        "project_forward_matches_the_f64_twin",
        cases(),
        |c, schedules| {
            let x = inputs(c);
            let (q, k, rstd) = forward_twin(c, &x);
            let (qw, _) = real_rows(c, &q, c.dz, f64::is_nan);
            let (kw, _) = real_rows(c, &k, c.dz, f64::is_nan);
            let d = c.dims();
            let inv_sqrt = 1.0f32 / (c.dz as f32).sqrt();
            schedules.each(|schedule, checks| {
                let (qb, kb) = (
                    nan_buf(c.head_major_len(c.dz)),
                    nan_buf(c.head_major_len(c.dz)),
                );
                let rb = nan_buf(c.rows());
                let (zb, gb, bb) = (
                    HostBuffer::from_slice(&x.z),
                    HostBuffer::from_slice(&x.gamma),
                    HostBuffer::from_slice(&x.beta),
                );
                run(
                    "mega_attn_project_forward_f32",
                    c.shape(),
                    &[
                        &qb,
                        &kb,
                        &rb,
                        &zb,
                        &gb,
                        &bb,
                        &Null::<u32>::new(),
                        &d[0],
                        &d[1],
                        &d[2],
                        &d[3],
                        &d[4],
                        &d[5],
                        &d[5],
                        &(EPS as f32),
                        &inv_sqrt,
                        &(BASE as f32),
                    ],
                    schedule,
                );
                let (qg, q_pad) = real_rows(c, &qb.to_vec(), c.dz, f32::is_nan);
                let (kg, k_pad) = real_rows(c, &kb.to_vec(), c.dz, f32::is_nan);
                checks.close("q", &qg, &qw, F32_TOL);
                checks.close("k", &kg, &kw, F32_TOL);
                checks.close("rstd", &rb.to_vec(), &rstd, F32_TOL);
                checks.exact("padding rows untouched", &[q_pad, k_pad], &[true, true]);
            });
        },
    );
}

#[test]
fn project_backward_matches_the_f64_twin() {
    sweep(
        "project_backward_matches_the_f64_twin",
        cases(),
        |c, schedules| {
            let x = inputs(c);
            let mut r = rng(c.seed + 100);
            // Gradients at the real rows; NaN in the padding rows, which must never be read.
            let grad = |r: &mut _| {
                let mut g = uniform(r, c.head_major_len(c.dz), 0.0, 1.0);
                for bh in 0..c.b * c.heads {
                    for ti in c.l..c.lpad() {
                        let at = (bh * c.lpad() + ti) * c.dz;
                        g[at..at + c.dz].fill(f32::NAN);
                    }
                }
                g
            };
            let (dq, dk) = (grad(&mut r), grad(&mut r));
            let want = backward_twin(c, &x, &dq, &dk);
            // The kernel reads the forward's rstd; give it the f32 rounding of the exact one.
            let (_, _, rstd) = forward_twin(c, &x);
            let rstd: Vec<f32> = rstd.iter().map(|&v| v as f32).collect();
            let d = c.dims();
            let inv_sqrt = 1.0f32 / (c.dz as f32).sqrt();
            let tokens = c.b * c.l;
            schedules.each(|schedule, checks| {
                let dzb = nan_buf(c.rows() * c.dz);
                let (gs, bs) = (
                    nan_buf(tokens * 2 * c.zdim()),
                    nan_buf(tokens * 2 * c.zdim()),
                );
                let (dqb, dkb) = (HostBuffer::from_slice(&dq), HostBuffer::from_slice(&dk));
                let (zb, rb, gb) = (
                    HostBuffer::from_slice(&x.z),
                    HostBuffer::from_slice(&rstd),
                    HostBuffer::from_slice(&x.gamma),
                );
                run(
                    "mega_attn_project_backward_f32",
                    c.shape(),
                    &[
                        &dzb,
                        &gs,
                        &bs,
                        &dqb,
                        &dkb,
                        &zb,
                        &rb,
                        &gb,
                        &d[0],
                        &d[1],
                        &d[2],
                        &d[3],
                        &d[4],
                        &d[5],
                        &inv_sqrt,
                        &(BASE as f32),
                    ],
                    schedule,
                );
                checks.close("dz", &dzb.to_vec(), &want[0], F32_TOL);
                checks.close("gamma terms", &gs.to_vec(), &want[1], F32_TOL);
                checks.close("beta terms", &bs.to_vec(), &want[2], F32_TOL);
            });
        },
    );
}

#[test]
fn layout_moves_are_exact() {
    sweep("layout_moves_are_exact", cases(), |c, schedules| {
        let d = c.dz + 1; // an odd width, as the values may have
        let src = uniform(&mut rng(c.seed), c.rows() * d, 0.0, 1.0);
        // The twin: element (bi, ti, hi, j) of [b, l, H·d] at hm(bi, ti, hi) + j.
        let mut want = vec![f32::NAN; c.head_major_len(d)];
        for bi in 0..c.b {
            for ti in 0..c.l {
                for hi in 0..c.heads {
                    let from = ((bi * c.l + ti) * c.heads + hi) * d;
                    let to = c.hm(bi, ti, hi, d);
                    want[to..to + d].copy_from_slice(&src[from..from + d]);
                }
            }
        }
        let dims = [c.b, c.l, c.heads, d, c.lpad()].map(|x| x as i32);
        let shape = shapes::elementwise(src.len());
        schedules.each(|schedule, checks| {
            let (hm, sb) = (nan_buf(want.len()), HostBuffer::from_slice(&src));
            let args = [&dims[0], &dims[1], &dims[2], &dims[3], &dims[4]];
            run(
                "mega_attn_to_heads_f32",
                shape,
                &[
                    &hm,
                    &sb,
                    &Null::<u32>::new(),
                    args[0],
                    args[1],
                    args[2],
                    args[3],
                    args[4],
                ],
                schedule,
            );
            let got: Vec<u32> = hm.to_vec().iter().map(|x| x.to_bits()).collect();
            let bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            checks.exact("to_heads (bits, NaN padding kept)", &got, &bits);
            let back = nan_buf(src.len());
            run(
                "mega_attn_from_heads_f32",
                shape,
                &[&back, &hm, args[0], args[1], args[2], args[3], args[4]],
                schedule,
            );
            checks.exact("from_heads", &back.to_vec(), &src);
        });
    });
}

/// A streaming call: `l` new tokens per row continuing each row's chunk of `chunk` positions
/// at `offsets[row]` (offset + l ≤ chunk).
#[derive(Debug)]
struct StreamCase {
    seed: u64,
    heads: usize,
    dz: usize,
    chunk: usize,
    l: usize,
    offsets: Vec<u32>,
}

fn stream_cases() -> Vec<StreamCase> {
    let c = |seed, heads, dz, chunk, l, offsets: &[u32]| StreamCase {
        seed,
        heads,
        dz,
        chunk,
        l,
        offsets: offsets.to_vec(),
    };
    vec![
        c(11, 1, 2, 1, 1, &[0]),
        c(12, 2, 8, 4, 1, &[0, 3, 1]),
        c(13, 3, 66, 7, 2, &[5, 0]),
        c(14, 1, 64, 40, 3, &[37, 12, 0, 20]),
    ]
}

/// `mega_attn_project_forward_f32` with per-row offsets (the streaming path): Q of the new
/// tokens compact `[b, H, l, dz]`, K appended at rows `offset ..` of `[b, H, chunk, dz]`,
/// RoPE at the chunk positions `offset + t`; every other cache row untouched (NaN).
#[test]
fn project_forward_with_offsets_matches_the_f64_twin() {
    sweep(
        "project_forward_with_offsets_matches_the_f64_twin",
        stream_cases(),
        |c, schedules| {
            let b = c.offsets.len();
            let zdim = c.heads * c.dz;
            let mut r = rng(c.seed);
            let z = uniform(&mut r, b * c.l * zdim, 0.0, 1.0);
            let gamma = uniform(&mut r, 2 * zdim, 0.0, 0.3);
            let beta = uniform(&mut r, 2 * zdim, 0.0, 0.3);
            let inv_sqrt = 1.0 / (c.dz as f64).sqrt();
            let mut q = vec![f64::NAN; b * c.heads * c.l * c.dz];
            let mut k = vec![f64::NAN; b * c.heads * c.chunk * c.dz];
            for bi in 0..b {
                for ti in 0..c.l {
                    for hi in 0..c.heads {
                        let at = ((bi * c.l + ti) * c.heads + hi) * c.dz;
                        let row = widen(&z[at..at + c.dz]);
                        let ms = row.iter().map(|x| x * x).sum::<f64>() / c.dz as f64;
                        let rs = 1.0 / (ms + EPS).sqrt();
                        let pos = c.offsets[bi] as usize + ti;
                        let q_at = ((bi * c.heads + hi) * c.l + ti) * c.dz;
                        let k_at = ((bi * c.heads + hi) * c.chunk + pos) * c.dz;
                        for (which, out, o) in [(0, &mut q, q_at), (1, &mut k, k_at)] {
                            let affine = |j: usize| {
                                let ch = which * zdim + hi * c.dz + j;
                                row[j] * rs * (gamma[ch] as f64 + 1.0) * inv_sqrt + beta[ch] as f64
                            };
                            for p in 0..c.dz / 2 {
                                let (cs, sn) = rope(pos, p, c.dz);
                                let (a0, a1) = (affine(2 * p), affine(2 * p + 1));
                                out[o + 2 * p] = a0 * cs - a1 * sn;
                                out[o + 2 * p + 1] = a0 * sn + a1 * cs;
                            }
                        }
                    }
                }
            }
            let d = [b, c.l, c.heads, c.dz, c.chunk, c.l, c.chunk].map(|x| x as i32);
            let inv = 1.0f32 / (c.dz as f32).sqrt();
            let rows = b * c.l * c.heads;
            schedules.each(|schedule, checks| {
                let (qb, kb, rb) = (nan_buf(q.len()), nan_buf(k.len()), nan_buf(rows));
                let (zb, gb, bb) = (
                    HostBuffer::from_slice(&z),
                    HostBuffer::from_slice(&gamma),
                    HostBuffer::from_slice(&beta),
                );
                let ob = HostBuffer::from_slice(&c.offsets);
                run(
                    "mega_attn_project_forward_f32",
                    shapes::mega_attention::rows(rows),
                    &[
                        &qb,
                        &kb,
                        &rb,
                        &zb,
                        &gb,
                        &bb,
                        &ob,
                        &d[0],
                        &d[1],
                        &d[2],
                        &d[3],
                        &d[4],
                        &d[5],
                        &d[6],
                        &(EPS as f32),
                        &inv,
                        &(BASE as f32),
                    ],
                    schedule,
                );
                checks.close("q (streaming)", &qb.to_vec(), &q, F32_TOL);
                // The cache: the appended rows close to the twin, every other row still NaN.
                let got = kb.to_vec();
                let written: Vec<usize> = (0..k.len()).filter(|&i| !k[i].is_nan()).collect();
                let got_w: Vec<f32> = written.iter().map(|&i| got[i]).collect();
                let want_w: Vec<f64> = written.iter().map(|&i| k[i]).collect();
                checks.close("k appended", &got_w, &want_w, F32_TOL);
                let untouched = (0..k.len()).all(|i| !k[i].is_nan() || got[i].is_nan());
                checks.exact("other cache rows untouched", &[untouched], &[true]);
            });
        },
    );
}

/// `mega_attn_cached_softmax_f32`: row `(bi, head, i)` sees keys `0 ..= offsets[bi] + i`;
/// scores beyond are NaN (never read) and their probabilities exact zeros.
#[test]
fn cached_softmax_matches_the_f64_twin() {
    sweep(
        "cached_softmax_matches_the_f64_twin",
        stream_cases(),
        |c, schedules| {
            let b = c.offsets.len();
            let rows = b * c.heads * c.l;
            let t = c.chunk;
            let keys = |row: usize| c.offsets[row / (c.heads * c.l)] as usize + row % c.l + 1;
            let mut scores = uniform(&mut rng(c.seed), rows * t, 0.0, 4.0);
            let mut want = vec![0.0f64; rows * t];
            for row in 0..rows {
                let n = keys(row);
                let s = &mut scores[row * t..(row + 1) * t];
                s[n..].fill(f32::NAN);
                let m = s[..n]
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let e: Vec<f64> = s[..n].iter().map(|&x| (x as f64 - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, v) in e.iter().enumerate() {
                    want[row * t + j] = v / sum;
                }
            }
            let d = [rows, t, c.l, c.heads].map(|x| x as i32);
            schedules.each(|schedule, checks| {
                let (pb, sb) = (nan_buf(rows * t), HostBuffer::from_slice(&scores));
                let ob = HostBuffer::from_slice(&c.offsets);
                run(
                    "mega_attn_cached_softmax_f32",
                    shapes::mega_attention::rows(rows),
                    &[&pb, &sb, &ob, &d[0], &d[1], &d[2], &d[3]],
                    schedule,
                );
                checks.close("probs", &pb.to_vec(), &want, F32_TOL);
            });
        },
    );
}
