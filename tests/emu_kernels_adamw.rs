//! `adamw_step_f32_bf16_copy` (kernels/adamw.cu), the fused AdamW that keeps the weights' bf16
//! working copy, on the CPU emulator against its twins:
//! - the f32 master and moments against `backend::cpu::adamw::step` run in f64 (F32_TOL), and
//!   bit for bit against the same step run in f32 (`step::<f32>` does the kernel's operations
//!   in the kernel's order) and against the unfused `adamw_step_f32`;
//! - the bf16 copy bit for bit against `half::bf16::from_f32` of the updated master (round to
//!   nearest, ties to even), including exact ties, subnormals, ±0 and values that overflow to
//!   ±inf (a zero learning rate leaves the master as given, so the rounding sees chosen bits).
//!
//! Every launch runs under the forward, greedy_low and greedy_high schedules; the copy starts
//! NaN, so an element left unwritten fails. Sizes: 1, a block's 256 threads ± 1, a prime, and a
//! grid that must stride.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use half::bf16;
use mega::backend::cpu::adamw;
use mega::backend::AdamW;
use mega::cuda::launch::{self as shapes, LaunchShape};
use mega::emu::{HostBuffer, KernelArg, Schedule};
use rand::Rng;

#[derive(Debug)]
struct AdamCase {
    seed: u64,
    n: usize,
    step: u64,
    /// 0 for the rounding cases (the master stays as drawn).
    lr: f32,
    /// Launch shape: the elementwise one, or 4 blocks of 64 threads (each thread strides).
    strided: bool,
}

fn hparams(c: &AdamCase) -> AdamW {
    AdamW {
        lr: c.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: if c.lr == 0.0 { 0.0 } else { 0.1 },
        step: c.step,
    }
}

fn shape(c: &AdamCase) -> LaunchShape {
    if c.strided {
        shapes::grid_stride(c.n, 1000, 64)
    } else {
        shapes::adamw::step(c.n)
    }
}

/// Masters whose bf16 rounding is hard: random bit patterns over every finite exponent, exact
/// ties (low 16 bits 0x8000, odd and even bf16 neighbours), ±0, subnormals, ±f32::MAX (beyond
/// the largest bf16 by more than half an ulp: +inf / −inf).
fn rounding_masters(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    let specials = [0.0f32, -0.0, f32::MAX, -f32::MAX, f32::from_bits(1), -1e-40];
    (0..n)
        .map(|i| {
            if i % 13 == 12 {
                return specials[(i / 13) % specials.len()];
            }
            let mut bits: u32 = r.random();
            if (bits >> 23) & 0xff == 0xff {
                bits &= !(1 << 30);
            }
            if i % 3 == 0 {
                bits = (bits & 0xffff_0000) | 0x8000;
            }
            f32::from_bits(bits)
        })
        .collect()
}

