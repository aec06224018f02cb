//! Which instruction set the lane kernels run with.
//!
//! The crate is built for baseline x86-64 (128-bit SSE2 vectors). The hot kernels also have
//! a copy compiled with AVX2 (256-bit vectors), picked at run time when the CPU has it. Both
//! copies perform the same operations in the same order on every channel (lanes never mix
//! and nothing is fused into FMA), so their results are identical bit for bit.

use std::sync::atomic::{AtomicBool, Ordering};

static PORTABLE_ONLY: AtomicBool = AtomicBool::new(false);

/// Whether the kernels should take their AVX2 copy.
#[inline]
pub(super) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !PORTABLE_ONLY.load(Ordering::Relaxed) && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Makes every later call use the baseline kernels (`true`) or the fastest available
/// (`false`, the default). Exists so tests can check both copies agree.
#[doc(hidden)]
pub fn force_portable_kernels(on: bool) {
    PORTABLE_ONLY.store(on, Ordering::Relaxed);
}
