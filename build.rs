//! Build script: provides one PTX module per `kernels/*.cu` in `$OUT_DIR/<name>.ptx`.
//!
//! With the pinned nvcc (release 13.0, which emits PTX ISA 9.0 that the CUDA 13.0 driver can
//! JIT) the PTX is compiled from source; otherwise the committed `kernels/ptx/<name>.ptx` is
//! copied, so hosts without any CUDA toolkit still build. nvcc is looked for in this order:
//! `$NVCC`, `nvcc` on `PATH`, then the venv made by `tools/install-nvcc.sh`. An `$NVCC` that
//! does not run, or any nvcc of another release, is reported with a warning and not used.
//!
//! The nvcc flags and working directory here must stay identical to `tools/check-ptx.sh`,
//! which regenerates the committed PTX; the `kernels_ptx` test compares the two whenever this
//! script compiled with nvcc.
//!
//! Emits `MEGA_KERNEL_BUILD` (read by `src/kernels.rs`): `nvcc V<version>` or `committed PTX`.
//!
//! The list of sources and entry points is the kernel manifest, `src/kernels/manifest.rs`
//! (compiled into this script too). Besides the PTX, every source is compiled with the host
//! C++ compiler into the CPU emulator library (`emu_build.rs`, kernels/emu/README.md).

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "build/emu_build.rs"]
mod emu_build;
#[path = "src/kernels/manifest.rs"]
#[allow(dead_code)]
mod manifest;

/// Flags for every kernel; the input is passed relative to `kernels/` so nothing
/// machine-specific can end up in the PTX.
const NVCC_FLAGS: [&str; 4] = ["-ptx", "-O3", "-arch=sm_80", "-std=c++17"];
/// The `nvcc --version` fragment of the pinned release.
const PINNED_RELEASE: &str = "release 13.0,";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/kernels/manifest.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-env-changed=NVCC");

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest_dir.join("kernels");
    check_manifest_covers_sources(&kernel_dir);
    let names: Vec<String> = manifest::KERNEL_SOURCES
        .iter()
        .filter(|source| source.ptx)
        .map(|source| source.name.to_string())
        .collect();
    write_module_table(&out_dir);

    let source = match find_nvcc(&manifest_dir) {
        Some(nvcc) => {
            compile_all(&nvcc.path, &kernel_dir, &out_dir, &names);
            format!("nvcc {}", nvcc.version)
        }
        None => {
            println!("cargo:warning=nvcc not found; using committed PTX (run tools/install-nvcc.sh to compile kernels from source)");
            copy_committed(&kernel_dir, &out_dir, &names);
            "committed PTX".to_string()
        }
    };
    println!("cargo:rustc-env=MEGA_KERNEL_BUILD={source}");

    emu_build::build(&manifest_dir, &out_dir);
}

/// Fails the build when a `kernels/*.cu` file is missing from the manifest (it would silently
/// never be compiled) or a manifest entry names a file that does not exist.
fn check_manifest_covers_sources(kernel_dir: &Path) {
    for stem in cu_stems(kernel_dir) {
        let listed = manifest::KERNEL_SOURCES
            .iter()
            .any(|source| source.path == format!("{stem}.cu"));
        assert!(
            listed,
            "kernels/{stem}.cu is not in the kernel manifest (src/kernels/manifest.rs)"
        );
    }
    for source in manifest::KERNEL_SOURCES {
        assert!(
            kernel_dir.join(source.path).is_file(),
            "the kernel manifest lists kernels/{}, which does not exist",
            source.path
        );
        if source.ptx {
            assert_eq!(
                source.path,
                format!("{}.cu", source.name),
                "PTX modules live directly in kernels/ and are named after their file"
            );
        }
    }
}

/// `$OUT_DIR/kernel_modules.rs`: the `MODULES` table of `src/kernels.rs`, one entry per PTX
/// source of the manifest.
fn write_module_table(out_dir: &Path) {
    let mut table = String::from("&[\n");
    for source in manifest::KERNEL_SOURCES.iter().filter(|s| s.ptx) {
        table += &format!(
            "    KernelModule {{ name: {name:?}, ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{name}.ptx\")), entry_points: manifest::KERNEL_SOURCES[{index}].entry_points }},\n",
            name = source.name,
            index = manifest::KERNEL_SOURCES
                .iter()
                .position(|s| s.name == source.name)
                .expect("source is in the manifest"),
        );
    }
    table += "]\n";
    emu_build::write_if_changed(&out_dir.join("kernel_modules.rs"), &table);
}

