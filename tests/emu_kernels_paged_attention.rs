//! kernels/paged_attention.cu (partition + combine) on the CPU emulator against its twin, the
//! CPU backend's `attention_decode` run in f64 on the same inputs (tolerance:
//! tests/support/emu_check.rs). Block sizes 1, 3, 16 and 600; row lengths 1, 255, 256, 257
//! (either side of the 256-position partition) and the prime 521 in one batch; several
//! heads; shuffled block tables; head widths on the float4 path (dh % 4 = 0), the scalar path
//! (odd widths, and a query row that is not 16-byte aligned), and widths past one block's
//! threads. Pool entries no row uses, positions past a row's length in its last block, and
//! table slots past its last block all point at NaN, so reading any of them fails the
//! comparison. Every launch runs under every schedule into a NaN-filled exact-size output.
//!
//! The kernel is not bitwise equal to the twin (other reduction orders, see the kernel's
//! header), but its partitions are the twin's tasks, so a row's result is bitwise
//! independent of block size and batch: the second test checks that.

#[path = "support/emu_check.rs"]
mod emu_check;

use emu_check::*;
use mega::backend::cpu::Cpu;
use mega::backend::cuda::paged_attention as shapes;
use mega::backend::Backend;
use mega::emu::{DeviceBuffer, HostBuffer, Schedule, ViewArg};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const LENS: [u32; 5] = [1, 255, 256, 257, 521];

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    block_size: usize,
    h: usize,
    dh: usize,
    /// Query rows start one float into their buffer, so they are not 16-byte aligned.
    misaligned_q: bool,
}

/// One paged problem: queries, pools with NaN wherever no row's position lives, a table whose
/// unused slots point at a NaN block.
struct Problem {
    lens: Vec<u32>,
    qkv: Vec<f32>,
    k_pool: Vec<f32>,
    v_pool: Vec<f32>,
    table: Vec<u32>,
    c: usize,
    h: usize,
    block_size: usize,
}

fn shuffled(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    ids
}

impl Problem {
    /// Rows `lens` with their keys/values `keys[r]`, `values[r]` (`[lens[r], c]`) paged with
    /// `block_size` into a shuffled pool with one spare NaN block, which every unused table
    /// slot names.
    #[allow(clippy::too_many_arguments)]
    fn paged(
        rng: &mut ChaCha8Rng,
        lens: &[u32],
        qkv: Vec<f32>,
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        c: usize,
        h: usize,
        block_size: usize,
    ) -> Self {
        let blocks_of = |len: u32| (len as usize).div_ceil(block_size);
        let mb = lens.iter().map(|&l| blocks_of(l)).max().unwrap() + 1;
        let used: usize = lens.iter().map(|&l| blocks_of(l)).sum();
        let n_blocks = used + 1;
        let ids = shuffled(rng, n_blocks);
        let spare = ids[used];
        let mut table = vec![spare; lens.len() * mb];
        let mut next = 0;
        for (r, &len) in lens.iter().enumerate() {
            for slot in &mut table[r * mb..][..blocks_of(len)] {
                *slot = ids[next];
                next += 1;
            }
        }
        let mut k_pool = vec![f32::NAN; n_blocks * block_size * c];
        let mut v_pool = k_pool.clone();
        for (r, &len) in lens.iter().enumerate() {
            for j in 0..len as usize {
                let e = table[r * mb + j / block_size] as usize * block_size + j % block_size;
                k_pool[e * c..][..c].copy_from_slice(&keys[r][j * c..][..c]);
                v_pool[e * c..][..c].copy_from_slice(&values[r][j * c..][..c]);
            }
        }
        Self {
            lens: lens.to_vec(),
            qkv,
            k_pool,
            v_pool,
            table,
            c,
            h,
            block_size,
        }
    }

