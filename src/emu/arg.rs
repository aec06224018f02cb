//! Kernel arguments, marshalled as cuLaunchKernel expects them: one pointer to each value.

use std::ffi::c_void;

use super::bindings::cuemu_arg_kind;

/// What a kernel parameter (or a pointer parameter's pointee) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A pointer to device memory.
    Pointer,
    /// A signed integer.
    Signed,
    /// An unsigned integer.
    Unsigned,
    /// An IEEE float (f32/f64).
    Float,
    /// Anything else (structs, bf16, half).
    Other,
}

impl ArgKind {
    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            cuemu_arg_kind::CUEMU_ARG_POINTER => Self::Pointer,
            cuemu_arg_kind::CUEMU_ARG_SIGNED => Self::Signed,
            cuemu_arg_kind::CUEMU_ARG_UNSIGNED => Self::Unsigned,
            cuemu_arg_kind::CUEMU_ARG_FLOAT => Self::Float,
            _ => Self::Other,
        }
    }
}

/// The layout of one kernel parameter, as the launcher checks it against the C++ signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgInfo {
    /// Size of the value in bytes.
    pub size: u32,
    /// What the value is.
    pub kind: ArgKind,
    /// For pointers: size of the pointee (0 for `void*`).
    pub elem_size: u32,
    /// For pointers: what the pointee is.
    pub elem_kind: ArgKind,
}

impl ArgInfo {
    /// A scalar parameter of type `T`.
    pub const fn scalar<T>(kind: ArgKind) -> Self {
        Self {
            size: std::mem::size_of::<T>() as u32,
            kind,
            elem_size: 0,
            elem_kind: ArgKind::Other,
        }
    }

    /// A pointer parameter to elements of type `T`.
    pub fn pointer_to<T: DeviceElement>() -> Self {
        Self {
            size: std::mem::size_of::<*mut T>() as u32,
            kind: ArgKind::Pointer,
            elem_size: std::mem::size_of::<T>() as u32,
            elem_kind: T::KIND,
        }
    }
}

/// A value that can be passed to a kernel.
///
/// # Safety
/// [`KernelArg::param_ptr`] must point to a value laid out exactly as [`KernelArg::arg_info`]
/// describes, valid for the duration of the launch; pointer arguments must point to memory
/// that holds as many elements as the kernel accesses.
pub unsafe trait KernelArg {
    /// Address of the argument's value (cuLaunchKernel's `kernelParams[i]`).
    fn param_ptr(&self) -> *mut c_void;
    /// Layout of the value.
    fn arg_info(&self) -> ArgInfo;
    /// For a pointer argument: the device bytes `[start, end)` the kernel may access through
    /// it (the whole buffer, or the view), which the emulator's stream hazard checker tracks
    /// ([`super::hazards`]). `None` for scalars and null pointers.
    fn extent(&self) -> Option<std::ops::Range<usize>> {
        None
    }
}

macro_rules! scalar_arg {
    ($t:ty, $kind:expr) => {
        // SAFETY: the pointer is to the scalar itself, whose layout is the C one.
        unsafe impl KernelArg for $t {
            fn param_ptr(&self) -> *mut c_void {
                self as *const $t as *mut c_void
            }
            fn arg_info(&self) -> ArgInfo {
                ArgInfo::scalar::<$t>($kind)
            }
        }
    };
}
scalar_arg!(i32, ArgKind::Signed);
scalar_arg!(u32, ArgKind::Unsigned);
scalar_arg!(i64, ArgKind::Signed);
scalar_arg!(u64, ArgKind::Unsigned);
scalar_arg!(f32, ArgKind::Float);
scalar_arg!(f64, ArgKind::Float);

/// An element type of device buffers, with the kind its C++ counterpart has.
///
/// # Safety
/// `Self` must have the size and bit layout of the C++ type the kernels use for it.
pub unsafe trait DeviceElement: Copy + Send + Sync + 'static {
    /// The kind of the C++ type (`float` → Float, `unsigned int` → Unsigned, `__nv_bfloat16` →
    /// Other).
    const KIND: ArgKind;
}
// SAFETY: primitive types with the layout of their C counterparts.
unsafe impl DeviceElement for f32 {
    const KIND: ArgKind = ArgKind::Float;
}
// SAFETY: as above.
unsafe impl DeviceElement for f64 {
    const KIND: ArgKind = ArgKind::Float;
}
// SAFETY: as above.
unsafe impl DeviceElement for u32 {
    const KIND: ArgKind = ArgKind::Unsigned;
}
// SAFETY: as above.
unsafe impl DeviceElement for i32 {
    const KIND: ArgKind = ArgKind::Signed;
}
// SAFETY: as above.
unsafe impl DeviceElement for u8 {
    const KIND: ArgKind = ArgKind::Unsigned;
}
// SAFETY: as above.
unsafe impl DeviceElement for u16 {
    const KIND: ArgKind = ArgKind::Unsigned;
}
// SAFETY: as above.
unsafe impl DeviceElement for u64 {
    const KIND: ArgKind = ArgKind::Unsigned;
}
// SAFETY: half::bf16 is the 16 upper bits of an f32, as __nv_bfloat16.
unsafe impl DeviceElement for half::bf16 {
    const KIND: ArgKind = ArgKind::Other;
}
// SAFETY: half::f16 is IEEE binary16, as __half.
unsafe impl DeviceElement for half::f16 {
    const KIND: ArgKind = ArgKind::Other;
}

