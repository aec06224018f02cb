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
