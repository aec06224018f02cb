//! Helpers shared by the emulator tests (tests/emu_harness.rs, tests/emu_kernels.rs). Kernel
//! tests compare against their twins over cases × schedules with `sweep` in
//! tests/support/emu_check.rs.
#![allow(dead_code)]

use std::path::PathBuf;

use mega::emu::{set_schedule, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator, so every failure reproduces.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `n` ids uniform in `0..hi`.
pub fn ids(rng: &mut ChaCha8Rng, n: usize, hi: u32) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..hi)).collect()
}

/// Runs `body` once under each schedule of the kernel test matrix, with the schedule set on
/// this thread; the schedule is passed on for failure messages.
pub fn for_each_schedule(mut body: impl FnMut(Schedule)) {
    for schedule in Schedule::TEST_MATRIX {
        set_schedule(schedule);
        body(schedule);
    }
    set_schedule(Schedule::Forward);
}

/// Asserts `|got − want| ≤ tol·(1 + |want|)` elementwise, NaN only where `want` is NaN.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= tol * (1.0 + w.abs())
        };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

/// 1-based line number of the first line containing `needle` after the first line containing
/// `after` in `kernels/<path>`: where the harness must say a planted bug is.
pub fn source_line(path: &str, after: &str, needle: &str) -> usize {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("kernels")
        .join(path);
    let text = std::fs::read_to_string(&file).expect("kernel source is readable");
    let start = text
        .lines()
        .position(|l| l.contains(after))
        .unwrap_or_else(|| panic!("{after:?} not in {path}"));
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not after {after:?} in {path}"))
}
