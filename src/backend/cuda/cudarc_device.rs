//! [`DeviceApi`] on a real GPU through cudarc: one context and two streams on device N, kernels
//! from the embedded PTX ([`crate::kernels::MODULES`]) loaded lazily by a
//! [`KernelCache`], launches through `cuLaunchKernel` with the same argument pointers the
//! emulator takes, every GEMM (plain, bf16, strided-batched) through cuBLASLt
//! ([`super::cublaslt`]: descriptors, layouts and the heuristic's algorithm cached per
//! problem, one workspace per stream).
//!
//! The main stream is the context's null stream; the side stream is a non-blocking one, so the
//! two never synchronise implicitly and only events order them. cuBLASLt gets a workspace per
//! stream: two GEMMs running at once must not share scratch memory.
//!
//! Nothing here runs in `cargo test` on a host without a driver: [`CudarcDevice::new`] checks
//! for `libcuda.so.1` first (cudarc panics on the first driver call without it) and returns
//! an error, as `--device cuda` does (src/device.rs).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr,
};
use cudarc::nvrtc::Ptx;

use super::cublaslt::{
    empty_product, EmptyProduct, LtCompute, LtDtype, LtGemm, LtOperands, LtProblem,
};
use super::module_cache::KernelCache;
use crate::emu::hazards::STREAMS;
use crate::emu::{
    check_disjoint, gemm_ranges, ArgInfo, BufferAt, DeviceApi, DeviceBuffer, DeviceElement,
    DeviceError, Event, GemmShape, KernelArg, LaunchConfig, StreamId, StridedGemm,
};

/// Events kept for [`DeviceApi::wait_event`]; older ones are dropped (waiting on an event
/// that old is waiting on work long finished).
const KEPT_EVENTS: usize = 1024;

fn driver(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Driver(format!("{what}: {e}"))
}

/// A device allocation of `len` `T`s, kept as bytes (cudarc's typed allocations need its own
/// element traits) with its device address, which is what a kernel parameter holds.
pub struct CudarcBuffer<T> {
    bytes: CudaSlice<u8>,
    ptr: sys::CUdeviceptr,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> DeviceBuffer for CudarcBuffer<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn device_address(&self) -> usize {
        self.ptr as usize
    }
}

// SAFETY: the parameter value is the allocation's device address (a pointer-sized integer),
// stored in the struct; the allocation holds `len` elements of T.
unsafe impl<T: DeviceElement> KernelArg for CudarcBuffer<T> {
    fn param_ptr(&self) -> *mut c_void {
        &self.ptr as *const sys::CUdeviceptr as *mut c_void
    }
    fn arg_info(&self) -> ArgInfo {
        ArgInfo::pointer_to::<T>()
    }
}

fn as_bytes<T: DeviceElement>(host: &[T]) -> &[u8] {
    // SAFETY: DeviceElement types are plain data without padding (its safety contract), so
    // their bytes are initialised; the slice covers exactly the host elements.
    unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, std::mem::size_of_val(host)) }
}

/// One CUDA device: context, main and side streams, a cuBLASLt handle with its plan cache and
/// workspace per stream, and the kernel cache.
pub struct CudarcDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    /// Indexed by [`StreamId::index`].
    streams: [Arc<CudaStream>; STREAMS],
    /// The stream operations are issued on ([`StreamId::index`]).
    current: AtomicUsize,
    // Declared before the workspaces they point into, so they are dropped first.
    lt: [LtGemm; STREAMS],
    _lt_workspaces: [CudaSlice<u8>; STREAMS],
    f32_compute: LtCompute,
    kernels: KernelCache<Arc<CudaModule>, CudaFunction>,
    events: Mutex<(u64, VecDeque<(u64, CudaEvent)>)>,
}

