//! bf16 GEMMs with f32 accumulation, without a GPU:
//! - the cuBLASLt host logic (src/backend/cuda/cublaslt.rs): the row-major → column-major
//!   mapping, run through a naive column-major GEMM, and the plan cache's key;
//! - `DeviceApi::gemm_bf16` on the emulated device against an f64 reference on the same bf16
//!   values;
//! - `CudaBackend` with `Precision::Bf16Gemm`: its matmul against that reference, and one
//!   training step of the tiny MEGABYTE and MEGALODON against the CPU f32 backend.
//!
//! Tolerances (docs/cuda-backend.md, docs/perf.md §8.1). u = 2⁻⁸ is bf16's unit roundoff
//! (8 significant bits, round to nearest), u₃₂ = 2⁻²⁴ f32's.
//! - GEMM on bf16 values vs f64: the products of two bf16 values are exact in f32, so only
//!   the f32 summation errs: `|Δ| ≤ (k + 2)·u₃₂·(Σ|aᵢbᵢ| + |c|)` per element (the standard
//!   γₖ bound, one more term for the accumulated `c`).
//! - GEMM on f32 inputs rounded to bf16 vs the f64 GEMM of the unrounded inputs: each product
//!   gains a relative error ≤ 2u + u², so `|Δ| ≤ (2u + u²)·Σ|aᵢbᵢ|` plus the f32 bound.
//! - Training step, bf16 GEMMs vs CPU f32: see `bf16_bounds` below; the same step with
//!   `Precision::F32` keeps the f32 bounds of tests/cuda_backend_train.rs.

use half::bf16;
use mega::backend::cpu::Cpu;
use mega::backend::cuda::cublaslt::{
    column_major, pointer_alignment, ColumnMajorGemm, GemmKey, LtCompute, LtDtype, LtProblem,
    PlanCache,
};
use mega::backend::cuda::{CudaBackend, Precision};
use mega::backend::Backend;
use mega::config::{MegabyteConfig, MegalodonConfig};
use mega::emu::{BufferAt, DeviceApi, DeviceError, EmulatedDevice, GemmShape, HostBuffer};
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::params::ParamLayout;
use mega::model::{LanguageModel, ModelShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "support/train_step.rs"]
mod train_step;
use train_step::{hparams, one_step, StepResult, LR};

/// bf16 unit roundoff.
const U_BF16: f64 = 1.0 / 256.0;
/// f32 unit roundoff.
const U_F32: f64 = 1.0 / 16_777_216.0;

/// (m, k, n): ones, odd sizes, primes, k = 0.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (3, 5, 7),
    (17, 33, 9),
    (31, 64, 1),
    (1, 129, 37),
    (40, 97, 23),
    (5, 0, 3),
];

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Values in [-1, 1) with every f32 mantissa bit random (drawn in f64), so rounding to bf16
/// really changes them.
fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f64..1.0) as f32)
        .collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// `op(x)[r, c]` of a row-major operand stored `[rows, cols]` or, transposed, `[cols, rows]`.
fn op_at(x: &[f32], trans: bool, r: usize, c: usize, rows: usize, cols: usize) -> f64 {
    if trans {
        x[c * rows + r] as f64
    } else {
        x[r * cols + c] as f64
    }
}

/// f64 reference of a row-major GEMM and, per element, `Σ|aᵢbᵢ| + |c|` (for the bounds).
fn reference(a: &[f32], b: &[f32], c0: &[f32], s: GemmShape) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut mag) = (vec![0.0; s.m * s.n], vec![0.0; s.m * s.n]);
    for i in 0..s.m {
        for j in 0..s.n {
            let (mut sum, mut abs) = if s.accumulate {
                (c0[i * s.n + j] as f64, (c0[i * s.n + j] as f64).abs())
            } else {
                (0.0, 0.0)
            };
            for p in 0..s.k {
                let prod =
                    op_at(a, s.trans_a, i, p, s.m, s.k) * op_at(b, s.trans_b, p, j, s.k, s.n);
                sum += prod;
                abs += prod.abs();
            }
            out[i * s.n + j] = sum;
            mag[i * s.n + j] = abs;
        }
    }
    (out, mag)
}

fn shapes() -> impl Iterator<Item = GemmShape> {
    SHAPES.into_iter().flat_map(|(m, k, n)| {
        (0..8).map(move |bits| GemmShape {
            m,
            k,
            n,
            trans_a: bits & 1 != 0,
            trans_b: bits & 2 != 0,
            accumulate: bits & 4 != 0,
        })
    })
}

