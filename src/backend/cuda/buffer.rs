//! The CUDA backend's buffer: a view (offset, length) into a device allocation, and the way
//! back to the pool. Most buffers are the only view of a pooled allocation; parameters,
//! gradients and optimizer moments are many views of one arena allocation
//! ([`super::arena`]). Element type f32; an uploaded arena may also carry a bf16 working copy
//! of its views for the bf16 GEMMs ([`super::shadow`]), and each view records whether its part
//! of that copy is current.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use half::bf16;

use super::pool::MemoryPool;
use super::shadow::Bf16Shadow;
use crate::emu::{
    ArgInfo, BufferAt, DeviceApi, DeviceBuffer, DeviceElement, KernelArg, ViewArg, ViewBoundsError,
};

/// How an allocation goes back when its last view drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// A size-class block: cached in the pool for reuse.
    Pooled,
    /// An exact-size arena: freed to the device.
    Arena,
}

/// One device allocation, shared by the views carved from it.
pub(super) struct Allocation<D: DeviceApi> {
    block: Option<D::Buffer<f32>>,
    pool: Arc<MemoryPool<D>>,
    release: Release,
    /// The bf16 working copy, for arenas that may hold weights (uploaded under
    /// [`super::Precision::Bf16Gemm`]); `None` for everything else.
    shadow: Option<Bf16Shadow<D>>,
}

impl<D: DeviceApi> Allocation<D> {
    pub(super) fn new(block: D::Buffer<f32>, pool: Arc<MemoryPool<D>>, release: Release) -> Self {
        Self {
            block: Some(block),
            pool,
            release,
            shadow: None,
        }
    }

    /// Gives the allocation a bf16 working copy of the same length (allocated on first use).
    pub(super) fn with_shadow(mut self) -> Self {
        let len = self.buffer().len();
        self.shadow = Some(Bf16Shadow::new(len));
        self
    }

    /// The device buffer.
    pub(super) fn buffer(&self) -> &D::Buffer<f32> {
        self.block.as_ref().expect("block present until drop")
    }

    fn buffer_mut(&mut self) -> &mut D::Buffer<f32> {
        self.block.as_mut().expect("block present until drop")
    }
}

impl<D: DeviceApi> Drop for Allocation<D> {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            match self.release {
                Release::Pooled => self.pool.give_back(block),
                Release::Arena => self.pool.release_arena(block),
            }
        }
    }
}

/// `len` f32s from element `offset` of a device allocation (a pooled size-class block, or an
/// arena shared with other views). Views of one allocation never overlap; the allocation is
/// released when its last view drops.
pub struct CudaBuf<D: DeviceApi> {
    alloc: Arc<Allocation<D>>,
    offset: usize,
    len: usize,
    /// The device pointer to element `offset`, which kernels receive.
    arg: ViewArg<f32>,
    /// Whether the allocation's bf16 shadow holds `bf16(x)` for every element of this view.
    /// Set by a cast into the shadow or by the fused AdamW; cleared by every backend op that
    /// may write a weight (they hold `&mut`). Atomic because a GEMM refreshes a stale shadow
    /// through `&self` (under the shadow's lock).
    shadow_fresh: AtomicBool,
}

impl<D: DeviceApi> CudaBuf<D> {
    /// The whole-buffer view of a fresh pooled block (capacity ≥ `len`).
    pub(super) fn new(block: D::Buffer<f32>, len: usize, pool: Arc<MemoryPool<D>>) -> Self {
        let alloc = Arc::new(Allocation::new(block, pool, Release::Pooled));
        Self::view(alloc, 0, len).expect("a pooled block holds its request")
    }

    /// The view `[offset, offset + len)` of `alloc`. The caller hands out disjoint views only.
    pub(super) fn view(
        alloc: Arc<Allocation<D>>,
        offset: usize,
        len: usize,
    ) -> Result<Self, ViewBoundsError> {
        let block = alloc.buffer();
        let arg = ViewArg::new(block.device_address(), block.len(), offset, len)?;
        Ok(Self {
            alloc,
            offset,
            len,
            arg,
            shadow_fresh: AtomicBool::new(false),
        })
    }

