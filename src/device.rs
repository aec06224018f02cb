//! Which backend runs the work: `--device auto|cpu|cuda[:N]` (design.md §3), plus the
//! debugging choice `--device emu`.
//!
//! Every query of the CUDA driver first checks that `libcuda.so.1` can be loaded at all:
//! cudarc loads the driver lazily and *panics* on the first driver call when it is missing
//! (spec/cuda-and-crates.md §1.3). `auto` takes CUDA device 0 when it opens, else falls back
//! to the CPU backend and says why in one line; an explicit `cuda` request that cannot be met
//! is an error. `emu` runs the CUDA backend over the CPU emulator ([`EmulatedDevice`]): very
//! slow, but the whole CUDA code path of every command then runs on a machine without a GPU.
//!
//! [`resolve`] opens the device; [`with_backend!`](crate::with_backend) turns the result into
//! a backend value and runs one generic body on it, so each command is written once.

use std::fmt;
use std::str::FromStr;

use cudarc::driver::{result as cu, sys};

use crate::backend::cuda::cudarc_device::CudarcDevice;
use crate::backend::cuda::Precision;

/// A device request, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA device when one is usable, else the CPU.
    #[default]
    Auto,
    /// The pure-Rust CPU backend.
    Cpu,
    /// CUDA device with this ordinal (`cuda` means `cuda:0`).
    Cuda(usize),
    /// Debugging: the CUDA backend on the CPU emulator (`emu`, also spelled `cuda-emu`).
    Emulated,
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DeviceError::InvalidSpec(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "emu" | "cuda-emu" => Ok(Self::Emulated),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                // Digits only: `usize::from_str` would also accept a leading `+`.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                ordinal.parse().map(Self::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Emulated => f.write_str("emu"),
        }
    }
}

/// The backend a [`DeviceSpec`] resolved to, with the one line that says why. A CUDA device
/// is already open (context, stream, cuBLASLt handle), so every driver error surfaced here.
pub enum Resolved {
    /// The CPU backend.
    Cpu {
        /// e.g. `no NVIDIA driver (libcuda.so.1) found; using the CPU backend`.
        reason: String,
    },
    /// The CUDA backend on an opened GPU.
    Cuda {
        /// The device, ready for [`crate::backend::cuda::CudaBackend::new`] (boxed: it holds
        /// the cuBLAS/cuBLASLt handles and plan cache).
        device: Box<CudarcDevice>,
        /// e.g. `using CUDA device 0 (NVIDIA H100 80GB HBM3, compute capability 9.0, 79.1 GiB)`.
        reason: String,
        /// The GEMM precision (`--precision`; f32 unless asked).
        precision: Precision,
        /// Whether work may overlap on two streams (`--stream-overlap`; on unless asked).
        stream_overlap: bool,
    },
    /// The CUDA backend on the CPU emulator (debugging).
    Emulated {
        /// States that this is the slow debugging path.
        reason: String,
        /// The GEMM precision (`--precision`; f32 unless asked).
        precision: Precision,
        /// Whether work may overlap on two streams (`--stream-overlap`; on unless asked).
        stream_overlap: bool,
    },
}

impl Resolved {
    /// The one line to print at start-up.
    pub fn reason(&self) -> &str {
        match self {
            Self::Cpu { reason } | Self::Cuda { reason, .. } | Self::Emulated { reason, .. } => {
                reason
            }
        }
    }

