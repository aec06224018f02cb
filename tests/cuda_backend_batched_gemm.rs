//! Strided-batched GEMMs through cuBLASLt, and bf16 in MEGABYTE's device attention, without a
//! GPU:
//! - the host logic of src/backend/cuda/cublaslt.rs for batched problems: the row-major →
//!   column-major mapping with leading dimensions and batch strides, run through a naive
//!   batched column-major GEMM as cuBLASLt defines it; the plan key (dense and batch-1 strided
//!   problems share one); the alignment promised for a batch; what an empty product does;
//! - `DeviceApi::gemm_strided_batched_bf16` on the emulated device against an f64 reference on
//!   the same bf16 values (the bound of tests/cuda_backend_bf16.rs: the products of bf16
//!   values are exact in f32, so `|Δ| ≤ (k + 2)·u₃₂·(Σ|aᵢbᵢ| + |beta·c|)`);
//! - `CudaBackend` attention at `Precision::Bf16Gemm` against an f64 attention of the
//!   unrounded inputs, with per-element bounds propagated from the bf16 roundings (below).

use half::bf16;
use mega::backend::cuda::cublaslt::{
    column_major, empty_product, operand_alignment, ColumnMajorGemm, EmptyProduct, LtProblem,
};
use mega::backend::cuda::{CudaBackend, Precision};
use mega::backend::Backend;
use mega::emu::{DeviceApi, EmulatedDevice, GemmShape, HostBuffer, MatrixLayout, StridedGemm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// bf16 unit roundoff.
const U_BF16: f64 = 1.0 / 256.0;
/// f32 unit roundoff.
const U_F32: f64 = 1.0 / 16_777_216.0;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Strided-batched problems with padded rows, offsets, gaps between matrices and every
/// transpose: `(m, k, n, batch)` × transposes, layouts derived per operand.
fn problems(beta: f32) -> Vec<StridedGemm> {
    let mut out = Vec::new();
    for (i, &(m, k, n, batch)) in [
        (1, 1, 1, 1),
        (3, 4, 5, 2),
        (5, 3, 5, 4),
        (7, 2, 3, 3),
        (4, 9, 1, 5),
    ]
    .iter()
    .enumerate()
    {
        for bits in 0..4 {
            let (trans_a, trans_b) = (bits & 1 != 0, bits & 2 != 0);
            // Stored (rows, cols) of each operand, padded rows (+pad) and gaps (+gap).
            let layout = |rows: usize, cols: usize, pad: usize, gap: usize, offset: usize| {
                MatrixLayout::new(offset, cols + pad, rows * (cols + pad) + gap)
            };
            let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
            let (br, bc) = if trans_b { (n, k) } else { (k, n) };
            out.push(StridedGemm {
                m,
                k,
                n,
                batch,
                trans_a,
                trans_b,
                a: layout(ar, ac, i % 3, 1 + i % 2, 2),
                b: layout(br, bc, 2 * (i % 2), i % 3, 1),
                out: layout(m, n, 1 + i % 2, 3, 4),
                alpha: 1.0,
                beta,
            });
        }
    }
    out
}

/// Elements a buffer needs for every matrix of `layout`.
fn extent(l: MatrixLayout, batch: usize, (rows, cols): (usize, usize)) -> usize {
    l.offset + (batch - 1) * l.stride + (rows - 1) * l.ld + cols
}

/// Row-major reference over the same memory: `out_i = alpha·op(a_i)·op(b_i) + beta·out_i`,
/// in f64; also, per element, `Σ|aᵢbᵢ| + |beta·c|` for the bounds. Untouched elements keep
/// their value.
fn row_major_reference(g: &StridedGemm, out: &[f64], a: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (mut res, mut mag) = (out.to_vec(), vec![0.0; out.len()]);
    for i in 0..g.batch {
        for r in 0..g.m {
            for c in 0..g.n {
                let (mut sum, mut abs) = (0.0, 0.0);
                for x in 0..g.k {
                    let ai = g.a.offset
                        + i * g.a.stride
                        + if g.trans_a {
                            x * g.a.ld + r
                        } else {
                            r * g.a.ld + x
                        };
                    let bi = g.b.offset
                        + i * g.b.stride
                        + if g.trans_b {
                            c * g.b.ld + x
                        } else {
                            x * g.b.ld + c
                        };
                    sum += a[ai] * b[bi];
                    abs += (a[ai] * b[bi]).abs();
                }
                let o = g.out.offset + i * g.out.stride + r * g.out.ld + c;
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * out[o]
                };
                res[o] = g.alpha as f64 * sum + old;
                mag[o] = (g.alpha as f64 * abs).abs() + old.abs();
            }
        }
    }
    (res, mag)
}

