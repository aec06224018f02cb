//! Cached device scratch of the element types the f32 [`super::pool::MemoryPool`] does not
//! hold: `u32` index arrays (gathers, scatters, cross-entropy targets), `f64` reduction
//! partials and totals (`sum`, `sum_squares`), `bf16` cast copies (the bf16 attention GEMMs).
//! Each op used to allocate these per call; a device allocation is slow and synchronising on
//! a GPU, and global-norm clipping alone sums every parameter tensor once per step.
//!
//! Buffers are kept in free lists per capacity (a [`size_class`], or an exact length for
//! buffers that are downloaded whole) and handed out as [`Scratch`] guards that give them
//! back when dropped. Giving a buffer back right after its launch was enqueued is safe on one
//! stream: the next user's write (an upload or a kernel) is ordered after that launch, as for
//! the pooled f32 blocks; with two streams the lists follow the backend's forks and joins
//! ([`FreeLists`]).

use std::ffi::c_void;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use half::bf16;

use super::free_lists::{FreeLists, StreamGate};
use super::pool::size_class;
use crate::emu::{ArgInfo, DeviceApi, DeviceBuffer, DeviceElement, DeviceError, KernelArg};

/// An element type the scratch pool keeps buffers of.
pub trait ScratchElement: DeviceElement + Default + Copy {
    /// The pool's free lists for this type.
    fn lists<D: DeviceApi>(pool: &ScratchPool<D>) -> &FreeLists<D::Buffer<Self>>;
}

impl ScratchElement for u32 {
    fn lists<D: DeviceApi>(pool: &ScratchPool<D>) -> &FreeLists<D::Buffer<Self>> {
        &pool.u32s
    }
}

impl ScratchElement for f64 {
    fn lists<D: DeviceApi>(pool: &ScratchPool<D>) -> &FreeLists<D::Buffer<Self>> {
        &pool.f64s
    }
}

impl ScratchElement for bf16 {
    fn lists<D: DeviceApi>(pool: &ScratchPool<D>) -> &FreeLists<D::Buffer<Self>> {
        &pool.bf16s
    }
}

/// How the scratch pool has served requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScratchStats {
    /// Requests that allocated a new device buffer.
    pub allocations: u64,
    /// Requests served by a cached buffer.
    pub reuses: u64,
}

/// Free lists of `u32`, `f64` and `bf16` device buffers, plus counters.
pub struct ScratchPool<D: DeviceApi> {
    u32s: FreeLists<D::Buffer<u32>>,
    f64s: FreeLists<D::Buffer<f64>>,
    bf16s: FreeLists<D::Buffer<bf16>>,
    gate: Arc<StreamGate>,
    allocations: AtomicU64,
    reuses: AtomicU64,
}

impl<D: DeviceApi> Default for ScratchPool<D> {
    fn default() -> Self {
        Self::with_gate(Arc::new(StreamGate::new()))
    }
}

impl<D: DeviceApi> ScratchPool<D> {
    /// An empty pool, on a device whose work stays on the main stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty pool whose reuse follows `gate`'s forks and joins.
    pub fn with_gate(gate: Arc<StreamGate>) -> Self {
        Self {
            u32s: FreeLists::default(),
            f64s: FreeLists::default(),
            bf16s: FreeLists::default(),
            gate,
            allocations: AtomicU64::new(0),
            reuses: AtomicU64::new(0),
        }
    }

    /// At a join: buffers freed during the fork become ready for either stream.
    pub fn release_held(&self) {
        self.u32s.release_held();
        self.f64s.release_held();
        self.bf16s.release_held();
    }

