//! Shared pieces of the emulated-kernel tests (`tests/emu_kernels_*.rs`): random inputs,
//! NaN-filled exact-size outputs, null optional pointers, launch shapes from
//! `mega::cuda::launch`, and the tolerance check against a CPU twin.
//!
//! Tolerance convention: a kernel output `got` matches its reference `want` (the CPU twin,
//! run in f64 on the same f32 inputs, i.e. the exact answer up to 1e-16) when
//! `max_i |got_i − want_i| ≤ tol · max(max_i |want_i|, 1)` — an error relative to the
//! tensor's scale, so entries near zero are not held to an impossible relative bound. Every
//! entry must also be finite (unwritten NaN-filled outputs fail). f32 kernels use
//! [`F32_TOL`]; kernels storing bf16 outputs [`BF16_TOL`].

#![allow(dead_code)] // each test binary uses a different subset

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::marker::PhantomData;

use half::bf16;
use mega::cuda::launch::LaunchShape;
use mega::emu::{launch, ArgInfo, DeviceElement, HostBuffer, KernelArg, LaunchConfig, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tolerance of f32 kernels (f32 storage and arithmetic) against the exact answer.
pub const F32_TOL: f64 = 1e-5;
/// Tolerance of kernels storing bf16 outputs: bf16 keeps 8 significant bits, so one rounding
/// to nearest is at most 2⁻⁸ = 3.9e-3 of the value; twice that leaves room for the f32
/// arithmetic before it. The twin reads the same bf16-rounded inputs, so input rounding does
/// not count.
pub const BF16_TOL: f64 = 8e-3;

/// The schedules every launch runs under (kernels/emu/README.md).
pub const SCHEDULES: [Schedule; 3] = Schedule::TEST_MATRIX;

/// A null device pointer, for a kernel's optional buffers.
pub struct Null<T>(*mut T, PhantomData<T>);

impl<T> Null<T> {
    pub fn new() -> Self {
        Self(std::ptr::null_mut(), PhantomData)
    }
}

// SAFETY: the parameter is a pointer value (null) of the pointer layout ArgInfo describes;
// the kernels test it before any access.
unsafe impl<T: DeviceElement> KernelArg for Null<T> {
    fn param_ptr(&self) -> *mut c_void {
        &self.0 as *const *mut T as *mut c_void
    }
    fn arg_info(&self) -> ArgInfo {
        ArgInfo::pointer_to::<T>()
    }
}

/// A seeded generator per test case.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[offset − scale, offset + scale)`, drawn in f64 and rounded, so every
/// mantissa bit is random (f32 draws sit on a 2⁻²³ grid, where short sums are often exact and
/// would hide rounding differences).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, offset: f32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (offset as f64 + scale as f64 * rng.random_range(-1.0f64..1.0)) as f32)
        .collect()
}

/// The f32 values widened to f64 (exactly), for the f64 twin.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// An exact-size output buffer filled with NaN.
pub fn nan_buf(n: usize) -> HostBuffer<f32> {
    HostBuffer::filled(n, f32::NAN)
}

/// An exact-size bf16 buffer from f32 values (rounded to nearest even).
pub fn bf16_buf(v: &[f32]) -> HostBuffer<bf16> {
    HostBuffer::from_slice(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
}

/// bf16 buffer contents as f32.
pub fn bf16_values(b: &HostBuffer<bf16>) -> Vec<f32> {
    b.to_vec().iter().map(|x| x.to_f32()).collect()
}

/// f32 values rounded through bf16 (what a bf16 kernel reads).
pub fn through_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// The emulator's launch configuration for a shape from `mega::cuda::launch`.
pub fn config(shape: LaunchShape) -> LaunchConfig {
    LaunchConfig::new(shape.grid, shape.block, shape.shared_mem_bytes)
}

/// Launches `kernel` under `schedule`; a launch error fails the test with its message.
pub fn run(kernel: &str, shape: LaunchShape, args: &[&dyn KernelArg], schedule: Schedule) {
    mega::emu::set_schedule(schedule);
    launch(kernel, config(shape), args)
        .unwrap_or_else(|e| panic!("{kernel} under {schedule:?}: {e}"));
}

/// The error of `got` against `want` relative to `want`'s scale (see the module docs);
/// infinite when a length differs or an entry of `got` is not finite.
pub fn scaled_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(1.0f64, |m, &w| m.max(w.abs()));
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max((g as f64 - w).abs());
    }
    worst / scale
}

thread_local! {
    /// Worst scaled error per output name (the text after the last `:` of `what`) seen by
    /// this test thread, for [`print_worst`].
    static WORST: RefCell<BTreeMap<String, f64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Asserts [`scaled_error`] ≤ `tol`, naming the case.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = scaled_error(got, want);
    assert!(
        err <= tol,
        "{what}: scaled error {err:.3e} > {tol:.1e} (len {} vs {})",
        got.len(),
        want.len()
    );
    let mut name = what.rsplit(':').next().unwrap_or(what).trim().to_string();
    if tol > F32_TOL {
        name += " (bf16)";
    }
    WORST.with(|w| {
        let mut w = w.borrow_mut();
        let e = w.entry(name).or_insert(0.0);
        *e = e.max(err);
    });
}

/// Prints (to stderr, seen with `--nocapture`) the worst scaled error of every output this
/// test checked: the figures docs/perf.md quotes.
pub fn print_worst(test: &str) {
    WORST.with(|w| {
        let line: Vec<String> = w
            .borrow()
            .iter()
            .map(|(name, e)| format!("{name} {e:.1e}"))
            .collect();
        eprintln!("worst scaled error, {test}: {}", line.join(", "));
    });
}
