//! Decode attention over a paged KV cache (`Backend::attention_decode`) on the CPU backend:
//! against a naive f64 implementation written here, at odd block sizes and lengths on either
//! side of the kernel's task split, with rows of different lengths, shuffled and
//! non-monotonic block tables and blocks shared between rows; and bit-for-bit invariance of a
//! row's result under re-paging and under a change of batch.

use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn shuffled(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    ids
}

/// Softmax attention of each row's query over the `lens[r]` keys and values `keys[r]`,
/// `values[r]` (each `[lens[r], c]`, logical order), in f64.
fn naive(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    lens: &[u32],
    c: usize,
    h: usize,
    scale: f32,
) -> Vec<f64> {
    let hs = c / h;
    let mut out = vec![0.0f64; lens.len() * c];
    for (r, &len) in lens.iter().enumerate() {
        let len = len as usize;
        for hi in 0..h {
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    (0..hs)
                        .map(|d| {
                            q[r * 3 * c + hi * hs + d] as f64 * keys[r][j * c + hi * hs + d] as f64
                        })
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for d in 0..hs {
                let acc: f64 = (0..len)
                    .map(|j| w[j] * values[r][j * c + hi * hs + d] as f64)
                    .sum();
                out[r * c + hi * hs + d] = acc / total;
            }
        }
    }
    out
}

/// A pool of `blocks` blocks with every row's logical keys and values written at the entries
/// its block table gives; entries no row uses hold NaN, so reading one shows up.
fn paged_pool(
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    table: &[u32],
    blocks: usize,
    bs: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = keys.len();
    let mb = table.len() / rows;
    let (mut kp, mut vp) = (
        vec![f32::NAN; blocks * bs * c],
        vec![f32::NAN; blocks * bs * c],
    );
    for r in 0..rows {
        for j in 0..keys[r].len() / c {
            let e = table[r * mb + j / bs] as usize * bs + j % bs;
            kp[e * c..(e + 1) * c].copy_from_slice(&keys[r][j * c..(j + 1) * c]);
            vp[e * c..(e + 1) * c].copy_from_slice(&values[r][j * c..(j + 1) * c]);
        }
    }
    (kp, vp)
}

#[allow(clippy::too_many_arguments)]
fn decode(
    q: &[f32],
    kp: &[f32],
    vp: &[f32],
    lens: &[u32],
    table: &[u32],
    bs: usize,
    c: usize,
    h: usize,
    scale: f32,
) -> Vec<f32> {
    let cpu = Cpu::<f32>::new();
    let mut out = vec![f32::NAN; lens.len() * c];
    cpu.attention_decode(
        &mut out,
        &q.to_vec(),
        &kp.to_vec(),
        &vp.to_vec(),
        lens,
        table,
        bs,
        c,
        h,
        scale,
    );
    out
}

#[test]
fn paged_decode_matches_a_naive_implementation() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    // Lengths on both sides of the 256-key task split, and short ones.
    let lens: [u32; 7] = [1, 2, 6, 255, 256, 257, 523];
    let (c, h) = (24, 3);
    let scale = 1.0 / ((c / h) as f32).sqrt();
    for bs in [1usize, 3, 7, 16, 600] {
        let rows = lens.len();
        let mb = (*lens.iter().max().unwrap() as usize).div_ceil(bs);
        let keys: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| random(&mut rng, l as usize * c))
            .collect();
        let values: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| random(&mut rng, l as usize * c))
            .collect();
        // Every row's blocks drawn from one shuffled list (so tables are non-monotonic and
        // rows interleave in the pool), table entries past a row's need left at u32::MAX.
        let needed: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(bs)).collect();
        let blocks = needed.iter().sum::<usize>() + 3;
        let order = shuffled(&mut rng, blocks);
        let mut table = vec![u32::MAX; rows * mb];
        let mut next = order.iter();
        for r in 0..rows {
            for slot in &mut table[r * mb..r * mb + needed[r]] {
                *slot = *next.next().unwrap();
            }
        }
        let (kp, vp) = paged_pool(&keys, &values, &table, blocks, bs, c);
        let q = random(&mut rng, rows * 3 * c);
        let got = decode(&q, &kp, &vp, &lens, &table, bs, c, h, scale);
        let want = naive(&q, &keys, &values, &lens, c, h, scale);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0f64, f64::max);
        assert!(worst < 2e-5, "block size {bs}: max |diff| {worst:e}");
    }
}

