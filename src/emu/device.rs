//! The device layer a CUDA backend is built on (design.md §4 item 3): allocate, copy, launch a
//! kernel by name, events, GEMM. [`EmulatedDevice`] implements it on the CPU emulator, so the
//! layers above can be tested end to end in `cargo test`; a cudarc implementation (kernels from
//! [`crate::kernels::MODULES`], arguments marshalled through the same [`KernelArg`] pointers
//! into cuLaunchKernel, GEMMs through cuBLASLt) is the GPU side.

use super::arg::{DeviceElement, KernelArg};
use super::buffer::HostBuffer;
use super::hazards::{Access, Hazard, HazardChecker, StreamId, StreamStats};
use super::launch::{kernel_writable_params, launch, EmuError, LaunchConfig};
use super::strided_gemm::{strided_gemm_on_host, StridedGemm};

/// A buffer in device memory.
pub trait DeviceBuffer {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the buffer has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address of the first element, as kernels receive it (a `CUdeviceptr` on a GPU, a
    /// host pointer in the emulator); views into the buffer offset it
    /// ([`super::arg::ViewArg`]).
    fn device_address(&self) -> usize;
}

impl<T: DeviceElement> DeviceBuffer for HostBuffer<T> {
    fn len(&self) -> usize {
        HostBuffer::len(self)
    }
    fn device_address(&self) -> usize {
        self.as_ptr() as usize
    }
}

/// A position in a device buffer: element `offset` of `buffer`, the start of a range that a
/// copy, a memset or a GEMM operand covers.
#[derive(Debug)]
pub struct BufferAt<'a, B> {
    /// The allocation.
    pub buffer: &'a B,
    /// First element of the range.
    pub offset: usize,
}

impl<'a, B> BufferAt<'a, B> {
    /// Element `offset` of `buffer`.
    pub fn new(buffer: &'a B, offset: usize) -> Self {
        Self { buffer, offset }
    }
}

impl<B> Clone for BufferAt<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for BufferAt<'_, B> {}

impl<B: DeviceBuffer> BufferAt<'_, B> {
    /// Checks that `len` elements from the offset lie inside the buffer; returns the
    /// element range.
    pub fn range(&self, len: usize, what: &str) -> Result<std::ops::Range<usize>, DeviceError> {
        match self.offset.checked_add(len) {
            Some(end) if end <= self.buffer.len() => Ok(self.offset..end),
            _ => Err(DeviceError::Shape(format!(
                "{what}: [{}, {} + {len}) lies outside a buffer of {}",
                self.offset,
                self.offset,
                self.buffer.len()
            ))),
        }
    }

    /// Device address of the range's first element (`T` elements of `elem_bytes` bytes).
    fn address(&self, elem_bytes: usize) -> usize {
        self.buffer.device_address() + self.offset * elem_bytes
    }
}

/// Errors when two element ranges of the same allocation overlap (a device copy or GEMM
/// between overlapping ranges is undefined on a GPU).
pub fn check_disjoint<B: DeviceBuffer>(
    a: BufferAt<'_, B>,
    a_len: usize,
    b: BufferAt<'_, B>,
    b_len: usize,
    elem_bytes: usize,
    what: &str,
) -> Result<(), DeviceError> {
    let (a0, b0) = (a.address(elem_bytes), b.address(elem_bytes));
    let (a1, b1) = (a0 + a_len * elem_bytes, b0 + b_len * elem_bytes);
    if a_len > 0 && b_len > 0 && a0 < b1 && b0 < a1 {
        return Err(DeviceError::Shape(format!(
            "{what}: ranges [{a0:#x}, {a1:#x}) and [{b0:#x}, {b1:#x}) overlap"
        )));
    }
    Ok(())
}

/// A point in a device's stream of work, to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Number of operations issued before the event was recorded.
    pub sequence: u64,
}

/// Row-major `out[m, n] = op(a)[m, k] · op(b)[k, n]` (+ `out` when `accumulate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Rows of `out`.
    pub m: usize,
    /// Reduction length.
    pub k: usize,
    /// Columns of `out`.
    pub n: usize,
    /// `a` is stored `[k, m]`.
    pub trans_a: bool,
    /// `b` is stored `[n, k]`.
    pub trans_b: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

