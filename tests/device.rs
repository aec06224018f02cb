//! Device selection: parsing `--device`, and resolution on this host (with or without driver).

use mega::device::{
    describe_devices, resolve, DeviceError, DeviceSpec, Resolved, NO_DRIVER_REASON,
};

fn driver_present() -> bool {
    // Independent of mega's own wrapper, so the tests check which branch it took.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[test]
fn parses_every_accepted_spelling() {
    let cases = [
        ("auto", DeviceSpec::Auto),
        ("cpu", DeviceSpec::Cpu),
        ("cuda", DeviceSpec::Cuda(0)),
        ("cuda:0", DeviceSpec::Cuda(0)),
        ("cuda:7", DeviceSpec::Cuda(7)),
        ("cuda:12", DeviceSpec::Cuda(12)),
        (" CUDA:1 ", DeviceSpec::Cuda(1)),
        ("CPU", DeviceSpec::Cpu),
    ];
    for (text, expected) in cases {
        assert_eq!(text.parse::<DeviceSpec>(), Ok(expected), "{text:?}");
    }
    assert_eq!(DeviceSpec::default(), DeviceSpec::Auto);
}

#[test]
fn rejects_anything_else_with_a_clear_message() {
    for text in [
        "",
        "gpu",
        "cuda:",
        "cuda:x",
        "cuda:-1",
        "cuda:+1",
        "cuda:1:2",
        "cuda0",
        "cuda 1",
        "cpu:0",
        "cuda:99999999999999999999999",
    ] {
        let err = text.parse::<DeviceSpec>().unwrap_err();
        assert_eq!(err, DeviceError::InvalidSpec(text.to_string()));
        let message = err.to_string();
        assert!(message.contains(&format!("{text:?}")), "{message}");
        assert!(
            message.contains("expected auto, cpu, cuda or cuda:N"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}

#[test]
fn display_round_trips_through_parse() {
    for spec in [
        DeviceSpec::Auto,
        DeviceSpec::Cpu,
        DeviceSpec::Cuda(0),
        DeviceSpec::Cuda(3),
    ] {
        assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
    }
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
}

#[test]
fn cpu_request_always_resolves_to_cpu() {
    let resolved = resolve(DeviceSpec::Cpu).unwrap();
    assert!(matches!(resolved, Resolved::Cpu { .. }));
    assert!(
        resolved.reason().contains("CPU backend"),
        "{}",
        resolved.reason()
    );
}

#[test]
fn auto_falls_back_to_cpu_and_says_why() {
    let resolved = resolve(DeviceSpec::Auto).expect("auto never fails");
    let Resolved::Cpu { reason } = &resolved;
    assert!(!reason.contains('\n'), "{reason}");
    if driver_present() {
        // Without a CUDA backend in this version, a driver still means CPU, for a stated reason.
        assert_ne!(reason, NO_DRIVER_REASON);
        assert!(reason.contains("CUDA"), "{reason}");
        assert!(reason.ends_with("using the CPU backend"), "{reason}");
    } else {
        assert_eq!(
            reason,
            "no NVIDIA driver (libcuda.so.1) found; using the CPU backend"
        );
    }
}

#[test]
fn explicit_cuda_is_an_error_until_the_backend_exists() {
    for ordinal in [0, 1000] {
        let err = resolve(DeviceSpec::Cuda(ordinal)).unwrap_err();
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        if driver_present() {
            match &err {
                DeviceError::CudaBackendNotBuilt { ordinal: o, .. } => {
                    assert_eq!(*o, ordinal);
                    assert!(message.contains("not built yet"), "{message}");
                }
                DeviceError::NoSuchDevice { ordinal: o, count } => {
                    assert_eq!(*o, ordinal);
                    assert!(ordinal >= *count);
                }
                DeviceError::Driver { message: m, .. } => assert!(!m.is_empty()),
                other => panic!("unexpected error with a driver present: {other:?}"),
            }
        } else {
            assert_eq!(
                err,
                DeviceError::NoDriver {
                    spec: DeviceSpec::Cuda(ordinal)
                }
            );
            assert!(message.contains("libcuda.so.1"), "{message}");
            assert!(
                message.contains(&format!("--device cuda:{ordinal}")),
                "{message}"
            );
        }
    }
}

#[test]
fn describe_devices_names_cpu_then_cuda() {
    let lines = describe_devices();
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(lines[0].starts_with("cpu: "), "{lines:?}");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        lines[0].contains(&format!("({cores} logical cores, ")),
        "{lines:?}"
    );
    assert!(
        lines[0].contains(&format!("{} rayon threads", rayon::current_num_threads())),
        "{lines:?}"
    );
    if driver_present() {
        assert!(lines[1].starts_with("cuda: "), "{lines:?}");
        assert_ne!(lines[1], "cuda: none (no driver)");
    } else {
        assert_eq!(lines[1..], ["cuda: none (no driver)".to_string()]);
    }
}
