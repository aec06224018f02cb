//! Shared pieces of the emulated-kernel tests (`tests/emu_kernels*.rs`): random inputs,
//! NaN-filled exact-size outputs, null optional pointers, launch shapes from
//! `mega::cuda::launch`, the tolerance check against a CPU twin, and [`sweep`], which runs a
//! test's cases under every schedule and reports each output's worst error with the case and
//! schedule that gave it.
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
use std::fmt::Debug;
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

// ---- sweeps over cases × schedules ---------------------------------------------------------

/// Runs a kernel test over every case × schedule of [`SCHEDULES`] and reports, per output,
/// the worst error with the case and schedule that gave it.
///
/// `body(&case, schedules)` runs once per case: it draws the inputs, runs the twin, and calls
/// [`Schedules::each`] with the launch closure, which runs once per schedule (already set on
/// this thread, so plain `mega::emu::launch` calls use it as well as [`run`]) and compares
/// each output through [`Checks`]. Every case and schedule runs even after a failure; then
/// the test panics naming, for each output over its tolerance, the worst error, its case (the
/// `Debug` form of `C`: give a case struct named fields, and its seed, so the message
/// reproduces it) and schedule, and how many launches failed. When all pass, each output's
/// worst error is printed (seen with `--nocapture`) with where it occurred: the figures
/// docs/perf.md quotes.
///
/// ```ignore
/// #[derive(Debug)]
/// struct Size { seed: u64, n: usize }
/// let sizes = [1, 255, 256, 257].map(|n| Size { seed: n as u64, n });
/// sweep("relu_matches_the_twin", sizes, |c, schedules| {
///     let x = uniform(&mut rng(c.seed), c.n, 0.0, 1.0);
///     let want = relu_twin(&widen(&x));
///     schedules.each(|schedule, checks| {
///         let (out, xb) = (nan_buf(c.n), HostBuffer::from_slice(&x));
///         run("relu_f32", relu_shape(c.n), &[&out, &xb], schedule);
///         checks.close("out", &out.to_vec(), &want, F32_TOL);
///     });
/// });
/// ```
pub fn sweep<C: Debug>(
    test: &str,
    cases: impl IntoIterator<Item = C>,
    mut body: impl FnMut(&C, &mut Schedules<'_>),
) {
    let mut record = SweepRecord::default();
    for case in cases {
        let mut schedules = Schedules {
            record: &mut record,
            case: format!("{case:?}"),
            ran: false,
        };
        body(&case, &mut schedules);
        assert!(
            schedules.ran,
            "{test}: case {} never called Schedules::each",
            schedules.case
        );
    }
    record.finish(test);
}

/// One case of a [`sweep`]: runs its launches under every schedule.
pub struct Schedules<'a> {
    record: &'a mut SweepRecord,
    case: String,
    ran: bool,
}

impl Schedules<'_> {
    /// Runs `launch` once under each schedule of [`SCHEDULES`], with the schedule set on this
    /// thread (and reset to `Forward` after).
    pub fn each(&mut self, mut launch: impl FnMut(Schedule, &mut Checks<'_>)) {
        for schedule in SCHEDULES {
            mega::emu::set_schedule(schedule);
            let mut checks = Checks {
                record: &mut *self.record,
                case: &self.case,
                schedule,
            };
            launch(schedule, &mut checks);
        }
        mega::emu::set_schedule(Schedule::Forward);
        self.ran = true;
    }
}

/// The comparisons of one launch (one case under one schedule), for [`sweep`].
/// An output is named by the text given here; outputs of one test sharing a name and a
/// tolerance are reported together.
pub struct Checks<'a> {
    record: &'a mut SweepRecord,
    case: &'a str,
    schedule: Schedule,
}

