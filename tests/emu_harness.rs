//! The CPU emulation harness itself, through the self-test kernels of kernels/emu/selftest.cu:
//! CUDA semantics of barriers and warp collectives checked against independent expectations,
//! and the planted bugs the harness must keep catching.

mod emu_support;

use emu_support::{for_each_schedule, rng, source_line, uniform};
use mega::emu::{
    kernel_names, launch, set_schedule, set_strict, EmuError, HostBuffer, LaunchConfig,
    LaunchErrorKind, Schedule,
};
use rand::Rng;

const SELFTEST: &str = "emu/selftest.cu";

const ALL_SCHEDULES: [Schedule; 5] = [
    Schedule::Forward,
    Schedule::Reverse,
    Schedule::GreedyLow,
    Schedule::GreedyHigh,
    Schedule::Random(7),
];

/// Small integers, so every float sum is exact and results compare with `==`.
fn integer_floats(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.random_range(-50i32..50) as f32).collect()
}

/// Per-element block totals of `in` for blocks of `block` threads.
fn block_totals(input: &[f32], block: usize) -> Vec<f32> {
    input
        .chunks(block)
        .flat_map(|chunk| {
            let total: f32 = chunk.iter().sum();
            std::iter::repeat_n(total, chunk.len())
        })
        .collect()
}

fn run_block_sum(kernel: &str, input: &[f32], block: u32) -> Result<Vec<f32>, EmuError> {
    let n = input.len() as i32;
    let x = HostBuffer::from_slice(input);
    let out = HostBuffer::filled(input.len(), f32::NAN);
    let grid = (input.len() as u32).div_ceil(block);
    launch(
        kernel,
        LaunchConfig::new(grid, block, 4 * block / 32),
        &[&out, &x, &n],
    )?;
    Ok(out.to_vec())
}

