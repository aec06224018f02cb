//! Causal multi-head attention on the CPU: training forward/backward, single-query decode
//! against a KV cache, and the cache append.
//!
//! Layouts follow [`crate::backend::Backend::attention_forward`]: `qkv` is `[b, t, 3c]` with
//! per row `[q | k | v]`, head `i` owning channels `i·c/h .. (i+1)·c/h` of each part.
//!
//! Two kernels, chosen by sequence length: `short` (whole sequences per task, for the local
//! model's thousands of rows of a few positions) and `tiled` (register-tiled products per
//! (batch, head) pair, for the global model); decode is `chunked_decode`. Each kernel is
//! compiled twice, for baseline x86-64 and for AVX2+FMA, and picked at run time. The
//! `reference` module holds the plain loops the fast paths are tested against.

mod chunked_decode;
mod short;
mod tile;
mod tiled;

use super::loss::vector_math::has_avx2_fma;
use super::Real;

/// Multiply-adds worth one rayon task: well above the pool's hand-off cost.
const TASK_MACS: usize = 1 << 16;

fn check_heads(c: usize, h: usize) {
    assert!(
        h > 0 && c % h == 0,
        "channels {c} must split evenly into {h} heads"
    );
}

/// Longest sequence the short-sequence forward takes; longer ones use the tiled kernel.
/// Measured (c = 256..512, one thread): the two forward kernels tie at t = 24.
const SHORT_MAX_T_FORWARD: usize = 24;

/// As [`SHORT_MAX_T_FORWARD`] for the backward pass, whose kernels tie at t ≈ 32-48.
const SHORT_MAX_T_BACKWARD: usize = 32;

/// Causal attention forward: `out = [b, t, c]`, `att = [b, h, t, t]` probabilities.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    check_heads(c, h);
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
    assert_eq!(out.len(), b * t * c, "out must be [b, t, c]");
    assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
    if out.is_empty() {
        return;
    }
    if t <= SHORT_MAX_T_FORWARD {
        return short::forward(out, att, qkv, t, c, h, scale, has_avx2_fma());
    }
    tiled::forward::<F, 16>(out, att, qkv, t, c, h, scale, has_avx2_fma())
}

/// Causal attention backward: `dqkv += …` given `dout` and the saved `att`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    check_heads(c, h);
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
    assert_eq!(dqkv.len(), b * t * 3 * c, "dqkv must be [b, t, 3c]");
    assert_eq!(dout.len(), b * t * c, "dout must be [b, t, c]");
    assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
    if dout.is_empty() {
        return;
    }
    if t <= SHORT_MAX_T_BACKWARD {
        return short::backward(dqkv, dout, qkv, att, t, c, h, scale, has_avx2_fma());
    }
    tiled::backward::<F, 16>(dqkv, dout, qkv, att, t, c, h, scale, has_avx2_fma())
}

/// Where each row's cached keys and values live: pools of `c`-wide entries in blocks of
/// `block_size`, and a row-major `[rows, max_blocks]` block table (see
/// [`crate::backend::Backend::attention_decode`]).
#[derive(Clone, Copy, Debug)]
pub struct KvPages<'a, F> {
    /// Key pool `[n_blocks, block_size, c]`.
    pub k: &'a [F],
    /// Value pool, same shape.
    pub v: &'a [F],
    /// Block ids, `max_blocks` per row.
    pub block_table: &'a [u32],
    /// Positions per block.
    pub block_size: usize,
    /// Entry width.
    pub c: usize,
}

impl<'a, F> KvPages<'a, F> {
    /// Block-table entries per row for `rows` rows.
    pub fn max_blocks(&self, rows: usize) -> usize {
        self.block_table.len() / rows.max(1)
    }

    /// Row `r`'s block ids (given `rows` rows in all).
    #[inline]
    pub fn row_table(&self, r: usize, rows: usize) -> &'a [u32] {
        let mb = self.max_blocks(rows);
        &self.block_table[r * mb..(r + 1) * mb]
    }

    /// Pool entry of position `p` for a row whose block ids are `table`.
    #[inline(always)]
    pub fn entry(&self, table: &[u32], p: usize) -> usize {
        table[p / self.block_size] as usize * self.block_size + p % self.block_size
    }

    /// Runs of consecutive pool entries holding positions `from..to` of a row whose block ids
    /// are `table`, as `(first entry, count)` in position order.
    #[inline]
    pub fn runs(
        &self,
        table: &'a [u32],
        from: usize,
        to: usize,
    ) -> impl Iterator<Item = (usize, usize)> + 'a {
        let bs = self.block_size;
        let mut p = from;
        std::iter::from_fn(move || {
            (p < to).then(|| {
                let n = (bs - p % bs).min(to - p);
                let first = table[p / bs] as usize * bs + p % bs;
                p += n;
                (first, n)
            })
        })
    }

    /// Checks the pools and table against `lens` (internal shape errors are bugs, so panics).
    fn check(&self, lens: &[u32]) {
        let (c, bs, b) = (self.c, self.block_size, lens.len());
        assert!(bs > 0, "block size must be positive");
        assert_eq!(
            self.k.len(),
            self.v.len(),
            "key and value pools differ in size"
        );
        assert_eq!(
            self.k.len() % (bs * c),
            0,
            "KV pool must be [n_blocks, block_size = {bs}, c = {c}]"
        );
        let n_blocks = self.k.len() / (bs * c);
        if b == 0 {
            return;
        }
        assert_eq!(
            self.block_table.len() % b,
            0,
            "block table must be [b = {b}, max_blocks]"
        );
        let mb = self.max_blocks(b);
        for (r, &len) in lens.iter().enumerate() {
            let len = len as usize;
            assert!(
                len >= 1 && len <= mb * bs,
                "decode length {len} outside 1..={} (row {r})",
                mb * bs
            );
            for &blk in &self.row_table(r, b)[..len.div_ceil(bs)] {
                assert!(
                    (blk as usize) < n_blocks,
                    "row {r}: block {blk} outside the pool of {n_blocks}"
                );
            }
        }
    }
}