/// Stems of `kernels/*.cu`, sorted so the build is independent of directory order.
fn cu_stems(kernel_dir: &Path) -> Vec<String> {
    let entries = fs::read_dir(kernel_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernel_dir.display()));
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .filter_map(|path| {
            path.file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

struct Nvcc {
    path: OsString,
    /// e.g. `V13.0.88`.
    version: String,
}

fn find_nvcc(manifest_dir: &Path) -> Option<Nvcc> {
    if let Some(explicit) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        // An explicit choice is never silently replaced by another nvcc.
        return probe(&explicit).or_else(|| {
            println!(
                "cargo:warning=NVCC={} is not a working nvcc of the pinned {}",
                explicit.to_string_lossy(),
                PINNED_RELEASE.trim_end_matches(',')
            );
            None
        });
    }
    if let Some(nvcc) = probe(OsStr::new("nvcc")) {
        return Some(nvcc);
    }
    venv_nvcc_candidates(manifest_dir)
        .into_iter()
        .find_map(|path| probe(path.as_os_str()))
}

/// `tools/.venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc`, for every Python version
/// present (sorted for determinism).
fn venv_nvcc_candidates(manifest_dir: &Path) -> Vec<PathBuf> {
    let lib = manifest_dir.join("tools/.venv-nvcc/lib");
    let Ok(entries) = fs::read_dir(&lib) else {
        return Vec::new();
    };
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .filter(|path| path.is_file())
        .collect();
    candidates.sort();
    candidates
}

/// Runs `<nvcc> --version`; returns the compiler if it runs and is the pinned release.
fn probe(nvcc: &OsStr) -> Option<Nvcc> {
    let output = Command::new(nvcc)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let release_line = text.lines().find(|line| line.contains("release "))?;
    if !release_line.contains(PINNED_RELEASE) {
        println!(
            "cargo:warning=ignoring {} ({}): kernels need nvcc {} (PTX ISA 9.0, loadable by the CUDA 13.0 driver)",
            nvcc.to_string_lossy(),
            release_line.trim(),
            PINNED_RELEASE.trim_end_matches(',')
        );
        return None;
    }
    let version = release_line
        .rsplit(", ")
        .next()
        .unwrap_or(release_line)
        .trim()
        .to_string();
    Some(Nvcc {
        path: nvcc.to_os_string(),
        version,
    })
}

/// Compiles every kernel concurrently. A compile error here is a bug in a kernel source, so it
/// fails the build with nvcc's message.
fn compile_all(nvcc: &OsString, kernel_dir: &Path, out_dir: &Path, names: &[String]) {
    let jobs: Vec<_> = names
        .iter()
        .map(|name| {
            let child = Command::new(nvcc)
                .current_dir(kernel_dir)
                .args(NVCC_FLAGS)
                .arg(format!("{name}.cu"))
                .arg("-o")
                .arg(out_dir.join(format!("{name}.ptx")))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", nvcc.to_string_lossy()));
            (name, child)
        })
        .collect();
    for (name, child) in jobs {
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("nvcc for kernels/{name}.cu did not finish: {e}"));
        if !output.status.success() {
            panic!(
                "nvcc failed on kernels/{name}.cu:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

fn copy_committed(kernel_dir: &Path, out_dir: &Path, names: &[String]) {
    for name in names {
        let committed = kernel_dir.join("ptx").join(format!("{name}.ptx"));
        let target = out_dir.join(format!("{name}.ptx"));
        if let Err(e) = fs::copy(&committed, &target) {
            println!(
                "cargo:warning=no committed PTX for kernels/{name}.cu ({}: {e}); run tools/check-ptx.sh --update on a host with nvcc",
                committed.display()
            );
        }
    }
}
