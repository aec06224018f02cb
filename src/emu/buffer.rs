//! Host memory that emulated kernels read and write through raw pointers.

use std::alloc::{self, Layout};
use std::ffi::c_void;
use std::ptr::NonNull;

use super::arg::{ArgInfo, DeviceElement, KernelArg};

/// An exact-size heap array that kernels access as a device pointer.
///
/// Exact size matters: the allocation has no slack, so a kernel reading one element past the
/// end touches the allocator's redzone, which AddressSanitizer reports (tools/emu-sanitize.sh).
/// Kernels write through the pointer while Rust holds only `&self`, so the contents are never
/// behind a Rust reference during a launch: reading them needs [`HostBuffer::to_vec`] or a
/// `&mut self` borrow.
pub struct HostBuffer<T: DeviceElement> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the buffer owns its allocation; moving it to another thread moves the ownership.
// It is not Sync: two threads holding `&HostBuffer` could both launch kernels writing it.
unsafe impl<T: DeviceElement> Send for HostBuffer<T> {}

impl<T: DeviceElement> HostBuffer<T> {
    /// `len` copies of `value` (use NaN for outputs, so unwritten elements fail comparisons).
    pub fn filled(len: usize, value: T) -> Self {
        let buffer = Self::uninit(len);
        for i in 0..len {
            // SAFETY: i < len, inside the fresh allocation.
            unsafe { buffer.ptr.as_ptr().add(i).write(value) };
        }
        buffer
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let buffer = Self::uninit(values.len());
        // SAFETY: the allocation holds values.len() elements and does not overlap `values`.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), buffer.ptr.as_ptr(), values.len())
        };
        buffer
    }

    fn uninit(len: usize) -> Self {
        let layout = Layout::array::<T>(len).expect("buffer size overflows usize");
        if layout.size() == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len,
            };
        }
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { alloc::alloc(layout) } as *mut T;
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: ptr holds len initialised elements; launches are synchronous, so no kernel
        // writes while this copies.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }.to_vec()
    }

    /// The contents behind a shared borrow.
    ///
    /// # Safety
    /// No launch may write the buffer while the slice lives (launches take `&self` too).
    pub(crate) unsafe fn view(&self) -> &[T] {
        std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
    }

    /// The contents.
    pub fn as_slice(&mut self) -> &[T] {
        // SAFETY: as in to_vec; `&mut self` keeps the buffer out of launches meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, writable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in as_slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Overwrites the contents with `values`, which must have the buffer's length.
    pub fn copy_from_slice(&mut self, values: &[T]) {
        self.as_mut_slice().copy_from_slice(values);
    }

    /// The device pointer a kernel receives.
    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T: DeviceElement> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        let layout = Layout::array::<T>(self.len).expect("layout was valid at allocation");
        if layout.size() != 0 {
            // SAFETY: allocated in `uninit` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout) };
        }
    }
}

impl<T: DeviceElement + std::fmt::Debug> std::fmt::Debug for HostBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the parameter value is the buffer's pointer, stored in the struct for the launch's
// duration; the pointee type is T, as declared.
unsafe impl<T: DeviceElement> KernelArg for HostBuffer<T> {
    fn param_ptr(&self) -> *mut c_void {
        &self.ptr as *const NonNull<T> as *mut c_void
    }
    fn arg_info(&self) -> ArgInfo {
        ArgInfo::pointer_to::<T>()
    }
    fn extent(&self) -> Option<std::ops::Range<usize>> {
        let start = self.ptr.as_ptr() as usize;
        Some(start..start + self.len * std::mem::size_of::<T>())
    }
}
