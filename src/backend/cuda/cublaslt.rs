//! GEMMs through cuBLASLt for [`super::cudarc_device::CudarcDevice`]: the row-major →
//! column-major mapping, the plan cache key, and the cached plans (matmul descriptor, matrix
//! layouts, preference and the heuristic's algorithm) with one workspace per device. Plain and
//! strided-batched GEMMs take the same path: a plain GEMM is the problem with one matrix per
//! operand and the natural leading dimensions ([`LtProblem::dense`]), a strided-batched one
//! sets each layout's batch count and stride ([`LtProblem::strided`]).
//!
//! The mapping and the cache are pure host logic, tested without a GPU
//! (tests/cuda_backend_bf16.rs); [`LtGemm`] is the only part that calls cuBLASLt, and it runs
//! only on a host with a driver. cuBLASLt facts this file depends on (cuBLAS documentation,
//! `cublasLtMatmul` and friends; cudarc 0.19 `cublaslt::result` wraps the calls one to one):
//! - matrices are column-major; a layout describes the matrix as stored (before its
//!   transpose): `rows × cols` with leading dimension `ld ≥ rows`;
//! - `D = alpha·op(A)·op(B) + beta·C`; with `beta = 0` C is not read, so C and D can be the same
//!   buffer (ours always are) and share one layout;
//! - A/B `CUDA_R_16BF` with C/D `CUDA_R_32F`, `CUBLAS_COMPUTE_32F` and `CUDA_R_32F` scales is a
//!   supported combination (bf16 in, f32 accumulate, f32 out), as is all-`CUDA_R_16BF`
//!   (bf16 out) and all-`CUDA_R_32F` (with `CUBLAS_COMPUTE_32F`, or `_FAST_TF32` for TF32);
//! - the heuristic assumes 256-byte-aligned pointers unless the preference says otherwise
//!   (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`); an algorithm chosen for aligned pointers
//!   can fail on misaligned ones, so the alignment is part of the key;
//! - an algorithm may use at most the workspace the preference allows
//!   (`CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES`); the workspace must stay valid until the
//!   GEMM has run (ours lives as long as the device);
//! - a batch is a layout attribute: `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT` (an `int32_t`,
//!   default one) and `CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET` (an `int64_t`, elements
//!   from one matrix to the next, default zero), set on A, B and C/D alike (cudarc's
//!   `MatrixLayout::set_batch` sets the same pair); matrix `i` of an operand starts
//!   `i·stride` elements after its pointer;
//! - descriptors are host objects: building them and asking the heuristic costs tens of
//!   microseconds, which is why they are cached per problem instead of rebuilt per call
//!   (cudarc's `Matmul::matmul` rebuilds them on every call).

use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::Hash;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as lt_sys};

use crate::emu::{DeviceError, GemmShape, StridedGemm};

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LtDtype {
    /// `CUDA_R_32F`.
    F32,
    /// `CUDA_R_16BF`.
    Bf16,
}

impl LtDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    fn cuda(self) -> lt_sys::cudaDataType {
        match self {
            Self::F32 => lt_sys::cudaDataType_t::CUDA_R_32F,
            Self::Bf16 => lt_sys::cudaDataType_t::CUDA_R_16BF,
        }
    }
}

/// How products are accumulated. Every variant accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LtCompute {
    /// `CUBLAS_COMPUTE_32F`: f32 multiply-add (bf16 inputs are widened exactly).
    F32,
    /// `CUBLAS_COMPUTE_32F_FAST_TF32`: f32 inputs rounded to TF32 (10 mantissa bits) on the
    /// tensor cores, f32 accumulate. Opt-in only ([`super::cudarc_device::CudarcDevice::with_tf32`]):
    /// each product then carries a relative error up to 2⁻¹⁰, far above f32's 2⁻²⁴.
    Tf32,
}

impl LtCompute {
    fn cuda(self) -> lt_sys::cublasComputeType_t {
        match self {
            Self::F32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Self::Tf32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        }
    }
}

/// A column-major matrix as cuBLASLt's layout describes it: as stored, before the transpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtLayout {
    /// Rows of the stored matrix.
    pub rows: u64,
    /// Columns of the stored matrix.
    pub cols: u64,
    /// Leading dimension: elements between the starts of two columns.
    pub ld: i64,
    /// Elements between the first elements of consecutive matrices of a batch (0 for a single
    /// matrix).
    pub batch_stride: i64,
}