    /// Applies `--precision`. The CUDA backends take it as their GEMM precision. The CPU
    /// backend computes in f32 only: `bf16` is an error when the CPU was asked for by name
    /// (`requested` is `cpu`), and a note in the reason when `auto` fell back to the CPU.
    pub fn with_precision(
        self,
        requested: DeviceSpec,
        precision: Precision,
    ) -> Result<Self, DeviceError> {
        match self {
            Self::Cuda {
                device,
                reason,
                stream_overlap,
                ..
            } => Ok(Self::Cuda {
                device,
                reason,
                precision,
                stream_overlap,
            }),
            Self::Emulated {
                reason,
                stream_overlap,
                ..
            } => Ok(Self::Emulated {
                reason,
                precision,
                stream_overlap,
            }),
            Self::Cpu { .. } if precision == Precision::F32 => Ok(self),
            Self::Cpu { .. } if requested == DeviceSpec::Cpu => Err(DeviceError::PrecisionOnCpu),
            Self::Cpu { reason } => Ok(Self::Cpu {
                reason: format!(
                    "{reason} (--precision bf16 ignored: the CPU backend computes in f32)"
                ),
            }),
        }
    }

    /// Applies `--stream-overlap`: whether the CUDA backends overlap work on two streams
    /// (MEGABYTE's global decode steps with the other rows' local steps; docs/cuda-backend.md,
    /// "Streams"). The CPU backend runs one op at a time either way.
    pub fn with_stream_overlap(mut self, on: bool) -> Self {
        match &mut self {
            Self::Cuda {
                stream_overlap,
                reason,
                ..
            }
            | Self::Emulated {
                stream_overlap,
                reason,
                ..
            } => {
                *stream_overlap = on;
                if !on {
                    reason.push_str(" (--stream-overlap off: one stream)");
                }
            }
            Self::Cpu { .. } => {}
        }
        self
    }

    /// `cpu`, `cuda` or `emu`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Cpu { .. } => "cpu",
            Self::Cuda { .. } => "cuda",
            Self::Emulated { .. } => "emu",
        }
    }
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The opened device has no useful Debug form; its description is in the reason.
        write!(f, "Resolved::{}({:?})", self.kind(), self.reason())
    }
}

/// Runs `$body` with `$be` bound to the backend a [`Resolved`] names, owned by the body:
/// `Cpu<f32>`, `CudaBackend<CudarcDevice>` or `CudaBackend<EmulatedDevice>`. The body is
/// compiled once per backend type (as [`with_model!`](crate::with_model) does per model), so a
/// command is written once, generically, and this is its only dispatch point.
///
/// ```no_run
/// use mega::backend::Backend;
/// let resolved = mega::device::resolve(mega::device::DeviceSpec::Auto).unwrap();
/// let name = mega::with_backend!(resolved, |be| be.name());
/// ```
#[macro_export]
macro_rules! with_backend {
    ($resolved:expr, |$be:ident| $body:expr) => {
        match $resolved {
            $crate::device::Resolved::Cpu { .. } => {
                let $be = $crate::backend::cpu::Cpu::<f32>::new();
                $body
            }
            $crate::device::Resolved::Cuda {
                device,
                precision,
                stream_overlap,
                ..
            } => {
                let $be = $crate::backend::cuda::CudaBackend::with_precision(*device, precision);
                $be.set_stream_overlap(stream_overlap);
                $body
            }
            $crate::device::Resolved::Emulated {
                precision,
                stream_overlap,
                ..
            } => {
                let $be = $crate::backend::cuda::CudaBackend::with_precision(
                    $crate::emu::EmulatedDevice::new(),
                    precision,
                );
                $be.set_stream_overlap(stream_overlap);
                $body
            }
        }
    };
}

