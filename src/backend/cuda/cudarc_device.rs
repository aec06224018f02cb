//! [`DeviceApi`] on a real GPU through cudarc: one context and stream on device N, kernels
//! from the embedded PTX ([`crate::kernels::MODULES`]) loaded lazily by a
//! [`KernelCache`], launches through `cuLaunchKernel` with the same argument pointers the
//! emulator takes, GEMMs through cuBLAS.
//!
//! Nothing here runs in `cargo test` on a host without a driver: [`CudarcDevice::new`] checks
//! for `libcuda.so.1` first (cudarc panics on the first driver call without it) and returns
//! an error, as `--device cuda` does (src/device.rs).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr,
};
use cudarc::nvrtc::Ptx;

use super::module_cache::KernelCache;
use crate::emu::{check_disjoint, gemm_ranges};
use crate::emu::{
    ArgInfo, BufferAt, DeviceApi, DeviceBuffer, DeviceElement, DeviceError, Event, GemmShape,
    KernelArg, LaunchConfig,
};

/// Events kept for [`DeviceApi::wait_event`]; older ones are dropped (waiting on an event
/// that old is waiting on work long finished on the single stream).
const KEPT_EVENTS: usize = 1024;

fn driver(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Driver(format!("{what}: {e}"))
}

fn blas(what: &str, e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Driver(format!("{what}: {e:?}"))
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

/// One CUDA device: context, stream, cuBLAS handle and the kernel cache.
pub struct CudarcDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: KernelCache<Arc<CudaModule>, CudaFunction>,
    events: Mutex<(u64, VecDeque<(u64, CudaEvent)>)>,
}

impl CudarcDevice {
    /// Opens device `ordinal`. Errors (never panics) when no driver is installed, the device
    /// does not exist, or cuBLAS cannot be loaded.
    pub fn new(ordinal: usize) -> Result<Self, DeviceError> {
        if !crate::device::driver_present() {
            return Err(DeviceError::Driver(
                "no NVIDIA driver (libcuda.so.1) found".to_string(),
            ));
        }
        // SAFETY: plain library presence check (dlopen), no driver call.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(DeviceError::Driver(
                "cuBLAS (libcublas.so.13) not found".to_string(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver("context", e))?;
        // One stream: cudarc's per-buffer event tracking only pays with several.
        // SAFETY: called before any allocation of this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas("cuBLAS handle", e))?;
        Ok(Self {
            ordinal,
            ctx,
            stream,
            blas,
            kernels: KernelCache::new(),
            events: Mutex::new((0, VecDeque::new())),
        })
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
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| driver("alloc", e))
    }

    fn wrap<T>(&self, bytes: CudaSlice<u8>, len: usize) -> CudarcBuffer<T> {
        let ptr = {
            let (ptr, _sync) = bytes.device_ptr(&self.stream);
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
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| driver("upload", e))
    }

    fn download<T: DeviceElement>(&self, src: &CudarcBuffer<T>) -> Result<Vec<T>, DeviceError> {
        let n_bytes = src.len * std::mem::size_of::<T>();
        let mut bytes = vec![0u8; n_bytes];
        if n_bytes > 0 {
            self.stream
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
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver(name, e))
    }

    fn record_event(&self) -> Result<Event, DeviceError> {
        let event = self
            .stream
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
            Some((_, e)) => self.stream.wait(e).map_err(|e| driver("wait event", e)),
            // Older than every kept event: its work finished before theirs was issued.
            None => Ok(()),
        }
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream
            .synchronize()
            .map_err(|e| driver("synchronize", e))
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
        // do not overlap; the copy is ordered on the one stream with every other operation.
        unsafe {
            cu::memcpy_dtod_async(
                (dst.buffer.ptr as usize + dst.offset * elem) as sys::CUdeviceptr,
                (src.buffer.ptr as usize + src.offset * elem) as sys::CUdeviceptr,
                len * elem,
                self.stream.cu_stream(),
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
                self.stream.cu_stream(),
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
        let at = |buf: &CudarcBuffer<f32>, start: usize| buf.ptr as usize + start * 4;
        let (out_ptr, a_ptr, b_ptr) = (
            at(out.buffer, ro.start),
            at(a.buffer, ra.start),
            at(b.buffer, rb.start),
        );
        let GemmShape {
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        } = shape;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dim = |x: usize| {
            i32::try_from(x)
                .map_err(|_| DeviceError::Shape(format!("gemm dimension {x} exceeds i32")))
        };
        let (mi, ki, ni) = (dim(m)?, dim(k)?, dim(n)?);
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // cuBLAS is column-major: the row-major out[m, n] is the column-major outᵀ[n, m] =
        // op(b)ᵀ · op(a)ᵀ, so b goes first and the dimensions swap.
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        self.ctx.bind_to_thread().map_err(|e| driver("gemm", e))?;
        // SAFETY: the pointers are device addresses of allocations of this context holding at
        // least the elements the leading dimensions and sizes address (checked above).
        unsafe {
            blas_result::sgemm(
                *self.blas.handle(),
                op(trans_b),
                op(trans_a),
                ni,
                mi,
                ki,
                &alpha,
                b_ptr as *const f32,
                if trans_b { ki.max(1) } else { ni },
                a_ptr as *const f32,
                if trans_a { mi } else { ki.max(1) },
                &beta,
                out_ptr as *mut f32,
                ni,
            )
        }
        .map_err(|e| blas("sgemm", e))
    }
}

/// The cudarc device satisfies everything `CudaBackend` needs to be a `Backend` (checked at
/// compile time: nothing here touches a driver).
#[allow(dead_code)]
fn cudarc_backend_is_a_backend() {
    fn is_backend<B: crate::backend::Backend>() {}
    is_backend::<super::CudaBackend<CudarcDevice>>();
}