/// cuBLASLt's batched column-major `D_i = op(A_i)·op(B_i)` over the layouts of `cm`: matrix
/// `i` of an operand starts `i·batch_stride` elements after its pointer (an element index
/// into the memory here). C = D, beta = 0.
fn column_major_batched(
    cm: &ColumnMajorGemm,
    d_mem: &mut [f64],
    (d0, a0, b0): (usize, usize, usize),
    a_mem: &[f64],
    b_mem: &[f64],
) {
    let at = |start: usize, stride: i64, i: u64, ld: i64, r: u64, c: u64| {
        (start as i64 + i as i64 * stride + r as i64 + c as i64 * ld) as usize
    };
    for i in 0..cm.batch {
        for col in 0..cm.n {
            for row in 0..cm.m {
                let mut sum = 0.0;
                for p in 0..cm.k {
                    let x = if cm.trans_a {
                        a_mem[at(a0, cm.a.batch_stride, i, cm.a.ld, p, row)]
                    } else {
                        a_mem[at(a0, cm.a.batch_stride, i, cm.a.ld, row, p)]
                    };
                    let y = if cm.trans_b {
                        b_mem[at(b0, cm.b.batch_stride, i, cm.b.ld, col, p)]
                    } else {
                        b_mem[at(b0, cm.b.batch_stride, i, cm.b.ld, p, col)]
                    };
                    sum += x * y;
                }
                d_mem[at(d0, cm.c.batch_stride, i, cm.c.ld, row, col)] = sum;
            }
        }
    }
}

#[test]
fn batched_column_major_mapping_computes_the_row_major_products() {
    let mut rng = rng(1);
    for g in problems(0.0) {
        let cm = column_major(LtProblem::strided(&g));
        // The layouts as cuBLASLt requires them: stored dimensions (before op), ld ≥ rows,
        // one batch count for all, the strides of our operands (A is our b, B our a).
        let (a_rows, a_cols) = if cm.trans_a {
            (cm.k, cm.m)
        } else {
            (cm.m, cm.k)
        };
        let (b_rows, b_cols) = if cm.trans_b {
            (cm.n, cm.k)
        } else {
            (cm.k, cm.n)
        };
        assert_eq!((cm.m, cm.n, cm.k), (g.n as u64, g.m as u64, g.k as u64));
        assert_eq!((cm.a.rows, cm.a.cols), (a_rows, a_cols), "{g:?}");
        assert_eq!((cm.b.rows, cm.b.cols), (b_rows, b_cols), "{g:?}");
        assert_eq!((cm.c.rows, cm.c.cols), (cm.m, cm.n), "{g:?}");
        assert_eq!(
            (cm.a.ld, cm.b.ld, cm.c.ld),
            (g.b.ld as i64, g.a.ld as i64, g.out.ld as i64)
        );
        for l in [cm.a, cm.b, cm.c] {
            assert!(l.ld as u64 >= l.rows, "{g:?}: {l:?}");
        }
        assert_eq!(cm.batch, g.batch as u64);
        let strides = if g.batch == 1 {
            (0, 0, 0)
        } else {
            (g.b.stride as i64, g.a.stride as i64, g.out.stride as i64)
        };
        assert_eq!(
            (cm.a.batch_stride, cm.b.batch_stride, cm.c.batch_stride),
            strides
        );
        // Small integers: every sum is exact, so both must give the same bits, and neither
        // may write outside the output matrices (NaN stays NaN).
        let a: Vec<f64> = (0..extent(g.a, g.batch, g.a_dims()))
            .map(|_| rng.random_range(-4..5) as f64)
            .collect();
        let b: Vec<f64> = (0..extent(g.b, g.batch, g.b_dims()))
            .map(|_| rng.random_range(-4..5) as f64)
            .collect();
        let out = vec![f64::NAN; extent(g.out, g.batch, (g.m, g.n)) + 2];
        let (want, _) = row_major_reference(&g, &out, &a, &b);
        let mut got = out.clone();
        column_major_batched(
            &cm,
            &mut got,
            (g.out.offset, g.b.offset, g.a.offset),
            &b,
            &a,
        );
        let same = |x: f64, y: f64| x == y || (x.is_nan() && y.is_nan());
        assert!(
            got.iter().zip(&want).all(|(&x, &y)| same(x, y)),
            "{g:?}:\n got {got:?}\nwant {want:?}"
        );
    }
}

