//! Single-query attention against a paged KV cache (decode). Memory-bound: each task streams
//! one row's cached keys and values once, all heads together, and long caches split into
//! several tasks whose partial softmax sums are merged (so one row still fills the pool).

use rayon::prelude::*;

use super::KvPages;
use super::TASK_MACS;
use crate::backend::cpu::loss::vector_math::{dot, exp_shifted_in_place, madd, row_max};
use crate::backend::cpu::Real;

/// Cached keys per decode task. Long caches split into several tasks (so a single row still
/// spreads over the pool), whose partial softmax sums are merged afterwards.
pub(super) const KEYS_PER_TASK: usize = 256;

/// One decode task: row `r`'s query against its cached positions `from..from + n`, all heads
/// at once so each cached entry of `c` values is streamed exactly once; `table` is the row's
/// block ids in `pages`. `part` receives, per head, the running max of the scaled scores,
/// `Σ e^(score − max)`, and the unnormalised `Σ e^(score − max)·v` (`[h | h | c]`); `scores`
/// is `[h, n]` scratch. The arithmetic depends only on the positions, never on where their
/// entries sit in the pool.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_chunk<F: Real, const FMA: bool>(
    part: &mut [F],
    scores: &mut [F],
    q: &[F],
    pages: &KvPages<'_, F>,
    table: &[u32],
    from: usize,
    n: usize,
    h: usize,
    scale: F,
) {
    let c = pages.c;
    let hs = c / h;
    let scores = &mut scores[..h * n];
    let mut j = 0;
    for (first, count) in pages.runs(table, from, from + n) {
        for key in pages.k[first * c..(first + count) * c].chunks_exact(c) {
            for hi in 0..h {
                let seg = hi * hs..(hi + 1) * hs;
                scores[hi * n + j] = dot::<F, FMA>(&q[seg.clone()], &key[seg]) * scale;
            }
            j += 1;
        }
    }
    let (maxima, rest) = part.split_at_mut(h);
    let (sums, acc) = rest.split_at_mut(h);
    for ((head_scores, max), sum) in scores.chunks_exact_mut(n).zip(maxima).zip(sums) {
        *max = row_max(head_scores);
        *sum = exp_shifted_in_place::<F, FMA>(head_scores, *max);
    }
    acc.fill(F::zero());
    let mut j = 0;
    for (first, count) in pages.runs(table, from, from + n) {
        for value in pages.v[first * c..(first + count) * c].chunks_exact(c) {
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
            j += 1;
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
    pages: &KvPages<'_, F>,
    table: &[u32],
    from: usize,
    n: usize,
    h: usize,
    scale: F,
) {
    decode_chunk::<F, true>(part, scores, q, pages, table, from, n, h, scale)
}

/// [`super::decode`] after validation, on the AVX2+FMA code path when `fma`.
pub(super) fn decode<F: Real>(
    out: &mut [F],
    qkv: &[F],
    pages: &KvPages<'_, F>,
    lens: &[u32],
    h: usize,
    scale: F,
    fma: bool,
) {
    let (c, b) = (pages.c, lens.len());
    // Tasks in row order, each a (row, first position) pair; `first_task[r]` indexes row r's.
    // Task boundaries fall at fixed positions, whatever the block size, so a row's result
    // does not depend on how its cache is paged.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(b + 1);
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
    let run_task = |scores: &mut Vec<F>, (part, &(r, j0)): (&mut [F], &(usize, usize))| {
        let n = KEYS_PER_TASK.min(lens[r] as usize - j0);
        let q = &qkv[r * 3 * c..][..c];
        let table = pages.row_table(r, b);
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: the caller passes `fma` only when the CPU has AVX2 and FMA.
            return unsafe { decode_chunk_avx2(part, scores, q, pages, table, j0, n, h, scale) };
        }
        let _ = fma;
        decode_chunk::<F, false>(part, scores, q, pages, table, j0, n, h, scale)
    };
    let new_scores = || vec![F::zero(); h * KEYS_PER_TASK];
    let row_parts = |r: usize| first_task[r] * width..first_task[r + 1] * width;

    // Work under one task's worth (the local model's few short rows) runs on the calling
    // thread: handing it to the pool costs more than computing it. Same tasks, same
    // arithmetic, so the result does not depend on which way it ran.
    let total_macs = 2 * c * lens.iter().map(|&l| l as usize).sum::<usize>();
    if total_macs <= TASK_MACS {
        let mut scores = new_scores();
        for job in partials.chunks_mut(width).zip(tasks.iter()) {
            run_task(&mut scores, job);
        }
    } else {
        let tasks_per_job = (TASK_MACS / (2 * keys_per_task * c).max(1)).max(1);
        partials
            .par_chunks_mut(width)
            .zip(tasks.par_iter())
            .with_min_len(tasks_per_job)
            .for_each_init(new_scores, run_task);
    }
    // The merge reads a few partials per row: cheaper on this thread than in the pool.
    for (r, out) in out.chunks_mut(c).enumerate() {
        merge_row(out, &partials[row_parts(r)], h);
    }
}

/// One row's output from its tasks' partials (`[h | h | c]` each): every partial rescaled to
/// the row's overall max per head, summed, and normalised.
fn merge_row<F: Real>(out: &mut [F], parts: &[F], h: usize) {
    let c = out.len();
    let (hs, width) = (c / h, 2 * h + c);
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
}
