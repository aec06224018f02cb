//! MEGALODON's TimestepNorm: a causal group norm whose statistics cover every scalar of a
//! group at all timesteps up to the current one (spec `megalodon.md` §5).
//!
//! Layout: `x`, `y` are `[b, l, d]` row-major; the `d` channels form `g` groups of `dg = d/g`
//! contiguous channels. For batch row `b`, group `g` and time `t`,
//!
//! ```text
//! μ_t  = mean of x[b, s, j]            over s ≤ t, j ∈ group     (carried state included)
//! σ²_t = population variance of the same scalars
//! y_tj = (x_tj − μ_t) / √(σ²_t + eps) · (w_j + 1) + bias_j        (plus-one scale)
//! ```
//!
//! computed, as the official code does, by a Welford merge of per-token group moments into a
//! running `(count, mean, var)` that starts from the carried state (§5.2). `count` counts
//! timesteps (one per batch row, shared by the groups) and is held as an integer-valued `F`;
//! in `f32` it is exact up to 2²⁴ timesteps. A fresh sequence starts from count 0, where the
//! starting mean and variance have no effect.
//!
//! Backward is the reverse-time adjoint scan of §5.5. It also returns the gradient with
//! respect to the carried-in mean and variance, so chunks of a sequence processed in separate
//! calls (streaming, chunk-parallel ranks) chain their gradients like one call.
//!
//! The fast path works in three phases: per-token group moments (parallel over `(b, t)` rows),
//! the time recursion (sequential per batch row, `O(l·g)` scalars, vectorized over groups), and
//! the normalization or input gradient (parallel over rows again). Work splits depend only on
//! the shapes, so results do not depend on the thread count.

use rayon::prelude::*;

use super::lanes::sum_by;
use super::parallel::min_rows;
use super::{real, Real};

/// The variance floor MEGALODON uses (`norm_eps`).
pub const EPS: f64 = 1e-5;

/// Carried statistics of a sequence (read-only): `count` `[b]` timesteps seen (an integer held
/// as `F`), `mean` `[b, g]`, `var` `[b, g]` (population variance).
#[derive(Clone, Copy, Debug)]
pub struct TsnState<'a, F> {
    /// Timesteps seen so far, per batch row.
    pub count: &'a [F],
    /// Running mean per (batch row, group).
    pub mean: &'a [F],
    /// Running population variance per (batch row, group).
    pub var: &'a [F],
}

/// Carried statistics of a sequence (writable); the layout of [`TsnState`].
#[derive(Debug)]
pub struct TsnStateMut<'a, F> {
    /// Timesteps seen so far, per batch row.
    pub count: &'a mut [F],
    /// Running mean per (batch row, group).
    pub mean: &'a mut [F],
    /// Running population variance per (batch row, group).
    pub var: &'a mut [F],
}

impl<'a, F> TsnStateMut<'a, F> {
    /// A read-only view of the same state.
    pub fn as_ref(&self) -> TsnState<'_, F> {
        TsnState {
            count: self.count,
            mean: self.mean,
            var: self.var,
        }
    }
}

/// Asserts `d = g·dg` with `g ≥ 1`; returns `dg`.
fn group_width(d: usize, g: usize) -> usize {
    assert!(g > 0, "timestep_norm: need at least one group");
    assert!(
        d > 0 && d % g == 0,
        "timestep_norm: d = {d} must be a positive multiple of g = {g}"
    );
    d / g
}

fn check_state_lens<F>(count: &[F], mean: &[F], var: &[F], b: usize, g: usize) {
    assert_eq!(count.len(), b, "timestep_norm: count must be [b]");
    assert_eq!(mean.len(), b * g, "timestep_norm: mean must be [b, g]");
    assert_eq!(var.len(), b * g, "timestep_norm: var must be [b, g]");
}