    /// Elements in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// First element of the view in its allocation.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Device address of the allocation the view lies in: views with the same address share
    /// one allocation (an arena).
    pub fn allocation_address(&self) -> usize {
        self.alloc.buffer().device_address()
    }

    /// The kernel argument: a device pointer to the view's first element.
    pub(super) fn block(&self) -> &ViewArg<f32> {
        &self.arg
    }

    /// The view's start, for device copies, memsets and GEMMs.
    pub(super) fn at(&self) -> BufferAt<'_, D::Buffer<f32>> {
        BufferAt::new(self.alloc.buffer(), self.offset)
    }

    /// The whole allocation (capacity ≥ `offset + len`).
    pub(super) fn allocation(&self) -> &D::Buffer<f32> {
        self.alloc.buffer()
    }

    /// The allocation, writable, when this is its only view and starts at its beginning
    /// (a pooled block): whole-allocation host writes and reads may then stand for the view.
    pub(super) fn sole_allocation_mut(&mut self) -> Option<&mut D::Buffer<f32>> {
        if self.offset != 0 {
            return None;
        }
        Arc::get_mut(&mut self.alloc).map(Allocation::buffer_mut)
    }

    /// Whether this is the only view of its allocation, starting at its beginning.
    pub(super) fn is_sole_view(&self) -> bool {
        self.offset == 0 && Arc::strong_count(&self.alloc) == 1
    }

    /// The bf16 shadow of the allocation, if it has one (whether or not this view's part of
    /// it is current).
    pub(super) fn shadow(&self) -> Option<&Bf16Shadow<D>> {
        self.alloc.shadow.as_ref()
    }

    /// The kernel argument for this view's part of `shadow` (the allocation's shadow buffer).
    pub(super) fn shadow_arg(&self, shadow: &D::Buffer<bf16>) -> ViewArg<bf16> {
        ViewArg::new(shadow.device_address(), shadow.len(), self.offset, self.len)
            .expect("the shadow has the arena's length")
    }

    /// Whether this view's part of the shadow equals `bf16(view)`.
    pub(super) fn shadow_is_fresh(&self) -> bool {
        self.shadow_fresh.load(Ordering::Acquire)
    }

    /// Records that this view's part of the shadow was just written from the view.
    pub(super) fn mark_shadow_fresh(&self) {
        self.shadow_fresh.store(true, Ordering::Release);
    }

    /// Records a write to the view: its shadow (if any) no longer matches. Every backend op
    /// that may write a weight calls this (docs/cuda-backend.md, "bf16 working copies").
    pub(super) fn invalidate_shadow(&mut self) {
        *self.shadow_fresh.get_mut() = false;
    }
}

impl<D: DeviceApi> std::fmt::Debug for CudaBuf<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuf")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the buffer owns a share of its allocation; moving it moves that share. The last
// view to drop releases the allocation on its thread, which needs the device buffer type to be
// Send (a bound of the backend). Views of one allocation are disjoint ranges, so moving one to
// another thread gives that thread no access to the others' elements.
unsafe impl<D: DeviceApi> Send for CudaBuf<D> where D::Buffer<f32>: Send {}
// SAFETY: through `&CudaBuf` nothing can write the view: the kernel argument is private to the
// backend module, and every backend op that writes a buffer takes it as `&mut`. Two threads
// sharing `&CudaBuf` can only read it; the allocation's bookkeeping (the Arc count) is atomic.
unsafe impl<D: DeviceApi> Sync for CudaBuf<D> where D::Buffer<f32>: Send {}

/// A null device pointer to `T`, for the kernels' optional arguments (`h0`, `state_in`, …).
pub struct NullArg<T>(*mut T, PhantomData<T>);

impl<T> NullArg<T> {
    /// The null pointer.
    pub fn new() -> Self {
        Self(std::ptr::null_mut(), PhantomData)
    }
}

impl<T> Default for NullArg<T> {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: the parameter is a pointer-sized null value; the kernels test optional pointers
// before any access.
unsafe impl<T: DeviceElement> KernelArg for NullArg<T> {
    fn param_ptr(&self) -> *mut c_void {
        &self.0 as *const *mut T as *mut c_void
    }
    fn arg_info(&self) -> ArgInfo {
        ArgInfo::pointer_to::<T>()
    }
}