// ---- cuBLASLt host logic ---------------------------------------------------------------------

/// A naive column-major `D = op(A)·op(B)` over the layouts of `cm`, as cuBLASLt defines it.
fn column_major_gemm(cm: &ColumnMajorGemm, a_mem: &[f64], b_mem: &[f64]) -> Vec<f64> {
    let at = |mem: &[f64], ld: i64, r: u64, c: u64| mem[(r as i64 + c as i64 * ld) as usize];
    let mut d = vec![f64::NAN; (cm.c.ld as u64 * cm.c.cols) as usize];
    for j in 0..cm.n {
        for i in 0..cm.m {
            let mut sum = 0.0;
            for p in 0..cm.k {
                let x = if cm.trans_a {
                    at(a_mem, cm.a.ld, p, i)
                } else {
                    at(a_mem, cm.a.ld, i, p)
                };
                let y = if cm.trans_b {
                    at(b_mem, cm.b.ld, j, p)
                } else {
                    at(b_mem, cm.b.ld, p, j)
                };
                sum += x * y;
            }
            d[(i as i64 + j as i64 * cm.c.ld) as usize] = sum;
        }
    }
    d
}

#[test]
fn column_major_mapping_computes_the_row_major_product() {
    let mut rng = rng(1);
    for s in shapes().filter(|s| !s.accumulate && s.k > 0) {
        let cm = column_major(s);
        // Layouts as cuBLASLt requires them: dimensions of the stored matrix (before op),
        // ld ≥ rows, and within the buffers our operands occupy.
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
        assert_eq!((cm.a.rows, cm.a.cols), (a_rows, a_cols), "{s:?}");
        assert_eq!((cm.b.rows, cm.b.cols), (b_rows, b_cols), "{s:?}");
        assert_eq!((cm.c.rows, cm.c.cols), (cm.m, cm.n), "{s:?}");
        for (l, len) in [(cm.a, s.k * s.n), (cm.b, s.m * s.k), (cm.c, s.m * s.n)] {
            assert!(l.ld as u64 >= l.rows.max(1), "{s:?}: ld {l:?}");
            assert_eq!(
                (l.ld as u64 * (l.cols - 1) + l.rows) as usize,
                len,
                "{s:?}: {l:?}"
            );
        }
        // Small integers: every sum is exact, so the two products must be equal.
        let a: Vec<f32> = (0..s.m * s.k)
            .map(|_| rng.random_range(-4..5) as f32)
            .collect();
        let b: Vec<f32> = (0..s.k * s.n)
            .map(|_| rng.random_range(-4..5) as f32)
            .collect();
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        // cuBLASLt's A is our b, its B our a, its D our out.
        let got = column_major_gemm(&cm, &widen(&b), &widen(&a));
        let (want, _) = reference(&a, &b, &[], s);
        assert_eq!(got, want, "{s:?}");
    }
}

#[test]
fn pointer_alignment_is_the_largest_power_of_two_up_to_256() {
    for (address, want) in [
        (0x7f00_0000_0000u64, 256),
        (0x7f00_0000_0100, 256),
        (0x7f00_0000_0080, 128),
        (0x7f00_0000_0010, 16),
        (0x7f00_0000_0004, 4),
        (0x7f00_0000_0002, 2),
        (0x7f00_0000_0001, 1),
    ] {
        assert_eq!(pointer_alignment(address), want, "{address:#x}");
    }
}

fn key(shape: GemmShape) -> GemmKey {
    GemmKey {
        problem: LtProblem::dense(shape),
        input: LtDtype::Bf16,
        output: LtDtype::F32,
        compute: LtCompute::F32,
        alignment: [256; 3],
    }
}