/// The carried count as an exact integer, in `f64` so the merge weights of long sequences do
/// not inherit `f32`'s integer limit.
fn count_of<F: Real>(c: F) -> f64 {
    let n = c.to_f64().unwrap_or(f64::NAN);
    assert!(
        n >= 0.0 && n.fract() == 0.0,
        "timestep_norm: count must be a non-negative integer, got {n}"
    );
    n
}

/// Starting counts per batch row: the carried ones, or zeros for a fresh sequence.
fn start_counts<F: Real>(state_in: Option<&TsnState<F>>, b: usize) -> Vec<f64> {
    match state_in {
        Some(s) => s.count.iter().map(|&c| count_of(c)).collect(),
        None => vec![0.0; b],
    }
}

/// Welford weights for merging one more timestep into `n` seen ones:
/// `c1 = n/(n+1)`, `c2 = 1/(n+1)`.
#[inline]
fn merge_weights<F: Real>(n: f64) -> (F, F) {
    (real(n / (n + 1.0)), real(1.0 / (n + 1.0)))
}

/// Mean and population variance of one group's channels (two passes).
#[inline]
fn group_moments<F: Real>(xs: &[F], inv_dg: F) -> (F, F) {
    let n = xs.len();
    let ux = sum_by(n, |j| xs[j]) * inv_dg;
    let vx = sum_by(n, |j| {
        let c = xs[j] - ux;
        c * c
    }) * inv_dg;
    (ux, vx)
}

/// One Welford merge (§5.2): the running `(μ, σ²)` after adding a timestep with group
/// moments `(ux, vx)`.
#[inline(always)]
fn merge<F: Real>(mu: F, var: F, ux: F, vx: F, c1: F, c2: F) -> (F, F) {
    let delta = ux - mu;
    (
        c1 * mu + c2 * ux,
        c1 * var + c2 * vx + (c1 * delta) * (c2 * delta),
    )
}

/// `y = (x − μ)·rstd·ŵ + bias` over one group's channels, `ŵ = w + 1` precomputed.
#[inline(always)]
fn normalize_group<F: Real>(y: &mut [F], x: &[F], w_hat: &[F], bias: &[F], mu: F, rs: F) {
    for j in 0..y.len() {
        y[j] = (x[j] - mu) * rs * w_hat[j] + bias[j];
    }
}

fn plus_one<F: Real>(w: &[F]) -> Vec<F> {
    w.iter().map(|&v| v + F::one()).collect()
}