/// Why a device request cannot be met. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The text is not `auto`, `cpu`, `cuda` or `cuda:N` (nor the debugging `emu`).
    #[error("invalid device {0:?}: expected auto, cpu, cuda or cuda:N (N = device number)")]
    InvalidSpec(String),
    /// CUDA was requested but the driver library is not loadable.
    #[error(
        "--device {spec} needs the NVIDIA driver, but libcuda.so.1 was not found \
         (install the driver or add its directory to LD_LIBRARY_PATH; --device cpu runs without it)"
    )]
    NoDriver {
        /// The request, e.g. `cuda:0`.
        spec: DeviceSpec,
    },
    /// The driver loaded but reported an error while listing devices (no GPU,
    /// driver/library mismatch, ...).
    #[error("--device {spec}: the CUDA driver reported {message}")]
    Driver {
        /// The request.
        spec: DeviceSpec,
        /// The driver's error, e.g. `DriverError(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected")`.
        message: String,
    },
    /// `--precision bf16` with `--device cpu`.
    #[error(
        "--precision bf16 needs the CUDA backend (bf16 GEMMs on tensor cores); \
         the CPU backend computes in f32: use --precision f32 or --device cuda"
    )]
    PrecisionOnCpu,
    /// The ordinal is past the last device.
    #[error("--device cuda:{ordinal}: there is no such device ({count} CUDA device(s) found)")]
    NoSuchDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// The device exists but could not be opened (context creation, cuBLAS missing, ...).
    #[error("--device cuda:{ordinal} ({name}) could not be opened: {message}")]
    Open {
        /// The device's ordinal.
        ordinal: usize,
        /// The device's name.
        name: String,
        /// What failed, e.g. `CUDA: cuBLASLt (libcublasLt.so.13) not found`.
        message: String,
    },
}

/// The reason printed when `auto` finds no driver.
pub const NO_DRIVER_REASON: &str = "no NVIDIA driver (libcuda.so.1) found; using the CPU backend";

/// The reason printed for `--device emu`.
pub const EMULATED_REASON: &str =
    "using the CUDA backend on the CPU emulator (--device emu, a debugging mode: very slow)";

/// Whether the CUDA driver library can be loaded. Must be true before any other driver call.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names; it calls nothing in it.
    unsafe { sys::is_culib_present() }
}

/// Resolves a request to a backend (opening a CUDA device when one is chosen), or explains in
/// one line why it cannot be met. `auto` never fails.
pub fn resolve(spec: DeviceSpec) -> Result<Resolved, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Resolved::Cpu {
            reason: "using the CPU backend (--device cpu)".to_string(),
        }),
        DeviceSpec::Emulated => Ok(Resolved::Emulated {
            reason: EMULATED_REASON.to_string(),
            precision: Precision::F32,
            stream_overlap: true,
        }),
        DeviceSpec::Cuda(ordinal) => open_cuda(spec, ordinal),
        DeviceSpec::Auto => {
            if !driver_present() {
                return Ok(Resolved::Cpu {
                    reason: NO_DRIVER_REASON.to_string(),
                });
            }
            Ok(open_cuda(spec, 0).unwrap_or_else(|e| Resolved::Cpu {
                reason: auto_fallback_reason(&e),
            }))
        }
    }
}

/// The one line `auto` prints when it cannot use CUDA device 0.
fn auto_fallback_reason(e: &DeviceError) -> String {
    match e {
        DeviceError::NoSuchDevice { .. } => {
            "the NVIDIA driver reports no CUDA device; using the CPU backend".to_string()
        }
        DeviceError::Driver { message, .. } => {
            format!("CUDA initialisation failed ({message}); using the CPU backend")
        }
        DeviceError::Open {
            ordinal,
            name,
            message,
        } => format!(
            "CUDA device {ordinal} ({name}) could not be opened ({message}); using the CPU backend"
        ),
        DeviceError::NoDriver { .. } => NO_DRIVER_REASON.to_string(),
        other => format!("{other}; using the CPU backend"),
    }
}

