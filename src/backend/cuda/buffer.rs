//! The CUDA backend's buffer: a pooled device allocation, the element count in use, and the
//! way back to the pool. Element type f32 for now (bf16 activations come with the bf16
//! kernels' wiring).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use super::pool::MemoryPool;
use crate::emu::{ArgInfo, DeviceApi, DeviceElement, KernelArg};

/// `len` f32s at the start of a pooled device allocation (its capacity is a size class, see
/// [`super::pool::size_class`]). Dropping the buffer returns the allocation to the pool.
pub struct CudaBuf<D: DeviceApi> {
    block: Option<D::Buffer<f32>>,
    len: usize,
    pool: Arc<MemoryPool<D>>,
}

impl<D: DeviceApi> CudaBuf<D> {
    pub(super) fn new(block: D::Buffer<f32>, len: usize, pool: Arc<MemoryPool<D>>) -> Self {
        Self {
            block: Some(block),
            len,
            pool,
        }
    }

    /// Elements in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device allocation (capacity ≥ `len`).
    pub(super) fn block(&self) -> &D::Buffer<f32> {
        self.block.as_ref().expect("block present until drop")
    }

    pub(super) fn block_mut(&mut self) -> &mut D::Buffer<f32> {
        self.block.as_mut().expect("block present until drop")
    }
}

impl<D: DeviceApi> Drop for CudaBuf<D> {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            self.pool.give_back(block);
        }
    }
}

impl<D: DeviceApi> std::fmt::Debug for CudaBuf<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the buffer owns its allocation; moving it moves that ownership (the device
// buffer type is Send, a bound of the backend).
unsafe impl<D: DeviceApi> Send for CudaBuf<D> where D::Buffer<f32>: Send {}
// SAFETY: through `&CudaBuf` nothing can write the allocation: it is private to the backend
// module (no KernelArg impl hands it to an arbitrary launch), and every backend op that
// writes a buffer takes it as `&mut`. Two threads sharing `&CudaBuf` can only read it.
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