/// Forward over a call of `l` tokens per batch row.
///
/// Writes `y` `[b, l, d]` and, for [`backward`], the cumulative statistics `saved_mean` and
/// `saved_rstd` `[b, l, g]` (`rstd = 1/√(σ² + eps)`). `state_in` is the carried state (`None`:
/// a fresh sequence); `state_out`, when given, receives the state after the last token (the
/// carried state itself when `l = 0`; count 0, mean 0, var 1 for a fresh empty call).
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    y: &mut [F],
    saved_mean: &mut [F],
    saved_rstd: &mut [F],
    state_out: Option<TsnStateMut<F>>,
    x: &[F],
    w: &[F],
    bias: &[F],
    state_in: Option<TsnState<F>>,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
    eps: F,
) {
    let dg = group_width(d, g);
    check_forward_shapes(y, saved_mean, saved_rstd, x, w, bias, b, l, d, g);
    if let Some(s) = &state_in {
        check_state_lens(s.count, s.mean, s.var, b, g);
    }
    if let Some(s) = &state_out {
        check_state_lens(s.count, s.mean, s.var, b, g);
    }
    let n0 = start_counts(state_in.as_ref(), b);
    let (mut end_mean, mut end_var) = match &state_in {
        Some(s) => (s.mean.to_vec(), s.var.to_vec()),
        None => (vec![F::zero(); b * g], vec![F::one(); b * g]),
    };

    if l > 0 {
        let inv_dg = F::one() / real(dg as f64);
        // Phase 1: per-token group moments, parked in the saved buffers (ux → mean, vx → rstd).
        x.par_chunks(d)
            .zip(saved_mean.par_chunks_mut(g))
            .zip(saved_rstd.par_chunks_mut(g))
            .with_min_len(min_rows(d))
            .for_each(|((xr, ux), vx)| {
                for gi in 0..g {
                    (ux[gi], vx[gi]) = group_moments(&xr[gi * dg..(gi + 1) * dg], inv_dg);
                }
            });

        // Phase 2: the time recursion, one batch row per task, vectorized over groups.
        saved_mean
            .par_chunks_mut(l * g)
            .zip(saved_rstd.par_chunks_mut(l * g))
            .zip(end_mean.par_chunks_mut(g))
            .zip(end_var.par_chunks_mut(g))
            .enumerate()
            .with_min_len(min_rows(l * g))
            .for_each(|(bi, (((mean_row, rstd_row), mu), var))| {
                for t in 0..l {
                    let (c1, c2) = merge_weights::<F>(n0[bi] + t as f64);
                    let m = &mut mean_row[t * g..(t + 1) * g];
                    let r = &mut rstd_row[t * g..(t + 1) * g];
                    for gi in 0..g {
                        let (mu_t, var_t) = merge(mu[gi], var[gi], m[gi], r[gi], c1, c2);
                        mu[gi] = mu_t;
                        var[gi] = var_t;
                        m[gi] = mu_t;
                        r[gi] = F::one() / (var_t + eps).sqrt();
                    }
                }
            });

        // Phase 3: normalize each row with its cumulative statistics.
        let w_hat = plus_one(w);
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(saved_mean.par_chunks(g).zip(saved_rstd.par_chunks(g)))
            .with_min_len(min_rows(d))
            .for_each(|((yr, xr), (mu, rs))| {
                for gi in 0..g {
                    let c = gi * dg..(gi + 1) * dg;
                    normalize_group(
                        &mut yr[c.clone()],
                        &xr[c.clone()],
                        &w_hat[c.clone()],
                        &bias[c],
                        mu[gi],
                        rs[gi],
                    );
                }
            });
    }

    if let Some(out) = state_out {
        for (c, &n) in out.count.iter_mut().zip(&n0) {
            *c = real(n + l as f64);
        }
        out.mean.copy_from_slice(&end_mean);
        out.var.copy_from_slice(&end_var);
    }
}

#[allow(clippy::too_many_arguments)]
fn check_forward_shapes<F>(
    y: &[F],
    saved_mean: &[F],
    saved_rstd: &[F],
    x: &[F],
    w: &[F],
    bias: &[F],
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) {
    assert_eq!(x.len(), b * l * d, "timestep_norm: x must be [b, l, d]");
    assert_eq!(y.len(), b * l * d, "timestep_norm: y must be [b, l, d]");
    assert_eq!(w.len(), d, "timestep_norm: weight must be [d]");
    assert_eq!(bias.len(), d, "timestep_norm: bias must be [d]");
    assert_eq!(
        saved_mean.len(),
        b * l * g,
        "timestep_norm: saved_mean must be [b, l, g]"
    );
    assert_eq!(
        saved_rstd.len(),
        b * l * g,
        "timestep_norm: saved_rstd must be [b, l, g]"
    );
}

#[allow(clippy::too_many_arguments)]
fn check_backward_shapes<F>(
    dx: &[F],
    dw: &[F],
    db: &[F],
    dstate_in: Option<&(&mut [F], &mut [F])>,
    dy: &[F],
    dstate_out: Option<&(&[F], &[F])>,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) {
    assert_eq!(dx.len(), b * l * d, "timestep_norm: dx must be [b, l, d]");
    assert_eq!(dy.len(), b * l * d, "timestep_norm: dy must be [b, l, d]");
    assert_eq!(dw.len(), d, "timestep_norm: dw must be [d]");
    assert_eq!(db.len(), d, "timestep_norm: db must be [d]");
    if let Some((dm, dv)) = dstate_in {
        assert_eq!(dm.len(), b * g, "timestep_norm: dmean_in must be [b, g]");
        assert_eq!(dv.len(), b * g, "timestep_norm: dvar_in must be [b, g]");
    }
    if let Some((dm, dv)) = dstate_out {
        assert_eq!(dm.len(), b * g, "timestep_norm: dmean_out must be [b, g]");
        assert_eq!(dv.len(), b * g, "timestep_norm: dvar_out must be [b, g]");
    }
}