/// A row-major GEMM problem as cuBLASLt runs it: the shape, each operand's leading
/// dimension, and a strided batch (one matrix per operand for a plain GEMM). Part of the plan
/// key: the layouts are built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtProblem {
    /// Rows, reduction length, columns, transposes; `accumulate` says whether C is read
    /// (beta ≠ 0).
    pub shape: GemmShape,
    /// Row-major leading dimensions of `out`, `a`, `b`: elements between two stored rows.
    pub ld: [usize; 3],
    /// Number of products.
    pub batch: usize,
    /// Elements between consecutive matrices of `out`, `a`, `b`; all 0 when `batch` is 1 (so
    /// one problem has one key whatever strides the caller passed).
    pub stride: [usize; 3],
}

impl LtProblem {
    /// A plain GEMM: contiguous row-major operands (`ld` = stored row length), one matrix.
    pub fn dense(shape: GemmShape) -> Self {
        let GemmShape { k, n, .. } = shape;
        let a_cols = if shape.trans_a { shape.m } else { k };
        let b_cols = if shape.trans_b { k } else { n };
        Self {
            shape,
            ld: [n, a_cols, b_cols],
            batch: 1,
            stride: [0; 3],
        }
    }

    /// A strided-batched GEMM ([`StridedGemm`]; its element offsets go into the operand
    /// addresses, its alpha into the call; beta ≠ 0 is `accumulate`).
    pub fn strided(g: &StridedGemm) -> Self {
        let stride = if g.batch == 1 {
            [0; 3]
        } else {
            [g.out.stride, g.a.stride, g.b.stride]
        };
        Self {
            shape: GemmShape {
                m: g.m,
                k: g.k,
                n: g.n,
                trans_a: g.trans_a,
                trans_b: g.trans_b,
                accumulate: g.beta != 0.0,
            },
            ld: [g.out.ld, g.a.ld, g.b.ld],
            batch: g.batch,
            stride,
        }
    }

    /// Whether `out`'s matrices fill one contiguous range of `batch·m·n` elements (rows `n`
    /// apart, matrices `m·n` apart): then an empty product (k = 0) can zero it in one memset.
    pub fn out_is_contiguous(&self) -> bool {
        let GemmShape { m, n, .. } = self.shape;
        (self.ld[0] == n || m <= 1) && (self.batch <= 1 || self.stride[0] == m * n)
    }
}

impl From<GemmShape> for LtProblem {
    fn from(shape: GemmShape) -> Self {
        Self::dense(shape)
    }
}

/// What a GEMM with k = 0 does instead of reaching cuBLASLt (which rejects empty layouts):
/// `out = beta·out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyProduct {
    /// Nothing to do: no output elements, or beta = 1.
    Nothing,
    /// Zero this many contiguous output elements from `out`'s address (beta = 0).
    Zero(usize),
    /// Scaling by another beta, or zeroing non-contiguous matrices: not supported.
    Unsupported,
}

/// The [`EmptyProduct`] for `problem` with factor `beta` on the old output.
pub fn empty_product(problem: &LtProblem, beta: f32) -> EmptyProduct {
    let GemmShape { m, n, .. } = problem.shape;
    if m == 0 || n == 0 || problem.batch == 0 || beta == 1.0 {
        EmptyProduct::Nothing
    } else if beta == 0.0 && problem.out_is_contiguous() {
        EmptyProduct::Zero(problem.batch * m * n)
    } else {
        EmptyProduct::Unsupported
    }
}

/// A row-major [`LtProblem`] restated as the column-major problem cuBLASLt solves.
///
/// The row-major `out[m, n]` is, byte for byte, the column-major `outᵀ[n, m]` with leading
/// dimension n, and `outᵀ = op(b)ᵀ · op(a)ᵀ`. So cuBLASLt's A is our `b`, its B is our `a`, its
/// `(m, n, k)` is our `(n, m, k)`, and each operand keeps its own transpose flag: a row-major
/// `[r, c]` buffer is the column-major `[c, r]` matrix with `ld = c`, which is already the
/// transpose the swapped product needs when the operand is not transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ColumnMajorGemm {
    /// Rows of D (our n).
    pub m: u64,
    /// Columns of D (our m).
    pub n: u64,
    /// Reduction length.
    pub k: u64,
    /// Matrices per operand (the layouts' `BATCH_COUNT`).
    pub batch: u64,
    /// cuBLASLt's A (our `b`) is transposed.
    pub trans_a: bool,
    /// cuBLASLt's B (our `a`) is transposed.
    pub trans_b: bool,
    /// Layout of cuBLASLt's A: our `b`.
    pub a: LtLayout,
    /// Layout of cuBLASLt's B: our `a`.
    pub b: LtLayout,
    /// Layout of C and D: our `out`.
    pub c: LtLayout,
}

