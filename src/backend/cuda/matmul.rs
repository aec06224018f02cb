//! The backend's `matmul` op and its precision: f32 GEMMs, or bf16 inputs with f32
//! accumulation and f32 output ([`Precision::Bf16Gemm`], design.md §3: "bf16 storage where
//! safe, f32 accumulation").
//!
//! Under `Bf16Gemm` each operand reaches [`DeviceApi::gemm_bf16`] in bf16 one of two ways:
//! - a weight (a view of an uploaded arena, [`super::shadow`]) is read from its bf16 working
//!   copy, which AdamW rewrites with the f32 master in one pass; it is cast only when stale
//!   (first read after an upload, or after another op wrote it), into the shadow, once;
//! - anything else (activations, gradients: pooled blocks and `zeros_many` arenas) is cast on
//!   the device (`cast_f32_to_bf16`, kernels/cast.cu: round to nearest even) into one of two
//!   scratch buffers that the backend keeps and grows to the largest operand seen. Activations
//!   stay f32 in memory; the cast costs one f32 read and one bf16 write per element per call
//!   (docs/perf.md §8.2).
//!
//! MEGABYTE's device attention takes bf16 operands at this precision too
//! ([`DeviceApi::gemm_strided_batched_bf16`], src/backend/cuda/attention.rs), cast per call.
//! Everything else stays f32: the GEMM outputs (so bias adds, residuals and gradient
//! accumulation into `out` are f32), `add_bias` and `bias_backward` (rank-1 GEMMs with a ones
//! vector, exact in f32), norms, CEMA, TimestepNorm, RoPE, softmax, the loss, and the
//! optimizer's master weights and moments.

use std::sync::{Mutex, MutexGuard};

use half::bf16;

use super::buffer::CudaBuf;
use super::pool::size_class;
use super::shadow::Bf16OperandStats;
use super::{fail, CudaBackend};
use crate::cuda::launch as launch_shapes;
use crate::emu::hazards::STREAMS;
use crate::emu::{BufferAt, DeviceApi, DeviceBuffer, GemmShape, KernelArg};

/// What the backend's matmuls compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 inputs, f32 arithmetic: matches the CPU backend to f32 rounding.
    #[default]
    F32,
    /// bf16 inputs (rounded to nearest even from the f32 operands), f32 products and sums,
    /// f32 output: the tensor-core path, about 15× the f32 FLOP rate on an H100.
    Bf16Gemm,
}

/// The `a` and `b` bf16 cast buffers of one stream (allocated on first use).
type OperandPair<D> = [Option<<D as DeviceApi>::Buffer<bf16>>; 2];

/// The two bf16 operand buffers of [`Precision::Bf16Gemm`] per stream, reused across calls,
/// and the operand accounting. The operands' lock is held from the casts to the GEMM's
/// launch; on a GPU the next call's casts are ordered after that GEMM by the stream, which is
/// why each stream has its own pair.
pub(super) struct Bf16Scratch<D: DeviceApi> {
    operands: Mutex<[OperandPair<D>; STREAMS]>,
    stats: Mutex<Bf16OperandStats>,
}

impl<D: DeviceApi> Default for Bf16Scratch<D> {
    fn default() -> Self {
        Self {
            operands: Mutex::new(std::array::from_fn(|_| [None, None])),
            stats: Mutex::new(Bf16OperandStats::default()),
        }
    }
}

impl<D: DeviceApi> Bf16Scratch<D> {
    pub(super) fn stats(&self) -> MutexGuard<'_, Bf16OperandStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// A backend on `device` whose matmuls run at `precision` (every other op is f32 either
    /// way); [`CudaBackend::new`] is `Precision::F32`.
    pub fn with_precision(device: D, precision: Precision) -> Self {
        let mut backend = Self::new(device);
        backend.precision = precision;
        backend
    }

    /// The matmul precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The `matmul` op: a device GEMM at the backend's precision.
    pub(super) fn matmul_at_precision(
        &self,
        out: &mut CudaBuf<D>,
        a: &CudaBuf<D>,
        b: &CudaBuf<D>,
        shape: GemmShape,
    ) {
        match self.precision {
            Precision::F32 => self.gemm(out, a, b, shape),
            Precision::Bf16Gemm => self.gemm_bf16(out, a, b, shape),
        }
    }

    fn gemm_bf16(&self, out: &mut CudaBuf<D>, a: &CudaBuf<D>, b: &CudaBuf<D>, shape: GemmShape) {
        let GemmShape { m, k, n, .. } = shape;
        out.invalidate_shadow();
        assert!(
            out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
            "matmul {m}x{k}x{n}: buffers of {}, {}, {}",
            out.len(),
            a.len(),
            b.len()
        );
        let mut operands = self
            .bf16_scratch
            .operands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let [a16, b16] = &mut operands[self.device.stream().index()];
        let a16 = self.bf16_operand(a, m * k, a16);
        let b16 = self.bf16_operand(b, k * n, b16);
        self.device
            .gemm_bf16(out.at(), a16, b16, shape)
            .unwrap_or_else(|e| fail("gemm_bf16", e));
    }

    /// The first `len` elements of `src` in bf16: its shadow when it has one (a weight),
    /// else a cast into `slot`.
    fn bf16_operand<'s>(
        &self,
        src: &'s CudaBuf<D>,
        len: usize,
        slot: &'s mut Option<D::Buffer<bf16>>,
    ) -> BufferAt<'s, D::Buffer<bf16>> {
        match self.shadow_operand(src) {
            Some(shadow) => shadow,
            None => BufferAt::new(self.cast_to_scratch(src, len, slot), 0),
        }
    }

    /// Casts the first `len` elements of `src` into `slot` (grown to a pool size class when
    /// too small) and returns it.
    fn cast_to_scratch<'s>(
        &self,
        src: &CudaBuf<D>,
        len: usize,
        slot: &'s mut Option<D::Buffer<bf16>>,
    ) -> &'s D::Buffer<bf16> {
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            // Drop the old buffer first, so the device holds one of them at a time.
            *slot = None;
            *slot = Some(
                self.device
                    .alloc_zeros::<bf16>(size_class(len))
                    .unwrap_or_else(|e| fail("bf16 scratch allocation", e)),
            );
        }
        let dst = slot.as_ref().expect("allocated above");
        self.cast_to_bf16_counted(dst, src, len, false);
        dst
    }

    /// `dst[..len] = bf16(src[..len])` (`cast_f32_to_bf16`), counted in
    /// [`Bf16OperandStats`] under `src`'s allocation; `refresh` when `dst` is `src`'s shadow.
    pub(super) fn cast_to_bf16_counted(
        &self,
        dst: &dyn KernelArg,
        src: &CudaBuf<D>,
        len: usize,
        refresh: bool,
    ) {
        let n = len as i64;
        self.run(
            "cast_f32_to_bf16",
            launch_shapes::elementwise(len),
            &[dst, src.block(), &n],
        );
        let mut stats = self.bf16_scratch.stats();
        *stats
            .casts_by_allocation
            .entry(src.allocation_address())
            .or_default() += 1;
        stats.cast_elements += len as u64;
        stats.shadow_refreshes += u64::from(refresh);
    }
}
