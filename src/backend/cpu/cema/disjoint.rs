//! Shared write access to one output buffer for tasks that write disjoint, interleaved
//! pieces of it.
//!
//! A CEMA task owns a block of channels over a range of tokens, i.e. a strided set of short
//! row segments of `[b, l, d]`; no slice split can hand those out safely, so tasks take the
//! segments they own through this wrapper instead.

use std::marker::PhantomData;

/// A mutable buffer that several threads may write at the same time, each to positions no
/// other writes.
pub(super) struct DisjointOut<'a, F> {
    ptr: *mut F,
    len: usize,
    _borrow: PhantomData<&'a mut [F]>,
}

// SAFETY: the wrapper hands out access only through `segment`, whose contract requires that
// concurrently live segments never overlap, so sharing it across threads creates no data
// race; `F: Send` lets the values themselves move between threads.
unsafe impl<F: Send> Send for DisjointOut<'_, F> {}
unsafe impl<F: Send> Sync for DisjointOut<'_, F> {}

impl<'a, F> DisjointOut<'a, F> {
    /// Wraps the unique borrow `buf` for the wrapper's lifetime.
    pub fn new(buf: &'a mut [F]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `start..start + len`.
    ///
    /// # Safety
    /// No other segment overlapping `start..start + len` may be alive at the same time (on
    /// any thread).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn segment(&self, start: usize, len: usize) -> &mut [F] {
        assert!(
            start <= self.len && len <= self.len - start,
            "segment out of bounds"
        );
        // SAFETY: in bounds (checked above) of a buffer uniquely borrowed for 'a, and the
        // caller guarantees no overlapping segment is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
