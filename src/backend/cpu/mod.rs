//! The pure-Rust CPU backend: the reference for every op and the default device.
//!
//! Generic over the element type so the same code runs in f32 (training, inference) and in
//! f64 (finite-difference gradient checks).

use num_traits::Float;

/// Element types the CPU backend computes in (`f32`, `f64`).
pub trait Real:
    Float
    + num_traits::FromPrimitive
    + std::iter::Sum
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}
impl Real for f32 {}
impl Real for f64 {}

/// The CPU backend. Parallelism comes from the global rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu<F: Real = f32> {
    _elem: std::marker::PhantomData<F>,
}

impl<F: Real> Cpu<F> {
    /// A CPU backend computing in `F`.
    pub fn new() -> Self {
        Self {
            _elem: std::marker::PhantomData,
        }
    }
}