/// Runs one AdamW kernel on copies of the inputs; returns (param, m, v, bf16 copy if fused).
#[allow(clippy::type_complexity)]
fn launch_step(
    fused: bool,
    c: &AdamCase,
    [p0, g, m0, v0]: [&[f32]; 4],
    schedule: Schedule,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<bf16>>) {
    let hp = hparams(c);
    let (bc1, bc2) = shapes::adamw::bias_corrections(&hp).unwrap();
    let (p, gb, m, v) = (
        HostBuffer::from_slice(p0),
        HostBuffer::from_slice(g),
        HostBuffer::from_slice(m0),
        HostBuffer::from_slice(v0),
    );
    let copy = HostBuffer::filled(c.n, bf16::NAN);
    let ni = c.n as i64;
    let scalars: [&dyn KernelArg; 8] = [
        &ni,
        &hp.lr,
        &hp.beta1,
        &hp.beta2,
        &hp.eps,
        &hp.weight_decay,
        &bc1,
        &bc2,
    ];
    if fused {
        let buffers: [&dyn KernelArg; 5] = [&p, &copy, &gb, &m, &v];
        run(
            "adamw_step_f32_bf16_copy",
            shape(c),
            &[&buffers[..], &scalars[..]].concat(),
            schedule,
        );
    } else {
        let buffers: [&dyn KernelArg; 4] = [&p, &gb, &m, &v];
        run(
            "adamw_step_f32",
            shape(c),
            &[&buffers[..], &scalars[..]].concat(),
            schedule,
        );
    }
    (
        p.to_vec(),
        m.to_vec(),
        v.to_vec(),
        fused.then(|| copy.to_vec()),
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn fused_adamw_writes_the_master_and_its_bf16_copy() {
    let sizes = [1usize, 255, 256, 257, 1009];
    let mut cases: Vec<AdamCase> = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        for step in [1u64, 7, 1000] {
            cases.push(AdamCase {
                seed: 7000 + 10 * i as u64 + step,
                n,
                step,
                lr: 3e-3,
                strided: false,
            });
        }
        cases.push(AdamCase {
            seed: 7100 + i as u64,
            n,
            step: 3,
            lr: 0.0,
            strided: false,
        });
    }
    // 3001 elements on 4 blocks of 64 threads: about 12 passes per thread, the last partial.
    for lr in [3e-3, 0.0] {
        cases.push(AdamCase {
            seed: 7200,
            n: 3001,
            step: 2,
            lr,
            strided: true,
        });
    }
    sweep(
        "fused_adamw_writes_the_master_and_its_bf16_copy",
        cases,
        |c, schedules| {
            let mut r = rng(c.seed);
            let p0 = if c.lr == 0.0 {
                rounding_masters(&mut r, c.n)
            } else {
                uniform(&mut r, c.n, 0.0, 1.0)
            };
            let g = uniform(&mut r, c.n, 0.0, 1.0);
            let m0 = uniform(&mut r, c.n, 0.0, 0.1);
            let v0 = uniform(&mut r, c.n, 0.02, 0.01);
            let hp = hparams(c);
            // Twins: the CPU step in f64 (the exact answer) and in f32 (the kernel's arithmetic).
            let (mut p_w, mut m_w, mut v_w) = (widen(&p0), widen(&m0), widen(&v0));
            adamw::step(&mut p_w, &widen(&g), &mut m_w, &mut v_w, &hp);
            let (mut p32, mut m32, mut v32) = (p0.clone(), m0.clone(), v0.clone());
            adamw::step(&mut p32, &g, &mut m32, &mut v32, &hp);
            let want_copy: Vec<bf16> = p32.iter().map(|&x| bf16::from_f32(x)).collect();
            schedules.each(|schedule, checks| {
                let inputs = [&p0[..], &g, &m0, &v0];
                let (p, m, v, copy) = launch_step(true, c, inputs, schedule);
                let copy = copy.expect("fused");
                if c.lr != 0.0 {
                    checks.close("param vs f64", &p, &p_w, F32_TOL);
                }
                checks.close("m vs f64", &m, &m_w, F32_TOL);
                checks.close("v vs f64", &v, &v_w, F32_TOL);
                checks.exact("param bits vs f32 twin", &bits(&p), &bits(&p32));
                checks.exact("m bits vs f32 twin", &bits(&m), &bits(&m32));
                checks.exact("v bits vs f32 twin", &bits(&v), &bits(&v32));
                checks.exact(
                    "bf16 copy bits vs half(f32 twin)",
                    &bf16_bits(&copy),
                    &bf16_bits(&want_copy),
                );
                // Fusing the copy changes nothing in the f32 update.
                let (p_plain, m_plain, v_plain, _) = launch_step(false, c, inputs, schedule);
                checks.exact("param bits vs unfused", &bits(&p), &bits(&p_plain));
                checks.exact("m bits vs unfused", &bits(&m), &bits(&m_plain));
                checks.exact("v bits vs unfused", &bits(&v), &bits(&v_plain));
            });
        },
    );
}

#[test]
fn the_bf16_copy_rounds_hand_computed_masters() {
    // Independent of `half`: with lr = 0 the master stays as given, so the copy is its
    // rounding. 1 + 2⁻⁸ is a tie between bf16 1 and 1 + 2⁻⁷ and goes to the even 1;
    // 1 + 3·2⁻⁸ a tie between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶, going up; f32::MAX overflows to +inf.
    let masters = [
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        -(1.0 + 2f32.powi(-8)),
        f32::MAX,
        -0.0,
    ];
    let want: [u16; 5] = [0x3f80, 0x3f82, 0xbf80, 0x7f80, 0x8000];
    let c = AdamCase {
        seed: 0,
        n: masters.len(),
        step: 1,
        lr: 0.0,
        strided: false,
    };
    let zeros = vec![0.0f32; c.n];
    for schedule in SCHEDULES {
        let (p, _, _, copy) = launch_step(true, &c, [&masters, &zeros, &zeros, &zeros], schedule);
        assert_eq!(
            bits(&p),
            bits(&masters),
            "{schedule:?}: lr 0 moved the master"
        );
        assert_eq!(bf16_bits(&copy.unwrap()), want, "{schedule:?}");
    }
}
