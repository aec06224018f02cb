//! `EmulatedDevice`, the CPU-emulator implementation of the `DeviceApi` layer a CUDA backend
//! sits on: copies, launches by name, events and GEMM against naive references.

mod emu_support;

use emu_support::{assert_close, rng, uniform};
use mega::emu::{DeviceApi, DeviceError, EmulatedDevice, GemmShape, LaunchConfig};

#[test]
fn copies_round_trip_and_reject_length_mismatch() {
    let dev = EmulatedDevice::new();
    let host = uniform(&mut rng(1), 37, -1.0, 1.0);
    let mut buf = dev.upload(&host).unwrap();
    assert_eq!(buf.len(), 37);
    assert_eq!(dev.download(&buf).unwrap(), host);
    let zeros = dev.alloc_zeros::<f32>(5).unwrap();
    assert_eq!(dev.download(&zeros).unwrap(), vec![0.0; 5]);
    let replaced: Vec<f32> = host.iter().map(|x| x * 2.0).collect();
    dev.write(&replaced, &mut buf).unwrap();
    assert_eq!(dev.download(&buf).unwrap(), replaced);
    assert!(matches!(
        dev.write(&[1.0f32; 3], &mut buf),
        Err(DeviceError::Shape(_))
    ));
}

#[test]
fn launches_by_name_and_orders_events() {
    let dev = EmulatedDevice::new();
    let n = 300usize;
    let input: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let x = dev.upload(&input).unwrap();
    let out = dev.alloc_zeros::<f32>(n).unwrap();
    let before = dev.record_event().unwrap();
    let n_i = n as i32;
    dev.launch(
        "selftest_block_sum",
        LaunchConfig::new(3, 128, 16),
        &[&out, &x, &n_i],
    )
    .unwrap();
    let after = dev.record_event().unwrap();
    assert!(after.sequence > before.sequence);
    dev.wait_event(&after).unwrap();
    dev.synchronize().unwrap();
    let want: Vec<f32> = input
        .chunks(128)
        .flat_map(|c| std::iter::repeat_n(c.iter().sum::<f32>(), c.len()))
        .collect();
    assert_eq!(dev.download(&out).unwrap(), want);
    let err = dev
        .launch(
            "selftest_block_sum",
            LaunchConfig::new(1, 4096, 16),
            &[&out, &x, &n_i],
        )
        .unwrap_err();
    assert!(matches!(err, DeviceError::Launch(_)), "{err}");
}

#[test]
fn gemm_matches_a_naive_product_for_every_transpose() {
    let dev = EmulatedDevice::new();
    let (m, k, n) = (5usize, 7usize, 3usize);
    let mut r = rng(2);
    let a = uniform(&mut r, m * k, -1.0, 1.0);
    let b = uniform(&mut r, k * n, -1.0, 1.0);
    let base = uniform(&mut r, m * n, -1.0, 1.0);
    for (trans_a, trans_b, accumulate) in [
        (false, false, false),
        (true, false, true),
        (false, true, false),
        (true, true, true),
    ] {
        // op(a)[i, p] and op(b)[p, j] from the stored layouts.
        let at = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] };
        let bt = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] };
        let want: Vec<f32> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let dot: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                dot as f32 + if accumulate { base[e] } else { 0.0 }
            })
            .collect();
        let (a_buf, b_buf) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut out = dev.upload(&base).unwrap();
        let shape = GemmShape {
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        };
        dev.gemm_f32(&mut out, &a_buf, &b_buf, shape).unwrap();
        assert_close(
            &dev.download(&out).unwrap(),
            &want,
            1e-5,
            &format!("{shape:?}"),
        );
    }
    let mut small = dev.alloc_zeros::<f32>(2).unwrap();
    let a_buf = dev.upload(&a).unwrap();
    let b_buf = dev.upload(&b).unwrap();
    let shape = GemmShape {
        m,
        k,
        n,
        trans_a: false,
        trans_b: false,
        accumulate: false,
    };
    assert!(matches!(
        dev.gemm_f32(&mut small, &a_buf, &b_buf, shape),
        Err(DeviceError::Shape(_))
    ));
}