impl CudarcDevice {
    /// Opens device `ordinal`. Errors (never panics) when no driver is installed, the device
    /// does not exist, or cuBLASLt cannot be loaded. f32 GEMMs use full f32 arithmetic
    /// (`CUBLAS_COMPUTE_32F`); see [`CudarcDevice::with_tf32`].
    pub fn new(ordinal: usize) -> Result<Self, DeviceError> {
        if !crate::device::driver_present() {
            return Err(DeviceError::Driver(
                "no NVIDIA driver (libcuda.so.1) found".to_string(),
            ));
        }
        // SAFETY: plain library presence check (dlopen), no driver call.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(DeviceError::Driver(
                "cuBLASLt (libcublasLt.so.13) not found".to_string(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver("context", e))?;
        // The backend orders its streams with explicit events (and keeps buffers per stream
        // in its pools), so cudarc's per-buffer event tracking would only add an event record
        // and wait per kernel argument.
        // SAFETY: called before any allocation of this context.
        unsafe { ctx.disable_event_tracking() };
        let main = ctx.default_stream();
        let side = ctx.new_stream().map_err(|e| driver("side stream", e))?;
        let (major, _) = ctx
            .compute_capability()
            .map_err(|e| driver("compute capability", e))?;
        let workspace_bytes = LtGemm::workspace_bytes_for(major);
        let workspace = || {
            main.alloc_zeros::<u8>(workspace_bytes)
                .map_err(|e| driver("cuBLASLt workspace", e))
        };
        let workspaces = [workspace()?, workspace()?];
        let lt_on = |w: &CudaSlice<u8>| {
            let (ptr, _sync) = w.device_ptr(&main);
            LtGemm::new(ptr, workspace_bytes)
        };
        let lt = [lt_on(&workspaces[0])?, lt_on(&workspaces[1])?];
        // The workspaces were zeroed on the main stream; the side stream must not use its
        // own before that finished.
        main.synchronize().map_err(|e| driver("synchronize", e))?;
        Ok(Self {
            ordinal,
            ctx,
            streams: [main, side],
            current: AtomicUsize::new(StreamId::Main.index()),
            lt,
            _lt_workspaces: workspaces,
            f32_compute: LtCompute::F32,
            kernels: KernelCache::new(),
            events: Mutex::new((0, VecDeque::new())),
        })
    }

    /// Opt-in TF32 for f32 GEMMs (`CUBLAS_COMPUTE_32F_FAST_TF32`): inputs rounded to 10
    /// mantissa bits on the tensor cores, f32 accumulate — about 8× the f32 FLOP rate on an
    /// H100 (≈495 vs ≈67 TFLOP/s dense) at a relative error per product up to 2⁻¹⁰ instead of
    /// 2⁻²⁴. Off by default: the backend's f32 path is meant to match the CPU backend tightly.
    pub fn with_tf32(mut self, allow: bool) -> Self {
        self.f32_compute = if allow {
            LtCompute::Tf32
        } else {
            LtCompute::F32
        };
        self
    }

    /// Number of cuBLASLt plans (descriptor sets) cached so far: one per distinct GEMM
    /// problem.
    pub fn cached_gemm_plans(&self) -> usize {
        self.lt.iter().map(LtGemm::cached_plans).sum()
    }

    /// The stream operations are issued on now.
    fn stream_now(&self) -> &Arc<CudaStream> {
        &self.streams[self.current.load(Ordering::Relaxed)]
    }

    /// bf16 GEMM with a bf16 `out` (A/B/C/D `CUDA_R_16BF`, f32 accumulate, one rounding of
    /// each result to bf16); otherwise as [`DeviceApi::gemm_bf16`]. With `accumulate`, the
    /// previous bf16 `out` is added in f32 before that rounding.
    pub fn gemm_bf16_to_bf16(
        &self,
        out: &mut CudarcBuffer<half::bf16>,
        a: &CudarcBuffer<half::bf16>,
        b: &CudarcBuffer<half::bf16>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        check_gemm_lens("gemm_bf16_to_bf16", shape, out.len, a.len, b.len)?;
        self.lt_gemm(
            shape.into(),
            LtOperands {
                out: out.ptr,
                a: a.ptr,
                b: b.ptr,
                input: LtDtype::Bf16,
                output: LtDtype::Bf16,
            },
            LtCompute::F32,
        )
    }

    /// Runs a GEMM whose operand extents were checked, on device addresses (each operand's
    /// first matrix): the one path every GEMM variant takes, with `alpha = 1` and
    /// `beta = accumulate`.
    fn lt_gemm(
        &self,
        problem: LtProblem,
        ops: LtOperands,
        compute: LtCompute,
    ) -> Result<(), DeviceError> {
        let beta = if problem.shape.accumulate { 1.0 } else { 0.0 };
        self.lt_run(problem, ops, compute, (1.0, beta))
    }