/// The column-major problem for a row-major `problem` (see [`ColumnMajorGemm`]; a
/// [`GemmShape`] is the dense problem). Each row-major leading dimension is the column-major
/// one of the transposed view, so it passes unchanged; leading dimensions are at least 1
/// (cuBLASLt rejects 0), which only matters for empty operands.
pub fn column_major(problem: impl Into<LtProblem>) -> ColumnMajorGemm {
    let p: LtProblem = problem.into();
    let shape = p.shape;
    let (m, k, n) = (shape.m as u64, shape.k as u64, shape.n as u64);
    let [ld_out, ld_a, ld_b] = p.ld.map(|x| x.max(1) as i64);
    let [stride_out, stride_a, stride_b] = p.stride.map(|x| x as i64);
    let layout = |rows: u64, cols: u64, ld: i64, batch_stride: i64| LtLayout {
        rows,
        cols,
        ld,
        batch_stride,
    };
    // Our b, stored row-major [k, n] (or [n, k] when transposed), read column-major: [n, k]
    // (or [k, n]), ld as stored.
    let a = if shape.trans_b {
        layout(k, n, ld_b, stride_b)
    } else {
        layout(n, k, ld_b, stride_b)
    };
    // Our a, stored row-major [m, k] (or [k, m]), read column-major: [k, m] (or [m, k]).
    let b = if shape.trans_a {
        layout(m, k, ld_a, stride_a)
    } else {
        layout(k, m, ld_a, stride_a)
    };
    ColumnMajorGemm {
        m: n,
        n: m,
        k,
        batch: p.batch as u64,
        trans_a: shape.trans_b,
        trans_b: shape.trans_a,
        a,
        b,
        c: layout(n, m, ld_out, stride_out),
    }
}

/// The largest power of two (at most 256, cuBLASLt's default assumption) dividing a device
/// address: what the preference's `MIN_ALIGNMENT_*_BYTES` may promise for it.
pub fn pointer_alignment(address: u64) -> u32 {
    if address == 0 {
        return 256;
    }
    1u32 << address.trailing_zeros().min(8)
}

/// What the preference may promise for an operand whose matrices start at `address`,
/// `address + stride_bytes`, …: the alignment every one of them has (the first pointer's when
/// the batch has one matrix).
pub fn operand_alignment(address: u64, stride_bytes: u64, batch: usize) -> u32 {
    if batch > 1 {
        pointer_alignment(address | stride_bytes)
    } else {
        pointer_alignment(address)
    }
}

/// Everything a cached plan depends on: one descriptor set, layouts and algorithm per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmKey {
    /// The row-major problem: shape, `accumulate` (the algorithm is chosen knowing whether C
    /// is read), leading dimensions, batch count and strides.
    pub problem: LtProblem,
    /// Element type of `a` and `b`.
    pub input: LtDtype,
    /// Element type of `out` (C and D).
    pub output: LtDtype,
    /// Accumulation mode.
    pub compute: LtCompute,
    /// [`operand_alignment`] of out, a, b, in bytes.
    pub alignment: [u32; 3],
}

/// A map from [`GemmKey`] to a plan, built on first use. Generic over the plan so the cache
/// logic is testable without cuBLASLt.
#[derive(Debug)]
pub struct PlanCache<P> {
    plans: HashMap<GemmKey, Arc<P>>,
}

impl<P> Default for PlanCache<P> {
    fn default() -> Self {
        Self {
            plans: HashMap::new(),
        }
    }
}