    /// Random rows of `lens` positions, paged with `block_size`.
    fn random(rng: &mut ChaCha8Rng, lens: &[u32], c: usize, h: usize, block_size: usize) -> Self {
        let qkv = uniform(rng, lens.len() * 3 * c, 0.0, 1.0);
        let keys: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| uniform(rng, l as usize * c, 0.0, 1.0))
            .collect();
        let values: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| uniform(rng, l as usize * c, 0.0, 1.0))
            .collect();
        Self::paged(rng, lens, qkv, &keys, &values, c, h, block_size)
    }

    /// The CPU backend's decode in f64.
    fn twin(&self, scale: f32) -> Vec<f64> {
        let mut out = vec![f64::NAN; self.lens.len() * self.c];
        Cpu::<f64>::new().attention_decode(
            &mut out,
            &widen(&self.qkv),
            &widen(&self.k_pool),
            &widen(&self.v_pool),
            &self.lens,
            &self.table,
            self.block_size,
            self.c,
            self.h,
            scale,
        );
        out
    }

    /// Both kernels on the emulator under `schedule`; the output buffer starts as NaN.
    fn kernels(&self, scale: f32, misaligned_q: bool, schedule: Schedule) -> Vec<f32> {
        let (b, c, h) = (self.lens.len(), self.c, self.h);
        let parts = shapes::partitions(&self.lens);
        let (acc_len, stats_len) = shapes::scratch_len(b, parts, c, h);
        let (part_acc, part_stats) = (nan_buf(acc_len), nan_buf(stats_len));
        let out = nan_buf(b * c);
        let skip = usize::from(misaligned_q);
        let mut padded = vec![f32::NAN; skip];
        padded.extend_from_slice(&self.qkv);
        let qkv_buf = HostBuffer::from_slice(&padded);
        let qkv =
            ViewArg::<f32>::new(qkv_buf.device_address(), padded.len(), skip, b * 3 * c).unwrap();
        let (kb, vb) = (
            HostBuffer::from_slice(&self.k_pool),
            HostBuffer::from_slice(&self.v_pool),
        );
        let (lens, table) = (
            HostBuffer::from_slice(&self.lens),
            HostBuffer::from_slice(&self.table),
        );
        let mb = (self.table.len() / b) as i32;
        let (bs, ci, hi, pi) = (self.block_size as i32, c as i32, h as i32, parts as i32);
        run(
            "paged_attention_partition_f32",
            shapes::partition_shape(parts, h, b),
            &[
                &part_acc,
                &part_stats,
                &qkv,
                &kb,
                &vb,
                &lens,
                &table,
                &mb,
                &bs,
                &ci,
                &hi,
                &pi,
                &scale,
            ],
            schedule,
        );
        run(
            "paged_attention_combine_f32",
            shapes::combine_shape(h, b),
            &[&out, &part_acc, &part_stats, &lens, &ci, &hi, &pi],
            schedule,
        );
        out.to_vec()
    }
}

#[test]
fn paged_attention_matches_the_cpu_twin() {
    let mut cases = Vec::new();
    for (i, block_size) in [1usize, 3, 16, 600].into_iter().enumerate() {
        // dh = 8: float4 path, groups of 2 threads; dh = 6: scalar path.
        for (h, dh) in [(2usize, 8usize), (3, 6)] {
            cases.push(Case {
                seed: 10 * i as u64 + dh as u64,
                block_size,
                h,
                dh,
                misaligned_q: false,
            });
        }
    }
    // dh = 8 but misaligned query rows: the scalar path with a width the float4 path takes.
    // dh = 160: float4 with 3 groups; dh = 640 (float4) and 130 (scalar): one group looping.
    for (seed, h, dh, misaligned_q) in [
        (90, 2, 8, true),
        (91, 1, 160, false),
        (92, 1, 640, false),
        (93, 2, 130, false),
    ] {
        cases.push(Case {
            seed,
            block_size: 16,
            h,
            dh,
            misaligned_q,
        });
    }
    sweep(
        "paged_attention_matches_the_cpu_twin",
        cases,
        |case, schedules| {
            let mut r = rng(case.seed);
            // The wide heads run two rows (one per side of a partition edge) to stay fast.
            let lens: &[u32] = if case.dh > 100 { &[257, 3] } else { &LENS };
            let c = case.h * case.dh;
            let p = Problem::random(&mut r, lens, c, case.h, case.block_size);
            let scale = 1.0 / (case.dh as f32).sqrt();
            let want = p.twin(scale);
            schedules.each(|schedule, checks| {
                let got = p.kernels(scale, case.misaligned_q, schedule);
                checks.close("out", &got, &want, F32_TOL);
            });
        },
    );
}

#[test]
fn a_rows_result_does_not_depend_on_block_size_or_batch() {
    let (h, dh) = (2usize, 8usize);
    let c = h * dh;
    let mut r = rng(7);
    let len = 300u32;
    let qkv = uniform(&mut r, 3 * c, 0.0, 1.0);
    let keys = uniform(&mut r, len as usize * c, 0.0, 1.0);
    let values = uniform(&mut r, len as usize * c, 0.0, 1.0);
    let alone = |bs: usize, r: &mut ChaCha8Rng| {
        Problem::paged(
            r,
            &[len],
            qkv.clone(),
            std::slice::from_ref(&keys),
            std::slice::from_ref(&values),
            c,
            h,
            bs,
        )
        .kernels(0.5, false, Schedule::Forward)
    };
    let reference = alone(16, &mut r);
    assert!(reference.iter().all(|x| x.is_finite()));
    for bs in [1, 7, 300] {
        assert_eq!(alone(bs, &mut r), reference, "block size {bs}");
    }
    // The same row second in a batch behind a longer one.
    let other_len = 700u32;
    let mut batch_qkv = uniform(&mut r, 3 * c, 0.0, 1.0);
    batch_qkv.extend_from_slice(&qkv);
    let other = (
        uniform(&mut r, other_len as usize * c, 0.0, 1.0),
        uniform(&mut r, other_len as usize * c, 0.0, 1.0),
    );
    let batch = Problem::paged(
        &mut r,
        &[other_len, len],
        batch_qkv,
        &[other.0, keys.clone()],
        &[other.1, values.clone()],
        c,
        h,
        5,
    )
    .kernels(0.5, false, Schedule::Forward);
    assert_eq!(&batch[c..], &reference[..], "second row of a batch");
}
