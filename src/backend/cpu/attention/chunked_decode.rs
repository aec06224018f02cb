//! Single-query attention against a KV cache (decode). Memory-bound: each task streams
//! one row's cached keys and values once, all heads together, and long caches split into
//! several tasks whose partial softmax sums are merged (so one row still fills the pool).

use rayon::prelude::*;

use super::TASK_MACS;
use crate::backend::cpu::loss::vector_math::{dot, exp_shifted_in_place, madd, row_max};
use crate::backend::cpu::Real;

/// Cached keys per decode task. Long caches split into several tasks (so a single row still
/// spreads over the pool), whose partial softmax sums are merged afterwards.
pub(super) const KEYS_PER_TASK: usize = 256;

/// One decode task: row `r`'s query against a run of `n` consecutive cached keys, all heads
/// at once so each cached row of `c` values is streamed exactly once. `part` receives, per
/// head, the running max of the scaled scores, `Σ e^(score − max)`, and the unnormalised
/// `Σ e^(score − max)·v` (`[h | h | c]`); `scores` is `[h, n]` scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_chunk<F: Real, const FMA: bool>(
    part: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    c: usize,
    h: usize,
    scale: F,
) {
    let hs = c / h;
    let n = keys.len() / c;
    let scores = &mut scores[..h * n];
    for (j, key) in keys.chunks_exact(c).enumerate() {
        for hi in 0..h {
            let seg = hi * hs..(hi + 1) * hs;
            scores[hi * n + j] = dot::<F, FMA>(&q[seg.clone()], &key[seg]) * scale;
        }
    }
    let (maxima, rest) = part.split_at_mut(h);
    let (sums, acc) = rest.split_at_mut(h);
    for ((head_scores, max), sum) in scores.chunks_exact_mut(n).zip(maxima).zip(sums) {
        *max = row_max(head_scores);
        *sum = exp_shifted_in_place::<F, FMA>(head_scores, *max);
    }
    acc.fill(F::zero());
    for (j, value) in values.chunks_exact(c).enumerate() {
        for ((acc, value), hi) in acc
            .chunks_exact_mut(hs)
            .zip(value.chunks_exact(hs))
            .zip(0..h)
        {
            let p = scores[hi * n + j];
            for (a, &v) in acc.iter_mut().zip(value) {
                *a = madd::<F, FMA>(p, v, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn decode_chunk_avx2<F: Real>(
    part: &mut [F],
    scores: &mut [F],
    q: &[F],
    keys: &[F],
    values: &[F],
    c: usize,
    h: usize,
    scale: F,
) {
    decode_chunk::<F, true>(part, scores, q, keys, values, c, h, scale)
}

/// [`super::decode`] after validation, on the AVX2+FMA code path when `fma`.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode<F: Real>(
    out: &mut [F],
    qkv: &[F],
    k_cache: &[F],
    v_cache: &[F],
    lens: &[u32],
    t_max: usize,
    c: usize,
    h: usize,
    scale: F,
    fma: bool,
) {
    // Tasks in row order, each a (row, first key) pair; `first_task[r]` indexes row r's.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(lens.len() + 1);
    for (r, &len) in lens.iter().enumerate() {
        first_task.push(tasks.len());
        tasks.extend((0..len as usize).step_by(KEYS_PER_TASK).map(|j0| (r, j0)));
    }
    first_task.push(tasks.len());

    let width = 2 * h + c;
    let mut partials = vec![F::zero(); tasks.len() * width];
    let keys_per_task = lens
        .iter()
        .map(|&l| l as usize)
        .sum::<usize>()
        .div_ceil(tasks.len());
    let tasks_per_job = (TASK_MACS / (2 * keys_per_task * c).max(1)).max(1);
    partials
        .par_chunks_mut(width)
        .zip(tasks.par_iter())
        .with_min_len(tasks_per_job)
        .for_each_init(
            || vec![F::zero(); h * KEYS_PER_TASK],
            |scores, (part, &(r, j0))| {
                let j1 = (j0 + KEYS_PER_TASK).min(lens[r] as usize);
                let q = &qkv[r * 3 * c..][..c];
                let keys = &k_cache[(r * t_max + j0) * c..(r * t_max + j1) * c];
                let values = &v_cache[(r * t_max + j0) * c..(r * t_max + j1) * c];
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the caller passes `fma` only when the CPU has AVX2 and FMA.
                    return unsafe {
                        decode_chunk_avx2(part, scores, q, keys, values, c, h, scale)
                    };
                }
                let _ = fma;
                decode_chunk::<F, false>(part, scores, q, keys, values, c, h, scale)
            },
        );

    // Merge each row's chunks: rescale every partial to the row's overall max.
    let hs = c / h;
    out.par_chunks_mut(c).enumerate().for_each(|(r, out)| {
        let parts = &partials[first_task[r] * width..first_task[r + 1] * width];
        for (hi, out) in out.chunks_exact_mut(hs).enumerate() {
            let max = parts
                .chunks_exact(width)
                .fold(F::neg_infinity(), |m, p| m.max(p[hi]));
            out.fill(F::zero());
            let mut total = F::zero();
            for part in parts.chunks_exact(width) {
                let weight = (part[hi] - max).exp();
                total = total + part[h + hi] * weight;
                let acc = &part[2 * h + hi * hs..][..hs];
                for (o, &a) in out.iter_mut().zip(acc) {
                    *o = *o + a * weight;
                }
            }
            let inv = F::one() / total;
            for o in out.iter_mut() {
                *o = *o * inv;
            }
        }
    });
}
