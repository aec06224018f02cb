//! `kernels/cast.cu` on the CPU emulator against its twin, the `half` crate: f32 → bf16 must
//! give the bits of `half::bf16::from_f32` (round to nearest, ties to even) for every non-NaN
//! input, NaN for NaN; bf16 → f32 the bf16 bits shifted into the upper half, for every one of
//! the 65,536 bf16 patterns (= `half::bf16::to_f32` for every non-NaN). Every launch runs under the forward, greedy_low and greedy_high schedules
//! into exact-size NaN-filled outputs; sizes are 1, a block's 256 threads ± 1 and primes.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use half::bf16;
use mega::cuda::launch as shapes;
use mega::emu::HostBuffer;
use rand::Rng;

/// Lengths around the 256-thread block, and primes (the elementwise grid covers each in one
/// pass; `grid_stride_loop_covers_every_element` runs the loop).
const LENGTHS: [usize; 7] = [1, 255, 256, 257, 37, 131, 1021];

/// Random f32 bit patterns over the whole range: every exponent (subnormals, values that
/// overflow to ±inf when rounded to bf16), random mantissas, plus exact rounding ties (low 16
/// bits 0x8000, half of them on an odd bf16 so ties-to-even is exercised both ways) and the
/// special values ±0 and ±inf. No NaN: those are checked on their own.
fn cast_inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rng(seed);
    let specials = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
    ];
    (0..n)
        .map(|i| {
            if i % 17 == 16 {
                return specials[(i / 17) % specials.len()];
            }
            let mut bits: u32 = rng.random();
            if (bits >> 23) & 0xff == 0xff {
                bits &= !(1 << 30); // not inf/NaN: drop to a finite exponent
            }
            if i % 5 == 0 {
                bits = (bits & 0xffff_0000) | 0x8000; // an exact tie
            }
            f32::from_bits(bits)
        })
        .collect()
}

fn bf16_nan_buf(n: usize) -> HostBuffer<bf16> {
    HostBuffer::filled(n, bf16::NAN)
}

fn run_f32_to_bf16(input: &[f32], schedule: mega::emu::Schedule) -> Vec<bf16> {
    let n = input.len();
    let (out, inp) = (bf16_nan_buf(n), HostBuffer::from_slice(input));
    let len = n as i64;
    run(
        "cast_f32_to_bf16",
        shapes::elementwise(n),
        &[&out, &inp, &len],
        schedule,
    );
    out.to_vec()
}

fn run_bf16_to_f32(input: &[bf16], schedule: mega::emu::Schedule) -> Vec<f32> {
    let n = input.len();
    let (out, inp) = (nan_buf(n), HostBuffer::from_slice(input));
    let len = n as i64;
    run(
        "cast_bf16_to_f32",
        shapes::elementwise(n),
        &[&out, &inp, &len],
        schedule,
    );
    out.to_vec()
}

fn assert_bits_match_half(input: &[f32], got: &[bf16], what: &str) {
    assert_eq!(got.len(), input.len(), "{what}: length");
    for (i, (&x, &g)) in input.iter().zip(got).enumerate() {
        let want = bf16::from_f32(x);
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "{what}: element {i}: f32 {x:e} ({:#010x}) gave bf16 {:#06x}, half gives {:#06x}",
            x.to_bits(),
            g.to_bits(),
            want.to_bits()
        );
    }
}

#[test]
fn f32_to_bf16_matches_half_bit_for_bit() {
    for (case, &n) in LENGTHS.iter().enumerate() {
        let input = cast_inputs(n, 100 + case as u64);
        for schedule in SCHEDULES {
            let got = run_f32_to_bf16(&input, schedule);
            assert_bits_match_half(&input, &got, &format!("n={n} {schedule:?}"));
        }
    }
}

