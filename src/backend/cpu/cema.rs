//! MEGALODON's complex exponential moving average (CEMA), spec §4.
//!
//! For every batch row `b`, channel `d` and expansion index `n`, with a complex state `h`
//! carried in from `h0` (zero when absent):
//!
//! ```text
//! h_t[d,n] = p[d,n]·x_t[d] + q[d,n]·h_{t−1}[d,n]
//! y_t[d]   = Re(Σ_n γ̃[d,n]·h_t[d,n]) + omega[d]·x_t[d]
//! ```
//!
//! with `p = σ(alpha)`, `q = (1 − σ(alpha)·σ(delta))·e^{iφ}`,
//! `φ[d,n] = σ(theta[d])·2π·(n+1)/N` (the angle index is 1-based), `γ̃ = (gamma_re +
//! i·gamma_im)/√N`.
//!
//! Layouts (row-major): `x`, `y` are `[b, l, d]`; the state `h` is `[b, d, n, 2]` (re, im);
//! parameters are in the official layout, `alpha`, `delta` `[d, n]`, `theta` `[d]`, `gamma`
//! `[d, n, 2]`, `omega` `[d]`.
//!
//! The fast path ([`forward`], [`backward`]) is a chunked scan over time, parallel over
//! (batch row, block of 32 channels, chunk of time); [`reference`](mod@reference) is the plain per-token
//! recurrence and its reverse-time adjoint over stored states. Time is split only when
//! batch rows × channel blocks give fewer than 64 tasks (a long single sequence), into
//! chunks of at least 256 tokens ([`auto_chunk_len`]); the split depends on the shape alone,
//! so results do not depend on the thread count. The backward stores no states: it needs
//! only the state before each chunk, recomputed by the forward carry passes (see
//! `adjoint.rs` for the algebra).
//!
//! Precision: coefficients are computed in f64 and rounded once to `F`. Inside a chunk the
//! powers `q^m` come from the recurrence itself (repeated multiplication in `F`); rounding
//! `q` perturbs the filter, so the f32 relative error of `h` and `y` can grow towards
//! ε_f32/(1−|q|) for long memories (an upper estimate; measured: 8e-7 normwise at |q| ≤ 0.99, 5e-6 at |q| up to 0.9999 over
//! 4000 tokens). The chunk-carry powers `q^T` are formed in f64 by binary powering (relative
//! error ~log₂T·1e-16) and carries are combined in f64. Parameter-gradient sums run in `F`
//! for at most 64 tokens before moving into f64, so their error does not grow with `l`.

mod adjoint;
mod coefficients;
mod disjoint;
mod isa;
mod plan;
pub mod reference;
mod scan;

pub use coefficients::Coefficients;
#[doc(hidden)]
pub use isa::force_portable_kernels;
pub use plan::{auto_chunk_len, BLOCK_WIDTH};

use super::Real;

/// The five CEMA parameters of one layer, official layout (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct CemaParams<'a, F> {
    /// `[d, n]`: input rate `a = σ(alpha)`.
    pub alpha: &'a [F],
    /// `[d, n]`: damping `δ = σ(delta)`; `|q| = 1 − a·δ`.
    pub delta: &'a [F],
    /// `[d]`: base angle `σ(theta)`; the n-th angle is `σ(theta)·2π·n/N`, n = 1..N.
    pub theta: &'a [F],
    /// `[d, n, 2]`: complex output projection (re, im), applied as `/√N`.
    pub gamma: &'a [F],
    /// `[d]`: real skip weight on the input.
    pub omega: &'a [F],
}

/// Gradient buffers for [`CemaParams`], same shapes. Backward ops *accumulate* (`+=`).
#[derive(Debug)]
pub struct CemaGrads<'a, F> {
    pub alpha: &'a mut [F],
    pub delta: &'a mut [F],
    pub theta: &'a mut [F],
    pub gamma: &'a mut [F],
    pub omega: &'a mut [F],
}

pub(crate) fn check_params<F>(p: &CemaParams<F>, d: usize, n: usize) {
    assert_eq!(p.alpha.len(), d * n, "cema: alpha must be [d, n]");
    assert_eq!(p.delta.len(), d * n, "cema: delta must be [d, n]");
    assert_eq!(p.theta.len(), d, "cema: theta must be [d]");
    assert_eq!(p.gamma.len(), d * n * 2, "cema: gamma must be [d, n, 2]");
    assert_eq!(p.omega.len(), d, "cema: omega must be [d]");
}

pub(crate) fn check_grads<F>(g: &CemaGrads<F>, d: usize, n: usize) {
    assert_eq!(g.alpha.len(), d * n, "cema: alpha grad must be [d, n]");
    assert_eq!(g.delta.len(), d * n, "cema: delta grad must be [d, n]");
    assert_eq!(g.theta.len(), d, "cema: theta grad must be [d]");
    assert_eq!(
        g.gamma.len(),
        d * n * 2,
        "cema: gamma grad must be [d, n, 2]"
    );
    assert_eq!(g.omega.len(), d, "cema: omega grad must be [d]");
}