/// Rows per piece of the weight-gradient reduction: a fixed function of the shape (never of
/// the thread count), so the partial sums, and the order they are added in, are always the
/// same. At most [`MAX_PARTIALS`] pieces keep the partial buffers small.
fn rows_per_partial(rows: usize, d: usize) -> usize {
    const MAX_PARTIALS: usize = 64;
    min_rows(d).max(rows.div_ceil(MAX_PARTIALS)).max(1)
}

/// Backward of [`forward`] (§5.5) from its saved statistics.
///
/// Overwrites `dx` `[b, l, d]`; adds into `dw`, `db` `[d]`. `dstate_out` is the incoming
/// gradient with respect to the returned mean and var `[b, g]` (zero when `None`);
/// `dstate_in`, when given, is overwritten with the gradient with respect to the carried-in
/// mean and var (zero for a fresh sequence). `state_in` must be the state the forward
/// started from.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dx: &mut [F],
    dw: &mut [F],
    db: &mut [F],
    dstate_in: Option<(&mut [F], &mut [F])>,
    dy: &[F],
    dstate_out: Option<(&[F], &[F])>,
    x: &[F],
    w: &[F],
    saved_mean: &[F],
    saved_rstd: &[F],
    state_in: Option<TsnState<F>>,
    b: usize,
    l: usize,
    d: usize,
    g: usize,
) {
    let dg = group_width(d, g);
    check_backward_shapes(
        dx,
        dw,
        db,
        dstate_in.as_ref(),
        dy,
        dstate_out.as_ref(),
        b,
        l,
        d,
        g,
    );
    assert_eq!(x.len(), b * l * d, "timestep_norm: x must be [b, l, d]");
    assert_eq!(w.len(), d, "timestep_norm: weight must be [d]");
    assert_eq!(
        saved_mean.len(),
        b * l * g,
        "timestep_norm: saved_mean must be [b, l, g]"
    );
    assert_eq!(
        saved_rstd.len(),
        b * l * g,
        "timestep_norm: saved_rstd must be [b, l, g]"
    );
    if let Some(s) = &state_in {
        check_state_lens(s.count, s.mean, s.var, b, g);
    }
    let n0 = start_counts(state_in.as_ref(), b);
    // Carried adjoints of (μ, σ²), walked backwards from the incoming ones.
    let (mut acc_mu, mut acc_var) = match &dstate_out {
        Some((dm, dv)) => (dm.to_vec(), dv.to_vec()),
        None => (vec![F::zero(); b * g], vec![F::zero(); b * g]),
    };

    if l > 0 {
        let rows = b * l;
        let inv_dg = F::one() / real(dg as f64);
        let w_hat = plus_one(w);
        // Per row: [ux (g) | Σ dy·ŵ → dux (g) | Σ dy·ŵ·(x−μ) → dvx (g)].
        let stride = 3 * g;
        let mut scratch = vec![F::zero(); rows * stride];

        // Phase 1: per-row group sums, fused with fixed-piece partial sums of dw and db.
        let piece = rows_per_partial(rows, d);
        let partials: Vec<Vec<F>> = scratch
            .par_chunks_mut(piece * stride)
            .enumerate()
            .map(|(pi, sc)| {
                let mut acc = vec![F::zero(); 2 * d];
                let (acc_w, acc_b) = acc.split_at_mut(d);
                for (ri, s) in sc.chunks_mut(stride).enumerate() {
                    let row = pi * piece + ri;
                    let xr = &x[row * d..(row + 1) * d];
                    let gr = &dy[row * d..(row + 1) * d];
                    for gi in 0..g {
                        let c0 = gi * dg;
                        let (xs, gs, ws) =
                            (&xr[c0..c0 + dg], &gr[c0..c0 + dg], &w_hat[c0..c0 + dg]);
                        let (mu, rs) = (saved_mean[row * g + gi], saved_rstd[row * g + gi]);
                        s[gi] = sum_by(dg, |j| xs[j]) * inv_dg;
                        s[g + gi] = sum_by(dg, |j| gs[j] * ws[j]);
                        s[2 * g + gi] = sum_by(dg, |j| gs[j] * ws[j] * (xs[j] - mu));
                        let (aw, ab) = (&mut acc_w[c0..c0 + dg], &mut acc_b[c0..c0 + dg]);
                        for j in 0..dg {
                            aw[j] = aw[j] + gs[j] * (xs[j] - mu) * rs;
                            ab[j] = ab[j] + gs[j];
                        }
                    }
                }
                acc
            })
            .collect();
        for p in &partials {
            for j in 0..d {
                dw[j] = dw[j] + p[j];
                db[j] = db[j] + p[d + j];
            }
        }

        // Phase 2: the reverse-time adjoint scan, one batch row per task.
        let half: F = real(0.5);
        let two: F = real(2.0);
        let mean0 = state_in.as_ref().map(|s| s.mean);
        scratch
            .par_chunks_mut(l * stride)
            .zip(acc_mu.par_chunks_mut(g))
            .zip(acc_var.par_chunks_mut(g))
            .enumerate()
            .with_min_len(min_rows(l * g))
            .for_each(|(bi, ((sc, amu), avar))| {
                for t in (0..l).rev() {
                    let (c1, c2) = merge_weights::<F>(n0[bi] + t as f64);
                    let row = bi * l + t;
                    let s = &mut sc[t * stride..(t + 1) * stride];
                    for gi in 0..g {
                        let rs = saved_rstd[row * g + gi];
                        let mu_prev = if t > 0 {
                            saved_mean[(row - 1) * g + gi]
                        } else {
                            mean0.map_or(F::zero(), |m| m[bi * g + gi])
                        };
                        let du = amu[gi] - rs * s[g + gi];
                        let dv = avar[gi] - half * rs * rs * rs * s[2 * g + gi];
                        let cross = two * c1 * c2 * dv * (s[gi] - mu_prev);
                        s[g + gi] = c2 * du + cross;
                        s[2 * g + gi] = c2 * dv;
                        amu[gi] = c1 * du - cross;
                        avar[gi] = c1 * dv;
                    }
                }
            });

        // Phase 3: dx from the direct path and the per-token moments' adjoints.
        dx.par_chunks_mut(d)
            .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
            .zip(saved_rstd.par_chunks(g).zip(scratch.par_chunks(stride)))
            .with_min_len(min_rows(d))
            .for_each(|((dxr, (gr, xr)), (rs, s))| {
                for gi in 0..g {
                    let c0 = gi * dg;
                    let (ux, a) = (s[gi], s[g + gi] * inv_dg);
                    let bc = two * s[2 * g + gi] * inv_dg;
                    let r = rs[gi];
                    for j in c0..c0 + dg {
                        dxr[j] = gr[j] * w_hat[j] * r + a + bc * (xr[j] - ux);
                    }
                }
            });
    }

    if let Some((dm, dv)) = dstate_in {
        dm.copy_from_slice(&acc_mu);
        dv.copy_from_slice(&acc_var);
    }
}