#[test]
fn dense_and_single_matrix_problems_share_a_plan_key() {
    let shape = GemmShape {
        m: 6,
        k: 4,
        n: 3,
        trans_a: true,
        trans_b: false,
        accumulate: false,
    };
    let dense = LtProblem::dense(shape);
    // Stored a: [k, m] = [4, 6] (ld 6); b: [k, n] = [4, 3] (ld 3); out ld 3.
    assert_eq!(dense.ld, [3, 6, 3]);
    assert_eq!((dense.batch, dense.stride), (1, [0; 3]));
    assert_eq!(LtProblem::from(shape), dense);
    // The same product as a strided GEMM of one matrix, whatever strides it names.
    let g = StridedGemm {
        m: 6,
        k: 4,
        n: 3,
        batch: 1,
        trans_a: true,
        trans_b: false,
        a: MatrixLayout::new(5, 6, 999),
        b: MatrixLayout::new(0, 3, 7),
        out: MatrixLayout::new(1, 3, 0),
        alpha: 1.0,
        beta: 0.0,
    };
    assert_eq!(LtProblem::strided(&g), dense);
    assert_eq!(column_major(LtProblem::strided(&g)), column_major(shape));
    // Beta decides whether C is read: any non-zero beta is an accumulating problem.
    for (beta, accumulate) in [(0.0, false), (1.0, true), (0.5, true)] {
        let p = LtProblem::strided(&StridedGemm { beta, ..g });
        assert_eq!(p.shape.accumulate, accumulate, "beta {beta}");
    }
    // A batch keeps its strides; another batch count or stride is another problem.
    let batched = LtProblem::strided(&StridedGemm { batch: 2, ..g });
    assert_eq!((batched.batch, batched.stride), (2, [0, 999, 7]));
    assert_ne!(batched, LtProblem::strided(&StridedGemm { batch: 3, ..g }));
}

#[test]
fn a_batch_promises_the_alignment_of_every_matrix() {
    // One matrix: the pointer's own alignment.
    assert_eq!(operand_alignment(0x1000, 4, 1), 256);
    // Matrices 4 bytes apart from a 256-aligned start: the second is only 4-aligned.
    assert_eq!(operand_alignment(0x1000, 4, 2), 4);
    // 96-byte strides keep 32-byte alignment; a 16-aligned start lowers it to 16.
    assert_eq!(operand_alignment(0x1000, 96, 8), 32);
    assert_eq!(operand_alignment(0x1010, 96, 8), 16);
    // A zero stride (every matrix the same) is the pointer's alignment.
    assert_eq!(operand_alignment(0x1080, 0, 8), 128);
    // Brute force: the promise divides the address of every matrix.
    for address in (0x7000u64..0x7400).step_by(4) {
        for stride in [0u64, 4, 8, 12, 48, 64, 256, 1000] {
            let align = operand_alignment(address, stride, 5) as u64;
            for i in 0..5 {
                assert_eq!((address + i * stride) % align, 0, "{address:#x} {stride}");
            }
        }
    }
}