impl<P> PlanCache<P> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan for `key`, built with `make` if there is none; a failed build is not cached
    /// (the next call tries again).
    pub fn get_or_try_insert<E>(
        &mut self,
        key: GemmKey,
        make: impl FnOnce(&GemmKey) -> Result<P, E>,
    ) -> Result<Arc<P>, E> {
        if let Some(plan) = self.plans.get(&key) {
            return Ok(plan.clone());
        }
        let plan = Arc::new(make(&key)?);
        self.plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// Number of cached plans.
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    /// Whether no plan is cached.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

fn lt_error(what: &str, e: lt::CublasError) -> DeviceError {
    DeviceError::Driver(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets a layout's batch: `count` matrices, `stride` elements apart.
fn set_batch(
    layout: lt_sys::cublasLtMatrixLayout_t,
    count: i32,
    stride: i64,
) -> Result<(), DeviceError> {
    use lt_sys::cublasLtMatrixLayoutAttribute_t as Attr;
    // SAFETY: the layout is live; each buffer is the attribute's value with its documented
    // type (BATCH_COUNT int32_t, STRIDED_BATCH_OFFSET int64_t).
    unsafe {
        lt::set_matrix_layout_attribute(
            layout,
            Attr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
            &count as *const i32 as *const c_void,
            size_of::<i32>(),
        )
        .map_err(|e| lt_error("batch count", e))?;
        lt::set_matrix_layout_attribute(
            layout,
            Attr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
            &stride as *const i64 as *const c_void,
            size_of::<i64>(),
        )
        .map_err(|e| lt_error("batch stride", e))
    }
}

/// One cached cuBLASLt problem: descriptors, layouts and the chosen algorithm. Destroyed with
/// the cache (the device's lifetime).
struct LtPlan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the handles point to host-side descriptor objects that cuBLASLt only reads during a
// matmul; they are created and destroyed once, and `LtGemm` serialises every use behind its
// mutex.
unsafe impl Send for LtPlan {}
// SAFETY: as above (shared use only reads).
unsafe impl Sync for LtPlan {}

impl LtPlan {
    /// Builds the descriptors for `key` and asks the heuristic for the best algorithm that
    /// fits `workspace_bytes`. Objects created before a failure are destroyed by `Drop`.
    fn new(
        handle: lt_sys::cublasLtHandle_t,
        key: &GemmKey,
        workspace_bytes: usize,
    ) -> Result<Self, DeviceError> {
        let cm = column_major(key.problem);
        let mut plan = Self {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let layout = |dtype: LtDtype, l: LtLayout| {
            lt::create_matrix_layout(dtype.cuda(), l.rows, l.cols, l.ld)
                .map_err(|e| lt_error("matrix layout", e))
        };
        plan.a = layout(key.input, cm.a)?;
        plan.b = layout(key.input, cm.b)?;
        plan.c = layout(key.output, cm.c)?;
        if cm.batch > 1 {
            let count = i32::try_from(cm.batch).map_err(|_| {
                DeviceError::Shape(format!("batched gemm: {} matrices exceed i32", cm.batch))
            })?;
            for (layout, l) in [(plan.a, cm.a), (plan.b, cm.b), (plan.c, cm.c)] {
                set_batch(layout, count, l.batch_stride)?;
            }
        }
        // Scales (alpha, beta) are f32 host values for every variant here.
        plan.desc = lt::create_matmul_desc(key.compute.cuda(), lt_sys::cudaDataType_t::CUDA_R_32F)
            .map_err(|e| lt_error("matmul descriptor", e))?;
        for (attr, trans) in [
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                cm.trans_a,
            ),
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                cm.trans_b,
            ),
        ] {
            // The attribute is a cublasOperation_t (a 32-bit enum): 0 = N, 1 = T.
            let op: i32 = if trans {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32
            };
            // SAFETY: the descriptor is live; the buffer is the attribute's 4-byte value.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &op as *const i32 as *const c_void,
                    size_of::<i32>(),
                )
            }
            .map_err(|e| lt_error("transpose attribute", e))?;
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_error("preference", e))?;
        let chosen = Self::choose(handle, &plan, pref, key, workspace_bytes);
        // SAFETY: created above and not used after this point.
        unsafe { lt::destroy_matmul_pref(pref) }.map_err(|e| lt_error("preference", e))?;
        plan.algo = chosen?;
        Ok(plan)
    }

    fn choose(
        handle: lt_sys::cublasLtHandle_t,
        plan: &LtPlan,
        pref: lt_sys::cublasLtMatmulPreference_t,
        key: &GemmKey,
        workspace_bytes: usize,
    ) -> Result<lt_sys::cublasLtMatmulAlgo_t, DeviceError> {
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let workspace = workspace_bytes as u64;
        // SAFETY: the preference is live; the buffer is the attribute's 8-byte value.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                size_of::<u64>(),
            )
        }
        .map_err(|e| lt_error("workspace preference", e))?;
        let [out_align, a_align, b_align] = key.alignment;
        // cuBLASLt's A is our b, its B our a; C and D are our out.
        for (attr, align) in [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, b_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, out_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, out_align),
        ] {
            // SAFETY: the preference is live; the buffer is the attribute's uint32 value.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &align as *const u32 as *const c_void,
                    size_of::<u32>(),
                )
            }
            .map_err(|e| lt_error("alignment preference", e))?;
        }
        // SAFETY: every descriptor is live and describes this problem; D has C's layout.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
        }
        .map_err(|e| lt_error("no algorithm for this GEMM (heuristic)", e))?;
        Ok(heuristic.algo)
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // Errors on destroy cannot be reported from Drop; the objects are gone either way.
        // SAFETY: each handle was created by this plan and is destroyed once; null ones
        // (a failed build) are skipped.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// Operands of one GEMM: device addresses (start of each operand's first matrix) and element