    /// A buffer of at least `len` elements (its capacity is [`size_class`]`(len)`), contents
    /// unspecified.
    pub fn take<T: ScratchElement>(
        &self,
        device: &D,
        len: usize,
    ) -> Result<Scratch<'_, D, T>, DeviceError> {
        self.take_capacity(device, size_class(len))
    }

    /// A buffer of exactly `len` elements (at least one), contents unspecified: for buffers
    /// downloaded whole, where a size class would move the slack over PCIe too.
    pub fn take_exact<T: ScratchElement>(
        &self,
        device: &D,
        len: usize,
    ) -> Result<Scratch<'_, D, T>, DeviceError> {
        self.take_capacity(device, len.max(1))
    }

    /// A buffer holding `host` in its first elements, the rest of its size class zeroed
    /// (device writes cover whole buffers).
    pub fn upload<T: ScratchElement>(
        &self,
        device: &D,
        host: &[T],
    ) -> Result<Scratch<'_, D, T>, DeviceError> {
        let mut scratch = self.take::<T>(device, host.len())?;
        let capacity = scratch.len();
        let mut padded = Vec::with_capacity(capacity);
        padded.extend_from_slice(host);
        padded.resize(capacity, T::default());
        device.write(&padded, &mut *scratch)?;
        Ok(scratch)
    }

    fn take_capacity<T: ScratchElement>(
        &self,
        device: &D,
        capacity: usize,
    ) -> Result<Scratch<'_, D, T>, DeviceError> {
        let cached = T::lists(self).pop(&self.gate, capacity);
        let buffer = match cached {
            Some(buffer) => {
                self.reuses.fetch_add(1, Ordering::Relaxed);
                buffer
            }
            None => {
                let buffer = device.alloc_zeros::<T>(capacity)?;
                self.allocations.fetch_add(1, Ordering::Relaxed);
                buffer
            }
        };
        Ok(Scratch {
            buffer: Some(buffer),
            pool: self,
        })
    }

    /// The counters.
    pub fn stats(&self) -> ScratchStats {
        ScratchStats {
            allocations: self.allocations.load(Ordering::Relaxed),
            reuses: self.reuses.load(Ordering::Relaxed),
        }
    }
}

/// A scratch buffer on loan from a [`ScratchPool`]; back to its free list when dropped. Passes
/// to kernels as the buffer itself.
pub struct Scratch<'a, D: DeviceApi, T: ScratchElement> {
    buffer: Option<D::Buffer<T>>,
    pool: &'a ScratchPool<D>,
}

impl<D: DeviceApi, T: ScratchElement> Deref for Scratch<'_, D, T> {
    type Target = D::Buffer<T>;
    fn deref(&self) -> &D::Buffer<T> {
        self.buffer.as_ref().expect("present until drop")
    }
}

impl<D: DeviceApi, T: ScratchElement> DerefMut for Scratch<'_, D, T> {
    fn deref_mut(&mut self) -> &mut D::Buffer<T> {
        self.buffer.as_mut().expect("present until drop")
    }
}

impl<D: DeviceApi, T: ScratchElement> Drop for Scratch<'_, D, T> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            let pool = self.pool;
            T::lists(pool).push(&pool.gate, buffer.len(), buffer);
        }
    }
}

// SAFETY: the parameter is the loaned buffer's own (same value, same layout), and the buffer
// lives as long as the guard.
unsafe impl<D: DeviceApi, T: ScratchElement> KernelArg for Scratch<'_, D, T> {
    fn param_ptr(&self) -> *mut c_void {
        (**self).param_ptr()
    }
    fn arg_info(&self) -> ArgInfo {
        (**self).arg_info()
    }
    fn extent(&self) -> Option<std::ops::Range<usize>> {
        (**self).extent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::EmulatedDevice;

    #[test]
    fn returned_buffers_are_reused_by_capacity() {
        let dev = EmulatedDevice::new();
        let pool = ScratchPool::<EmulatedDevice>::new();
        let first = pool.upload(&dev, &[3u32, 1, 4]).unwrap();
        assert_eq!(first.len(), size_class(3));
        assert_eq!(&first.to_vec()[..4], &[3, 1, 4, 0]);
        let address = first.device_address();
        drop(first);
        // Same class, other contents: the same buffer, rewritten (padding zeroed again).
        let again = pool.upload(&dev, &[9u32; 200]).unwrap();
        assert_eq!(again.device_address(), address);
        assert_eq!(&again.to_vec()[198..201], &[9, 9, 0]);
        // Held at the same time: a second buffer.
        let other = pool.take::<u32>(&dev, 10).unwrap();
        assert_ne!(other.device_address(), address);
        // Exact lengths, and one list per element type.
        let one = pool.take_exact::<f64>(&dev, 1).unwrap();
        assert_eq!(one.len(), 1);
        let wide = pool.take::<bf16>(&dev, 1000).unwrap();
        assert_eq!(wide.len(), size_class(1000));
        assert_eq!(
            pool.stats(),
            ScratchStats {
                allocations: 4,
                reuses: 1
            }
        );
        assert_eq!(dev.allocations(), 4);
        drop((again, other, one, wide));
        for _ in 0..3 {
            let _a = pool.take::<u32>(&dev, 256).unwrap();
            let _b = pool.take::<u32>(&dev, 1).unwrap();
            let _c = pool.take_exact::<f64>(&dev, 1).unwrap();
            let _d = pool.take::<bf16>(&dev, 999).unwrap();
        }
        assert_eq!(dev.allocations(), 4, "warm requests allocate nothing");
        assert_eq!(pool.stats().reuses, 13);
    }
}