pub(crate) fn check_state<F>(what: &str, h: Option<&[F]>, b: usize, d: usize, n: usize) {
    if let Some(h) = h {
        assert_eq!(h.len(), b * d * n * 2, "cema: {what} must be [b, d, n, 2]");
    }
}

/// Forward over a call of `l` tokens: `y = CEMA(x)` (overwritten), starting from `h0`
/// (zeros when `None`); `h_out`, when given, receives the state after the last token
/// (`h0`, or zeros, when `l = 0`).
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    y: &mut [F],
    h_out: Option<&mut [F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
) {
    forward_chunked(y, h_out, x, p, h0, b, l, d, n, auto_chunk_len(b, l, d));
}

/// [`forward`] with an explicit time-chunk length (`chunk_len ≥ 1`; `≥ l` means one chunk).
/// The result differs from [`forward`] only by rounding; exposed for tests and tuning.
#[allow(clippy::too_many_arguments)]
pub fn forward_chunked<F: Real>(
    y: &mut [F],
    h_out: Option<&mut [F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
    chunk_len: usize,
) {
    check_params(p, d, n);
    assert_eq!(x.len(), b * l * d, "cema: x must be [b, l, d]");
    assert_eq!(y.len(), b * l * d, "cema: y must be [b, l, d]");
    check_state("h0", h0, b, d, n);
    check_state("h_out", h_out.as_deref(), b, d, n);
    assert!(chunk_len >= 1, "cema: chunk length must be positive");
    let coef = Coefficients::new(p, d, n);
    scan::forward(y, h_out, x, &coef, h0, b, l, chunk_len);
}

/// Backward of [`forward`]. `dx` is overwritten (`=`); the parameter gradients in `g` are
/// accumulated (`+=`); `dh0`, when given, is overwritten with the gradient with respect to
/// the carried-in state (`∂/∂re`, `∂/∂im` pairs, zero-state case included). `dh_out` is the
/// incoming gradient with respect to `h_out` (streaming training), zero when `None`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dx: &mut [F],
    g: &mut CemaGrads<F>,
    dh0: Option<&mut [F]>,
    dy: &[F],
    dh_out: Option<&[F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
) {
    backward_chunked(
        dx,
        g,
        dh0,
        dy,
        dh_out,
        x,
        p,
        h0,
        b,
        l,
        d,
        n,
        auto_chunk_len(b, l, d),
    );
}

/// [`backward`] with an explicit time-chunk length (see [`forward_chunked`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_chunked<F: Real>(
    dx: &mut [F],
    g: &mut CemaGrads<F>,
    dh0: Option<&mut [F]>,
    dy: &[F],
    dh_out: Option<&[F]>,
    x: &[F],
    p: &CemaParams<F>,
    h0: Option<&[F]>,
    b: usize,
    l: usize,
    d: usize,
    n: usize,
    chunk_len: usize,
) {
    check_params(p, d, n);
    check_grads(g, d, n);
    assert_eq!(x.len(), b * l * d, "cema: x must be [b, l, d]");
    assert_eq!(dy.len(), b * l * d, "cema: dy must be [b, l, d]");
    assert_eq!(dx.len(), b * l * d, "cema: dx must be [b, l, d]");
    check_state("h0", h0, b, d, n);
    check_state("dh0", dh0.as_deref(), b, d, n);
    check_state("dh_out", dh_out, b, d, n);
    assert!(chunk_len >= 1, "cema: chunk length must be positive");
    let coef = Coefficients::new(p, d, n);
    let sums = adjoint::backward(dx, dh0, dy, dh_out, x, &coef, h0, b, l, chunk_len);
    coef.accumulate_grads(&sums, g);
}

/// One token per batch row (decoding): `x`, `y` are `[b, d]`, `h` `[b, d, n, 2]` is advanced
/// in place. Computes the coefficients on every call; a decoder that steps many times with
/// the same parameters should build [`Coefficients`] once and call [`step_with`].
#[allow(clippy::too_many_arguments)]
pub fn step<F: Real>(
    y: &mut [F],
    h: &mut [F],
    x: &[F],
    p: &CemaParams<F>,
    b: usize,
    d: usize,
    n: usize,
) {
    check_params(p, d, n);
    step_with(y, h, x, &Coefficients::new(p, d, n), b);
}

/// [`step`] with precomputed coefficients (their `d` and `n` give the shapes).
pub fn step_with<F: Real>(y: &mut [F], h: &mut [F], x: &[F], coef: &Coefficients, b: usize) {
    let (d, n) = (coef.d, coef.n);
    assert_eq!(x.len(), b * d, "cema step: x must be [b, d]");
    assert_eq!(y.len(), b * d, "cema step: y must be [b, d]");
    assert_eq!(h.len(), b * d * n * 2, "cema step: h must be [b, d, n, 2]");
    scan::step(y, h, x, coef, b);
}