/// types.
#[derive(Debug, Clone, Copy)]
pub struct LtOperands {
    /// `out` (C and D).
    pub out: u64,
    /// `a`.
    pub a: u64,
    /// `b`.
    pub b: u64,
    /// Element type of `a` and `b`.
    pub input: LtDtype,
    /// Element type of `out`.
    pub output: LtDtype,
}

/// A cuBLASLt handle, its workspace (allocated once) and the plan cache.
pub struct LtGemm {
    handle: lt_sys::cublasLtHandle_t,
    workspace: u64,
    workspace_bytes: usize,
    plans: Mutex<PlanCache<LtPlan>>,
}

// SAFETY: the handle is used only behind the plan mutex (one caller at a time); the workspace
// is a device address owned by the caller for the handle's lifetime.
unsafe impl Send for LtGemm {}
// SAFETY: as above.
unsafe impl Sync for LtGemm {}

impl LtGemm {
    /// A handle using the `workspace_bytes` of device memory at `workspace`, which must stay
    /// allocated as long as this value lives. Errors when cuBLASLt is missing or fails.
    pub fn new(workspace: u64, workspace_bytes: usize) -> Result<Self, DeviceError> {
        // SAFETY: a library presence check (dlopen), no cuBLASLt call.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(DeviceError::Driver(
                "cuBLASLt (libcublasLt.so.13) not found".to_string(),
            ));
        }
        let handle = lt::create_handle().map_err(|e| lt_error("handle", e))?;
        Ok(Self {
            handle,
            workspace,
            workspace_bytes,
            plans: Mutex::new(PlanCache::new()),
        })
    }

    /// The workspace size cuBLASLt recommends per architecture (and cudarc allocates): 32 MiB
    /// on compute capability ≥ 9 (Hopper), 4 MiB before.
    pub fn workspace_bytes_for(compute_major: i32) -> usize {
        if compute_major >= 9 {
            32 << 20
        } else {
            4 << 20
        }
    }

    /// Number of cached plans.
    pub fn cached_plans(&self) -> usize {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Enqueues `out_i = alpha·op(a_i)·op(b_i) + beta·out_i` for every matrix `i` of
    /// `problem` on `stream` (`beta` must be 0 unless `problem.shape.accumulate`; C is not read
    /// when it is 0). The caller has checked that the operands hold every element the problem
    /// addresses, that `out` overlaps neither input, and that `m`, `n`, `k` and the batch are
    /// all non-zero; the addresses are those of each operand's first matrix.
    ///
    /// # Safety
    /// The addresses are device memory of the context `stream` belongs to (the one current on
    /// this thread), valid until the GEMM has run.
    pub unsafe fn matmul(
        &self,
        stream: lt_sys::cudaStream_t,
        problem: LtProblem,
        ops: LtOperands,
        compute: LtCompute,
        (alpha, beta): (f32, f32),
    ) -> Result<(), DeviceError> {
        debug_assert!(problem.shape.accumulate || beta == 0.0);
        let stride_bytes = |i: usize, dtype: LtDtype| (problem.stride[i] * dtype.bytes()) as u64;
        let key = GemmKey {
            problem,
            input: ops.input,
            output: ops.output,
            compute,
            alignment: [
                operand_alignment(ops.out, stride_bytes(0, ops.output), problem.batch),
                operand_alignment(ops.a, stride_bytes(1, ops.input), problem.batch),
                operand_alignment(ops.b, stride_bytes(2, ops.input), problem.batch),
            ],
        };
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan =
            plans.get_or_try_insert(key, |k| LtPlan::new(self.handle, k, self.workspace_bytes))?;
        // cuBLASLt's A is our b and its B our a (see ColumnMajorGemm); C = D = out.
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            ops.b as *const c_void,
            plan.a,
            ops.a as *const c_void,
            plan.b,
            ops.out as *const c_void,
            plan.c,
            ops.out as *mut c_void,
            plan.c,
            &plan.algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream,
        )
        .map_err(|e| lt_error("matmul", e))
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // Plans first: their descriptors belong to no handle, but keep the order simple.
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plans
            .clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
