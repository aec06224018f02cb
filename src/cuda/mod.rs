//! Host-side pieces of the CUDA kernels that do not need a GPU: launch shapes and the index
//! plans the kernels read. Both the cudarc backend and the CPU emulator launch with these, so
//! the shapes tested on the emulator are the shapes a GPU runs.

pub mod launch;
pub mod scatter_plan;
