//! bf16 working copies of the weights under [`super::Precision::Bf16Gemm`] (the mixed-precision
//! scheme of llm.c and Megatron: f32 master weights in the optimizer, a bf16 copy that the
//! GEMMs read, rewritten by the optimizer step).
//!
//! Design (docs/cuda-backend.md, "bf16 working copies"):
//! - **Which allocations.** An arena made by [`crate::backend::Backend::upload_many`] in
//!   `Bf16Gemm` mode carries a [`Bf16Shadow`]: a bf16 buffer with the arena's length, so each
//!   view's copy lies at the view's own offset (the same layout). Parameters are uploaded
//!   (`ParamLayout::upload`: at start, from a checkpoint); gradients and fresh moments come
//!   from `zeros_many` and never get one. Moments uploaded on resume are eligible but are never
//!   a GEMM operand, so their shadow is never allocated: the buffer is allocated at the first
//!   GEMM that reads one of the arena's views.
//! - **Freshness.** Each view ([`super::CudaBuf`]) holds a flag: its part of the shadow equals
//!   `bf16(view)`. A GEMM reading a view with a fresh shadow uses it directly; a stale one is
//!   cast into the shadow first (once, not per call) and marked fresh. The fused AdamW
//!   (`adamw_step_f32_bf16_copy`) writes the f32 master and its bf16 copy in one pass and
//!   marks the view fresh. Every other backend op that may write a weight — copies, memsets,
//!   the elementwise ops, `scatter_rows`, host writes, a GEMM or bias op writing into it —
//!   clears the flag (they take the view as `&mut`). Kernel ops whose outputs are activations
//!   or gradients do not: models hold their weights as `&[Buf]`, so no such op can receive a
//!   weight as its output.
//! - **Rounding.** Round to nearest even (`__float2bfloat16`, bit-exact with
//!   `half::bf16::from_f32`), the cast kernel's rounding, so a shadow equals what the per-call
//!   cast would give and a refresh and an AdamW write agree bit for bit.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use half::bf16;

use super::buffer::CudaBuf;
use super::{fail, CudaBackend};
use crate::emu::{BufferAt, DeviceApi};

/// The bf16 copy of an arena, allocated when a GEMM first reads one of its views.
pub struct Bf16Shadow<D: DeviceApi> {
    buffer: OnceLock<D::Buffer<bf16>>,
    len: usize,
    /// Held while a view's part is cast, so two threads reading the same stale weight cast it
    /// once (the second finds it fresh).
    refresh: Mutex<()>,
}

impl<D: DeviceApi> Bf16Shadow<D> {
    /// A shadow of `len` elements, not allocated yet.
    pub(super) fn new(len: usize) -> Self {
        Self {
            buffer: OnceLock::new(),
            len,
            refresh: Mutex::new(()),
        }
    }

    /// The buffer, if a GEMM has read the arena.
    pub(super) fn allocated(&self) -> Option<&D::Buffer<bf16>> {
        self.buffer.get()
    }

    fn get_or_allocate(&self, device: &D) -> &D::Buffer<bf16> {
        self.buffer.get_or_init(|| {
            device
                .alloc_zeros::<bf16>(self.len)
                .unwrap_or_else(|e| fail("bf16 shadow allocation", e))
        })
    }
}

/// What the bf16 GEMM path did with its operands since the backend was made (or last reset):
/// the evidence that weights are not cast per GEMM call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bf16OperandStats {
    /// `cast_f32_to_bf16` launches feeding a GEMM, per device address of the source's
    /// allocation ([`CudaBuf::allocation_address`]): casts into the scratch (operands without
    /// a shadow: activations, gradients) and refreshes of stale shadows.
    pub casts_by_allocation: BTreeMap<usize, u64>,
    /// Elements those launches cast.
    pub cast_elements: u64,
    /// Of those launches, refreshes of a shadow (the first GEMM read of a weight after an
    /// upload, or after a write other than AdamW's).
    pub shadow_refreshes: u64,
    /// GEMM operands read from a fresh shadow, with no cast.
    pub shadow_reads: u64,
    /// Elements of those operands.
    pub shadow_read_elements: u64,
    /// AdamW steps that wrote a view's shadow in the same pass as its f32 master.
    pub fused_adamw_steps: u64,
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// The bf16 GEMM path's operand accounting ([`Bf16OperandStats`]).
    pub fn bf16_operand_stats(&self) -> Bf16OperandStats {
        self.bf16_scratch.stats().clone()
    }

    /// Clears [`CudaBackend::bf16_operand_stats`].
    pub fn reset_bf16_operand_stats(&self) {
        *self.bf16_scratch.stats() = Bf16OperandStats::default();
    }

    /// The bf16 working copy of `buf` when it has a current one (a weight under
    /// `Precision::Bf16Gemm` that a GEMM has read or AdamW has updated, not written since);
    /// `None` otherwise. For tests and debugging: one device copy and one download.
    pub fn bf16_working_copy(&self, buf: &CudaBuf<D>) -> Option<Vec<bf16>> {
        let shadow = buf.shadow()?.allocated()?;
        if !buf.shadow_is_fresh() {
            return None;
        }
        if buf.is_empty() {
            return Some(Vec::new());
        }
        let staging = self
            .device
            .alloc_zeros::<bf16>(buf.len())
            .unwrap_or_else(|e| fail("bf16 staging allocation", e));
        self.device
            .copy_dtod(
                BufferAt::new(&staging, 0),
                BufferAt::new(shadow, buf.offset()),
                buf.len(),
            )
            .unwrap_or_else(|e| fail("bf16 working copy", e));
        Some(
            self.device
                .download(&staging)
                .unwrap_or_else(|e| fail("bf16 working copy download", e)),
        )
    }

    /// `src`'s bf16 copy as a GEMM operand when its allocation has a shadow: cast into the
    /// shadow first if stale. `None` when there is no shadow (the caller casts into scratch).
    pub(super) fn shadow_operand<'b>(
        &self,
        src: &'b CudaBuf<D>,
    ) -> Option<BufferAt<'b, D::Buffer<bf16>>> {
        let shadow = src.shadow()?;
        let buffer = shadow.get_or_allocate(&self.device);
        if !src.shadow_is_fresh() {
            let _casting = shadow.refresh.lock().unwrap_or_else(|e| e.into_inner());
            if !src.shadow_is_fresh() {
                self.cast_to_bf16_counted(&src.shadow_arg(buffer), src, src.len(), true);
                src.mark_shadow_fresh();
            }
        }
        let mut stats = self.bf16_scratch.stats();
        stats.shadow_reads += 1;
        stats.shadow_read_elements += src.len() as u64;
        Some(BufferAt::new(buffer, src.offset()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::{DeviceBuffer, EmulatedDevice};

    #[test]
    fn a_shadow_is_allocated_once_at_the_arena_length() {
        let dev = EmulatedDevice::new();
        let shadow = Bf16Shadow::<EmulatedDevice>::new(300);
        assert!(shadow.allocated().is_none());
        let first = shadow.get_or_allocate(&dev).device_address();
        assert_eq!(shadow.allocated().map(|b| b.len()), Some(300));
        assert_eq!(shadow.get_or_allocate(&dev).device_address(), first);
    }
}
