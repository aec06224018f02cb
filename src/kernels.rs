//! The CUDA kernels compiled into this binary: one PTX module per shipped `kernels/*.cu`.
//!
//! `build.rs` puts each module's PTX in `$OUT_DIR` (compiled by the pinned nvcc 13.0 when it is
//! available, otherwise the committed `kernels/ptx/` copy), and this file embeds it. Which
//! sources and entry points exist is the kernel manifest, [`manifest::KERNEL_SOURCES`]: the
//! CUDA backend loads a module by name (`ctx.load_module(Ptx::from_src(module.ptx))`) and its
//! functions by the listed entry points, and the CPU emulator ([`crate::emu`]) exports the same
//! entry points; tests check the table against the sources and the PTX.

use std::collections::BTreeSet;
use std::fmt;

pub mod manifest;

/// One embedded PTX module.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// File stem of the source, `kernels/<name>.cu`.
    pub name: &'static str,
    /// PTX text, ready for `Ptx::from_src`.
    pub ptx: &'static str,
    /// The `extern "C" __global__` functions of the module.
    pub entry_points: &'static [&'static str],
}

/// Every PTX module (the manifest's sources with `ptx` set), sorted by name.
pub static MODULES: &[KernelModule] = include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));

/// The module compiled from `kernels/<name>.cu`, if there is one.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// How the embedded kernels were produced: `nvcc V13.0.88` when build.rs compiled them, or
/// `committed PTX` when it embedded `kernels/ptx/`.
pub const BUILD_SOURCE: &str = env!("MEGA_KERNEL_BUILD");

/// The header fields of one PTX module that decide where it can be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxHeader {
    /// PTX ISA version from `.version`, e.g. `(9, 0)`; a driver JITs only ISAs up to its own.
    pub isa_version: (u32, u32),
    /// Targets from `.target`, e.g. `["sm_80"]` (qualifiers such as `debug` included).
    pub targets: Vec<String>,
    /// The compiler line of the header comment, e.g. `Cuda compilation tools, release 13.0, V13.0.88`.
    pub compiler: Option<String>,
}

/// Why a PTX header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PtxHeaderError {
    /// No `.version` directive before the first function.
    #[error("PTX has no .version directive")]
    MissingVersion,
    /// A `.version` whose value is not `MAJOR.MINOR`.
    #[error("PTX .version {0:?} is not MAJOR.MINOR")]
    BadVersion(String),
    /// No `.target` directive.
    #[error("PTX has no .target directive")]
    MissingTarget,
}

/// Reads `.version`, `.target` and the compiler comment from the top of a PTX module.
pub fn parse_ptx_header(ptx: &str) -> Result<PtxHeader, PtxHeaderError> {
    let mut isa_version = None;
    let mut targets = None;
    let mut compiler = None;
    // The directives come before any function; stop there so a kernel body cannot match.
    for line in ptx
        .lines()
        .map(str::trim)
        .take_while(|l| !l.contains(".entry"))
    {
        if let Some(rest) = line.strip_prefix(".version") {
            let value = rest.trim();
            let parsed = value
                .split_once('.')
                .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
            isa_version =
                Some(parsed.ok_or_else(|| PtxHeaderError::BadVersion(value.to_string()))?);
        } else if let Some(rest) = line.strip_prefix(".target") {
            targets = Some(
                rest.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>(),
            );
        } else if let Some(rest) = line.strip_prefix("//") {
            if rest.contains("compilation tools") {
                compiler = Some(rest.trim().to_string());
            }
        }
    }
    Ok(PtxHeader {
        isa_version: isa_version.ok_or(PtxHeaderError::MissingVersion)?,
        targets: targets
            .filter(|t| !t.is_empty())
            .ok_or(PtxHeaderError::MissingTarget)?,
        compiler,
    })
}

/// A summary of the embedded kernels, for `mega info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuildInfo {
    /// [`BUILD_SOURCE`].
    pub source: &'static str,
    /// Module names, in [`MODULES`] order.
    pub modules: Vec<&'static str>,
    /// Every distinct PTX ISA version across the modules, formatted `MAJOR.MINOR`.
    pub ptx_isa_versions: Vec<String>,
    /// Every distinct `.target` across the modules.
    pub targets: Vec<String>,
    /// Every distinct compiler line across the modules (the nvcc that produced the PTX,
    /// also when it was embedded from the committed copy).
    pub compilers: Vec<String>,
    /// Modules whose header could not be parsed, with the reason.
    pub errors: Vec<String>,
}

/// Describes the embedded kernels: where they came from, their ISA and targets.
pub fn build_info() -> KernelBuildInfo {
    let mut versions = BTreeSet::new();
    let mut targets = BTreeSet::new();
    let mut compilers = BTreeSet::new();
    let mut errors = Vec::new();
    for module in MODULES {
        match parse_ptx_header(module.ptx) {
            Ok(header) => {
                versions.insert(format!("{}.{}", header.isa_version.0, header.isa_version.1));
                targets.extend(header.targets);
                compilers.extend(header.compiler);
            }
            Err(e) => errors.push(format!("{}: {e}", module.name)),
        }
    }
    KernelBuildInfo {
        source: BUILD_SOURCE,
        modules: MODULES.iter().map(|m| m.name).collect(),
        ptx_isa_versions: versions.into_iter().collect(),
        targets: targets.into_iter().collect(),
        compilers: compilers.into_iter().collect(),
        errors,
    }
}

impl fmt::Display for KernelBuildInfo {
    /// One line, e.g. `2 PTX modules (cross_entropy, embedding), PTX ISA 9.0, target sm_80,
    /// from nvcc V13.0.88`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} PTX modules ({}), PTX ISA {}, target {}, from {}",
            self.modules.len(),
            self.modules.join(", "),
            self.ptx_isa_versions.join("/"),
            self.targets.join("/"),
            self.source
        )?;
        // Built from source the compiler is already named; for committed PTX say which nvcc
        // made it.
        if !self.source.starts_with("nvcc") && !self.compilers.is_empty() {
            write!(f, " ({})", self.compilers.join("; "))?;
        }
        for error in &self.errors {
            write!(f, "; unreadable header in {error}")?;
        }
        Ok(())
    }
}