#[test]
fn plan_cache_builds_one_plan_per_distinct_key() {
    let shape = GemmShape {
        m: 8,
        k: 16,
        n: 4,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    };
    let base = key(shape);
    let with_shape = |key: GemmKey, shape: GemmShape| GemmKey {
        problem: LtProblem::dense(shape),
        ..key
    };
    let with_problem = |key: GemmKey, f: &dyn Fn(&mut LtProblem)| {
        let mut problem = key.problem;
        f(&mut problem);
        GemmKey { problem, ..key }
    };
    // Each variant differs from `base` in one field, so each needs its own plan.
    let variants = [
        with_shape(base, GemmShape { m: 9, ..shape }),
        with_shape(base, GemmShape { k: 17, ..shape }),
        with_shape(base, GemmShape { n: 5, ..shape }),
        with_shape(
            base,
            GemmShape {
                trans_a: true,
                ..shape
            },
        ),
        with_shape(
            base,
            GemmShape {
                trans_b: false,
                ..shape
            },
        ),
        with_shape(
            base,
            GemmShape {
                accumulate: true,
                ..shape
            },
        ),
        GemmKey {
            input: LtDtype::F32,
            ..base
        },
        GemmKey {
            output: LtDtype::Bf16,
            ..base
        },
        GemmKey {
            compute: LtCompute::Tf32,
            ..base
        },
        GemmKey {
            alignment: [256, 4, 256],
            ..base
        },
        // Leading dimensions, batch count and strides (strided-batched GEMMs).
        with_problem(base, &|p| p.ld[1] = 48),
        with_problem(base, &|p| {
            p.batch = 3;
            p.stride = [32, 128, 64];
        }),
        with_problem(base, &|p| {
            p.batch = 4;
            p.stride = [32, 128, 64];
        }),
        with_problem(base, &|p| {
            p.batch = 3;
            p.stride = [32, 256, 64];
        }),
    ];
    let mut cache = PlanCache::<usize>::new();
    let builds = std::cell::Cell::new(0usize);
    let build = |_: &GemmKey| -> Result<usize, ()> {
        builds.set(builds.get() + 1);
        Ok(builds.get())
    };
    let first = cache.get_or_try_insert(base, build).unwrap();
    for v in &variants {
        cache.get_or_try_insert(*v, build).unwrap();
    }
    assert_eq!(cache.len(), 1 + variants.len());
    // The same problems again: served from the cache, no further builds.
    assert_eq!(*cache.get_or_try_insert(base, build).unwrap(), *first);
    for v in &variants {
        cache.get_or_try_insert(*v, build).unwrap();
    }
    assert_eq!(builds.get(), 1 + variants.len());
}

#[test]
fn plan_cache_does_not_keep_failed_builds() {
    let k = key(GemmShape {
        m: 2,
        k: 3,
        n: 4,
        trans_a: false,
        trans_b: false,
        accumulate: false,
    });
    let mut cache = PlanCache::<u8>::new();
    assert_eq!(
        cache.get_or_try_insert(k, |_| Err("no algorithm")),
        Err("no algorithm")
    );
    assert!(cache.is_empty());
    assert_eq!(
        *cache.get_or_try_insert(k, |_| Ok::<u8, &str>(7)).unwrap(),
        7
    );
    assert_eq!(cache.len(), 1);
}

// ---- DeviceApi::gemm_bf16 on the emulated device ---------------------------------------------