/// Why a device operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A kernel launch failed.
    #[error(transparent)]
    Launch(#[from] EmuError),
    /// Buffer lengths that do not fit the operation.
    #[error("{0}")]
    Shape(String),
    /// The GPU driver or a CUDA library reported an error (cudarc implementations).
    #[error("CUDA: {0}")]
    Driver(String),
    /// Two streams touch the same bytes without an event ordering them (the emulator's
    /// hazard checker, [`super::hazards`]).
    #[error(transparent)]
    Hazard(#[from] Hazard),
}

/// The lowest layer of a GPU backend. Work is ordered as issued on each of its streams
/// ([`StreamId`]); the main stream is current unless a caller switches.
pub trait DeviceApi {
    /// A device allocation of `T`s, passable to kernels.
    type Buffer<T: DeviceElement>: DeviceBuffer + KernelArg + Send;

    /// Short description, e.g. `CPU emulator`.
    fn name(&self) -> String;
    /// Issues every later operation (allocations, copies, launches, GEMMs, events, downloads)
    /// on `stream`, until the next call. Work on different streams is unordered unless an
    /// event orders it ([`DeviceApi::record_event`] on one, [`DeviceApi::wait_event`] on the
    /// other).
    fn set_stream(&self, stream: StreamId) -> Result<(), DeviceError>;
    /// The stream operations are issued on now.
    fn stream(&self) -> StreamId;
    /// `len` elements, each `T::default()` (`T::default()`).
    fn alloc_zeros<T: DeviceElement + Default>(
        &self,
        len: usize,
    ) -> Result<Self::Buffer<T>, DeviceError>;
    /// A device copy of `host`.
    fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<Self::Buffer<T>, DeviceError>;
    /// Overwrites `dst` with `host` (same length).
    fn write<T: DeviceElement>(
        &self,
        host: &[T],
        dst: &mut Self::Buffer<T>,
    ) -> Result<(), DeviceError>;
    /// A host copy of `src`, after all work issued before on the current stream (and the work
    /// that work waited for).
    fn download<T: DeviceElement>(&self, src: &Self::Buffer<T>) -> Result<Vec<T>, DeviceError>;
    /// Launches kernel `name` of the kernel manifest.
    fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<(), DeviceError>;
    /// Records an event after the work issued so far on the current stream.
    fn record_event(&self) -> Result<Event, DeviceError>;
    /// Makes the current stream's later work wait until `event` completed.
    fn wait_event(&self, event: &Event) -> Result<(), DeviceError>;
    /// Blocks until all issued work, on every stream, has finished.
    fn synchronize(&self) -> Result<(), DeviceError>;
    /// f32 GEMM (see [`GemmShape`]) on the first `m·n`, `m·k`, `k·n` elements of `out`, `a`,
    /// `b` (buffers may be longer).
    fn gemm_f32(
        &self,
        out: &mut Self::Buffer<f32>,
        a: &Self::Buffer<f32>,
        b: &Self::Buffer<f32>,
        shape: GemmShape,
    ) -> Result<(), DeviceError>;

    /// Mixed-precision GEMM: bf16 `a` and `b`, products and sums in f32, f32 `out` (cuBLASLt
    /// with A/B `CUDA_R_16BF`, C/D `CUDA_R_32F`, `CUBLAS_COMPUTE_32F`). Same [`GemmShape`] and
    /// buffer rules as [`DeviceApi::gemm_f32_at`]: every operand starts at an element offset of
    /// its allocation (`out` a view of an arena, e.g. a weight gradient; `a` or `b` a weight's
    /// part of the arena's bf16 shadow).
    fn gemm_bf16(
        &self,
        out: BufferAt<'_, Self::Buffer<f32>>,
        a: BufferAt<'_, Self::Buffer<half::bf16>>,
        b: BufferAt<'_, Self::Buffer<half::bf16>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError>;

    /// Strided-batched f32 GEMM (see [`StridedGemm`]): `batch` products whose matrices lie at
    /// fixed strides inside `out`, `a`, `b` (cuBLASLt with batched layouts on a GPU). `a` and
    /// `b` may be the same buffer, and `out` may share their allocation (views of an arena) as
    /// long as the elements it writes are not read.
    fn gemm_strided_batched_f32(
        &self,
        out: &Self::Buffer<f32>,
        a: &Self::Buffer<f32>,
        b: &Self::Buffer<f32>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError>;

    /// Strided-batched mixed-precision GEMM: bf16 `a` and `b`, products and sums in f32, f32
    /// `out` (cuBLASLt A/B `CUDA_R_16BF`, C/D `CUDA_R_32F`, `CUBLAS_COMPUTE_32F`, batched
    /// layouts); otherwise as [`DeviceApi::gemm_strided_batched_f32`].
    fn gemm_strided_batched_bf16(
        &self,
        out: &Self::Buffer<f32>,
        a: &Self::Buffer<half::bf16>,
        b: &Self::Buffer<half::bf16>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError>;

    /// Device-to-device copy of `len` elements from `src` to `dst` (cuMemcpyDtoDAsync),
    /// ordered with the other work. Both ranges may lie in one allocation (views of an arena,
    /// which is why `dst` is a shared borrow, as for kernel launches) but must not overlap.
    fn copy_dtod<T: DeviceElement>(
        &self,
        dst: BufferAt<'_, Self::Buffer<T>>,
        src: BufferAt<'_, Self::Buffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError>;

    /// Sets `len` elements from `at` to all-zero bytes (cuMemsetD8Async): 0 / 0.0 / +0 bf16.
    fn memset_zero<T: DeviceElement>(
        &self,
        at: BufferAt<'_, Self::Buffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError>;

    /// f32 GEMM (see [`GemmShape`]) on operands that start at element offsets of their
    /// allocations (views of arenas): `out` covers `m·n` elements from its offset, `a` `m·k`,
    /// `b` `k·n`. `out` must not overlap `a` or `b`.
    fn gemm_f32_at(
        &self,
        out: BufferAt<'_, Self::Buffer<f32>>,
        a: BufferAt<'_, Self::Buffer<f32>>,
        b: BufferAt<'_, Self::Buffer<f32>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError>;
}

/// Checks a GEMM's operand ranges: inside their buffers, and `out` disjoint from `a` and `b`.
/// Returns the element ranges of out, a, b.
pub fn gemm_ranges<B: DeviceBuffer>(
    out: BufferAt<'_, B>,
    a: BufferAt<'_, B>,
    b: BufferAt<'_, B>,
    shape: GemmShape,
) -> Result<[std::ops::Range<usize>; 3], DeviceError> {
    let GemmShape { m, k, n, .. } = shape;
    let what = format!("gemm {m}x{k}x{n}");
    let ranges = [
        out.range(m * n, &format!("{what} out"))?,
        a.range(m * k, &format!("{what} a"))?,
        b.range(k * n, &format!("{what} b"))?,
    ];
    check_disjoint(out, m * n, a, m * k, 4, &what)?;
    check_disjoint(out, m * n, b, k * n, 4, &what)?;
    Ok(ranges)
}

/// [`DeviceApi`] on the CPU emulator: buffers are exact-size host arrays, kernels run
/// synchronously in the emulator (so events are complete when recorded), GEMMs run on the CPU
/// backend's matmul.
///
/// Because every operation runs at once, in issue order, work split over the two streams
/// always computes the right values here even when a `wait_event` is missing; the device
/// therefore checks stream ordering itself ([`super::hazards`]): an operation that touches
/// bytes another stream's unordered operation wrote (or writes bytes it read) fails with
/// [`DeviceError::Hazard`] naming both.
#[derive(Debug, Default)]
pub struct EmulatedDevice {
    allocations: std::sync::atomic::AtomicU64,
    hazards: std::sync::Mutex<HazardChecker>,
}

/// The bytes of elements `range` of `buffer`.
fn bytes_of<T: DeviceElement>(
    buffer: &HostBuffer<T>,
    range: std::ops::Range<usize>,
) -> std::ops::Range<usize> {
    let size = std::mem::size_of::<T>();
    let base = buffer.as_ptr() as usize;
    base + range.start * size..base + range.end * size
}

impl EmulatedDevice {
    /// A device; its schedule is the calling thread's ([`super::set_schedule`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Device allocations made so far (`alloc_zeros` and `upload`): what a GPU would pay a
    /// cuMemAlloc for, so tests can check that a hot path allocates nothing once warm.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Operations issued per stream, and how many could overlap the other stream's work.
    pub fn stream_stats(&self) -> StreamStats {
        self.checker().stats()
    }

    fn checker(&self) -> std::sync::MutexGuard<'_, HazardChecker> {
        // Every update leaves the clocks and log consistent, so a poisoned lock is usable.
        self.hazards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `op`'s accesses against the other stream's unordered work, and logs them.
    fn issue(&self, op: &str, accesses: &[Access]) -> Result<(), DeviceError> {
        Ok(self.checker().issue(op, accesses)?)
    }

    fn fresh<T: DeviceElement>(
        &self,
        what: &str,
        buffer: &HostBuffer<T>,
    ) -> Result<(), DeviceError> {
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = bytes_of(buffer, 0..buffer.len());
        let mut checker = self.checker();
        checker.forget(bytes.clone());
        Ok(checker.issue(what, &[Access::write(bytes)])?)
    }

    /// Checks a strided-batched GEMM's extents and its accesses (see [`StridedGemm::spans`]).
    fn issue_strided<T: DeviceElement>(
        &self,
        op: &str,
        out: &HostBuffer<f32>,
        a: &HostBuffer<T>,
        b: &HostBuffer<T>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        gemm.check(out.len(), a.len(), b.len())?;
        let [so, sa, sb] = gemm.spans();
        self.issue(
            op,
            &[
                Access::write(bytes_of(out, so)),
                Access::read(bytes_of(a, sa)),
                Access::read(bytes_of(b, sb)),
            ],
        )
    }

    /// `out[m, n] = a · b` on element ranges already checked (see [`gemm_ranges`]).
    fn matmul_ranges(
        out: BufferAt<'_, HostBuffer<f32>>,
        a: BufferAt<'_, HostBuffer<f32>>,
        b: BufferAt<'_, HostBuffer<f32>>,
        [ro, ra, rb]: [std::ops::Range<usize>; 3],
        shape: GemmShape,
    ) {
        // SAFETY: the ranges lie inside their live allocations, `out`'s is disjoint from the
        // others (checked by the caller), and no launch runs during this call (launches are
        // synchronous on this thread), so the mutable slice is the only access to its elements.
        let (o, a_s, b_s) = unsafe {
            (
                std::slice::from_raw_parts_mut(out.buffer.as_ptr().add(ro.start), ro.len()),
                std::slice::from_raw_parts(a.buffer.as_ptr().add(ra.start), ra.len()),
                std::slice::from_raw_parts(b.buffer.as_ptr().add(rb.start), rb.len()),
            )
        };
        crate::backend::cpu::matmul::matmul(
            o,
            a_s,
            b_s,
            shape.m,
            shape.k,
            shape.n,
            shape.trans_a,
            shape.trans_b,
            shape.accumulate,
        );
    }
}

impl DeviceApi for EmulatedDevice {
    type Buffer<T: DeviceElement> = HostBuffer<T>;

    fn name(&self) -> String {
        "CPU emulator".to_string()
    }

    fn set_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.checker().set_stream(stream);
        Ok(())
    }

    fn stream(&self) -> StreamId {
        self.checker().stream()
    }

    fn alloc_zeros<T: DeviceElement + Default>(
        &self,
        len: usize,
    ) -> Result<HostBuffer<T>, DeviceError> {
        let buffer = HostBuffer::filled(len, T::default());
        self.fresh("alloc_zeros", &buffer)?;
        Ok(buffer)
    }

    fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<HostBuffer<T>, DeviceError> {
        let buffer = HostBuffer::from_slice(host);
        self.fresh("upload", &buffer)?;
        Ok(buffer)
    }

    fn write<T: DeviceElement>(
        &self,
        host: &[T],
        dst: &mut HostBuffer<T>,
    ) -> Result<(), DeviceError> {
        if host.len() != dst.len() {
            return Err(DeviceError::Shape(format!(
                "write: {} host elements into a buffer of {}",
                host.len(),
                dst.len()
            )));
        }
        self.issue("write", &[Access::write(bytes_of(dst, 0..dst.len()))])?;
        dst.copy_from_slice(host);
        Ok(())
    }

    fn download<T: DeviceElement>(&self, src: &HostBuffer<T>) -> Result<Vec<T>, DeviceError> {
        let mut checker = self.checker();
        checker.issue("download", &[Access::read(bytes_of(src, 0..src.len()))])?;
        checker.synchronize_current();
        Ok(src.to_vec())
    }

    fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<(), DeviceError> {
        let writable = kernel_writable_params(name)?;
        let accesses: Vec<Access> = args
            .iter()
            .zip(writable)
            .filter_map(|(arg, write)| arg.extent().map(|bytes| Access { bytes, write }))
            .collect();
        self.issue(name, &accesses)?;
        Ok(launch(name, config, args)?)
    }

    fn record_event(&self) -> Result<Event, DeviceError> {
        Ok(Event {
            sequence: self.checker().record_event(),
        })
    }

    fn wait_event(&self, event: &Event) -> Result<(), DeviceError> {
        // The work itself is complete (every operation runs when issued); the wait orders the
        // streams for the hazard checker.
        self.checker()
            .wait_event(event.sequence)
            .map_err(DeviceError::Driver)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.checker().synchronize_all();
        Ok(())
    }

    fn gemm_f32(
        &self,
        out: &mut HostBuffer<f32>,
        a: &HostBuffer<f32>,
        b: &HostBuffer<f32>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let GemmShape { m, k, n, .. } = shape;
        if out.len() < m * n || a.len() < m * k || b.len() < k * n {
            return Err(DeviceError::Shape(format!(
                "gemm {m}x{k}x{n}: buffers hold out {}, a {}, b {}",
                out.len(),
                a.len(),
                b.len()
            )));
        }
        self.gemm_f32_at(
            BufferAt::new(out, 0),
            BufferAt::new(a, 0),
            BufferAt::new(b, 0),
            shape,
        )
    }

    fn gemm_bf16(
        &self,
        out: BufferAt<'_, HostBuffer<f32>>,
        a: BufferAt<'_, HostBuffer<half::bf16>>,
        b: BufferAt<'_, HostBuffer<half::bf16>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let GemmShape { m, k, n, .. } = shape;
        let what = format!("gemm_bf16 {m}x{k}x{n}");
        let ro = out.range(m * n, &format!("{what} out"))?;
        let ra = a.range(m * k, &format!("{what} a"))?;
        let rb = b.range(k * n, &format!("{what} b"))?;
        self.issue(
            "gemm_bf16",
            &[
                Access::write(bytes_of(out.buffer, ro.clone())),
                Access::read(bytes_of(a.buffer, ra.clone())),
                Access::read(bytes_of(b.buffer, rb.clone())),
            ],
        )?;
        // What a GPU computes: every bf16 value widens to f32 exactly, and the product of two
        // bf16 values (8 significant bits each) is exact in f32 (16 bits ≤ 24), so the f32
        // GEMM of the widened inputs differs from cuBLASLt's only in the summation order.
        let widen = |x: BufferAt<'_, HostBuffer<half::bf16>>, r: std::ops::Range<usize>| {
            // SAFETY: the range lies inside the live allocation (checked above), and no launch
            // runs during this call (launches are synchronous on this thread).
            let values =
                unsafe { std::slice::from_raw_parts(x.buffer.as_ptr().add(r.start), r.len()) };
            HostBuffer::from_slice(&values.iter().map(|v| v.to_f32()).collect::<Vec<_>>())
        };
        let (a32, b32) = (widen(a, ra.clone()), widen(b, rb.clone()));
        Self::matmul_ranges(
            out,
            BufferAt::new(&a32, 0),
            BufferAt::new(&b32, 0),
            [ro, 0..ra.len(), 0..rb.len()],
            shape,
        );
        Ok(())
    }

    fn gemm_strided_batched_f32(
        &self,
        out: &HostBuffer<f32>,
        a: &HostBuffer<f32>,
        b: &HostBuffer<f32>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        self.issue_strided("gemm_strided_batched", out, a, b, gemm)?;
        // `out` may share an allocation with `a` or `b` (arena views), so the inputs are
        // copied before `out` is borrowed mutably.
        // SAFETY: no launch runs during this call (launches are synchronous on this thread),
        // and after the copies the mutable slice is the only live access to `out`.
        let (a, b) = unsafe { (a.view().to_vec(), b.view().to_vec()) };
        let out = unsafe { std::slice::from_raw_parts_mut(out.as_ptr(), out.len()) };
        strided_gemm_on_host(out, &a, &b, gemm);
        Ok(())
    }

    fn gemm_strided_batched_bf16(
        &self,
        out: &HostBuffer<f32>,
        a: &HostBuffer<half::bf16>,
        b: &HostBuffer<half::bf16>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        self.issue_strided("gemm_strided_batched_bf16", out, a, b, gemm)?;
        // As `gemm_bf16`: widened exactly to f32, the products are exact, so only the
        // summation order differs from a GPU's. `out` (f32) cannot share the bf16 inputs'
        // allocations.
        // SAFETY: no launch runs during this call (launches are synchronous on this thread);
        // the inputs are read into copies before the mutable slice of `out` is made.
        let widen = |x: &HostBuffer<half::bf16>| {
            unsafe { x.view() }
                .iter()
                .map(|v| v.to_f32())
                .collect::<Vec<f32>>()
        };
        let (a, b) = (widen(a), widen(b));
        let out = unsafe { std::slice::from_raw_parts_mut(out.as_ptr(), out.len()) };
        strided_gemm_on_host(out, &a, &b, gemm);
        Ok(())
    }

    fn copy_dtod<T: DeviceElement>(
        &self,
        dst: BufferAt<'_, HostBuffer<T>>,
        src: BufferAt<'_, HostBuffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError> {
        let d = dst.range(len, "copy_dtod dst")?;
        let s = src.range(len, "copy_dtod src")?;
        check_disjoint(dst, len, src, len, std::mem::size_of::<T>(), "copy_dtod")?;
        self.issue(
            "copy_dtod",
            &[
                Access::write(bytes_of(dst.buffer, d.clone())),
                Access::read(bytes_of(src.buffer, s.clone())),
            ],
        )?;
        // SAFETY: both ranges lie inside their live allocations (checked) and do not overlap
        // (checked); launches are synchronous on this thread, so no kernel touches them now.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.buffer.as_ptr().add(s.start),
                dst.buffer.as_ptr().add(d.start),
                len,
            )
        };
        Ok(())
    }

    fn memset_zero<T: DeviceElement>(
        &self,
        at: BufferAt<'_, HostBuffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError> {
        let r = at.range(len, "memset_zero")?;
        self.issue(
            "memset_zero",
            &[Access::write(bytes_of(at.buffer, r.clone()))],
        )?;
        // SAFETY: the range lies inside the live allocation (checked); all-zero bytes are a
        // valid value of every DeviceElement type (integers, IEEE floats, bf16, f16).
        unsafe { std::ptr::write_bytes(at.buffer.as_ptr().add(r.start), 0, len) };
        Ok(())
    }

    fn gemm_f32_at(
        &self,
        out: BufferAt<'_, HostBuffer<f32>>,
        a: BufferAt<'_, HostBuffer<f32>>,
        b: BufferAt<'_, HostBuffer<f32>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let ranges = gemm_ranges(out, a, b, shape)?;
        self.issue(
            "gemm",
            &[
                Access::write(bytes_of(out.buffer, ranges[0].clone())),
                Access::read(bytes_of(a.buffer, ranges[1].clone())),
                Access::read(bytes_of(b.buffer, ranges[2].clone())),
            ],
        )?;
        Self::matmul_ranges(out, a, b, ranges, shape);
        Ok(())
    }
}

#[cfg(test)]
mod offset_op_tests {
    use super::*;

    #[test]
    fn copies_memsets_and_gemms_work_on_sub_ranges() {
        let dev = EmulatedDevice::new();
        let host: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let buf = dev.upload(&host).unwrap();
        let other = dev.alloc_zeros::<f32>(4).unwrap();
        // Within one allocation: [0, 3) → [5, 8).
        dev.copy_dtod(BufferAt::new(&buf, 5), BufferAt::new(&buf, 0), 3)
            .unwrap();
        dev.copy_dtod(BufferAt::new(&other, 1), BufferAt::new(&buf, 8), 2)
            .unwrap();
        dev.memset_zero(BufferAt::new(&buf, 1), 2).unwrap();
        assert_eq!(
            buf.to_vec(),
            vec![0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 1.0, 2.0, 8.0, 9.0]
        );
        assert_eq!(other.to_vec(), vec![0.0, 8.0, 9.0, 0.0]);
        // Overlapping or out-of-range ranges are errors, and change nothing.
        for (dst, src, len) in [(2, 0, 3), (8, 0, 3), (0, 9, 2)] {
            let r = dev.copy_dtod(BufferAt::new(&buf, dst), BufferAt::new(&buf, src), len);
            assert!(matches!(r, Err(DeviceError::Shape(_))), "{dst} {src} {len}");
        }
        assert!(dev.memset_zero(BufferAt::new(&buf, 9), 2).is_err());
        // out[1,1] = a[1,2]·b[2,1] with every operand at an offset of one buffer.
        let m = dev.upload(&[9.0f32, 2.0, 3.0, 4.0, 5.0, 7.0]).unwrap();
        let shape = GemmShape {
            m: 1,
            k: 2,
            n: 1,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        };
        dev.gemm_f32_at(
            BufferAt::new(&m, 0),
            BufferAt::new(&m, 1),
            BufferAt::new(&m, 3),
            shape,
        )
        .unwrap();
        assert_eq!(m.to_vec()[0], 2.0 * 4.0 + 3.0 * 5.0);
        let overlap = dev.gemm_f32_at(
            BufferAt::new(&m, 1),
            BufferAt::new(&m, 1),
            BufferAt::new(&m, 3),
            shape,
        );
        assert!(matches!(overlap, Err(DeviceError::Shape(_))));
    }
}
