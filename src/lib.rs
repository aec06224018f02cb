//! mega: training and serving for byte-level long-context language models of the MEGA family
//! (MEGABYTE, MEGALODON and their hybrid), on a pure-Rust CPU backend and on NVIDIA GPUs.

pub mod backend;
pub mod bench;
pub mod config;
pub mod convert;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod serve;
pub mod train;