#[test]
fn emulated_gemm_bf16_matches_the_f64_reference() {
    let dev = EmulatedDevice::new();
    let mut rng = rng(2);
    for s in shapes() {
        let a = round_bf16(&uniform(&mut rng, s.m * s.k));
        let b = round_bf16(&uniform(&mut rng, s.k * s.n));
        let c0 = uniform(&mut rng, s.m * s.n);
        let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        // The inputs are views 3 and 5 elements into longer allocations (as weights in a bf16
        // working copy are), with NaN around them: reading outside the view poisons the output.
        let nan_around = |v: &[f32], before: usize| {
            let padded = [vec![f32::NAN; before], v.to_vec(), vec![f32::NAN; 4]].concat();
            HostBuffer::from_slice(&to_bf16(&padded))
        };
        let (a16, b16) = (nan_around(&a, 3), nan_around(&b, 5));
        // The output is a view two elements into a longer allocation (as arena buffers
        // are): the elements before and after it must stay untouched.
        let out =
            HostBuffer::from_slice(&[vec![f32::NAN; 2], c0.clone(), vec![f32::NAN; 3]].concat());
        dev.gemm_bf16(
            BufferAt::new(&out, 2),
            BufferAt::new(&a16, 3),
            BufferAt::new(&b16, 5),
            s,
        )
        .unwrap();
        let all = out.to_vec();
        assert!(
            all[..2]
                .iter()
                .chain(&all[2 + s.m * s.n..])
                .all(|x| x.is_nan()),
            "{s:?}: wrote outside the view"
        );
        let got = &all[2..];
        let (want, mag) = reference(&a, &b, &c0, s);
        for i in 0..s.m * s.n {
            let bound = (s.k + 2) as f64 * U_F32 * mag[i];
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= bound,
                "{s:?}[{i}]: got {} want {} (bound {bound:e})",
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn emulated_gemm_bf16_rejects_short_buffers() {
    let dev = EmulatedDevice::new();
    let s = GemmShape {
        m: 2,
        k: 3,
        n: 4,
        trans_a: false,
        trans_b: false,
        accumulate: false,
    };
    let a = HostBuffer::filled(5, bf16::ONE); // needs 6
    let b = HostBuffer::filled(12, bf16::ONE);
    let out = HostBuffer::filled(8, 0.0f32);
    assert!(matches!(
        dev.gemm_bf16(
            BufferAt::new(&out, 0),
            BufferAt::new(&a, 0),
            BufferAt::new(&b, 0),
            s
        ),
        Err(DeviceError::Shape(_))
    ));
    // b holds the 12 elements it needs, but not from offset 1.
    let a = HostBuffer::filled(6, bf16::ONE);
    assert!(matches!(
        dev.gemm_bf16(
            BufferAt::new(&out, 0),
            BufferAt::new(&a, 0),
            BufferAt::new(&b, 1),
            s
        ),
        Err(DeviceError::Shape(_))
    ));
    assert!(dev
        .gemm_bf16(
            BufferAt::new(&out, 0),
            BufferAt::new(&a, 0),
            BufferAt::new(&b, 0),
            s
        )
        .is_ok());
}

// ---- CudaBackend matmul at each precision ----------------------------------------------------

#[test]
fn backend_matmul_precision_decides_the_rounding() {
    let bf = CudaBackend::with_precision(EmulatedDevice::new(), Precision::Bf16Gemm);
    let f32_be = CudaBackend::with_precision(EmulatedDevice::new(), Precision::F32);
    assert_eq!(bf.precision(), Precision::Bf16Gemm);
    assert_eq!(
        CudaBackend::new(EmulatedDevice::new()).precision(),
        Precision::F32
    );
    let mut rng = rng(3);
    let mut rounding_seen = false;
    // Large, small, large again: the bf16 scratch grows, is reused, and grows back.
    let mut sizes: Vec<GemmShape> = shapes().collect();
    sizes.insert(
        0,
        GemmShape {
            m: 64,
            k: 300,
            n: 48,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        },
    );
    for s in sizes {
        let (a, b, c0) = (
            uniform(&mut rng, s.m * s.k),
            uniform(&mut rng, s.k * s.n),
            uniform(&mut rng, s.m * s.n),
        );
        let run = |be: &CudaBackend<EmulatedDevice>| {
            let (ad, bd) = (be.upload(&a), be.upload(&b));
            let mut out = be.upload(&c0);
            be.matmul(
                &mut out,
                &ad,
                &bd,
                s.m,
                s.k,
                s.n,
                s.trans_a,
                s.trans_b,
                s.accumulate,
            );
            be.download(&out)
        };
        let (got_bf, got_f32) = (run(&bf), run(&f32_be));
        let (exact, mag) = reference(&a, &b, &c0, s);
        let (on_bf16, mag_bf16) = reference(&round_bf16(&a), &round_bf16(&b), &c0, s);
        for i in 0..s.m * s.n {
            let f32_bound = (s.k + 2) as f64 * U_F32;
            // Bf16Gemm: the GEMM of the bf16-rounded inputs, to f32 accuracy …
            let err = (got_bf[i] as f64 - on_bf16[i]).abs();
            assert!(err <= f32_bound * mag_bf16[i], "bf16 {s:?}[{i}]: {err:e}");
            // … which is within the bf16 input-rounding bound of the exact product.
            let err = (got_bf[i] as f64 - exact[i]).abs();
            let bf16_bound = (2.0 * U_BF16 + U_BF16 * U_BF16) * mag[i] + 2.0 * f32_bound * mag[i];
            assert!(
                err <= bf16_bound,
                "bf16 {s:?}[{i}]: {err:e} > {bf16_bound:e}"
            );
            rounding_seen |= err > f32_bound * mag[i];
            // F32: the exact product to f32 accuracy.
            let err = (got_f32[i] as f64 - exact[i]).abs();
            assert!(err <= f32_bound * mag[i], "f32 {s:?}[{i}]: {err:e}");
        }
    }
    // The bf16 path really rounded its inputs (else the checks above could not tell them apart).
    assert!(rounding_seen);
    // Nothing ran on the host: the casts are kernels, the GEMMs the device's.
    assert!(
        bf.host_fallback_calls().is_empty(),
        "{:?}",
        bf.host_fallback_calls()
    );
}

// ---- one training step -----------------------------------------------------------------------

/// Initial parameters plus uniform ±0.05 (so every path carries signal) and random bytes.
fn inputs(layout: &ParamLayout, window_bytes: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<u8>) {
    let mut rng = rng(seed);
    let mut host = layout.init_host(seed);
    for p in host.iter_mut() {
        for x in p.iter_mut() {
            *x += 0.05 * rng.random_range(-1.0f32..1.0);
        }
    }
    let bytes = (0..window_bytes).map(|_| rng.random()).collect();
    (host, bytes)
}

/// Bounds of one step against the CPU f32 backend.
struct StepBounds {
    /// `|Δloss|` in nats.
    loss: f64,
    /// Per tensor, `max|Δg| ≤ grad · max|g_cpu|`, the maximum taken over the tensor
    /// (`grad_per_tensor`) or over the whole model.
    grad: f32,
    /// Whether the gradient bound scales with each tensor's own largest gradient.
    grad_per_tensor: bool,
    /// Updated parameters where the gradient's sign is certain: `|Δp| ≤ param·(1 + |p|)`.
    param: f32,
}

/// The bf16 path's bounds (docs/perf.md §8.1). Each GEMM rounds both inputs to bf16, so
/// every product gains a relative error ≤ 2u (u = 2⁻⁸); with independent signs a GEMM
/// output's error is ≈ √(2/3)·u·√(Σ aᵢ²bᵢ²), about u relative to an output of random-sign
/// terms (≈ √k·|aᵢbᵢ|) and at most 2u relative to Σ|aᵢbᵢ|.
/// - Loss: a token's loss `logsumexp(z) − z_y` moves by at most 2·max|Δz|. The logits of
///   these models are O(1) (the losses, 5.5–6.0 nats, sit near ln 256), and their error is
///   ≈ u relative, so a token's loss moves by ≲ 2u nats, and so does the mean: 2u.
/// - Gradients: a gradient passes through about 2L + 4 ≈ 8 GEMMs (forward and backward,
///   L = 2 layers), ≈ √8·u ≈ 3u in quadrature; gradients that are sums with heavy cancellation
///   (MEGABYTE's global model receives its gradient summed over the local model's positions)
///   carry that error relative to the terms, not to their small sum, so the bound is taken
///   relative to the model's largest gradient, with a 5× margin: 16u = 2⁻⁴.
/// - Parameters: the first AdamW step moves a weight by lr·g/(|g| + ε) = lr·sign(g) unless |g|
///   is near ε. Where |g| exceeds the gradient bound the sign cannot flip, and the weights must
///   match to the f32 bound; elsewhere they may differ by up to 2·lr more.
fn bf16_bounds() -> StepBounds {
    StepBounds {
        loss: 2.0 * U_BF16,
        grad: (16.0 * U_BF16) as f32,
        grad_per_tensor: false,
        param: 1e-4,
    }
}

/// The f32 path's bounds (tests/cuda_backend_train.rs, docs/cuda-backend.md).
const F32_BOUNDS: StepBounds = StepBounds {
    loss: 1e-5,
    grad: 1e-4,
    grad_per_tensor: true,
    param: 1e-4,
};

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, &x| m.max(x.abs()))
}

/// Asserts `got` is within `bounds` of the CPU step and prints the worst differences.
fn compare(
    what: &str,
    layout: &ParamLayout,
    cpu: &StepResult,
    got: &StepResult,
    bounds: StepBounds,
) {
    let hp = hparams(1, 1);
    let loss_diff = (cpu.loss - got.loss).abs();
    assert!(
        loss_diff <= bounds.loss,
        "{what}: loss {} vs cpu {} (bound {:e})",
        got.loss,
        cpu.loss,
        bounds.loss
    );
    let model_scale = cpu
        .grads
        .iter()
        .fold(f32::MIN_POSITIVE, |m, g| m.max(max_abs(g)));
    let (mut worst_grad, mut worst_param, mut flips_allowed) = (0.0f32, 0.0f32, 0usize);
    for (i, spec) in layout.specs.iter().enumerate() {
        let scale = if bounds.grad_per_tensor {
            max_abs(&cpu.grads[i]).max(f32::MIN_POSITIVE)
        } else {
            model_scale
        };
        let grad_bound = bounds.grad * scale;
        let diff = cpu.grads[i]
            .iter()
            .zip(&got.grads[i])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= grad_bound,
            "{what}: gradient of {}: max |Δ| {diff:e} > {grad_bound:e}",
            spec.name
        );
        worst_grad = worst_grad.max(diff / scale);
        for (j, ((&p_cpu, &p), &g)) in cpu.params[i]
            .iter()
            .zip(&got.params[i])
            .zip(&cpu.grads[i])
            .enumerate()
        {
            let d = (p_cpu - p).abs();
            let sign_certain = g.abs() > grad_bound;
            let bound = if sign_certain {
                bounds.param * (1.0 + p_cpu.abs())
            } else {
                flips_allowed += 1;
                2.0 * LR + bounds.param * (1.0 + p_cpu.abs())
            };
            assert!(
                d <= bound,
                "{what}: param {}[{j}]: {p} vs cpu {p_cpu} (gradient {g:e}, bound {bound:e})",
                spec.name
            );
            if sign_certain {
                worst_param = worst_param.max(d);
            }
        }
        // Moments: m = (1 − β1)·g_clipped, v = (1 − β2)·g_clipped²; clipping scales by ≤ 1
        // with a factor that itself differs by about the gradients' relative difference.
        let m_bound = (1.0 - hp.beta1) * 2.0 * grad_bound + 1e-7;
        let v_bound = (1.0 - hp.beta2) * 5.0 * grad_bound * scale + 1e-7;
        for (kind, c, g, bound) in [
            ("m", &cpu.m[i], &got.m[i], m_bound),
            ("v", &cpu.v[i], &got.v[i], v_bound),
        ] {
            for (j, (&a, &b)) in c.iter().zip(g).enumerate() {
                assert!(
                    (a - b).abs() <= bound,
                    "{what}: {kind} {}[{j}]: {b} vs cpu {a} (bound {bound:e})",
                    spec.name
                );
            }
        }
    }
    println!(
        "{what}: loss {:.4}, |Δloss| = {loss_diff:.2e} (bound {:.2e}), model gradient scale \
         {model_scale:.2e}, max gradient |Δ|/scale = \
         {worst_grad:.2e} (bound {:.2e}), max parameter |Δ| where the gradient sign is \
         certain = {worst_param:.2e}; {flips_allowed} parameters with |g| within the \
         gradient bound",
        cpu.loss, bounds.loss, bounds.grad
    );
}