#[test]
fn empty_products_zero_contiguous_outputs_or_are_refused() {
    let g = StridedGemm {
        m: 3,
        k: 0,
        n: 4,
        batch: 2,
        trans_a: false,
        trans_b: false,
        a: MatrixLayout::new(0, 1, 3),
        b: MatrixLayout::new(0, 4, 0),
        out: MatrixLayout::new(0, 4, 12),
        alpha: 1.0,
        beta: 0.0,
    };
    let p = LtProblem::strided(&g);
    assert!(p.out_is_contiguous());
    assert_eq!(empty_product(&p, 0.0), EmptyProduct::Zero(24));
    assert_eq!(empty_product(&p, 1.0), EmptyProduct::Nothing);
    assert_eq!(empty_product(&p, 0.5), EmptyProduct::Unsupported);
    // Padded rows or a gap between matrices: one memset would clobber the gaps.
    for out in [MatrixLayout::new(0, 5, 15), MatrixLayout::new(0, 4, 13)] {
        let p = LtProblem::strided(&StridedGemm { out, ..g });
        assert!(!p.out_is_contiguous());
        assert_eq!(empty_product(&p, 0.0), EmptyProduct::Unsupported);
        assert_eq!(empty_product(&p, 1.0), EmptyProduct::Nothing);
    }
    // Nothing to write at all.
    let p = LtProblem::strided(&StridedGemm { batch: 0, ..g });
    assert_eq!(empty_product(&p, 0.0), EmptyProduct::Nothing);
    // The dense path: m·n contiguous elements.
    let shape = GemmShape {
        m: 3,
        k: 0,
        n: 4,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    };
    assert_eq!(
        empty_product(&LtProblem::dense(shape), 0.0),
        EmptyProduct::Zero(12)
    );
}

// ---- DeviceApi::gemm_strided_batched_bf16 on the emulated device ----------------------------

fn bf16s(rng: &mut ChaCha8Rng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f64(rng.random_range(-1.0f64..1.0)))
        .collect()
}

#[test]
fn emulated_strided_batched_bf16_matches_the_f64_reference() {
    let dev = EmulatedDevice::new();
    let mut rng = rng(2);
    for (beta, alpha) in [(0.0f32, 1.0f32), (1.0, 1.0), (0.5, 0.5)] {
        for g in problems(beta) {
            let g = StridedGemm { alpha, ..g };
            let a = bf16s(&mut rng, extent(g.a, g.batch, g.a_dims()));
            let b = bf16s(&mut rng, extent(g.b, g.batch, g.b_dims()));
            // NaN outside the output matrices must stay NaN; inside, with beta = 0, NaN
            // must not propagate (C is not read).
            let mut start: Vec<f32> = vec![f32::NAN; extent(g.out, g.batch, (g.m, g.n)) + 2];
            // Output elements are those a beta = 0 product writes over NaN.
            let (probe, _) = row_major_reference(
                &StridedGemm { beta: 0.0, ..g },
                &vec![f64::NAN; start.len()],
                &vec![0.0; a.len()],
                &vec![0.0; b.len()],
            );
            for (s, p) in start.iter_mut().zip(&probe) {
                if !p.is_nan() && beta != 0.0 {
                    *s = rng.random_range(-1.0f32..1.0);
                }
            }
            let out = HostBuffer::from_slice(&start);
            let (a16, b16) = (HostBuffer::from_slice(&a), HostBuffer::from_slice(&b));
            dev.gemm_strided_batched_bf16(&out, &a16, &b16, &g).unwrap();
            let widen = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
            let start64: Vec<f64> = start.iter().map(|&x| x as f64).collect();
            let (want, mag) = row_major_reference(&g, &start64, &widen(&a), &widen(&b));
            let got = out.to_vec();
            for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
                if y.is_nan() {
                    assert!(x.is_nan(), "{g:?}[{i}]: wrote outside the outputs");
                    continue;
                }
                // One more rounding for alpha·p and beta·c each when they are not 1.
                let bound = (g.k + 4) as f64 * U_F32 * mag[i];
                assert!(
                    (x as f64 - y).abs() <= bound,
                    "{g:?}[{i}]: got {x}, want {y} (bound {bound:e})"
                );
            }
        }
    }
    // Extents are checked like the f32 variant's.
    let g = problems(0.0)[4];
    let short = HostBuffer::from_slice(&vec![bf16::ONE; extent(g.a, g.batch, g.a_dims()) - 1]);
    let b = HostBuffer::from_slice(&vec![bf16::ONE; extent(g.b, g.batch, g.b_dims())]);
    let out = HostBuffer::filled(extent(g.out, g.batch, (g.m, g.n)), 0.0f32);
    assert!(dev.gemm_strided_batched_bf16(&out, &short, &b, &g).is_err());
}

