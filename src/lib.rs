//! mega: training and serving for byte-level long-context language models of the MEGA family
//! (MEGABYTE, MEGALODON and their hybrid), on a pure-Rust CPU backend and on NVIDIA GPUs.

pub mod backend;
pub mod infer;
pub mod train;