/// A device pointer to element `offset` of an allocation: how a kernel receives a view into a
/// larger buffer (an arena of parameters, a slice of a workspace).
///
/// cuLaunchKernel and the emulator both take a pointer parameter by value, so a view is just
/// the allocation's address advanced by `offset` elements (`CUdeviceptr + offset·size_of::<T>()`
/// on a GPU, the host pointer plus `offset` in the emulator). [`ViewArg::new`] checks the view
/// against the allocation, so a view never starts or ends outside it.
pub struct ViewArg<T> {
    addr: *mut T,
    len: usize,
}

/// A view that does not fit its allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("view [{offset}, {offset} + {len}) lies outside an allocation of {capacity} elements")]
pub struct ViewBoundsError {
    /// First element of the view.
    pub offset: usize,
    /// Elements in the view.
    pub len: usize,
    /// Elements in the allocation.
    pub capacity: usize,
}

impl<T: DeviceElement> ViewArg<T> {
    /// The pointer to element `offset` of the allocation at `base_address` (a device address,
    /// see [`super::DeviceBuffer::device_address`]) holding `capacity` elements, for a view
    /// of `len` elements. Errors when `offset + len > capacity`.
    pub fn new(
        base_address: usize,
        capacity: usize,
        offset: usize,
        len: usize,
    ) -> Result<Self, ViewBoundsError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > capacity) {
            return Err(ViewBoundsError {
                offset,
                len,
                capacity,
            });
        }
        // The address is only passed on to the device (or the emulator, which owns the
        // allocation it points into); integer arithmetic keeps it valid for device addresses
        // that are not host pointers.
        let addr = base_address + offset * std::mem::size_of::<T>();
        Ok(Self {
            addr: addr as *mut T,
            len,
        })
    }

    /// The device address the kernel receives.
    pub fn address(&self) -> usize {
        self.addr as usize
    }
}

impl<T> std::fmt::Debug for ViewArg<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ViewArg({:#x})", self.addr as usize)
    }
}

// SAFETY: the parameter value is a pointer (stored in the struct) to elements of T; `new`
// checked that the view lies inside the allocation, whose owner keeps it alive while the
// view is launched on (CudaBuf holds its allocation).
unsafe impl<T: DeviceElement> KernelArg for ViewArg<T> {
    fn param_ptr(&self) -> *mut c_void {
        &self.addr as *const *mut T as *mut c_void
    }
    fn arg_info(&self) -> ArgInfo {
        ArgInfo::pointer_to::<T>()
    }
    fn extent(&self) -> Option<std::ops::Range<usize>> {
        let start = self.addr as usize;
        Some(start..start + self.len * std::mem::size_of::<T>())
    }
}

// SAFETY: a device address is plain data; what may be done through it is governed by the
// owner of the allocation (the same rules as for the allocation itself).
unsafe impl<T> Send for ViewArg<T> {}
// SAFETY: as above; the struct is never written after construction.
unsafe impl<T> Sync for ViewArg<T> {}

#[cfg(test)]
mod view_tests {
    use super::*;

    #[test]
    fn views_inside_the_allocation_are_offset_pointers() {
        let v = ViewArg::<f32>::new(0x1000, 100, 10, 90).unwrap();
        assert_eq!(v.address(), 0x1000 + 40);
        let whole = ViewArg::<f64>::new(0x2000, 8, 0, 8).unwrap();
        assert_eq!(whole.address(), 0x2000);
        // An empty view at the very end is allowed (a zero-length tensor).
        let end = ViewArg::<f32>::new(0x1000, 100, 100, 0).unwrap();
        assert_eq!(end.address(), 0x1000 + 400);
        assert_eq!(v.arg_info(), ArgInfo::pointer_to::<f32>());
        assert_eq!(v.extent(), Some(0x1000 + 40..0x1000 + 400));
        // The parameter cuLaunchKernel reads is the offset pointer itself.
        // SAFETY: param_ptr points to the stored pointer value.
        let param = unsafe { *(v.param_ptr() as *const usize) };
        assert_eq!(param, 0x1000 + 40);
    }

    #[test]
    fn views_past_the_allocation_are_rejected() {
        for (offset, len) in [(0, 101), (1, 100), (100, 1), (101, 0), (usize::MAX, 2)] {
            let e = ViewArg::<f32>::new(0x1000, 100, offset, len).unwrap_err();
            assert_eq!(
                e,
                ViewBoundsError {
                    offset,
                    len,
                    capacity: 100
                }
            );
        }
    }
}