// ---- MEGABYTE attention at Precision::Bf16Gemm ------------------------------------------------

/// Attention of one shape in f64 on the unrounded inputs, with per-element error bounds for
/// the bf16 path. With u = 2⁻⁸:
/// - a score `s_ij = scale·q_i·k_j` from bf16-rounded q, k errs by ≤ e_ij = scale·(2u + u²)·
///   Σ|q k| (+ f32 summation); softmax turns score errors ≤ e_i = max_j e_ij into
///   `|ΔP_ij| ≤ P_ij·(exp(2e_i) − 1)` (log P_ij moves by ≤ |Δs_ij| + max_j |Δs_ij|);
/// - a product of a perturbed factor (relative δ) and a bf16-rounded one (u) errs by
///   ≤ (1 + δ)(1 + u) − 1 relative, summed over |terms|: out = P·V and dV = Pᵀ·dout have
///   `|Δ| ≤ Σ|P||y|·((1 + u)²·exp(2e) − 1)`;
/// - dP = dout·Vᵀ errs by ≤ (2u + u²)·Σ|dout v|; dS = scale·P ⊙ (dP − Σ P dP) carries ΔP
///   and ΔdP through that formula in absolute terms, then dQ = dS·K and dK = dSᵀ·Q add one
///   bf16 rounding of each factor.
///
/// Every bound gets `F32_SLACK·(1 + |value|)` for the f32 arithmetic around the roundings.
struct AttentionCase {
    out: Vec<f64>,
    out_bound: Vec<f64>,
    att: Vec<f64>,
    att_bound: Vec<f64>,
    dqkv: Vec<f64>,
    dqkv_bound: Vec<f64>,
}

