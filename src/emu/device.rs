//! The device layer a CUDA backend is built on (design.md §4 item 3): allocate, copy, launch a
//! kernel by name, events, GEMM. [`EmulatedDevice`] implements it on the CPU emulator, so the
//! layers above can be tested end to end in `cargo test`; a cudarc implementation (kernels from
//! [`crate::kernels::MODULES`], arguments marshalled through the same [`KernelArg`] pointers
//! into cuLaunchKernel, GEMMs through cuBLASLt) is the GPU side.

use super::arg::{DeviceElement, KernelArg};
use super::buffer::HostBuffer;
use super::launch::{launch, EmuError, LaunchConfig};
use super::strided_gemm::{strided_gemm_on_host, StridedGemm};

/// A buffer in device memory.
pub trait DeviceBuffer {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the buffer has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: DeviceElement> DeviceBuffer for HostBuffer<T> {
    fn len(&self) -> usize {
        HostBuffer::len(self)
    }
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
}

/// The lowest layer of a GPU backend. Work is ordered as issued on one stream.
pub trait DeviceApi {
    /// A device allocation of `T`s, passable to kernels.
    type Buffer<T: DeviceElement>: DeviceBuffer + KernelArg + Send;

    /// Short description, e.g. `CPU emulator`.
    fn name(&self) -> String;
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
    /// A host copy of `src`, after all work issued before.
    fn download<T: DeviceElement>(&self, src: &Self::Buffer<T>) -> Result<Vec<T>, DeviceError>;
    /// Launches kernel `name` of the kernel manifest.
    fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<(), DeviceError>;
    /// Records an event after the work issued so far.
    fn record_event(&self) -> Result<Event, DeviceError>;
    /// Makes later work wait until `event` completed.
    fn wait_event(&self, event: &Event) -> Result<(), DeviceError>;
    /// Blocks until all issued work has finished.
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
    /// buffer rules as [`DeviceApi::gemm_f32`].
    fn gemm_bf16(
        &self,
        out: &mut Self::Buffer<f32>,
        a: &Self::Buffer<half::bf16>,
        b: &Self::Buffer<half::bf16>,
        shape: GemmShape,
    ) -> Result<(), DeviceError>;

    /// Strided-batched f32 GEMM (see [`StridedGemm`]): `batch` products whose matrices lie at
    /// fixed strides inside `out`, `a`, `b` (cuBLAS `sgemmStridedBatched`). `a` and `b` may
    /// be the same buffer.
    fn gemm_strided_batched_f32(
        &self,
        out: &mut Self::Buffer<f32>,
        a: &Self::Buffer<f32>,
        b: &Self::Buffer<f32>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError>;
}

/// [`DeviceApi`] on the CPU emulator: buffers are exact-size host arrays, kernels run
/// synchronously in the emulator (so events are complete when recorded), GEMMs run on the CPU
/// backend's matmul.
#[derive(Debug, Default)]
pub struct EmulatedDevice {
    issued: std::sync::atomic::AtomicU64,
}

impl EmulatedDevice {
    /// A device; its schedule is the calling thread's ([`super::set_schedule`]).
    pub fn new() -> Self {
        Self::default()
    }

    fn issue(&self) {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl DeviceApi for EmulatedDevice {
    type Buffer<T: DeviceElement> = HostBuffer<T>;

    fn name(&self) -> String {
        "CPU emulator".to_string()
    }

    fn alloc_zeros<T: DeviceElement + Default>(
        &self,
        len: usize,
    ) -> Result<HostBuffer<T>, DeviceError> {
        self.issue();
        Ok(HostBuffer::filled(len, T::default()))
    }

    fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<HostBuffer<T>, DeviceError> {
        self.issue();
        Ok(HostBuffer::from_slice(host))
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
        self.issue();
        dst.copy_from_slice(host);
        Ok(())
    }

    fn download<T: DeviceElement>(&self, src: &HostBuffer<T>) -> Result<Vec<T>, DeviceError> {
        Ok(src.to_vec())
    }

    fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<(), DeviceError> {
        self.issue();
        Ok(launch(name, config, args)?)
    }

    fn record_event(&self) -> Result<Event, DeviceError> {
        Ok(Event {
            sequence: self.issued.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn wait_event(&self, _event: &Event) -> Result<(), DeviceError> {
        // Every operation completes before it returns.
        Ok(())
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn gemm_f32(
        &self,
        out: &mut HostBuffer<f32>,
        a: &HostBuffer<f32>,
        b: &HostBuffer<f32>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let GemmShape {
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        } = shape;
        if out.len() < m * n || a.len() < m * k || b.len() < k * n {
            return Err(DeviceError::Shape(format!(
                "gemm {m}x{k}x{n}: buffers hold out {}, a {}, b {}",
                out.len(),
                a.len(),
                b.len()
            )));
        }
        self.issue();
        // SAFETY: no launch runs during this call (launches are synchronous on this thread,
        // and `out`, borrowed mutably, cannot be shared with another).
        let (a, b) = unsafe { (a.view(), b.view()) };
        crate::backend::cpu::matmul::matmul(
            &mut out.as_mut_slice()[..m * n],
            &a[..m * k],
            &b[..k * n],
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        );
        Ok(())
    }

    fn gemm_bf16(
        &self,
        out: &mut HostBuffer<f32>,
        a: &HostBuffer<half::bf16>,
        b: &HostBuffer<half::bf16>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let GemmShape { m, k, n, .. } = shape;
        if out.len() < m * n || a.len() < m * k || b.len() < k * n {
            return Err(DeviceError::Shape(format!(
                "gemm_bf16 {m}x{k}x{n}: buffers hold out {}, a {}, b {}",
                out.len(),
                a.len(),
                b.len()
            )));
        }
        // What a GPU computes: every bf16 value widens to f32 exactly, and the product of two
        // bf16 values (8 significant bits each) is exact in f32 (16 bits ≤ 24), so the f32
        // GEMM of the widened inputs differs from cuBLASLt's only in the summation order.
        let widen = |x: &HostBuffer<half::bf16>, len: usize| {
            HostBuffer::from_slice(
                &x.to_vec()[..len]
                    .iter()
                    .map(|v| v.to_f32())
                    .collect::<Vec<_>>(),
            )
        };
        let (a32, b32) = (widen(a, m * k), widen(b, k * n));
        self.gemm_f32(out, &a32, &b32, shape)
    }

    fn gemm_strided_batched_f32(
        &self,
        out: &mut HostBuffer<f32>,
        a: &HostBuffer<f32>,
        b: &HostBuffer<f32>,
        gemm: &StridedGemm,
    ) -> Result<(), DeviceError> {
        gemm.check(out.len(), a.len(), b.len())?;
        self.issue();
        // SAFETY: as in `gemm_f32`: no launch runs during this call and `out` is borrowed
        // mutably, so it is neither `a` nor `b`.
        let (a, b) = unsafe { (a.view(), b.view()) };
        strided_gemm_on_host(out.as_mut_slice(), a, b, gemm);
        Ok(())
    }
}