#[test]
fn f32_to_bf16_rounds_ties_to_even_and_overflows_to_infinity() {
    // Hand-computed cases, independent of `half`: 1 + 2⁻⁸ is halfway between bf16 1 and
    // 1 + 2⁻⁷ and goes to the even 1; 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and
    // 1 + 2⁻⁶ and goes up; just above a tie rounds up; the largest finite f32 exceeds the
    // largest bf16 (0x7f7f) by more than half a bf16 ulp and becomes +inf.
    let cases: [(f32, u16); 6] = [
        (1.0 + 2f32.powi(-8), 0x3f80),
        (1.0 + 3.0 * 2f32.powi(-8), 0x3f82),
        (f32::from_bits(0x3f80_8001), 0x3f81),
        (-(1.0 + 2f32.powi(-8)), 0xbf80),
        (f32::MAX, 0x7f80),
        (f32::from_bits(0x0000_0001), 0x0000), // the smallest subnormal rounds to +0
    ];
    let input: Vec<f32> = cases.iter().map(|c| c.0).collect();
    for schedule in SCHEDULES {
        let got = run_f32_to_bf16(&input, schedule);
        for ((x, want), g) in cases.iter().zip(&got) {
            assert_eq!(g.to_bits(), *want, "{x:e} under {schedule:?}");
        }
    }
}

#[test]
fn f32_to_bf16_keeps_nan() {
    let input: Vec<f32> = [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), 1.5]
        .into_iter()
        .collect();
    for schedule in SCHEDULES {
        let got = run_f32_to_bf16(&input, schedule);
        for (x, g) in input.iter().zip(&got) {
            // The payload may differ (the GPU returns the canonical 0x7fff), NaN-ness may not.
            assert_eq!(g.is_nan(), x.is_nan(), "{x} gave {g} under {schedule:?}");
        }
        assert_eq!(got[3].to_f32(), 1.5);
    }
}

#[test]
fn bf16_to_f32_is_exact_for_every_pattern() {
    let every: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    for schedule in SCHEDULES {
        let got = run_bf16_to_f32(&every, schedule);
        for (b, g) in every.iter().zip(&got) {
            // The definition: the bf16 bits become the upper half of the f32 (NaN payloads,
            // signalling ones included, pass unchanged, as on the GPU) …
            assert_eq!(
                g.to_bits(),
                (b.to_bits() as u32) << 16,
                "bf16 {:#06x} under {schedule:?}",
                b.to_bits()
            );
            // … which is `half`'s value for every non-NaN (`half` quiets signalling NaNs).
            if !b.is_nan() {
                assert_eq!(g.to_bits(), b.to_f32().to_bits(), "{:#06x}", b.to_bits());
            } else {
                assert!(g.is_nan());
            }
        }
    }
}

#[test]
fn bf16_to_f32_at_block_edges() {
    for &n in &LENGTHS {
        let input: Vec<bf16> = cast_inputs(n, 7 + n as u64)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        for schedule in SCHEDULES {
            let got = run_bf16_to_f32(&input, schedule);
            let want: Vec<f32> = input.iter().map(|b| b.to_f32()).collect();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "n={n} {schedule:?}"
            );
        }
    }
}

#[test]
fn grid_stride_loop_covers_every_element() {
    // 4 blocks of 64 threads over 3001 elements: each thread makes ~12 passes, and the last
    // pass is partial. The outputs start NaN, so a skipped element fails.
    let n = 3001;
    let shape = shapes::grid_stride(n, 1000, 64);
    assert_eq!(shape.blocks(), 4);
    let input = cast_inputs(n, 9);
    let len = n as i64;
    for schedule in SCHEDULES {
        let (out, inp) = (bf16_nan_buf(n), HostBuffer::from_slice(&input));
        run("cast_f32_to_bf16", shape, &[&out, &inp, &len], schedule);
        assert_bits_match_half(&input, &out.to_vec(), &format!("to bf16 {schedule:?}"));
        let back = nan_buf(n);
        run("cast_bf16_to_f32", shape, &[&back, &out, &len], schedule);
        let want: Vec<u32> = out.to_vec().iter().map(|b| b.to_f32().to_bits()).collect();
        let got: Vec<u32> = back.to_vec().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "to f32 {schedule:?}");
    }
}