/// One token per batch row (`x`, `y` `[b, d]`), merging it into `state` in place: the
/// incremental-decoding form of [`forward`] with `l = 1`.
#[allow(clippy::too_many_arguments)]
pub fn step<F: Real>(
    y: &mut [F],
    state: TsnStateMut<F>,
    x: &[F],
    w: &[F],
    bias: &[F],
    b: usize,
    d: usize,
    g: usize,
    eps: F,
) {
    let dg = group_width(d, g);
    assert_eq!(x.len(), b * d, "timestep_norm: x must be [b, d]");
    assert_eq!(y.len(), b * d, "timestep_norm: y must be [b, d]");
    assert_eq!(w.len(), d, "timestep_norm: weight must be [d]");
    assert_eq!(bias.len(), d, "timestep_norm: bias must be [d]");
    check_state_lens(state.count, state.mean, state.var, b, g);
    let inv_dg = F::one() / real(dg as f64);
    let w_hat = plus_one(w);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(state.count.par_iter_mut())
        .zip(
            state
                .mean
                .par_chunks_mut(g)
                .zip(state.var.par_chunks_mut(g)),
        )
        .with_min_len(min_rows(d))
        .for_each(|(((yr, xr), count), (mu, var))| {
            let n = count_of(*count);
            let (c1, c2) = merge_weights::<F>(n);
            for gi in 0..g {
                let c = gi * dg..(gi + 1) * dg;
                let (ux, vx) = group_moments(&xr[c.clone()], inv_dg);
                let (mu_t, var_t) = merge(mu[gi], var[gi], ux, vx, c1, c2);
                mu[gi] = mu_t;
                var[gi] = var_t;
                let rs = F::one() / (var_t + eps).sqrt();
                normalize_group(
                    &mut yr[c.clone()],
                    &xr[c.clone()],
                    &w_hat[c.clone()],
                    &bias[c],
                    mu_t,
                    rs,
                );
            }
            *count = real(n + 1.0);
        });
}