#[test]
fn block_sum_is_exact_under_every_schedule() {
    for schedule in ALL_SCHEDULES {
        set_schedule(schedule);
        for n in [1usize, 31, 127, 128, 129, 389] {
            let input = integer_floats(n, n as u64);
            let got = run_block_sum("selftest_block_sum", &input, 128).unwrap();
            assert_eq!(got, block_totals(&input, 128), "n={n} {schedule:?}");
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn missing_barrier_gives_wrong_sums_under_greedy_schedules() {
    let input = integer_floats(256, 3);
    let want = block_totals(&input, 128);
    // The correct twin passes under the same schedules, so a failure below is the bug.
    for schedule in [Schedule::GreedyLow, Schedule::GreedyHigh] {
        set_schedule(schedule);
        let good = run_block_sum("selftest_block_sum", &input, 128).unwrap();
        assert_eq!(good, want, "{schedule:?}");
        let bad = run_block_sum("selftest_missing_barrier", &input, 128).unwrap();
        let wrong = bad.iter().zip(&want).filter(|(b, w)| b != w).count();
        assert!(wrong > 0, "{schedule:?} missed the planted missing barrier");
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn random_schedule_is_reproducible_from_its_seed() {
    let input = integer_floats(256, 4);
    let bits = |seed| {
        set_schedule(Schedule::Random(seed));
        run_block_sum("selftest_missing_barrier", &input, 128)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(11), bits(11));
    set_schedule(Schedule::Forward);
}

#[test]
fn early_return_before_barrier_is_a_deadlock_with_its_line() {
    let line = source_line(SELFTEST, "void selftest_early_return", "__syncthreads();");
    let input = uniform(&mut rng(5), 20, -1.0, 1.0);
    let n = 20i32;
    let x = HostBuffer::from_slice(&input);
    let out = HostBuffer::filled(20, f32::NAN);
    for_each_schedule(|schedule| {
        let err = launch(
            "selftest_early_return",
            LaunchConfig::new(1, 32, 0),
            &[&out, &x, &n],
        )
        .unwrap_err();
        assert_eq!(
            err.launch_kind(),
            Some(LaunchErrorKind::Deadlock),
            "{schedule:?}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("selftest.cu:{line}")),
            "{schedule:?}: {text}"
        );
        assert!(text.contains("12 of 32 threads exited"), "{text}");
        assert!(text.contains("block (0,0,0)"), "{text}");
    });

    // The same thread launches normally afterwards, and a lenient launch (exited threads count
    // as arrived) runs the kernel to completion with the right result.
    assert_eq!(
        run_block_sum("selftest_block_sum", &[1.0; 40], 64).unwrap(),
        vec![40.0; 40]
    );
    set_strict(false);
    let result = launch(
        "selftest_early_return",
        LaunchConfig::new(1, 32, 0),
        &[&out, &x, &n],
    );
    set_strict(true);
    result.unwrap();
    let want: Vec<f32> = (0..20).map(|t| input[(t + 1) % 20]).collect();
    assert_eq!(out.to_vec(), want);
}

#[test]
fn divergent_barriers_are_reported_with_both_lines() {
    let first = source_line(
        SELFTEST,
        "void selftest_divergent_barrier",
        "__syncthreads();",
    );
    let second = source_line(SELFTEST, "} else {", "__syncthreads();");
    assert!(second > first);
    let out = HostBuffer::filled(64, f32::NAN);
    let n = 64i32;
    for_each_schedule(|schedule| {
        let err = launch(
            "selftest_divergent_barrier",
            LaunchConfig::new(1, 64, 0),
            &[&out, &n],
        )
        .unwrap_err();
        assert_eq!(
            err.launch_kind(),
            Some(LaunchErrorKind::DivergentBarrier),
            "{schedule:?}: {err}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("selftest.cu:{first}")), "{text}");
        assert!(text.contains(&format!("selftest.cu:{second}")), "{text}");
    });
}

#[test]
fn dynamic_shared_memory_is_poisoned_for_every_block() {
    let threads = 32usize;
    let blocks = 6usize;
    let out = HostBuffer::<u32>::filled(threads * blocks, 0);
    for schedule in ALL_SCHEDULES {
        set_schedule(schedule);
        launch(
            "selftest_dyn_smem_poison",
            LaunchConfig::new((3, 2), (8, 4), 4 * threads as u32),
            &[&out],
        )
        .unwrap();
        assert!(
            out.to_vec().iter().all(|&w| w == u32::MAX),
            "{schedule:?}: a block saw another block's shared memory"
        );
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn writing_past_dynamic_shared_memory_is_reported() {
    let out = HostBuffer::filled(1, f32::NAN);
    let n_floats = 64i32;
    let fits = launch(
        "selftest_shared_overflow",
        LaunchConfig::new(1, 32, 4 * 64),
        &[&out, &n_floats, &0i32],
    );
    fits.unwrap();
    assert_eq!(out.to_vec(), vec![1.0]);
    let err = launch(
        "selftest_shared_overflow",
        LaunchConfig::new(1, 32, 4 * 64),
        &[&out, &n_floats, &3i32],
    )
    .unwrap_err();
    assert_eq!(
        err.launch_kind(),
        Some(LaunchErrorKind::SharedOverflow),
        "{err}"
    );
    assert!(err.to_string().contains("byte 256"), "{err}");
}

/// What `selftest_warp_ops` must write for one block shape, from CUDA's documented semantics.
/// Reads of a lane that does not exist (the missing lanes of a partial warp) are undefined in
/// CUDA; the emulator returns all-ones bits for them.
fn expected_warp_ops(input: &[u32], block: (u32, u32, u32), grid: (u32, u32, u32)) -> Vec<u32> {
    const POISON: u32 = u32::MAX;
    let threads = (block.0 * block.1 * block.2) as usize;
    let blocks = (grid.0 * grid.1 * grid.2) as usize;
    let mut out = vec![0u32; threads * blocks * 17];
    for b in 0..blocks {
        let base = b * threads;
        let v = |t: usize| input[base + t];
        let count = (0..threads).filter(|t| t % 3 == 0).count() as u32;
        for t in 0..threads {
            let lane = t % 32;
            let warp_start = t - lane;
            let lanes = (threads - warp_start).min(32);
            let exists = |l: usize| l < lanes;
            let value_of = |l: usize| {
                if exists(l) {
                    v(warp_start + l)
                } else {
                    POISON
                }
            };
            let members: Vec<usize> = (0..lanes).collect();
            let mask_of = |f: &dyn Fn(usize) -> bool| {
                members
                    .iter()
                    .filter(|&&l| f(l))
                    .fold(0u32, |m, &l| m | (1 << l))
            };
            let row = &mut out[(base + t) * 17..(base + t + 1) * 17];
            row[0] = value_of(5);
            row[1] = value_of((lane & !7) + (lane + 3) % 8);
            row[2] = if lane % 16 < 3 {
                v(t)
            } else {
                value_of(lane - 3)
            };
            row[3] = if lane + 5 >= 32 {
                v(t)
            } else {
                value_of(lane + 5)
            };
            row[4] = value_of(lane ^ 9);
            row[5] = mask_of(&|l| l % 2 == 1);
            row[6] = members.iter().any(|&l| value_of(l) == 7) as u32;
            row[7] = members.iter().all(|&l| value_of(l) < 1000) as u32;
            row[8] = members
                .iter()
                .fold(0u32, |s, &l| s.wrapping_add(value_of(l)));
            row[9] = members.iter().map(|&l| value_of(l)).max().unwrap();
            row[10] = mask_of(&|l| value_of(l) % 4 == v(t) % 4);
            row[11] = count;
            row[12] = 1;
            row[13] = (threads > 5) as u32;
            let (x, y, z) = (
                t as u32 % block.0,
                (t as u32 / block.0) % block.1,
                t as u32 / (block.0 * block.1),
            );
            row[14] = x | (y << 10) | (z << 20);
            let bu = b as u32;
            let (bx, by, bz) = (bu % grid.0, (bu / grid.0) % grid.1, bu / (grid.0 * grid.1));
            row[15] = bx | (by << 10) | (bz << 20);
            row[16] = mask_of(&|_| true);
        }
    }
    out
}

#[test]
fn warp_and_block_collectives_follow_cuda_semantics() {
    // A partial last warp (48 threads), a 3-D block, and a 3-D grid.
    let shapes = [((48, 1, 1), (2, 1, 1)), ((8, 4, 2), (2, 1, 2))];
    for (block, grid) in shapes {
        let total = (block.0 * block.1 * block.2 * grid.0 * grid.1 * grid.2) as usize;
        let mut r = rng(9);
        let input: Vec<u32> = (0..total).map(|_| r.random_range(0..1100)).collect();
        let want = expected_warp_ops(&input, block, grid);
        let x = HostBuffer::from_slice(&input);
        let out = HostBuffer::<u32>::filled(total * 17, 0xdead_beef);
        for schedule in ALL_SCHEDULES {
            set_schedule(schedule);
            launch(
                "selftest_warp_ops",
                LaunchConfig::new(grid, block, 0),
                &[&out, &x],
            )
            .unwrap();
            let got = out.to_vec();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "block {block:?} {schedule:?}: thread {} column {}",
                    i / 17,
                    i % 17
                );
            }
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn launches_on_parallel_threads_are_independent() {
    // Each thread has its own schedule, shared memory and fibers; the planted missing barrier
    // on one thread must not disturb the correct kernel on another.
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                set_schedule(ALL_SCHEDULES[i as usize % ALL_SCHEDULES.len()]);
                for round in 0..5 {
                    let input = integer_floats(300, i * 100 + round);
                    let want = block_totals(&input, 64);
                    if i == 3 {
                        set_schedule(Schedule::GreedyLow);
                        let _ = run_block_sum("selftest_missing_barrier", &input, 64).unwrap();
                    } else {
                        assert_eq!(
                            run_block_sum("selftest_block_sum", &input, 64).unwrap(),
                            want
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn bad_launches_are_rejected_before_running() {
    let out = HostBuffer::filled(4, f32::NAN);
    let x = HostBuffer::filled(4, 1.0f32);
    let n = 4i32;
    let unknown = launch("no_such_kernel", LaunchConfig::new(1, 32, 16), &[&out]).unwrap_err();
    assert_eq!(unknown, EmuError::UnknownKernel("no_such_kernel".into()));

    let too_few = launch(
        "selftest_block_sum",
        LaunchConfig::new(1, 32, 16),
        &[&out, &x],
    );
    assert!(
        matches!(too_few, Err(EmuError::Arguments { ref message, .. }) if message.contains("takes 3 arguments, 2 given")),
        "{too_few:?}"
    );
    let ints = HostBuffer::filled(4, 1u32);
    let wrong_type = launch(
        "selftest_block_sum",
        LaunchConfig::new(1, 32, 16),
        &[&out, &ints, &n],
    );
    assert!(
        matches!(wrong_type, Err(EmuError::Arguments { ref message, .. }) if message.starts_with("argument 1")),
        "{wrong_type:?}"
    );
    let wrong_scalar = launch(
        "selftest_block_sum",
        LaunchConfig::new(1, 32, 16),
        &[&out, &x, &4u64],
    );
    assert!(
        matches!(wrong_scalar, Err(EmuError::Arguments { .. })),
        "{wrong_scalar:?}"
    );

    for config in [
        LaunchConfig::new(1, 2048, 16),
        LaunchConfig::new(0, 32, 16),
        LaunchConfig::new(1, (32, 1, 65), 16),
        LaunchConfig::new(1, 32, 1 << 20),
    ] {
        let err = launch("selftest_block_sum", config, &[&out, &x, &n]).unwrap_err();
        assert_eq!(
            err.launch_kind(),
            Some(LaunchErrorKind::InvalidConfig),
            "{config:?}: {err}"
        );
    }
    assert_eq!(out.to_vec().iter().filter(|v| !v.is_nan()).count(), 0);
}

#[test]
fn every_manifest_entry_point_is_in_the_emulator() {
    let exported: Vec<&str> = kernel_names().collect();
    for source in mega::kernels::manifest::KERNEL_SOURCES {
        for entry in source.entry_points {
            assert!(exported.contains(entry), "{entry} missing");
            mega::emu::kernel_signature(entry).unwrap();
        }
    }
}

/// The planted one-past-the-end read is invisible to output comparison (the value is masked),
/// so only the sanitizer build can catch it: tools/emu-sanitize.sh builds with
/// `MEGA_EMU_SANITIZE=1`, and this test then runs the kernel in a child process and expects
/// AddressSanitizer to stop it at the faulting source line.
#[cfg(emu_sanitize)]
#[test]
fn read_past_end_is_caught_by_address_sanitizer() {
    const CHILD: &str = "MEGA_EMU_OOB_CHILD";
    let n = 100usize;
    let run = || {
        let input = uniform(&mut rng(1), n, -1.0, 1.0);
        let x = HostBuffer::from_slice(&input);
        let out = HostBuffer::filled(n, f32::NAN);
        let len = n as i32;
        launch(
            "selftest_read_past_end",
            LaunchConfig::new(1, 128, 0),
            &[&out, &x, &len],
        )
    };
    if std::env::var_os(CHILD).is_some() {
        let _ = run();
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "read_past_end_is_caught_by_address_sanitizer",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    let line = source_line(SELFTEST, "void selftest_read_past_end", "in[i + 1]");
    assert!(!child.status.success(), "the child survived: {stderr}");
    assert!(stderr.contains("heap-buffer-overflow"), "{stderr}");
    assert!(
        stderr.contains(&format!("selftest.cu:{line}")),
        "no selftest.cu:{line} in: {stderr}"
    );
    assert!(
        stderr.contains("cuemu: error raised in blockIdx=(0,0,0) threadIdx=(99,0,0)"),
        "{stderr}"
    );
}

#[test]
fn wmma_gemm_matches_a_double_precision_product() {
    use half::bf16;
    let (m, n, k) = (32usize, 48usize, 32usize);
    let mut r = rng(12);
    let a: Vec<bf16> = uniform(&mut r, m * k, -1.0, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let b: Vec<bf16> = uniform(&mut r, k * n, -1.0, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let mut want = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| a[i * k + p].to_f64() * b[p * n + j].to_f64())
                .sum();
            want[i * n + j] = dot as f32;
        }
    }
    let (a_buf, b_buf) = (HostBuffer::from_slice(&a), HostBuffer::from_slice(&b));
    let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
    for_each_schedule(|schedule| {
        let c = HostBuffer::filled(m * n, f32::NAN);
        launch(
            "selftest_wmma_gemm",
            LaunchConfig::new((n as u32 / 16, m as u32 / 16), 32, 0),
            &[&c, &a_buf, &b_buf, &m_i, &n_i, &k_i],
        )
        .unwrap();
        emu_support::assert_close(&c.to_vec(), &want, 1e-5, &format!("{schedule:?}"));
    });
}

#[test]
fn misaligned_wmma_load_is_reported_with_its_line() {
    let line = source_line(
        SELFTEST,
        "void selftest_wmma_misaligned",
        "load_matrix_sync",
    );
    let c = HostBuffer::filled(32, f32::NAN);
    let err = launch(
        "selftest_wmma_misaligned",
        LaunchConfig::new(1, 32, 0),
        &[&c],
    )
    .unwrap_err();
    assert_eq!(err.launch_kind(), Some(LaunchErrorKind::Kernel), "{err}");
    let text = err.to_string();
    assert!(text.contains("not 256-bit aligned"), "{text}");
    assert!(text.contains(&format!("selftest.cu:{line}")), "{text}");
}