#[test]
fn rows_may_share_blocks() {
    // Two rows reading the same prefix blocks (as parallel samples of one prompt would),
    // then diverging into blocks of their own.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let (c, h, bs) = (8, 2, 5);
    let shared = random(&mut rng, 10 * c);
    let own: Vec<Vec<f32>> = (0..2).map(|_| random(&mut rng, 3 * c)).collect();
    let keys: Vec<Vec<f32>> = own.iter().map(|o| [&shared[..], o].concat()).collect();
    let values = keys.clone();
    let table = [4u32, 1, 0, 4, 1, 2];
    let (mut kp, mut vp) = paged_pool(&keys[..1], &values[..1], &table[..3], 5, bs, c);
    // Row 1's own positions 10..13 go to block 2.
    for j in 0..3 {
        let e = 2 * bs + j;
        kp[e * c..(e + 1) * c].copy_from_slice(&own[1][j * c..(j + 1) * c]);
        vp[e * c..(e + 1) * c].copy_from_slice(&own[1][j * c..(j + 1) * c]);
    }
    let lens = [13u32, 13];
    let q = random(&mut rng, 2 * 3 * c);
    let got = decode(&q, &kp, &vp, &lens, &table, bs, c, h, 0.4);
    let want = naive(&q, &keys, &values, &lens, c, h, 0.4);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
fn a_rows_result_does_not_depend_on_paging_or_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let (c, h) = (32, 4);
    let len = 300usize;
    let keys = vec![random(&mut rng, len * c)];
    let values = vec![random(&mut rng, len * c)];
    let q = random(&mut rng, 3 * c);
    let lens = [len as u32];
    // Contiguous: one block holding the whole row.
    let (kp, vp) = paged_pool(&keys, &values, &[0], 1, len, c);
    let alone = decode(&q, &kp, &vp, &lens, &[0], len, c, h, 0.2);
    for bs in [1usize, 3, 16, 64] {
        let n = len.div_ceil(bs);
        let table = shuffled(&mut rng, n + 2)[..n].to_vec();
        let (kp, vp) = paged_pool(&keys, &values, &table, n + 2, bs, c);
        let paged = decode(&q, &kp, &vp, &lens, &table, bs, c, h, 0.2);
        assert!(
            paged
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "block size {bs}: the result changed with the paging"
        );
        // The same row in the middle of a batch of rows of other lengths, enough work in all
        // that the kernel spreads it over the thread pool (alone, it runs on the caller).
        let other_lens = [7u32, len as u32, 1200];
        let mut all_keys = vec![random(&mut rng, 7 * c), keys[0].clone()];
        all_keys.push(random(&mut rng, 1200 * c));
        let mut all_values = vec![random(&mut rng, 7 * c), values[0].clone()];
        all_values.push(random(&mut rng, 1200 * c));
        let need: Vec<usize> = other_lens
            .iter()
            .map(|&l| (l as usize).div_ceil(bs))
            .collect();
        let mb = *need.iter().max().unwrap();
        let blocks = need.iter().sum::<usize>();
        let order = shuffled(&mut rng, blocks);
        let mut table = vec![0u32; 3 * mb];
        let mut next = order.iter();
        for r in 0..3 {
            for slot in &mut table[r * mb..r * mb + need[r]] {
                *slot = *next.next().unwrap();
            }
        }
        let (kp, vp) = paged_pool(&all_keys, &all_values, &table, blocks, bs, c);
        let mut qs = random(&mut rng, 3 * 3 * c);
        qs[3 * c..6 * c].copy_from_slice(&q);
        let batch = decode(&qs, &kp, &vp, &other_lens, &table, bs, c, h, 0.2);
        assert!(
            batch[c..2 * c]
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "block size {bs}: the result changed with the batch"
        );
    }
}

#[test]
fn kv_append_then_decode_reads_what_was_appended() {
    // Append a row's keys and values one position at a time through its block table, then
    // decode: the same as attention over the appended sequence in logical order.
    let mut rng = ChaCha8Rng::seed_from_u64(44);
    let cpu = Cpu::<f32>::new();
    let (c, h, bs, len) = (12, 3, 3, 10usize);
    let table = [5u32, 2, 7, 0];
    let blocks = 8;
    let mut kp = vec![f32::NAN; blocks * bs * c];
    let mut vp = vec![f32::NAN; blocks * bs * c];
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut qkv = Vec::new();
    for p in 0..len {
        qkv = random(&mut rng, 3 * c);
        keys.extend_from_slice(&qkv[c..2 * c]);
        values.extend_from_slice(&qkv[2 * c..]);
        let entry = table[p / bs] * bs as u32 + (p % bs) as u32;
        cpu.kv_append(&mut kp, &mut vp, &qkv, &[entry], c);
    }
    let got = decode(&qkv, &kp, &vp, &[len as u32], &table, bs, c, h, 0.3);
    let want = naive(&qkv, &[keys], &[values], &[len as u32], c, h, 0.3);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
#[should_panic(expected = "outside the pool")]
fn a_block_id_outside_the_pool_is_caught() {
    let (c, h, bs) = (4, 1, 2);
    let pool = vec![0.0f32; 2 * bs * c];
    decode(&[0.0; 12], &pool, &pool, &[3], &[1, 2], bs, c, h, 1.0);
}