/// Opens CUDA device `ordinal`, or says why not.
fn open_cuda(spec: DeviceSpec, ordinal: usize) -> Result<Resolved, DeviceError> {
    if !driver_present() {
        return Err(DeviceError::NoDriver { spec });
    }
    let devices = cuda_devices().map_err(|message| DeviceError::Driver { spec, message })?;
    let count = devices.len();
    let info = devices
        .into_iter()
        .nth(ordinal)
        .ok_or(DeviceError::NoSuchDevice { ordinal, count })?;
    // A panic inside cudarc (a symbol missing from an old driver) becomes an error too.
    let opened = std::panic::catch_unwind(|| CudarcDevice::new(ordinal))
        .unwrap_or_else(|_| {
            Err(crate::emu::DeviceError::Driver(
                "a panic inside the CUDA bindings".to_string(),
            ))
        })
        .map_err(|e| DeviceError::Open {
            ordinal,
            name: info.name.clone(),
            message: e.to_string(),
        })?;
    Ok(Resolved::Cuda {
        device: Box::new(opened),
        reason: format!("using CUDA device {ordinal} ({})", info.describe()),
        precision: Precision::F32,
        stream_overlap: true,
    })
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
struct CudaDeviceInfo {
    name: String,
    compute_capability: (i32, i32),
    total_memory_bytes: usize,
}

impl CudaDeviceInfo {
    /// e.g. `NVIDIA H100 80GB HBM3, compute capability 9.0, 79.1 GiB`.
    fn describe(&self) -> String {
        format!(
            "{}, compute capability {}.{}, {:.1} GiB",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory_bytes as f64 / (1u64 << 30) as f64
        )
    }
}
/// Lists the CUDA devices. Call only when [`driver_present`] is true. A panic inside cudarc
/// (e.g. a symbol missing from an old driver) is turned into an error, not propagated.
fn cuda_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    std::panic::catch_unwind(query_cuda_devices)
        .unwrap_or_else(|_| Err("a panic inside the CUDA driver bindings".to_string()))
}

fn query_cuda_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    use sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as CC_MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as CC_MINOR,
    };
    cu::init().map_err(|e| e.to_string())?;
    let count = cu::device::get_count().map_err(|e| e.to_string())?;
    (0..count)
        .map(|ordinal| {
            let device = cu::device::get(ordinal).map_err(|e| e.to_string())?;
            let name = cu::device::get_name(device).map_err(|e| e.to_string())?;
            // SAFETY: `device` was just returned by cuDeviceGet.
            let (major, minor, total) = unsafe {
                (
                    cu::device::get_attribute(device, CC_MAJOR).map_err(|e| e.to_string())?,
                    cu::device::get_attribute(device, CC_MINOR).map_err(|e| e.to_string())?,
                    cu::device::total_mem(device).map_err(|e| e.to_string())?,
                )
            };
            Ok(CudaDeviceInfo {
                name,
                compute_capability: (major, minor),
                total_memory_bytes: total,
            })
        })
        .collect()
}

/// Human-readable lines about the compute devices of this host, for `mega info`: the CPU
/// (model, logical cores, rayon threads), then CUDA (devices, or why there are none), then the
/// debugging emulator.
pub fn describe_devices() -> Vec<String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let mut lines = vec![format!(
        "cpu: {} ({} logical cores, {} rayon threads)",
        cpu_model_name().unwrap_or_else(|| "unknown model".to_string()),
        cores,
        rayon::current_num_threads()
    )];
    lines.extend(describe_cuda());
    lines.push(
        "emu: the CUDA backend on the CPU emulator, available for debugging \
         (--device emu; very slow)"
            .to_string(),
    );
    lines
}

/// The CUDA lines of [`describe_devices`].
fn describe_cuda() -> Vec<String> {
    if !driver_present() {
        return vec![
            "cuda: unavailable: no NVIDIA driver (libcuda.so.1 not found on the library path)"
                .to_string(),
        ];
    }
    match cuda_devices() {
        Ok(devices) if devices.is_empty() => {
            vec!["cuda: unavailable: the driver is present but reports no device".to_string()]
        }
        Ok(devices) => {
            let mut lines = vec![format!("cuda: {} device(s)", devices.len())];
            lines.extend(
                devices
                    .iter()
                    .enumerate()
                    .map(|(ordinal, device)| format!("cuda:{ordinal}: {}", device.describe())),
            );
            lines
        }
        Err(message) => vec![format!(
            "cuda: unavailable: the driver is present, but reported {message}"
        )],
    }
}

/// The first `model name` in /proc/cpuinfo (Linux x86); `None` elsewhere.
fn cpu_model_name() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}
