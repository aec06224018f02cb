//! The embedded PTX modules against the kernel sources, the committed PTX and the manifest.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use mega::kernels::{build_info, module, parse_ptx_header, PtxHeaderError, BUILD_SOURCE, MODULES};

fn kernel_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// Stems of kernels/*.cu, read from disk independently of build.rs.
fn source_stems() -> BTreeSet<String> {
    fs::read_dir(kernel_dir())
        .expect("kernels/ is readable")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Names of `.visible .entry NAME(` lines in a PTX text.
fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| l.strip_prefix(".visible .entry "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn every_kernel_source_has_exactly_one_embedded_module() {
    let embedded: BTreeSet<String> = MODULES.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(
        embedded.len(),
        MODULES.len(),
        "duplicate module names in MODULES"
    );
    assert_eq!(
        embedded,
        source_stems(),
        "MODULES must list every kernels/*.cu, and only those"
    );
    for stem in source_stems() {
        assert_eq!(module(&stem).map(|m| m.name), Some(stem.as_str()));
    }
    assert!(module("no_such_kernel").is_none());
}

#[test]
fn every_module_is_pinned_isa_9_0_for_sm_80() {
    for m in MODULES {
        let lines: Vec<&str> = m.ptx.lines().map(str::trim).collect();
        assert!(
            lines.contains(&".version 9.0"),
            "{}: not PTX ISA 9.0",
            m.name
        );
        assert!(
            lines.contains(&".target sm_80"),
            "{}: not .target sm_80",
            m.name
        );
        let header = parse_ptx_header(m.ptx).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        assert_eq!(header.isa_version, (9, 0), "{}", m.name);
        assert_eq!(header.targets, vec!["sm_80".to_string()], "{}", m.name);
        let compiler = header.compiler.unwrap_or_default();
        assert!(
            compiler.contains("release 13.0"),
            "{}: compiled by {compiler:?}",
            m.name
        );
    }
}

#[test]
fn manifest_entry_points_match_the_ptx_and_the_sources() {
    for m in MODULES {
        let declared: BTreeSet<String> = m.entry_points.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            declared.len(),
            m.entry_points.len(),
            "{}: duplicate entry points",
            m.name
        );
        for entry in m.entry_points {
            assert!(
                m.ptx.contains(&format!("\n.visible .entry {entry}(")),
                "{}: entry point {entry} missing from the PTX",
                m.name
            );
        }
        // The reverse direction: the manifest is complete, so nothing compiled goes unlisted.
        assert_eq!(
            ptx_entries(m.ptx),
            declared,
            "{}: PTX entries vs manifest",
            m.name
        );
        let source = fs::read_to_string(kernel_dir().join(format!("{}.cu", m.name))).unwrap();
        assert!(
            source.matches("extern \"C\" __global__").count() >= m.entry_points.len(),
            "{}: every entry point must be extern \"C\" __global__",
            m.name
        );
    }
}

#[test]
fn embedded_ptx_is_the_committed_ptx() {
    // Holds in both build modes: copied from kernels/ptx/ without nvcc, or compiled by the
    // pinned nvcc, whose output must be byte-identical to what was committed.
    for m in MODULES {
        let path = kernel_dir().join("ptx").join(format!("{}.ptx", m.name));
        let committed =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == m.ptx,
            "{}: embedded PTX ({BUILD_SOURCE}) differs from {}; run tools/check-ptx.sh --update",
            m.name,
            path.display()
        );
    }
}

#[test]
fn ptx_carries_no_host_paths() {
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    for m in MODULES {
        assert!(
            !m.ptx.contains(manifest_dir),
            "{}: PTX embeds {manifest_dir}",
            m.name
        );
        assert!(
            !m.ptx.contains(".file"),
            "{}: PTX has .file (line info) directives",
            m.name
        );
    }
}

#[test]
fn build_info_summarises_the_modules() {
    let info = build_info();
    assert!(
        info.source == "committed PTX" || info.source.starts_with("nvcc V13.0."),
        "unexpected kernel build source {:?}",
        info.source
    );
    assert_eq!(info.source, BUILD_SOURCE);
    assert_eq!(
        info.modules,
        MODULES.iter().map(|m| m.name).collect::<Vec<_>>()
    );
    assert_eq!(info.ptx_isa_versions, vec!["9.0".to_string()]);
    assert_eq!(info.targets, vec!["sm_80".to_string()]);
    assert_eq!(info.errors, Vec::<String>::new());
    assert_eq!(info.compilers.len(), 1, "{:?}", info.compilers);
    let line = info.to_string();
    assert!(line.contains("PTX ISA 9.0"), "{line}");
    assert!(line.contains("target sm_80"), "{line}");
    assert!(line.contains(info.source), "{line}");
}

#[test]
fn ptx_header_parser_reads_and_rejects_headers() {
    let good = "//\n// Cuda compilation tools, release 12.8, V12.8.61\n//\n\n.version 8.7\n\
                .target sm_90a, debug\n.address_size 64\n\n.visible .entry k(\n)\n{\n}\n";
    let header = parse_ptx_header(good).unwrap();
    assert_eq!(header.isa_version, (8, 7));
    assert_eq!(
        header.targets,
        vec!["sm_90a".to_string(), "debug".to_string()]
    );
    assert_eq!(
        header.compiler.as_deref(),
        Some("Cuda compilation tools, release 12.8, V12.8.61")
    );

    assert_eq!(
        parse_ptx_header(".target sm_80\n"),
        Err(PtxHeaderError::MissingVersion)
    );
    assert_eq!(
        parse_ptx_header(".version 9.0\n"),
        Err(PtxHeaderError::MissingTarget)
    );
    assert_eq!(
        parse_ptx_header(".version 9.0\n.target\n"),
        Err(PtxHeaderError::MissingTarget)
    );
    assert_eq!(
        parse_ptx_header(".version 9\n.target sm_80\n"),
        Err(PtxHeaderError::BadVersion("9".to_string()))
    );
    assert_eq!(
        parse_ptx_header(".version x.y\n.target sm_80\n"),
        Err(PtxHeaderError::BadVersion("x.y".to_string()))
    );
    // Directives after the first function are not the module header.
    assert_eq!(
        parse_ptx_header(".target sm_80\n.visible .entry k(\n)\n.version 9.0\n"),
        Err(PtxHeaderError::MissingVersion)
    );
}
