//! CUDA-on-CPU emulation: runs the crate's kernel sources (`kernels/*.cu`) on the CPU so every
//! kernel can be tested against its Rust twin without a GPU (design.md §4, kernels/emu/README.md).
//!
//! `build.rs` compiles each source of the kernel manifest with g++ and the emulation header
//! `kernels/emu/cuda_emu.h` into a static library. A launch runs the blocks of the grid one
//! after another on the calling thread; the threads of a block are fibers that switch at
//! `__syncthreads` and warp collectives, in the order of a [`Schedule`]. Deadlocks (threads
//! that exited while others wait at a barrier) and divergent barriers come back as
//! [`EmuError`]s naming the source line.
//!
//! ```
//! use mega::emu::{launch, HostBuffer, LaunchConfig};
//! let n = 100i32;
//! let input = HostBuffer::from_slice(&vec![1.0f32; 100]);
//! let out = HostBuffer::<f32>::filled(100, f32::NAN);
//! // One block of 128 threads; 4 bytes of dynamic shared memory per warp.
//! launch("selftest_block_sum", LaunchConfig::new(1, 128, 16), &[&out, &input, &n]).unwrap();
//! assert!(out.to_vec().iter().all(|&s| s == 100.0));
//! ```

mod arg;
#[allow(clippy::all, missing_docs, rustdoc::all)]
mod bindings;
mod buffer;
mod device;
pub mod hazards;
mod launch;
mod strided_gemm;

pub use arg::{ArgInfo, ArgKind, DeviceElement, KernelArg, ViewArg, ViewBoundsError};
pub use buffer::HostBuffer;
pub use device::{
    check_disjoint, gemm_ranges, BufferAt, DeviceApi, DeviceBuffer, DeviceError, EmulatedDevice,
    Event, GemmShape,
};
pub use hazards::{StreamId, StreamStats};
pub use launch::{
    kernel_names, kernel_signature, launch, set_schedule, set_strict, Dim3, EmuError, LaunchConfig,
    LaunchErrorKind, Schedule,
};
pub use strided_gemm::{MatrixLayout, StridedGemm};