/// Plain loop implementations of §5.2 and §5.5, the yardstick for the fast paths.
pub mod reference {
    use super::{count_of, group_width, Real, TsnState, TsnStateMut};
    use crate::backend::cpu::real;

    /// Forward: for each (batch row, group), walk time merging each token's two-pass group
    /// moments into the running statistics, and normalize the token with the result.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        y: &mut [F],
        saved_mean: &mut [F],
        saved_rstd: &mut [F],
        state_out: Option<TsnStateMut<F>>,
        x: &[F],
        w: &[F],
        bias: &[F],
        state_in: Option<TsnState<F>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
        eps: F,
    ) {
        let dg = group_width(d, g);
        super::check_forward_shapes(y, saved_mean, saved_rstd, x, w, bias, b, l, d, g);
        let dgf: F = real(dg as f64);
        let mut out_stats = Vec::new();
        for bi in 0..b {
            let n0 = state_in.as_ref().map_or(0.0, |s| count_of(s.count[bi]));
            for gi in 0..g {
                let (mut mu, mut var) = match &state_in {
                    Some(s) => (s.mean[bi * g + gi], s.var[bi * g + gi]),
                    None => (F::zero(), F::one()),
                };
                for t in 0..l {
                    let base = (bi * l + t) * d + gi * dg;
                    let mut s = F::zero();
                    for j in 0..dg {
                        s = s + x[base + j];
                    }
                    let ux = s / dgf;
                    let mut ss = F::zero();
                    for j in 0..dg {
                        ss = ss + (x[base + j] - ux) * (x[base + j] - ux);
                    }
                    let vx = ss / dgf;
                    let n = n0 + t as f64;
                    let c1: F = real(n / (n + 1.0));
                    let c2: F = real(1.0 / (n + 1.0));
                    let delta = ux - mu;
                    mu = c1 * mu + c2 * ux;
                    var = c1 * var + c2 * vx + (c1 * delta) * (c2 * delta);
                    let rs = F::one() / (var + eps).sqrt();
                    for j in 0..dg {
                        let c = gi * dg + j;
                        y[base + j] = (x[base + j] - mu) * rs * (w[c] + F::one()) + bias[c];
                    }
                    saved_mean[(bi * l + t) * g + gi] = mu;
                    saved_rstd[(bi * l + t) * g + gi] = rs;
                }
                out_stats.push((n0 + l as f64, mu, var));
            }
        }
        if let Some(out) = state_out {
            for bi in 0..b {
                for gi in 0..g {
                    let (n, mu, var) = out_stats[bi * g + gi];
                    out.count[bi] = real(n);
                    out.mean[bi * g + gi] = mu;
                    out.var[bi * g + gi] = var;
                }
            }
        }
    }

    /// Backward: for each (batch row, group), walk time in reverse carrying the adjoints of
    /// the running mean and variance (§5.5).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dx: &mut [F],
        dw: &mut [F],
        db: &mut [F],
        mut dstate_in: Option<(&mut [F], &mut [F])>,
        dy: &[F],
        dstate_out: Option<(&[F], &[F])>,
        x: &[F],
        w: &[F],
        saved_mean: &[F],
        saved_rstd: &[F],
        state_in: Option<TsnState<F>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
    ) {
        let dg = group_width(d, g);
        super::check_backward_shapes(
            dx,
            dw,
            db,
            dstate_in.as_ref(),
            dy,
            dstate_out.as_ref(),
            b,
            l,
            d,
            g,
        );
        let dgf: F = real(dg as f64);
        let half: F = real(0.5);
        let two: F = real(2.0);
        for bi in 0..b {
            let n0 = state_in.as_ref().map_or(0.0, |s| count_of(s.count[bi]));
            for gi in 0..g {
                let (mut acc_mu, mut acc_var) = match &dstate_out {
                    Some((dm, dv)) => (dm[bi * g + gi], dv[bi * g + gi]),
                    None => (F::zero(), F::zero()),
                };
                for t in (0..l).rev() {
                    let base = (bi * l + t) * d + gi * dg;
                    let si = (bi * l + t) * g + gi;
                    let (mu, rs) = (saved_mean[si], saved_rstd[si]);
                    let mu_prev = if t > 0 {
                        saved_mean[si - g]
                    } else {
                        state_in.as_ref().map_or(F::zero(), |s| s.mean[bi * g + gi])
                    };
                    let n = n0 + (t + 1) as f64;
                    let c1: F = real((n - 1.0) / n);
                    let c2: F = real(1.0 / n);
                    let mut sx = F::zero();
                    let mut sdb = F::zero();
                    let mut sds = F::zero();
                    for j in 0..dg {
                        let c = gi * dg + j;
                        let gw = dy[base + j] * (w[c] + F::one());
                        sx = sx + x[base + j];
                        sdb = sdb + gw;
                        sds = sds + gw * (x[base + j] - mu);
                    }
                    let ux = sx / dgf;
                    let du = acc_mu - rs * sdb;
                    let dv = acc_var - half * rs * rs * rs * sds;
                    let dux = c2 * du + two * c1 * c2 * dv * (ux - mu_prev);
                    let dvx = c2 * dv;
                    for j in 0..dg {
                        let c = gi * dg + j;
                        dx[base + j] = dy[base + j] * (w[c] + F::one()) * rs
                            + dux / dgf
                            + two * dvx * (x[base + j] - ux) / dgf;
                        dw[c] = dw[c] + dy[base + j] * (x[base + j] - mu) * rs;
                        db[c] = db[c] + dy[base + j];
                    }
                    acc_mu = c1 * du - two * c1 * c2 * dv * (ux - mu_prev);
                    acc_var = c1 * dv;
                }
                if let Some((dm, dv)) = dstate_in.as_mut() {
                    dm[bi * g + gi] = acc_mu;
                    dv[bi * g + gi] = acc_var;
                }
            }
        }
    }
}
