//! Which backend runs the work: `--device auto|cpu|cuda[:N]` (design.md §3).
//!
//! Every query of the CUDA driver first checks that `libcuda.so.1` can be loaded at all:
//! cudarc loads the driver lazily and *panics* on the first driver call when it is missing
//! (spec/cuda-and-crates.md §1.3). `auto` falls back to the CPU backend and says why in one
//! line; an explicit `cuda` request that cannot be met is an error.
//!
//! This version of mega has no CUDA backend yet, so a usable CUDA device still resolves to an
//! error (for `cuda`) or to the CPU backend (for `auto`), each saying so.

use std::fmt;
use std::str::FromStr;

use cudarc::driver::{result as cu, sys};

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
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DeviceError::InvalidSpec(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
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
        }
    }
}

/// The backend a [`DeviceSpec`] resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The CPU backend, with a one-line reason for the log (why not CUDA, or that it was asked
    /// for).
    Cpu {
        /// e.g. `no NVIDIA driver (libcuda.so.1) found; using the CPU backend`.
        reason: String,
    },
}

impl Resolved {
    /// The one line to print at start-up.
    pub fn reason(&self) -> &str {
        match self {
            Self::Cpu { reason } => reason,
        }
    }
}

/// Why a device request cannot be met. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The text is not `auto`, `cpu`, `cuda` or `cuda:N`.
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
    /// The driver loaded but reported an error (no GPU, driver/library mismatch, ...).
    #[error("--device {spec}: the CUDA driver reported {message}")]
    Driver {
        /// The request.
        spec: DeviceSpec,
        /// The driver's error, e.g. `DriverError(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected")`.
        message: String,
    },
    /// The ordinal is past the last device.
    #[error("--device cuda:{ordinal}: there is no such device ({count} CUDA device(s) found)")]
    NoSuchDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// The device is usable but this build cannot run on it.
    #[error(
        "CUDA device {ordinal} ({name}) is available, but the CUDA backend is not built yet in \
         this version of mega; use --device cpu"
    )]
    CudaBackendNotBuilt {
        /// The device's ordinal.
        ordinal: usize,
        /// The device's name.
        name: String,
    },
}

/// The reason printed when `auto` finds no driver.
pub const NO_DRIVER_REASON: &str = "no NVIDIA driver (libcuda.so.1) found; using the CPU backend";

/// Whether the CUDA driver library can be loaded. Must be true before any other driver call.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names; it calls nothing in it.
    unsafe { sys::is_culib_present() }
}

/// Resolves a request to a backend, or explains in one line why it cannot be met.
pub fn resolve(spec: DeviceSpec) -> Result<Resolved, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Resolved::Cpu {
            reason: "using the CPU backend (--device cpu)".to_string(),
        }),
        DeviceSpec::Cuda(ordinal) => Err(resolve_cuda(spec, ordinal)),
        DeviceSpec::Auto => {
            if !driver_present() {
                return Ok(Resolved::Cpu {
                    reason: NO_DRIVER_REASON.to_string(),
                });
            }
            let why = match resolve_cuda(spec, 0) {
                DeviceError::CudaBackendNotBuilt { ordinal, name } => format!(
                    "CUDA device {ordinal} ({name}) found, but this version of mega has no CUDA \
                     backend yet; using the CPU backend"
                ),
                DeviceError::NoSuchDevice { .. } => {
                    "the NVIDIA driver reports no CUDA device; using the CPU backend".to_string()
                }
                DeviceError::Driver { message, .. } => {
                    format!("CUDA initialisation failed ({message}); using the CPU backend")
                }
                other => format!("{other}; using the CPU backend"),
            };
            Ok(Resolved::Cpu { reason: why })
        }
    }
}

/// What the driver says about CUDA device `ordinal`, as the error that stops using it (every
/// outcome is an error while the CUDA backend does not exist).
fn resolve_cuda(spec: DeviceSpec, ordinal: usize) -> DeviceError {
    if !driver_present() {
        return DeviceError::NoDriver { spec };
    }
    let devices = match cuda_devices() {
        Ok(devices) => devices,
        Err(message) => return DeviceError::Driver { spec, message },
    };
    let count = devices.len();
    match devices.into_iter().nth(ordinal) {
        Some(device) => DeviceError::CudaBackendNotBuilt {
            ordinal,
            name: device.name,
        },
        None => DeviceError::NoSuchDevice { ordinal, count },
    }
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
struct CudaDeviceInfo {
    name: String,
    compute_capability: (i32, i32),
    total_memory_bytes: usize,
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
/// (model, logical cores, rayon threads), then CUDA (devices, or why there are none).
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
    if !driver_present() {
        lines.push("cuda: none (no driver)".to_string());
        return lines;
    }
    match cuda_devices() {
        Ok(devices) if devices.is_empty() => {
            lines.push("cuda: none (driver present, no device)".to_string())
        }
        Ok(devices) => {
            lines.push(format!("cuda: {} device(s)", devices.len()));
            for (ordinal, device) in devices.iter().enumerate() {
                lines.push(format!(
                    "cuda:{ordinal}: {} (compute capability {}.{}, {:.1} GiB)",
                    device.name,
                    device.compute_capability.0,
                    device.compute_capability.1,
                    device.total_memory_bytes as f64 / (1u64 << 30) as f64
                ));
            }
        }
        Err(message) => lines.push(format!("cuda: none (driver present, but {message})")),
    }
    lines
}

/// The first `model name` in /proc/cpuinfo (Linux x86); `None` elsewhere.
fn cpu_model_name() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}