fn check_step<M>(what: &str, model: &M, layout: &ParamLayout, b: usize, t: usize, seed: u64)
where
    M: LanguageModel<Cpu<f32>> + LanguageModel<CudaBackend<EmulatedDevice>> + ModelShape,
{
    let (host, bytes) = inputs(layout, b * model.window_len(t), seed);
    let cpu = one_step(&Cpu::<f32>::new(), model, layout, &host, &bytes, b, t);
    let bf = CudaBackend::with_precision(EmulatedDevice::new(), Precision::Bf16Gemm);
    let got = one_step(&bf, model, layout, &host, &bytes, b, t);
    compare(
        &format!("{what} bf16 GEMMs"),
        layout,
        &cpu,
        &got,
        bf16_bounds(),
    );
    let f32_be = CudaBackend::with_precision(EmulatedDevice::new(), Precision::F32);
    let got = one_step(&f32_be, model, layout, &host, &bytes, b, t);
    compare(&format!("{what} f32 GEMMs"), layout, &cpu, &got, F32_BOUNDS);
}

#[test]
fn megabyte_tiny_step_with_bf16_gemms_matches_cpu() {
    let cfg = MegabyteConfig::preset("tiny").unwrap();
    let model = Megabyte::new(&cfg);
    check_step(
        "megabyte tiny",
        &model,
        &model.layout,
        2,
        cfg.max_seq_len,
        1,
    );
}

#[test]
fn megalodon_tiny_step_with_bf16_gemms_matches_cpu() {
    let cfg = MegalodonConfig::preset("tiny").unwrap();
    let model = Megalodon::new(&cfg);
    check_step("megalodon tiny", &model, &model.layout, 2, 16, 2);
}