const F32_SLACK: f64 = 2e-6;

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn attention_reference(
    qkv: &[f32],
    dout: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: f64,
) -> AttentionCase {
    let hs = c / h;
    let u = U_BF16;
    let q =
        |bi: usize, i: usize, hi: usize, d: usize| qkv[(bi * t + i) * 3 * c + hi * hs + d] as f64;
    let k = |bi: usize, j: usize, hi: usize, d: usize| {
        qkv[(bi * t + j) * 3 * c + c + hi * hs + d] as f64
    };
    let v = |bi: usize, j: usize, hi: usize, d: usize| {
        qkv[(bi * t + j) * 3 * c + 2 * c + hi * hs + d] as f64
    };
    let dy = |bi: usize, i: usize, hi: usize, d: usize| dout[(bi * t + i) * c + hi * hs + d] as f64;
    let mut r = AttentionCase {
        out: vec![0.0; b * t * c],
        out_bound: vec![0.0; b * t * c],
        att: vec![0.0; b * h * t * t],
        att_bound: vec![0.0; b * h * t * t],
        dqkv: vec![0.0; b * t * 3 * c],
        dqkv_bound: vec![0.0; b * t * 3 * c],
    };
    for bi in 0..b {
        for hi in 0..h {
            // Probabilities, their relative error factor per row, dS and its error.
            let mut p = vec![vec![0.0; t]; t];
            let mut dp_rel = vec![0.0; t]; // exp(2 e_i) − 1
            let mut ds = vec![vec![0.0; t]; t];
            let mut ds_err = vec![vec![0.0; t]; t];
            for i in 0..t {
                let mut s = vec![0.0; i + 1];
                let mut e_max: f64 = 0.0;
                for j in 0..=i {
                    let (mut dot, mut mag) = (0.0, 0.0);
                    for d in 0..hs {
                        dot += q(bi, i, hi, d) * k(bi, j, hi, d);
                        mag += (q(bi, i, hi, d) * k(bi, j, hi, d)).abs();
                    }
                    s[j] = scale * dot;
                    e_max = e_max.max(scale * (2.0 * u + u * u + (hs + 2) as f64 * U_F32) * mag);
                }
                let top = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - top).exp()).sum();
                for j in 0..=i {
                    p[i][j] = (s[j] - top).exp() / z;
                }
                dp_rel[i] = (2.0 * e_max).exp() - 1.0;
                // dP, its error, and dS.
                let (mut dp, mut dp_err) = (vec![0.0; i + 1], vec![0.0; i + 1]);
                for j in 0..=i {
                    for d in 0..hs {
                        dp[j] += dy(bi, i, hi, d) * v(bi, j, hi, d);
                        dp_err[j] += (dy(bi, i, hi, d) * v(bi, j, hi, d)).abs();
                    }
                    dp_err[j] *= 2.0 * u + u * u;
                }
                let row: f64 = (0..=i).map(|j| p[i][j] * dp[j]).sum();
                let row_err: f64 = (0..=i)
                    .map(|j| p[i][j] * (dp_rel[i] * dp[j].abs() + (1.0 + dp_rel[i]) * dp_err[j]))
                    .sum();
                for j in 0..=i {
                    ds[i][j] = scale * p[i][j] * (dp[j] - row);
                    ds_err[i][j] = scale
                        * (p[i][j] * dp_rel[i] * (dp[j] - row).abs()
                            + p[i][j] * (1.0 + dp_rel[i]) * (dp_err[j] + row_err));
                }
            }
            for i in 0..t {
                for j in 0..t {
                    let at = ((bi * h + hi) * t + i) * t + j;
                    r.att[at] = p[i][j];
                    r.att_bound[at] = p[i][j] * dp_rel[i] + F32_SLACK * (1.0 + p[i][j]);
                }
                for d in 0..hs {
                    let o = (bi * t + i) * c + hi * hs + d;
                    let (mut sum, mut mag) = (0.0, 0.0);
                    for j in 0..=i {
                        sum += p[i][j] * v(bi, j, hi, d);
                        mag += p[i][j] * v(bi, j, hi, d).abs();
                    }
                    r.out[o] = sum;
                    r.out_bound[o] = mag * ((1.0 + u).powi(2) * (1.0 + dp_rel[i]) - 1.0)
                        + F32_SLACK * (1.0 + sum.abs());
                }
            }
            // dQ_i = Σ_j dS_ij k_j, dK_j = Σ_i dS_ij q_i, dV_j = Σ_i P_ij dout_i.
            let two_roundings = (1.0 + u).powi(2) - 1.0;
            for d in 0..hs {
                for i in 0..t {
                    let (mut dq, mut dq_b) = (0.0, 0.0);
                    for j in 0..=i {
                        dq += ds[i][j] * k(bi, j, hi, d);
                        dq_b += (ds_err[i][j] * (1.0 + u).powi(2) + ds[i][j].abs() * two_roundings)
                            * k(bi, j, hi, d).abs();
                    }
                    let at = (bi * t + i) * 3 * c + hi * hs + d;
                    r.dqkv[at] = dq;
                    r.dqkv_bound[at] = dq_b + F32_SLACK * (1.0 + dq.abs());
                }
                for j in 0..t {
                    let (mut dk, mut dk_b, mut dv, mut dv_b) = (0.0, 0.0, 0.0, 0.0);
                    for i in j..t {
                        dk += ds[i][j] * q(bi, i, hi, d);
                        dk_b += (ds_err[i][j] * (1.0 + u).powi(2) + ds[i][j].abs() * two_roundings)
                            * q(bi, i, hi, d).abs();
                        dv += p[i][j] * dy(bi, i, hi, d);
                        dv_b += p[i][j]
                            * dy(bi, i, hi, d).abs()
                            * ((1.0 + u).powi(2) * (1.0 + dp_rel[i]) - 1.0);
                    }
                    let at = (bi * t + j) * 3 * c + c + hi * hs + d;
                    r.dqkv[at] = dk;
                    r.dqkv_bound[at] = dk_b + F32_SLACK * (1.0 + dk.abs());
                    r.dqkv[at + c] = dv;
                    r.dqkv_bound[at + c] = dv_b + F32_SLACK * (1.0 + dv.abs());
                }
            }
        }
    }
    r
}