/// Single-query attention of each row `r` over its first `lens[r]` cached positions, read
/// through the block table of `pages`.
pub fn decode<F: Real>(
    out: &mut [F],
    qkv: &[F],
    pages: &KvPages<'_, F>,
    lens: &[u32],
    h: usize,
    scale: F,
) {
    let c = pages.c;
    check_heads(c, h);
    let b = lens.len();
    assert_eq!(qkv.len(), b * 3 * c, "qkv must be [b, 3c]");
    assert_eq!(out.len(), b * c, "out must be [b, c]");
    pages.check(lens);
    if out.is_empty() {
        return;
    }
    chunked_decode::decode(out, qkv, pages, lens, h, scale, has_avx2_fma());
}

#[cfg(test)]
mod tests {
    //! Both kernels on both instruction-set paths, for lengths on either side of the switch
    //! between them (the public functions pick one kernel per length and one path per CPU,
    //! so the integration tests cannot reach every combination).

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        // `f32::max` skips NaN, so non-finite values must be rejected explicitly.
        assert!(
            a.iter().chain(b).all(|x| x.is_finite()),
            "{what}: non-finite values"
        );
        let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 4e-6 * (1.0 + scale), "{what}: max diff {diff}");
    }

    fn instruction_sets() -> Vec<bool> {
        if has_avx2_fma() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn every_kernel_and_instruction_set_matches_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (b, t, c, h) in [
            (2, 1, 8, 2),
            (3, 7, 12, 3),
            (1, 9, 6, 2),
            (2, 30, 16, 2),
            (1, 40, 32, 4),
        ] {
            let scale = 1.0 / ((c / h) as f32).sqrt();
            let qkv = random(&mut rng, b * t * 3 * c);
            let dout = random(&mut rng, b * t * c);
            let start = random(&mut rng, b * t * 3 * c);
            let (mut out_ref, mut att_ref) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
            reference::forward(&mut out_ref, &mut att_ref, &qkv, b, t, c, h, scale);
            let mut dqkv_ref = start.clone();
            reference::backward(&mut dqkv_ref, &dout, &qkv, &att_ref, b, t, c, h, scale);
            for fma in instruction_sets() {
                let what = format!("{b}x{t}x{c}/{h} fma={fma}");
                let (mut out, mut att) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * h * t * t]);
                short::forward(&mut out, &mut att, &qkv, t, c, h, scale, fma);
                assert_close(&out, &out_ref, &format!("short forward out {what}"));
                assert_close(&att, &att_ref, &format!("short forward att {what}"));
                let (mut out, mut att) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * h * t * t]);
                tiled::forward::<f32, 16>(&mut out, &mut att, &qkv, t, c, h, scale, fma);
                assert_close(&out, &out_ref, &format!("tiled forward out {what}"));
                assert_close(&att, &att_ref, &format!("tiled forward att {what}"));

                let mut dqkv = start.clone();
                short::backward(&mut dqkv, &dout, &qkv, &att_ref, t, c, h, scale, fma);
                assert_close(&dqkv, &dqkv_ref, &format!("short backward {what}"));
                let mut dqkv = start.clone();
                tiled::backward::<f32, 16>(&mut dqkv, &dout, &qkv, &att_ref, t, c, h, scale, fma);
                assert_close(&dqkv, &dqkv_ref, &format!("tiled backward {what}"));
            }
        }
    }

    #[test]
    fn decode_on_every_instruction_set_matches_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (c, h, bs) = (16, 2, 7);
        let t_max = 2 * chunked_decode::KEYS_PER_TASK + 3;
        let lens = [
            1,
            chunked_decode::KEYS_PER_TASK as u32,
            chunked_decode::KEYS_PER_TASK as u32 + 1,
            t_max as u32,
        ];
        let b = lens.len();
        let mb = t_max.div_ceil(bs);
        // Every row's blocks scattered over the pool in a shuffled order.
        let mut ids: Vec<u32> = (0..(b * mb) as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let qkv = random(&mut rng, b * 3 * c);
        let k = random(&mut rng, b * mb * bs * c);
        let v = random(&mut rng, b * mb * bs * c);
        let pages = KvPages {
            k: &k,
            v: &v,
            block_table: &ids,
            block_size: bs,
            c,
        };
        let mut out_ref = vec![0.0; b * c];
        reference::decode(&mut out_ref, &qkv, &pages, &lens, h, 0.3);
        for fma in instruction_sets() {
            let mut out = vec![f32::NAN; b * c];
            chunked_decode::decode(&mut out, &qkv, &pages, &lens, h, 0.3, fma);
            assert_close(&out, &out_ref, &format!("decode fma={fma}"));
        }
    }
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// Reference of [`super::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        out: &mut [F],
        att: &mut [F],
        qkv: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(out.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    let arow = ((bi * h + hi) * t + i) * t;
                    let mut max = F::neg_infinity();
                    for j in 0..=i {
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + qkv[q + d] * qkv[k + d];
                        }
                        s = s * scale;
                        att[arow + j] = s;
                        max = max.max(s);
                    }
                    let mut sum = F::zero();
                    for j in 0..=i {
                        let e = (att[arow + j] - max).exp();
                        att[arow + j] = e;
                        sum = sum + e;
                    }
                    for j in 0..t {
                        att[arow + j] = if j <= i {
                            att[arow + j] / sum
                        } else {
                            F::zero()
                        };
                    }
                    let o = (bi * t + i) * c + hi * hs;
                    for d in 0..hs {
                        let mut acc = F::zero();
                        for j in 0..=i {
                            let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                            acc = acc + att[arow + j] * qkv[v + d];
                        }
                        out[o + d] = acc;
                    }
                }
            }
        }
    }

    /// Reference of [`super::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dqkv: &mut [F],
        dout: &[F],
        qkv: &[F],
        att: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(dqkv.len(), b * t * 3 * c);
        assert_eq!(dout.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        let mut datt = vec![F::zero(); t];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let arow = ((bi * h + hi) * t + i) * t;
                    let o = (bi * t + i) * c + hi * hs;
                    // dP[j] = dout_i · v_j ; dv_j += P[j] dout_i
                    for j in 0..=i {
                        let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + dout[o + d] * qkv[v + d];
                            dqkv[v + d] = dqkv[v + d] + att[arow + j] * dout[o + d];
                        }
                        datt[j] = s;
                    }
                    // softmax backward: dS[j] = P[j] (dP[j] - Σ_k P[k] dP[k])
                    let mut dot = F::zero();
                    for j in 0..=i {
                        dot = dot + att[arow + j] * datt[j];
                    }
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    for j in 0..=i {
                        let ds = att[arow + j] * (datt[j] - dot) * scale;
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        for d in 0..hs {
                            dqkv[q + d] = dqkv[q + d] + ds * qkv[k + d];
                            dqkv[k + d] = dqkv[k + d] + ds * qkv[q + d];
                        }
                    }
                }
            }
        }
    }

    /// Reference of [`super::decode`]: every position's entry looked up one at a time.
    pub fn decode<F: Real>(
        out: &mut [F],
        qkv: &[F],
        pages: &super::KvPages<'_, F>,
        lens: &[u32],
        h: usize,
        scale: F,
    ) {
        let c = pages.c;
        assert_eq!(c % h, 0);
        let b = lens.len();
        assert_eq!(qkv.len(), b * 3 * c);
        assert_eq!(out.len(), b * c);
        pages.check(lens);
        let hs = c / h;
        for (r, &len) in lens.iter().enumerate() {
            let len = len as usize;
            let table = pages.row_table(r, b);
            let mut scores = vec![F::zero(); len];
            for hi in 0..h {
                let q = r * 3 * c + hi * hs;
                let mut max = F::neg_infinity();
                for (j, sj) in scores.iter_mut().enumerate() {
                    let k = pages.entry(table, j) * c + hi * hs;
                    let mut s = F::zero();
                    for d in 0..hs {
                        s = s + qkv[q + d] * pages.k[k + d];
                    }
                    *sj = s * scale;
                    max = max.max(*sj);
                }
                let mut sum = F::zero();
                for sj in scores.iter_mut() {
                    *sj = (*sj - max).exp();
                    sum = sum + *sj;
                }
                let o = r * c + hi * hs;
                for d in 0..hs {
                    let mut acc = F::zero();
                    for (j, sj) in scores.iter().enumerate() {
                        acc = acc + *sj * pages.v[pages.entry(table, j) * c + hi * hs + d];
                    }
                    out[o + d] = acc / sum;
                }
            }
        }
    }
}