    /// [`CudarcDevice::lt_gemm`] with any factors. Empty products (k = 0) never reach
    /// cuBLASLt, which rejects empty layouts: they leave `out` as is (beta = 1) or zero it
    /// (beta = 0, contiguous output); any other case is an error ([`empty_product`]).
    fn lt_run(
        &self,
        problem: LtProblem,
        ops: LtOperands,
        compute: LtCompute,
        scales: (f32, f32),
    ) -> Result<(), DeviceError> {
        let GemmShape { m, k, n, .. } = problem.shape;
        if m == 0 || n == 0 || problem.batch == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| driver("gemm", e))?;
        if k == 0 {
            return match empty_product(&problem, scales.1) {
                EmptyProduct::Nothing => Ok(()),
                // SAFETY: `out` holds these elements of the output type (checked by the
                // caller), in this context.
                EmptyProduct::Zero(elements) => unsafe {
                    cu::memset_d8_async(
                        ops.out as sys::CUdeviceptr,
                        0,
                        elements * ops.output.bytes(),
                        self.stream_now().cu_stream(),
                    )
                }
                .map_err(|e| driver("gemm (k = 0)", e)),
                EmptyProduct::Unsupported => Err(DeviceError::Shape(format!(
                    "gemm with k = 0: beta = {} on a strided output is not supported \
                     (cuBLASLt rejects empty layouts)",
                    scales.1
                ))),
            };
        }
        // SAFETY: the addresses are allocations of this context holding the elements the
        // problem addresses (checked by the caller); `out` does not overlap the inputs
        // (checked or guaranteed by the caller); the work is ordered on the current stream,
        // with that stream's own workspace.
        let current = self.current.load(Ordering::Relaxed);
        unsafe {
            self.lt[current].matmul(
                self.streams[current].cu_stream() as cudarc::cublaslt::sys::cudaStream_t,
                problem,
                ops,
                compute,
                scales,
            )
        }
    }

    /// A strided-batched GEMM on `out` (f32) and inputs of `input` type: checks the extents,
    /// then one cuBLASLt call with batched layouts (the batch count and strides of
    /// [`LtProblem::strided`], the element offsets added to each operand's address).
    fn strided<A, B>(
        &self,
        out: &CudarcBuffer<f32>,
        a: &CudarcBuffer<A>,
        b: &CudarcBuffer<B>,
        gemm: &StridedGemm,
        input: LtDtype,
        compute: LtCompute,
    ) -> Result<(), DeviceError> {
        gemm.check(out.len, a.len, b.len)?;
        let at = |ptr: sys::CUdeviceptr, offset: usize, dtype: LtDtype| {
            ptr + (offset * dtype.bytes()) as sys::CUdeviceptr
        };
        self.lt_run(
            LtProblem::strided(gemm),
            LtOperands {
                out: at(out.ptr, gemm.out.offset, LtDtype::F32),
                a: at(a.ptr, gemm.a.offset, input),
                b: at(b.ptr, gemm.b.offset, input),
                input,
                output: LtDtype::F32,
            },
            compute,
            (gemm.alpha, gemm.beta),
        )
    }

    fn function(&self, name: &str) -> Result<CudaFunction, DeviceError> {
        self.kernels.function(
            name,
            |m| {
                self.ctx
                    .load_module(Ptx::from_src(m.ptx))
                    .map_err(|e| driver(&format!("loading PTX module {}", m.name), e))
            },
            |m, k| m.load_function(k).map_err(|e| driver(k, e)),
        )
    }

    fn alloc_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>, DeviceError> {
        // Some drivers refuse empty allocations; a zero-length buffer keeps one byte.
        self.stream_now()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| driver("alloc", e))
    }

    fn wrap<T>(&self, bytes: CudaSlice<u8>, len: usize) -> CudarcBuffer<T> {
        let ptr = {
            let (ptr, _sync) = bytes.device_ptr(self.stream_now());
            ptr
        };
        CudarcBuffer {
            bytes,
            ptr,
            len,
            _elem: PhantomData,
        }
    }
}

impl DeviceApi for CudarcDevice {
    type Buffer<T: DeviceElement> = CudarcBuffer<T>;

    fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("cuda:{} {name}", self.ordinal)
    }

    fn set_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.current.store(stream.index(), Ordering::Relaxed);
        Ok(())
    }

    fn stream(&self) -> StreamId {
        StreamId::ALL[self.current.load(Ordering::Relaxed)]
    }

    fn alloc_zeros<T: DeviceElement + Default>(
        &self,
        len: usize,
    ) -> Result<CudarcBuffer<T>, DeviceError> {
        // All-zero bytes are T::default() for the element types kernels use (0, 0.0, +0 bf16).
        let bytes = self.alloc_bytes(len * std::mem::size_of::<T>())?;
        Ok(self.wrap(bytes, len))
    }

    fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<CudarcBuffer<T>, DeviceError> {
        let mut buf = self.wrap(self.alloc_bytes(std::mem::size_of_val(host))?, host.len());
        self.write(host, &mut buf)?;
        Ok(buf)
    }

    fn write<T: DeviceElement>(
        &self,
        host: &[T],
        dst: &mut CudarcBuffer<T>,
    ) -> Result<(), DeviceError> {
        if host.len() != dst.len {
            return Err(DeviceError::Shape(format!(
                "write: {} host elements into a buffer of {}",
                host.len(),
                dst.len
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        let src = as_bytes(host);
        let mut view = dst.bytes.slice_mut(0..src.len());
        self.stream_now()
            .memcpy_htod(src, &mut view)
            .map_err(|e| driver("upload", e))
    }

    fn download<T: DeviceElement>(&self, src: &CudarcBuffer<T>) -> Result<Vec<T>, DeviceError> {
        let n_bytes = src.len * std::mem::size_of::<T>();
        let mut bytes = vec![0u8; n_bytes];
        if n_bytes > 0 {
            self.stream_now()
                .memcpy_dtoh(&src.bytes.slice(0..n_bytes), &mut bytes)
                .map_err(|e| driver("download", e))?;
        }
        let mut out = Vec::<T>::with_capacity(src.len);
        // SAFETY: the capacity holds len elements = n_bytes bytes, which the copy fills with
        // values of T (written by kernels or uploads of T); the byte vector does not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, n_bytes);
            out.set_len(src.len);
        }
        Ok(out)
    }

    fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<(), DeviceError> {
        let function = self.function(name)?;
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.param_ptr()).collect();
        self.ctx.bind_to_thread().map_err(|e| driver(name, e))?;
        let (g, b) = (config.grid, config.block);
        // SAFETY: each parameter points to a live value laid out as the kernel's C signature
        // (KernelArg's contract, the same arguments the emulator checks against the source),
        // and device pointers come from this context.
        unsafe {
            cu::launch_kernel(
                function.cu_function(),
                (g.x, g.y, g.z),
                (b.x, b.y, b.z),
                config.shared_mem_bytes,
                self.stream_now().cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver(name, e))
    }

    fn record_event(&self) -> Result<Event, DeviceError> {
        let event = self
            .stream_now()
            .record_event(None)
            .map_err(|e| driver("record event", e))?;
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.0 += 1;
        let sequence = events.0;
        events.1.push_back((sequence, event));
        if events.1.len() > KEPT_EVENTS {
            events.1.pop_front();
        }
        Ok(Event { sequence })
    }

    fn wait_event(&self, event: &Event) -> Result<(), DeviceError> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        match events.1.iter().find(|(s, _)| *s == event.sequence) {
            Some((_, e)) => self
                .stream_now()
                .wait(e)
                .map_err(|e| driver("wait event", e)),
            // Older than every kept event: its work finished before theirs was issued.
            None => Ok(()),
        }
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.ctx.synchronize().map_err(|e| driver("synchronize", e))
    }

    fn gemm_f32(
        &self,
        out: &mut CudarcBuffer<f32>,
        a: &CudarcBuffer<f32>,
        b: &CudarcBuffer<f32>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        self.gemm_f32_at(
            BufferAt::new(out, 0),
            BufferAt::new(a, 0),
            BufferAt::new(b, 0),
            shape,
        )
    }

    fn gemm_bf16(
        &self,
        out: BufferAt<'_, CudarcBuffer<f32>>,
        a: BufferAt<'_, CudarcBuffer<half::bf16>>,
        b: BufferAt<'_, CudarcBuffer<half::bf16>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let GemmShape { m, k, n, .. } = shape;
        let ro = out.range(m * n, "gemm_bf16 out")?;
        let ra = a.range(m * k, "gemm_bf16 a")?;
        let rb = b.range(k * n, "gemm_bf16 b")?;
        let at = |ptr: sys::CUdeviceptr, start: usize, elem: usize| {
            ptr + (start * elem) as sys::CUdeviceptr
        };
        let bf16_bytes = std::mem::size_of::<half::bf16>();
        // The plan cache keys on each pointer's alignment, so views at any offset are safe.
        self.lt_gemm(
            shape.into(),
            LtOperands {
                out: at(out.buffer.ptr, ro.start, std::mem::size_of::<f32>()),
                a: at(a.buffer.ptr, ra.start, bf16_bytes),
                b: at(b.buffer.ptr, rb.start, bf16_bytes),
                input: LtDtype::Bf16,
                output: LtDtype::F32,
            },
            LtCompute::F32,
        )
    }

    fn gemm_strided_batched_f32(
        &self,
        out: &CudarcBuffer<f32>,
        a: &CudarcBuffer<f32>,
        b: &CudarcBuffer<f32>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        self.strided(out, a, b, gemm, LtDtype::F32, self.f32_compute)
    }

    fn gemm_strided_batched_bf16(
        &self,
        out: &CudarcBuffer<f32>,
        a: &CudarcBuffer<half::bf16>,
        b: &CudarcBuffer<half::bf16>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        self.strided(out, a, b, gemm, LtDtype::Bf16, LtCompute::F32)
    }

    fn copy_dtod<T: DeviceElement>(
        &self,
        dst: BufferAt<'_, CudarcBuffer<T>>,
        src: BufferAt<'_, CudarcBuffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError> {
        let elem = std::mem::size_of::<T>();
        dst.range(len, "copy_dtod dst")?;
        src.range(len, "copy_dtod src")?;
        check_disjoint(dst, len, src, len, elem, "copy_dtod")?;
        if len == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver("copy_dtod", e))?;
        // SAFETY: both ranges lie inside live allocations of this context (checked above) and
        // do not overlap; the copy is ordered on the current stream.
        unsafe {
            cu::memcpy_dtod_async(
                (dst.buffer.ptr as usize + dst.offset * elem) as sys::CUdeviceptr,
                (src.buffer.ptr as usize + src.offset * elem) as sys::CUdeviceptr,
                len * elem,
                self.stream_now().cu_stream(),
            )
        }
        .map_err(|e| driver("copy_dtod", e))
    }

    fn memset_zero<T: DeviceElement>(
        &self,
        at: BufferAt<'_, CudarcBuffer<T>>,
        len: usize,
    ) -> Result<(), DeviceError> {
        let elem = std::mem::size_of::<T>();
        at.range(len, "memset_zero")?;
        if len == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver("memset_zero", e))?;
        // SAFETY: the range lies inside a live allocation of this context (checked above).
        unsafe {
            cu::memset_d8_async(
                (at.buffer.ptr as usize + at.offset * elem) as sys::CUdeviceptr,
                0,
                len * elem,
                self.stream_now().cu_stream(),
            )
        }
        .map_err(|e| driver("memset_zero", e))
    }

    fn gemm_f32_at(
        &self,
        out: BufferAt<'_, CudarcBuffer<f32>>,
        a: BufferAt<'_, CudarcBuffer<f32>>,
        b: BufferAt<'_, CudarcBuffer<f32>>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let [ro, ra, rb] = gemm_ranges(out, a, b, shape)?;
        let at = |buf: &CudarcBuffer<f32>, start: usize| {
            buf.ptr + (start * std::mem::size_of::<f32>()) as sys::CUdeviceptr
        };
        // The plan cache keys on each pointer's alignment, so views at any offset are safe.
        self.lt_gemm(
            shape.into(),
            LtOperands {
                out: at(out.buffer, ro.start),
                a: at(a.buffer, ra.start),
                b: at(b.buffer, rb.start),
                input: LtDtype::F32,
                output: LtDtype::F32,
            },
            self.f32_compute,
        )
    }
}

/// Errors unless the buffers hold the `m·n`, `m·k`, `k·n` elements of `shape`.
fn check_gemm_lens(
    what: &str,
    shape: GemmShape,
    out: usize,
    a: usize,
    b: usize,
) -> Result<(), DeviceError> {
    let GemmShape { m, k, n, .. } = shape;
    if out < m * n || a < m * k || b < k * n {
        return Err(DeviceError::Shape(format!(
            "{what} {m}x{k}x{n}: buffers hold out {out}, a {a}, b {b}"
        )));
    }
    Ok(())
}

/// The cudarc device satisfies everything `CudaBackend` needs to be a `Backend` (checked at
/// compile time: nothing here touches a driver).
#[allow(dead_code)]
fn cudarc_backend_is_a_backend() {
    fn is_backend<B: crate::backend::Backend>() {}
    is_backend::<super::CudaBackend<CudarcDevice>>();
}