/// Worst `|got − want| / bound` (must be ≤ 1) and whether any error exceeded the f32 slack
/// (the bf16 rounding really happened).
fn within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> (f64, bool) {
    let (mut worst, mut rounded) = (0.0f64, false);
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= b, "{what}[{i}]: got {g}, want {w} (bound {b:e})");
        worst = worst.max(err / b);
        rounded |= err > F32_SLACK * (1.0 + w.abs());
    }
    (worst, rounded)
}

#[test]
fn bf16_attention_matches_the_f64_reference_within_the_rounding_bounds() {
    let mut rng = rng(3);
    let mut rounding_seen = false;
    // (b, t, c, h): both GEMM batchings (h ≤ b and h > b), odd t.
    for &(b, t, c, h) in &[
        (1, 1, 4, 1),
        (2, 5, 8, 2),
        (1, 9, 12, 3),
        (3, 7, 16, 2),
        (1, 33, 24, 4),
    ] {
        let scale = 1.0 / ((c / h) as f32).sqrt();
        let qkv: Vec<f32> = (0..b * t * 3 * c)
            .map(|_| rng.random_range(-1.5f64..1.5) as f32)
            .collect();
        let dout: Vec<f32> = (0..b * t * c)
            .map(|_| rng.random_range(-1.0f64..1.0) as f32)
            .collect();
        let want = attention_reference(&qkv, &dout, b, t, c, h, scale as f64);
        let be = CudaBackend::with_precision(EmulatedDevice::new(), Precision::Bf16Gemm);
        let qkv_d = be.upload(&qkv);
        let (mut out, mut att) = (be.zeros(b * t * c), be.zeros(b * h * t * t));
        be.attention_forward(&mut out, &mut att, &qkv_d, b, t, c, h, scale);
        let mut dqkv = be.zeros(b * t * 3 * c);
        be.attention_backward(
            &mut dqkv,
            &be.upload(&dout),
            &qkv_d,
            &att,
            b,
            t,
            c,
            h,
            scale,
        );
        let shape = format!("(b, t, c, h) = ({b}, {t}, {c}, {h})");
        let mut worst = Vec::new();
        for (what, got, want, bound) in [
            ("out", be.download(&out), &want.out, &want.out_bound),
            ("att", be.download(&att), &want.att, &want.att_bound),
            ("dqkv", be.download(&dqkv), &want.dqkv, &want.dqkv_bound),
        ] {
            let (w, r) = within(&format!("{shape} {what}"), &got, want, bound);
            worst.push(format!("{what} {w:.2}"));
            rounding_seen |= r;
        }
        println!("{shape}: worst error / bound: {}", worst.join(", "));
        assert!(be.host_fallback_calls().is_empty());
    }
    assert!(rounding_seen, "the bf16 path never rounded");
}
