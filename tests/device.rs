//! Device selection: parsing `--device`, resolution on this host (with or without driver),
//! and the dispatch from a resolved device to a backend.

use mega::backend::Backend;
use mega::device::{
    describe_devices, resolve, DeviceError, DeviceSpec, Resolved, EMULATED_REASON, NO_DRIVER_REASON,
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
        ("emu", DeviceSpec::Emulated),
        ("cuda-emu", DeviceSpec::Emulated),
        (" EMU", DeviceSpec::Emulated),
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
        "emu:0",
        "emulator",
        "cuda-emu:1",
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
        DeviceSpec::Emulated,
    ] {
        assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
    }
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
}

#[test]
fn cpu_request_always_resolves_to_cpu() {
    let resolved = resolve(DeviceSpec::Cpu).unwrap();
    assert!(matches!(resolved, Resolved::Cpu { .. }));
    assert_eq!(resolved.kind(), "cpu");
    assert!(
        resolved.reason().contains("CPU backend"),
        "{}",
        resolved.reason()
    );
}

#[test]
fn emulated_request_always_resolves_to_the_emulator_and_says_it_is_for_debugging() {
    let resolved = resolve(DeviceSpec::Emulated).unwrap();
    assert!(matches!(resolved, Resolved::Emulated { .. }));
    assert_eq!(resolved.kind(), "emu");
    assert_eq!(resolved.reason(), EMULATED_REASON);
    assert!(resolved.reason().contains("debugging"), "{resolved:?}");
}

#[test]
fn with_backend_hands_the_body_the_backend_that_was_resolved() {
    let cpu = mega::with_backend!(resolve(DeviceSpec::Cpu).unwrap(), |be| be.name());
    assert_eq!(cpu, "cpu");
    // The emulated device runs the CUDA backend (its name says so), and ops really run on it.
    let (name, sum) = mega::with_backend!(resolve(DeviceSpec::Emulated).unwrap(), |be| {
        let buf = be.upload(&[1.0, 2.0, 3.5]);
        (be.name(), be.sum(&buf))
    });
    assert_eq!(name, "cuda (CPU emulator)");
    assert_eq!(sum, 6.5);
}

#[test]
fn auto_falls_back_to_cpu_or_opens_cuda_and_says_why() {
    let resolved = resolve(DeviceSpec::Auto).expect("auto never fails");
    let reason = resolved.reason().to_string();
    assert!(!reason.contains('\n'), "{reason}");
    if driver_present() {
        match resolved {
            Resolved::Cuda { .. } => {
                assert!(reason.starts_with("using CUDA device 0 ("), "{reason}")
            }
            Resolved::Cpu { .. } => {
                assert_ne!(reason, NO_DRIVER_REASON);
                assert!(reason.contains("CUDA"), "{reason}");
                assert!(reason.ends_with("using the CPU backend"), "{reason}");
            }
            Resolved::Emulated { .. } => panic!("auto never picks the emulator"),
        }
    } else {
        assert!(matches!(resolved, Resolved::Cpu { .. }));
        assert_eq!(
            reason,
            "no NVIDIA driver (libcuda.so.1) found; using the CPU backend"
        );
    }
}

#[test]
fn explicit_cuda_opens_the_device_or_says_in_one_line_why_not() {
    for ordinal in [0, 1000] {
        let result = resolve(DeviceSpec::Cuda(ordinal));
        if driver_present() {
            match result {
                Ok(resolved) => {
                    assert_eq!(ordinal, 0, "no host has 1001 GPUs");
                    assert!(matches!(resolved, Resolved::Cuda { .. }));
                    assert!(resolved.reason().starts_with("using CUDA device 0 ("));
                }
                Err(err) => {
                    let message = err.to_string();
                    assert!(!message.contains('\n'), "{message}");
                    match &err {
                        DeviceError::NoSuchDevice { ordinal: o, count } => {
                            assert_eq!(*o, ordinal);
                            assert!(ordinal >= *count);
                        }
                        DeviceError::Open { ordinal: o, .. } => assert_eq!(*o, ordinal),
                        DeviceError::Driver { message: m, .. } => assert!(!m.is_empty()),
                        other => panic!("unexpected error with a driver present: {other:?}"),
                    }
                }
            }
        } else {
            let err = result.unwrap_err();
            let message = err.to_string();
            assert!(!message.contains('\n'), "{message}");
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
fn describe_devices_names_cpu_then_cuda_then_the_emulator() {
    let lines = describe_devices();
    assert!(lines.len() >= 3, "{lines:?}");
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
    let cuda = &lines[1..lines.len() - 1];
    if driver_present() {
        assert!(cuda[0].starts_with("cuda: "), "{lines:?}");
        assert!(!cuda[0].contains("no NVIDIA driver"), "{lines:?}");
    } else {
        assert_eq!(
            cuda,
            ["cuda: unavailable: no NVIDIA driver (libcuda.so.1 not found on the library path)"]
        );
    }
    let emu = lines.last().unwrap();
    assert!(emu.starts_with("emu: "), "{lines:?}");
    assert!(emu.contains("available for debugging"), "{emu}");
    assert!(emu.contains("--device emu"), "{emu}");
}