impl Checks<'_> {
    /// `got` against the f64 twin's `want`: [`scaled_error`] ≤ `tol` (the module's
    /// convention; entries must be finite and lengths equal).
    pub fn close(&mut self, output: &str, got: &[f32], want: &[f64], tol: f64) {
        let err = scaled_error(got, want);
        let detail = || {
            if got.len() != want.len() {
                return format!("length {} vs {}", got.len(), want.len());
            }
            // The entry with the largest |got − want|, or the first that is not finite.
            let distance = |(&g, &w): (&f32, &f64)| {
                if g.is_finite() {
                    (g as f64 - w).abs()
                } else {
                    f64::INFINITY
                }
            };
            let (at, _) = got.iter().zip(want).map(distance).enumerate().fold(
                (0, -1.0f64),
                |worst, (i, d)| if d > worst.1 { (i, d) } else { worst },
            );
            match (got.get(at), want.get(at)) {
                (Some(g), Some(w)) => format!("largest at [{at}]: got {g}, want {w}"),
                _ => String::new(),
            }
        };
        self.note(output, tol, err, detail);
    }

    /// Elementwise `|got − want| ≤ tol · (1 + |want|)`, NaN only where `want` is NaN: for
    /// twins run in f32 (tests/emu_kernels.rs). The error is the largest
    /// `|got − want| / (1 + |want|)`.
    pub fn close_elementwise(&mut self, output: &str, got: &[f32], want: &[f32], tol: f64) {
        let element_error = |(&g, &w): (&f32, &f32)| {
            if g.is_nan() && w.is_nan() {
                return 0.0;
            }
            let e = (g as f64 - w as f64).abs() / (1.0 + (w as f64).abs());
            // A NaN on one side only, or an infinity (∞/∞), fails.
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        };
        let (at, err) = got.iter().zip(want).map(element_error).enumerate().fold(
            (0, 0.0f64),
            |worst, (i, e)| if e > worst.1 { (i, e) } else { worst },
        );
        let (err, detail) = if got.len() != want.len() {
            (
                f64::INFINITY,
                format!("length {} vs {}", got.len(), want.len()),
            )
        } else {
            let detail = (at < got.len())
                .then(|| format!("largest at [{at}]: got {}, want {}", got[at], want[at]));
            (err, detail.unwrap_or_default())
        };
        self.note(output, tol, err, || detail);
    }

    /// Equal element for element (bit-exact for floats other than NaN). The error is 0 or
    /// infinite; the tolerance reported is 0.
    pub fn exact<T: PartialEq + Debug>(&mut self, output: &str, got: &[T], want: &[T]) {
        let first = if got.len() != want.len() {
            Some(format!("length {} vs {}", got.len(), want.len()))
        } else {
            got.iter().zip(want).position(|(g, w)| g != w).map(|i| {
                format!(
                    "first difference at [{i}]: got {:?}, want {:?}",
                    got[i], want[i]
                )
            })
        };
        let err = if first.is_some() { f64::INFINITY } else { 0.0 };
        self.note(output, 0.0, err, || first.clone().unwrap_or_default());
    }

    fn note(&mut self, output: &str, tol: f64, err: f64, detail: impl FnOnce() -> String) {
        let failed = err > tol || err.is_nan();
        let entry = self.record.entry(output, tol);
        entry.checked += 1;
        if failed {
            entry.failed += 1;
        }
        // A failure's error exceeds every pass's, so the worst is a failure when there is one.
        let counts_as_worse = err > entry.err || entry.case.is_empty();
        if counts_as_worse {
            entry.err = err;
            entry.case = self.case.to_string();
            entry.schedule = Some(self.schedule);
            entry.detail = if failed { detail() } else { String::new() };
        }
    }
}

/// One output's worst error over a sweep.
#[derive(Default)]
struct OutputRecord {
    output: String,
    tol: f64,
    err: f64,
    case: String,
    schedule: Option<Schedule>,
    detail: String,
    checked: usize,
    failed: usize,
}

/// Every output's record, in the order first checked.
#[derive(Default)]
struct SweepRecord {
    outputs: Vec<OutputRecord>,
}

impl SweepRecord {
    fn entry(&mut self, output: &str, tol: f64) -> &mut OutputRecord {
        let at = self
            .outputs
            .iter()
            .position(|o| o.output == output && o.tol == tol);
        let at = at.unwrap_or_else(|| {
            self.outputs.push(OutputRecord {
                output: output.to_string(),
                tol,
                ..OutputRecord::default()
            });
            self.outputs.len() - 1
        });
        &mut self.outputs[at]
    }

    /// Panics listing every output over its tolerance; else prints every output's worst.
    fn finish(self, test: &str) {
        assert!(
            !self.outputs.is_empty(),
            "{test}: the sweep checked nothing"
        );
        let line = |o: &OutputRecord| {
            format!(
                "{}: worst {:.1e} (tol {:.0e}) at {} under {:?}",
                o.output,
                o.err,
                o.tol,
                o.case,
                o.schedule.expect("a checked output has a schedule")
            )
        };
        let failures: Vec<String> = self
            .outputs
            .iter()
            .filter(|o| o.failed > 0)
            .map(|o| {
                format!(
                    "{}; {} of {} launches over tolerance; {}",
                    line(o),
                    o.failed,
                    o.checked,
                    o.detail
                )
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{test}: {} output(s) over tolerance:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
        let lines: Vec<String> = self.outputs.iter().map(line).collect();
        eprintln!("worst errors, {test}:\n  {}", lines.join("\n  "));
    }
}
