//! MEGALODON's normalized, chunk-local attention core (spec `megalodon.md` §3(b), §6, §16).
//!
//! From the projected shared representation `Z` and the (already SiLU'd) value `V`:
//!
//! ```text
//! Ẑ = Z / √(mean_dz(Z²) + eps)                       per (row, head), no affine
//! Q = Ẑ ⊙ (γ[0]+1)/√dz + β[0],  K = Ẑ ⊙ (γ[1]+1)/√dz + β[1]
//! Q, K ← RoPE(position inside the chunk), adjacent pairs (2i, 2i+1), inv_i = base^(−2i/dz)
//! O = softmax(causal(Q Kᵀ)) V                          per chunk of C tokens, no 1/√d scale
//! ```
//!
//! Layouts (row-major): `z [b, l, H·dz]`, `v` and `out [b, l, H·dv]`, `γ` and `β` `[2, H·dz]`.
//! A sequence is split into chunks of `C` tokens starting at its first token; the last chunk
//! may be partial. Chunks never see each other, and RoPE positions restart at 0 in each one.
//!
//! The training path ([`forward`], [`backward`]) runs one task per (batch row, head, chunk)
//! on the rayon pool, each on contiguous per-head scratch with causal row blocks handed to
//! `gemm`; the streaming path ([`forward_cached`]) keeps the post-RoPE keys and values of the
//! current partial chunk in a [`ChunkKvCache`]. Every output element is computed by the same
//! operations whatever the thread count, so results are deterministic.

use std::any::TypeId;

use gemm::Parallelism;
use rayon::prelude::*;

use super::lanes::sum_by;
use super::{real, Real};

/// Query rows per causal block: each block multiplies only against the keys it can see, so
/// the masked upper triangle costs at most one block's width of wasted work per row.
const ROW_BLOCK: usize = 32;

/// Sizes of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MegaAttnShape {
    /// Batch rows.
    pub b: usize,
    /// Tokens per row in this call.
    pub l: usize,
    /// Attention heads `H`.
    pub heads: usize,
    /// Query/key width per head (even: RoPE rotates pairs).
    pub dz: usize,
    /// Value width per head.
    pub dv: usize,
    /// Chunk size `C`.
    pub chunk: usize,
    /// RoPE base (1e4 in the official presets).
    pub rope_base: f64,
    /// Floor of the per-head mean square (1e-5 in the official code).
    pub eps: f64,
}

impl MegaAttnShape {
    /// Width of `z`, `γ` and `β` rows: `H·dz`.
    pub fn zdim(&self) -> usize {
        self.heads * self.dz
    }

    /// Width of `v` and `out` rows: `H·dv`.
    pub fn vdim(&self) -> usize {
        self.heads * self.dv
    }

    /// Rows of one attention block: the chunk, or the whole call when it is shorter.
    pub fn span(&self) -> usize {
        self.chunk.min(self.l).max(1)
    }

    /// Attention blocks per batch row (the last one may be partial).
    pub fn n_chunks(&self) -> usize {
        self.l.div_ceil(self.span())
    }

    fn check(&self) {
        assert!(
            self.heads > 0,
            "megalodon attention: heads must be positive"
        );
        assert!(
            self.dz > 0 && self.dz % 2 == 0,
            "megalodon attention: dz = {} must be positive and even (RoPE pairs)",
            self.dz
        );
        assert!(
            self.chunk > 0,
            "megalodon attention: chunk must be positive"
        );
    }
}

/// What [`forward`] keeps for [`backward`]. Layouts are per head, so every (row, head,
/// chunk) block is one contiguous slice.
#[derive(Clone, Debug, PartialEq)]
pub struct MegaAttnSaved<F> {
    /// `1/√(mean(Z²) + eps)` per (row, head, token): `[b, H, l]`.
    pub rstd: Vec<F>,
    /// Post-RoPE queries `[b, H, l, dz]`.
    pub q: Vec<F>,
    /// Post-RoPE keys `[b, H, l, dz]`.
    pub k: Vec<F>,
    /// Attention probabilities `[b, H, n_chunks, span, span]` (see [`MegaAttnShape::span`]):
    /// row `i` of a block holds the weights of keys `0..=i`, zeros after; rows past the end
    /// of a partial last chunk are zero.
    pub probs: Vec<F>,
}

/// Zeroed [`MegaAttnSaved`] buffers for shape `s`.
pub fn saved_new<F: Real>(s: &MegaAttnShape) -> MegaAttnSaved<F> {
    let span = s.span();
    MegaAttnSaved {
        rstd: vec![F::zero(); s.b * s.heads * s.l],
        q: vec![F::zero(); s.b * s.l * s.zdim()],
        k: vec![F::zero(); s.b * s.l * s.zdim()],
        probs: vec![F::zero(); s.b * s.heads * s.n_chunks() * span * span],
    }
}

fn check_saved<F>(saved: &MegaAttnSaved<F>, s: &MegaAttnShape) {
    let span = s.span();
    assert_eq!(
        saved.rstd.len(),
        s.b * s.heads * s.l,
        "saved.rstd must be [b, H, l]"
    );
    assert_eq!(
        saved.q.len(),
        s.b * s.l * s.zdim(),
        "saved.q must be [b, H, l, dz]"
    );
    assert_eq!(
        saved.k.len(),
        s.b * s.l * s.zdim(),
        "saved.k must be [b, H, l, dz]"
    );
    assert_eq!(
        saved.probs.len(),
        s.b * s.heads * s.n_chunks() * span * span,
        "saved.probs must be [b, H, n_chunks, span, span]"
    );
}

fn check_io<F>(z: &[F], v: &[F], gamma: &[F], beta: &[F], s: &MegaAttnShape) {
    s.check();
    assert_eq!(z.len(), s.b * s.l * s.zdim(), "z must be [b, l, H·dz]");
    assert_eq!(v.len(), s.b * s.l * s.vdim(), "v must be [b, l, H·dv]");
    assert_eq!(gamma.len(), 2 * s.zdim(), "gamma must be [2, H·dz]");
    assert_eq!(beta.len(), 2 * s.zdim(), "beta must be [2, H·dz]");
}

/// The post-RoPE keys and values of each batch row's current, partially filled chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkKvCache<F> {
    /// Keys `[b, H, chunk, dz]`; positions `0..count[r]` of row `r` are live.
    pub k: Vec<F>,
    /// Values `[b, H, chunk, dv]`.
    pub v: Vec<F>,
    /// Tokens of the current chunk already seen, per batch row (`< chunk` between calls).
    pub count: Vec<usize>,
}

impl<F: Real> ChunkKvCache<F> {
    /// An empty cache for `b` rows.
    pub fn new(b: usize, heads: usize, dz: usize, dv: usize, chunk: usize) -> Self {
        Self {
            k: vec![F::zero(); b * heads * chunk * dz],
            v: vec![F::zero(); b * heads * chunk * dv],
            count: vec![0; b],
        }
    }

    /// Forgets every row's partial chunk (a new sequence starts at chunk position 0).
    pub fn reset(&mut self) {
        self.count.fill(0);
    }

    fn check(&self, s: &MegaAttnShape) {
        assert_eq!(self.count.len(), s.b, "cache.count must be [b]");
        assert_eq!(
            self.k.len(),
            s.b * s.heads * s.chunk * s.dz,
            "cache.k must be [b, H, C, dz]"
        );
        assert_eq!(
            self.v.len(),
            s.b * s.heads * s.chunk * s.dv,
            "cache.v must be [b, H, C, dv]"
        );
    }
}

/// A streaming call whose length breaks the chunking rules of spec §16.2.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkCallError {
    /// The row holds a partial chunk and the call would run past its end.
    #[error(
        "row {row}: {count} cached + {len} new tokens exceed the chunk of {chunk}; a call must \
         not straddle a chunk boundary"
    )]
    Straddles {
        row: usize,
        count: usize,
        len: usize,
        chunk: usize,
    },
    /// The row is at a chunk boundary and the call is neither shorter than a chunk nor a
    /// whole number of chunks.
    #[error(
        "row {row}: a call of {len} tokens at a chunk boundary must be shorter than the chunk \
         ({chunk}) or a multiple of it"
    )]
    Ragged {
        row: usize,
        len: usize,
        chunk: usize,
    },
}

/// Checks every row of a streaming call of `len` tokens against the rules of spec §16.2.
pub fn check_call(count: &[usize], len: usize, chunk: usize) -> Result<(), ChunkCallError> {
    for (row, &c) in count.iter().enumerate() {
        if c > 0 && c + len > chunk {
            return Err(ChunkCallError::Straddles {
                row,
                count: c,
                len,
                chunk,
            });
        }
        if c == 0 && len >= chunk && len % chunk != 0 {
            return Err(ChunkCallError::Ragged { row, len, chunk });
        }
    }
    Ok(())
}

/// `inv_i = base^(−2i/dz)` for `i < dz/2`, computed in `F` as the official code does in fp32.
pub fn rope_inv_freqs<F: Real>(dz: usize, base: f64) -> Vec<F> {
    let base: F = real(base);
    let dzf: F = real(dz as f64);
    (0..dz / 2)
        .map(|i| F::one() / base.powf(real::<F>((2 * i) as f64) / dzf))
        .collect()
}

/// `(cos, sin)` of `pos·inv_i` for positions `0..n`, each `[n, dz/2]`.
fn rope_table<F: Real>(n: usize, dz: usize, base: f64) -> (Vec<F>, Vec<F>) {
    let inv = rope_inv_freqs::<F>(dz, base);
    let mut cos = Vec::with_capacity(n * inv.len());
    let mut sin = Vec::with_capacity(n * inv.len());
    for pos in 0..n {
        let p: F = real(pos as f64);
        for &f in &inv {
            let a = p * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Per-channel Q and K affine coefficients: `(γ[0]+1)/√dz, β[0], (γ[1]+1)/√dz, β[1]`.
struct QkAffine<F> {
    gq: Vec<F>,
    bq: Vec<F>,
    gk: Vec<F>,
    bk: Vec<F>,
}

impl<F: Real> QkAffine<F> {
    fn new(gamma: &[F], beta: &[F], zdim: usize, dz: usize) -> Self {
        let inv_sqrt: F = F::one() / real::<F>(dz as f64).sqrt();
        let scale = |g: &[F]| {
            g.iter()
                .map(|&x| (x + F::one()) * inv_sqrt)
                .collect::<Vec<F>>()
        };
        Self {
            gq: scale(&gamma[..zdim]),
            bq: beta[..zdim].to_vec(),
            gk: scale(&gamma[zdim..]),
            bk: beta[zdim..].to_vec(),
        }
    }
}

/// Normalizes one head's `z` row and writes its rotated query and key; returns the rstd.
/// `g*`, `b*` are the head's slices of the affine, `cos`/`sin` the table row of the position.
#[allow(clippy::too_many_arguments)]
#[inline]
fn project_row<F: Real>(
    q: &mut [F],
    k: &mut [F],
    zrow: &[F],
    aff: (&[F], &[F], &[F], &[F]),
    cos: &[F],
    sin: &[F],
    eps: F,
) -> F {
    let dz = zrow.len();
    let (gq, bq, gk, bk) = aff;
    let ms = sum_by(dz, |j| zrow[j] * zrow[j]) / real::<F>(dz as f64);
    let rs = F::one() / (ms + eps).sqrt();
    for p in 0..dz / 2 {
        let (j0, j1) = (2 * p, 2 * p + 1);
        let (z0, z1) = (zrow[j0] * rs, zrow[j1] * rs);
        let (c, sn) = (cos[p], sin[p]);
        let (q0, q1) = (z0 * gq[j0] + bq[j0], z1 * gq[j1] + bq[j1]);
        q[j0] = q0 * c - q1 * sn;
        q[j1] = q0 * sn + q1 * c;
        let (k0, k1) = (z0 * gk[j0] + bk[j0], z1 * gk[j1] + bk[j1]);
        k[j0] = k0 * c - k1 * sn;
        k[j1] = k0 * sn + k1 * c;
    }
    rs
}

/// `dst[i·dst_rs + j] (= or +=) Σ_p a[i·a_rs + p·a_cs] · b[p·b_rs + j·b_cs]` for `i < m`,
/// `j < n`, on the calling thread (the parallelism is over attention blocks).
#[allow(clippy::too_many_arguments)]
fn mm<F: Real>(
    dst: &mut [F],
    dst_rs: usize,
    a: (&[F], usize, usize),
    b: (&[F], usize, usize),
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let (a, a_rs, a_cs) = a;
    let (b, b_rs, b_cs) = b;
    if m == 0 || n == 0 {
        return;
    }
    assert!(m == 1 || n <= dst_rs, "mm: destination rows overlap");
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "mm: destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(F::zero());
            }
        }
        return;
    }
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "mm: lhs out of bounds"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "mm: rhs out of bounds"
    );
    let gemm_supports =
        TypeId::of::<F>() == TypeId::of::<f32>() || TypeId::of::<F>() == TypeId::of::<f64>();
    if !gemm_supports {
        for i in 0..m {
            for j in 0..n {
                let mut s = F::zero();
                for p in 0..k {
                    s = s + a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
                }
                let d = &mut dst[i * dst_rs + j];
                *d = if accumulate { *d + s } else { s };
            }
        }
        return;
    }
    // SAFETY: F is f32 or f64 (checked above), which gemm implements. Every index gemm forms
    // from (m, n, k) and these strides was bounds-checked against its slice above, the
    // destination rows do not overlap, and `dst` is a unique borrow so aliases no input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            F::one(),
            F::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Causal softmax attention of `nq` queries over `offset + nq` keys, query `i` seeing keys
/// `0..=offset + i` (the bottom-right aligned mask of a cached prefix).
///
/// `q [nq, dz]` and `k [offset+nq, dz]` are contiguous; `v` holds key rows of `dv` values
/// `v_rs` apart. Writes `out [nq, dv]` and the probabilities into rows `probs_rs` apart
/// (zero past each row's last visible key, up to `probs_rs`).
#[allow(clippy::too_many_arguments)]
fn attend<F: Real>(
    out: &mut [F],
    probs: &mut [F],
    probs_rs: usize,
    q: &[F],
    k: &[F],
    v: (&[F], usize),
    nq: usize,
    offset: usize,
    dz: usize,
    dv: usize,
) {
    let (v, v_rs) = v;
    let mut r0 = 0;
    while r0 < nq {
        let r1 = (r0 + ROW_BLOCK).min(nq);
        let kn = offset + r1;
        mm(
            &mut probs[r0 * probs_rs..],
            probs_rs,
            (&q[r0 * dz..], dz, 1),
            (k, 1, dz),
            r1 - r0,
            kn,
            dz,
            false,
        );
        for i in r0..r1 {
            let row = &mut probs[i * probs_rs..(i + 1) * probs_rs];
            let (seen, hidden) = row.split_at_mut(offset + i + 1);
            let max = seen.iter().fold(F::neg_infinity(), |m, &x| m.max(x));
            let mut sum = F::zero();
            for x in seen.iter_mut() {
                *x = (*x - max).exp();
                sum = sum + *x;
            }
            let inv = F::one() / sum;
            for x in seen.iter_mut() {
                *x = *x * inv;
            }
            hidden.fill(F::zero());
        }
        mm(
            &mut out[r0 * dv..],
            dv,
            (&probs[r0 * probs_rs..], probs_rs, 1),
            (v, v_rs, 1),
            r1 - r0,
            dv,
            kn,
            false,
        );
        r0 = r1;
    }
}

/// Gradients of [`attend`] with `offset = 0` (one whole training block of `n` rows):
/// overwrites `dq, dk [n, dz]`, `dv_out [n, dv]`; `ds` is scratch of `n` rows `probs_rs` apart.
#[allow(clippy::too_many_arguments)]
fn attend_backward<F: Real>(
    dq: &mut [F],
    dk: &mut [F],
    dv_out: &mut [F],
    ds: &mut [F],
    dout: (&[F], usize),
    v: (&[F], usize),
    q: &[F],
    k: &[F],
    probs: &[F],
    probs_rs: usize,
    n: usize,
    dz: usize,
    dv: usize,
) {
    let (dout, do_rs) = dout;
    let (v, v_rs) = v;
    dk.fill(F::zero());
    dv_out.fill(F::zero());
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + ROW_BLOCK).min(n);
        let rows = r1 - r0;
        // dV[0..r1] += P[r0..r1, 0..r1]ᵀ · dO[r0..r1]
        mm(
            dv_out,
            dv,
            (&probs[r0 * probs_rs..], 1, probs_rs),
            (&dout[r0 * do_rs..], do_rs, 1),
            r1,
            dv,
            rows,
            true,
        );
        // dP[r0..r1, 0..r1] = dO[r0..r1] · V[0..r1]ᵀ, then the softmax backward in place:
        // dS = P ⊙ (dP − Σ_j P dP).
        mm(
            &mut ds[r0 * probs_rs..],
            probs_rs,
            (&dout[r0 * do_rs..], do_rs, 1),
            (v, 1, v_rs),
            rows,
            r1,
            dv,
            false,
        );
        for i in r0..r1 {
            let p = &probs[i * probs_rs..i * probs_rs + i + 1];
            let d = &mut ds[i * probs_rs..i * probs_rs + r1];
            let dot = sum_by(i + 1, |j| p[j] * d[j]);
            for j in 0..=i {
                d[j] = p[j] * (d[j] - dot);
            }
            d[i + 1..].fill(F::zero());
        }
        // dQ[r0..r1] = dS · K[0..r1];  dK[0..r1] += dSᵀ · Q[r0..r1]
        mm(
            &mut dq[r0 * dz..],
            dz,
            (&ds[r0 * probs_rs..], probs_rs, 1),
            (k, dz, 1),
            rows,
            dz,
            r1,
            false,
        );
        mm(
            dk,
            dz,
            (&ds[r0 * probs_rs..], 1, probs_rs),
            (&q[r0 * dz..], dz, 1),
            r1,
            dz,
            rows,
            true,
        );
        r0 = r1;
    }
}

/// Forward over whole sequences starting at chunk position 0: writes `out [b, l, H·dv]` and
/// `saved`. Any `l` works; the last chunk of a row may be partial.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    out: &mut [F],
    saved: &mut MegaAttnSaved<F>,
    z: &[F],
    v: &[F],
    gamma: &[F],
    beta: &[F],
    s: &MegaAttnShape,
) {
    check_io(z, v, gamma, beta, s);
    check_saved(saved, s);
    assert_eq!(out.len(), s.b * s.l * s.vdim(), "out must be [b, l, H·dv]");
    if s.b == 0 || s.l == 0 {
        return;
    }
    let (l, heads, dz, dv) = (s.l, s.heads, s.dz, s.dv);
    let (zdim, vdim, span) = (s.zdim(), s.vdim(), s.span());
    let half = dz / 2;
    let eps: F = real(s.eps);
    let (cos, sin) = rope_table::<F>(span, dz, s.rope_base);
    let aff = QkAffine::new(gamma, beta, zdim, dz);
    let mut o_heads = vec![F::zero(); s.b * heads * l * dv];
    let per_row = (
        saved.q.par_chunks_mut(l * dz),
        saved.k.par_chunks_mut(l * dz),
        saved.rstd.par_chunks_mut(l),
        saved.probs.par_chunks_mut(s.n_chunks() * span * span),
        o_heads.par_chunks_mut(l * dv),
    );
    per_row
        .into_par_iter()
        .enumerate()
        .for_each(|(bh, (q_bh, k_bh, rs_bh, p_bh, o_bh))| {
            let (bi, hi) = (bh / heads, bh % heads);
            let hz = hi * dz..(hi + 1) * dz;
            let aff_h = (
                &aff.gq[hz.clone()],
                &aff.bq[hz.clone()],
                &aff.gk[hz.clone()],
                &aff.bk[hz.clone()],
            );
            let blocks = (
                q_bh.par_chunks_mut(span * dz),
                k_bh.par_chunks_mut(span * dz),
                rs_bh.par_chunks_mut(span),
                p_bh.par_chunks_mut(span * span),
                o_bh.par_chunks_mut(span * dv),
            );
            blocks
                .into_par_iter()
                .enumerate()
                .for_each(|(c, (qc, kc, rsc, pc, oc))| {
                    let t0 = c * span;
                    let n = rsc.len();
                    for i in 0..n {
                        let zrow = &z[(bi * l + t0 + i) * zdim + hi * dz..][..dz];
                        rsc[i] = project_row(
                            &mut qc[i * dz..(i + 1) * dz],
                            &mut kc[i * dz..(i + 1) * dz],
                            zrow,
                            aff_h,
                            &cos[i * half..(i + 1) * half],
                            &sin[i * half..(i + 1) * half],
                            eps,
                        );
                    }
                    let vh = &v[(bi * l + t0) * vdim + hi * dv..];
                    attend(oc, pc, span, qc, kc, (vh, vdim), n, 0, dz, dv);
                    // Rows past the end of a partial last chunk are never read; keep them clean.
                    pc[n * span..].fill(F::zero());
                });
        });
    scatter_heads(out, &o_heads, l, heads, dv);
}

/// `dst [b, l, H·d] = src [b, H, l, d]` transposed, in parallel over rows.
fn scatter_heads<F: Real>(dst: &mut [F], src: &[F], l: usize, heads: usize, d: usize) {
    let width = heads * d;
    dst.par_chunks_mut(width)
        .enumerate()
        .with_min_len(super::parallel::min_rows(width))
        .for_each(|(row, dst_row)| {
            let (bi, t) = (row / l, row % l);
            for h in 0..heads {
                let from = ((bi * heads + h) * l + t) * d;
                dst_row[h * d..(h + 1) * d].copy_from_slice(&src[from..from + d]);
            }
        });
}

/// Backward of [`forward`]: overwrites `dz [b, l, H·dz]` and `dv [b, l, H·dv]`, adds into
/// `dgamma`, `dbeta` `[2, H·dz]`, from `dout [b, l, H·dv]` and what forward saved.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dz: &mut [F],
    dv: &mut [F],
    dgamma: &mut [F],
    dbeta: &mut [F],
    dout: &[F],
    z: &[F],
    v: &[F],
    gamma: &[F],
    beta: &[F],
    saved: &MegaAttnSaved<F>,
    s: &MegaAttnShape,
) {
    check_io(z, v, gamma, beta, s);
    check_saved(saved, s);
    let (zdim, vdim) = (s.zdim(), s.vdim());
    assert_eq!(dz.len(), z.len(), "dz must be [b, l, H·dz]");
    assert_eq!(dv.len(), v.len(), "dv must be [b, l, H·dv]");
    assert_eq!(dout.len(), v.len(), "dout must be [b, l, H·dv]");
    assert_eq!(dgamma.len(), 2 * zdim, "dgamma must be [2, H·dz]");
    assert_eq!(dbeta.len(), 2 * zdim, "dbeta must be [2, H·dz]");
    if s.b == 0 || s.l == 0 {
        return;
    }
    let (l, heads, hd, hv) = (s.l, s.heads, s.dz, s.dv);
    let (span, n_chunks) = (s.span(), s.n_chunks());
    let half = hd / 2;
    let (cos, sin) = rope_table::<F>(span, hd, s.rope_base);
    let aff = QkAffine::new(gamma, beta, zdim, hd);
    let inv_sqrt: F = F::one() / real::<F>(hd as f64).sqrt();
    let inv_dz: F = F::one() / real::<F>(hd as f64);
    let mut dz_heads = vec![F::zero(); s.b * heads * l * hd];
    let mut dv_heads = vec![F::zero(); s.b * heads * l * hv];
    // Per block: dγ0, dγ1, dβ0, dβ1 of its head, summed afterwards in a fixed order.
    let mut parts = vec![F::zero(); s.b * heads * n_chunks * 4 * hd];
    let per_row = (
        dz_heads.par_chunks_mut(l * hd),
        dv_heads.par_chunks_mut(l * hv),
        parts.par_chunks_mut(n_chunks * 4 * hd),
        saved.q.par_chunks(l * hd),
        saved.k.par_chunks(l * hd),
        saved.rstd.par_chunks(l),
        saved.probs.par_chunks(n_chunks * span * span),
    );
    per_row.into_par_iter().enumerate().for_each(
        |(bh, (dz_bh, dv_bh, parts_bh, q_bh, k_bh, rs_bh, p_bh))| {
            let (bi, hi) = (bh / heads, bh % heads);
            let hz = hi * hd..(hi + 1) * hd;
            let (gq, gk) = (&aff.gq[hz.clone()], &aff.gk[hz.clone()]);
            let blocks = (
                dz_bh.par_chunks_mut(span * hd),
                dv_bh.par_chunks_mut(span * hv),
                parts_bh.par_chunks_mut(4 * hd),
                q_bh.par_chunks(span * hd),
                k_bh.par_chunks(span * hd),
                rs_bh.par_chunks(span),
                p_bh.par_chunks(span * span),
            );
            blocks.into_par_iter().enumerate().for_each(
                |(c, (dzc, dvc, part, qc, kc, rsc, pc))| {
                    let t0 = c * span;
                    let n = rsc.len();
                    let mut dq = vec![F::zero(); n * hd];
                    let mut dk = vec![F::zero(); n * hd];
                    let mut ds = vec![F::zero(); n * span];
                    attend_backward(
                        &mut dq,
                        &mut dk,
                        dvc,
                        &mut ds,
                        (&dout[(bi * l + t0) * vdim + hi * hv..], vdim),
                        (&v[(bi * l + t0) * vdim + hi * hv..], vdim),
                        qc,
                        kc,
                        pc,
                        span,
                        n,
                        hd,
                        hv,
                    );
                    let (dg, rest) = part.split_at_mut(2 * hd);
                    let (dgq, dgk) = dg.split_at_mut(hd);
                    let (dbq, dbk) = rest.split_at_mut(hd);
                    for i in 0..n {
                        let zrow = &z[(bi * l + t0 + i) * zdim + hi * hd..][..hd];
                        let rs = rsc[i];
                        let (cs, sn) = (&cos[i * half..], &sin[i * half..]);
                        let dzr = &mut dzc[i * hd..(i + 1) * hd];
                        // Undo the rotation (its transpose), then the affine: dzr ← dẐ.
                        for p in 0..half {
                            let (j0, j1) = (2 * p, 2 * p + 1);
                            let (c_, s_) = (cs[p], sn[p]);
                            let (a0, a1) = (dq[i * hd + j0], dq[i * hd + j1]);
                            let (dq0, dq1) = (a0 * c_ + a1 * s_, a1 * c_ - a0 * s_);
                            let (a0, a1) = (dk[i * hd + j0], dk[i * hd + j1]);
                            let (dk0, dk1) = (a0 * c_ + a1 * s_, a1 * c_ - a0 * s_);
                            let (zh0, zh1) = (zrow[j0] * rs, zrow[j1] * rs);
                            dgq[j0] = dgq[j0] + dq0 * zh0;
                            dgq[j1] = dgq[j1] + dq1 * zh1;
                            dgk[j0] = dgk[j0] + dk0 * zh0;
                            dgk[j1] = dgk[j1] + dk1 * zh1;
                            dbq[j0] = dbq[j0] + dq0;
                            dbq[j1] = dbq[j1] + dq1;
                            dbk[j0] = dbk[j0] + dk0;
                            dbk[j1] = dbk[j1] + dk1;
                            dzr[j0] = dq0 * gq[j0] + dk0 * gk[j0];
                            dzr[j1] = dq1 * gq[j1] + dk1 * gk[j1];
                        }
                        // RMSNorm without affine: dZ = rstd·(dẐ − Ẑ·mean(dẐ ⊙ Ẑ)).
                        let m = sum_by(hd, |j| dzr[j] * zrow[j] * rs) * inv_dz;
                        for j in 0..hd {
                            dzr[j] = rs * (dzr[j] - zrow[j] * rs * m);
                        }
                    }
                    for g in dgq.iter_mut().chain(dgk.iter_mut()) {
                        *g = *g * inv_sqrt;
                    }
                },
            );
        },
    );
    scatter_heads(dz, &dz_heads, l, heads, hd);
    scatter_heads(dv, &dv_heads, l, heads, hv);
    // Blocks in (row, head, chunk) order: the same sums whatever the thread count.
    let mut acc = vec![F::zero(); 4 * zdim];
    for (blk, part) in parts.chunks(4 * hd).enumerate() {
        let hi = (blk / n_chunks) % heads;
        for which in 0..4 {
            for j in 0..hd {
                let a = &mut acc[which * zdim + hi * hd + j];
                *a = *a + part[which * hd + j];
            }
        }
    }
    for j in 0..2 * zdim {
        dgamma[j] = dgamma[j] + acc[j];
        dbeta[j] = dbeta[j] + acc[2 * zdim + j];
    }
}

/// Streaming forward of `s.l` new tokens per batch row against `cache`.
///
/// Row `r`'s new tokens take chunk positions `count[r]..count[r] + s.l`, attend to the cached
/// keys of their chunk and to the causal part of the new ones, and are appended to the cache;
/// when a chunk fills, the row's cache is emptied (`count = 0`). A call from a chunk boundary
/// may cover several whole chunks, each processed on its own. Writes `out [b, s.l, H·dv]`.
///
/// Errors (before anything is written) when a row's call breaks the rules of spec §16.2: see
/// [`check_call`].
#[allow(clippy::too_many_arguments)]
pub fn forward_cached<F: Real>(
    out: &mut [F],
    cache: &mut ChunkKvCache<F>,
    z: &[F],
    v: &[F],
    gamma: &[F],
    beta: &[F],
    s: &MegaAttnShape,
) -> Result<(), ChunkCallError> {
    check_io(z, v, gamma, beta, s);
    cache.check(s);
    assert_eq!(out.len(), s.b * s.l * s.vdim(), "out must be [b, l, H·dv]");
    check_call(&cache.count, s.l, s.chunk)?;
    if s.b == 0 || s.l == 0 {
        return Ok(());
    }
    let (l, heads, dz, dv, chunk) = (s.l, s.heads, s.dz, s.dv, s.chunk);
    let (zdim, vdim) = (s.zdim(), s.vdim());
    let half = dz / 2;
    let eps: F = real(s.eps);
    let inv = rope_inv_freqs::<F>(dz, s.rope_base);
    let aff = QkAffine::new(gamma, beta, zdim, dz);
    let mut o_heads = vec![F::zero(); s.b * heads * l * dv];
    let counts = cache.count.clone();
    // Tiny decode steps run inline rather than paying for pool hand-offs.
    let work = (counts.iter().max().copied().unwrap_or(0) + l) * l * (dz + dv);
    let min_len = (super::parallel::MIN_TASK_ELEMS / work.max(1)).max(1);
    (
        cache.k.par_chunks_mut(chunk * dz),
        cache.v.par_chunks_mut(chunk * dv),
        o_heads.par_chunks_mut(l * dv),
    )
        .into_par_iter()
        .enumerate()
        .with_min_len(min_len)
        .for_each(|(bh, (kc, vc, o_bh))| {
            let (bi, hi) = (bh / heads, bh % heads);
            let hz = hi * dz..(hi + 1) * dz;
            let aff_h = (
                &aff.gq[hz.clone()],
                &aff.bq[hz.clone()],
                &aff.gk[hz.clone()],
                &aff.bk[hz.clone()],
            );
            let mut count = counts[bi];
            let mut t0 = 0;
            let mut q = Vec::new();
            let mut probs = Vec::new();
            let (mut cos, mut sin) = (vec![F::zero(); half], vec![F::zero(); half]);
            while t0 < l {
                let n = (chunk - count).min(l - t0);
                q.resize(n * dz, F::zero());
                for i in 0..n {
                    let t = t0 + i;
                    let pos = count + i;
                    let zrow = &z[(bi * l + t) * zdim + hi * dz..][..dz];
                    // The same products as `rope_table`, so streaming and training agree.
                    let p: F = real(pos as f64);
                    for (j, &f) in inv.iter().enumerate() {
                        cos[j] = (p * f).cos();
                        sin[j] = (p * f).sin();
                    }
                    project_row(
                        &mut q[i * dz..(i + 1) * dz],
                        &mut kc[pos * dz..(pos + 1) * dz],
                        zrow,
                        aff_h,
                        &cos,
                        &sin,
                        eps,
                    );
                    vc[pos * dv..(pos + 1) * dv]
                        .copy_from_slice(&v[(bi * l + t) * vdim + hi * dv..][..dv]);
                }
                let nk = count + n;
                probs.resize(n * nk, F::zero());
                attend(
                    &mut o_bh[t0 * dv..(t0 + n) * dv],
                    &mut probs,
                    nk,
                    &q,
                    &kc[..nk * dz],
                    (&vc[..nk * dv], dv),
                    n,
                    count,
                    dz,
                    dv,
                );
                count = if nk == chunk { 0 } else { nk };
                t0 += n;
            }
        });
    for c in cache.count.iter_mut() {
        *c = (*c + l) % chunk;
    }
    scatter_heads(out, &o_heads, l, heads, dv);
    Ok(())
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{
        check_call, check_io, check_saved, ChunkCallError, ChunkKvCache, MegaAttnSaved,
        MegaAttnShape,
    };
    use crate::backend::cpu::{real, Real};

    /// `(Ẑ row, rstd)` of head `h` of the `z` row starting at `at`.
    fn normalize<F: Real>(z: &[F], at: usize, dz: usize, eps: F) -> (Vec<F>, F) {
        let mut ms = F::zero();
        for j in 0..dz {
            ms = ms + z[at + j] * z[at + j];
        }
        let rs = F::one() / (ms / real::<F>(dz as f64) + eps).sqrt();
        ((0..dz).map(|j| z[at + j] * rs).collect(), rs)
    }

    /// Query (`which = 0`) or key (`which = 1`) of head `h` from `Ẑ`, rotated to `pos`.
    #[allow(clippy::too_many_arguments)]
    fn project<F: Real>(
        zhat: &[F],
        gamma: &[F],
        beta: &[F],
        which: usize,
        h: usize,
        zdim: usize,
        pos: usize,
        base: f64,
    ) -> Vec<F> {
        let dz = zhat.len();
        let sq = real::<F>(dz as f64).sqrt();
        let x: Vec<F> = (0..dz)
            .map(|j| {
                let ch = which * zdim + h * dz + j;
                zhat[j] * (gamma[ch] + F::one()) / sq + beta[ch]
            })
            .collect();
        let mut y = x.clone();
        for i in 0..dz / 2 {
            let inv = F::one() / real::<F>(base).powf(real::<F>((2 * i) as f64) / real(dz as f64));
            let a = real::<F>(pos as f64) * inv;
            y[2 * i] = x[2 * i] * a.cos() - x[2 * i + 1] * a.sin();
            y[2 * i + 1] = x[2 * i] * a.sin() + x[2 * i + 1] * a.cos();
        }
        y
    }

    /// Reference of [`super::forward`] (same outputs and saved layouts).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        out: &mut [F],
        saved: &mut MegaAttnSaved<F>,
        z: &[F],
        v: &[F],
        gamma: &[F],
        beta: &[F],
        s: &MegaAttnShape,
    ) {
        check_io(z, v, gamma, beta, s);
        check_saved(saved, s);
        assert_eq!(out.len(), s.b * s.l * s.vdim());
        let (l, hn, dz, dv, c) = (s.l, s.heads, s.dz, s.dv, s.chunk);
        let (zdim, vdim, span, nch) = (s.zdim(), s.vdim(), s.span(), s.n_chunks());
        let eps: F = real(s.eps);
        for bi in 0..s.b {
            for h in 0..hn {
                for t in 0..l {
                    let (zhat, rs) = normalize(z, (bi * l + t) * zdim + h * dz, dz, eps);
                    let pos = t % c;
                    let q = project(&zhat, gamma, beta, 0, h, zdim, pos, s.rope_base);
                    let k = project(&zhat, gamma, beta, 1, h, zdim, pos, s.rope_base);
                    let at = ((bi * hn + h) * l + t) * dz;
                    saved.q[at..at + dz].copy_from_slice(&q);
                    saved.k[at..at + dz].copy_from_slice(&k);
                    saved.rstd[(bi * hn + h) * l + t] = rs;
                }
                for t in 0..l {
                    let (start, i) = (t - t % c, t % c);
                    let prow = (((bi * hn + h) * nch + t / c) * span + i) * span;
                    let qa = ((bi * hn + h) * l + t) * dz;
                    let mut max = F::neg_infinity();
                    for j in 0..=i {
                        let ka = ((bi * hn + h) * l + start + j) * dz;
                        let mut sc = F::zero();
                        for d in 0..dz {
                            sc = sc + saved.q[qa + d] * saved.k[ka + d];
                        }
                        saved.probs[prow + j] = sc;
                        max = max.max(sc);
                    }
                    let mut sum = F::zero();
                    for j in 0..=i {
                        saved.probs[prow + j] = (saved.probs[prow + j] - max).exp();
                        sum = sum + saved.probs[prow + j];
                    }
                    for j in 0..span {
                        saved.probs[prow + j] = if j <= i {
                            saved.probs[prow + j] / sum
                        } else {
                            F::zero()
                        };
                    }
                    for d in 0..dv {
                        let mut acc = F::zero();
                        for j in 0..=i {
                            acc = acc
                                + saved.probs[prow + j]
                                    * v[(bi * l + start + j) * vdim + h * dv + d];
                        }
                        out[(bi * l + t) * vdim + h * dv + d] = acc;
                    }
                }
            }
        }
    }

    /// Reference of [`super::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dz: &mut [F],
        dv: &mut [F],
        dgamma: &mut [F],
        dbeta: &mut [F],
        dout: &[F],
        z: &[F],
        v: &[F],
        gamma: &[F],
        beta: &[F],
        saved: &MegaAttnSaved<F>,
        s: &MegaAttnShape,
    ) {
        check_io(z, v, gamma, beta, s);
        check_saved(saved, s);
        let (l, hn, hd, hv, c) = (s.l, s.heads, s.dz, s.dv, s.chunk);
        let (zdim, vdim, span, nch) = (s.zdim(), s.vdim(), s.span(), s.n_chunks());
        assert_eq!(dz.len(), z.len());
        assert_eq!(dv.len(), v.len());
        assert_eq!(dout.len(), v.len());
        dz.fill(F::zero());
        dv.fill(F::zero());
        let sq = real::<F>(hd as f64).sqrt();
        for bi in 0..s.b {
            for h in 0..hn {
                // Gradients of the post-RoPE q and k of every token of this (row, head).
                let mut dq = vec![F::zero(); l * hd];
                let mut dk = vec![F::zero(); l * hd];
                for t in 0..l {
                    let (start, i) = (t - t % c, t % c);
                    let prow = (((bi * hn + h) * nch + t / c) * span + i) * span;
                    let orow = (bi * l + t) * vdim + h * hv;
                    let mut dp = vec![F::zero(); i + 1];
                    let mut dot = F::zero();
                    for (j, dpj) in dp.iter_mut().enumerate() {
                        let vrow = (bi * l + start + j) * vdim + h * hv;
                        for d in 0..hv {
                            *dpj = *dpj + dout[orow + d] * v[vrow + d];
                            dv[vrow + d] = dv[vrow + d] + saved.probs[prow + j] * dout[orow + d];
                        }
                        dot = dot + saved.probs[prow + j] * *dpj;
                    }
                    let qa = ((bi * hn + h) * l + t) * hd;
                    for (j, &dpj) in dp.iter().enumerate() {
                        let dsc = saved.probs[prow + j] * (dpj - dot);
                        let ka = ((bi * hn + h) * l + start + j) * hd;
                        for d in 0..hd {
                            dq[t * hd + d] = dq[t * hd + d] + dsc * saved.k[ka + d];
                            dk[(start + j) * hd + d] =
                                dk[(start + j) * hd + d] + dsc * saved.q[qa + d];
                        }
                    }
                }
                for t in 0..l {
                    let zat = (bi * l + t) * zdim + h * hd;
                    let rs = saved.rstd[(bi * hn + h) * l + t];
                    let zhat: Vec<F> = (0..hd).map(|j| z[zat + j] * rs).collect();
                    let pos = t % c;
                    let mut dzhat = vec![F::zero(); hd];
                    for (which, dy) in [(0, &dq), (1, &dk)] {
                        // Transposed rotation back to the pre-RoPE gradient.
                        let mut dx = vec![F::zero(); hd];
                        for i in 0..hd / 2 {
                            let inv = F::one()
                                / real::<F>(s.rope_base)
                                    .powf(real::<F>((2 * i) as f64) / real(hd as f64));
                            let a = real::<F>(pos as f64) * inv;
                            let (y0, y1) = (dy[t * hd + 2 * i], dy[t * hd + 2 * i + 1]);
                            dx[2 * i] = y0 * a.cos() + y1 * a.sin();
                            dx[2 * i + 1] = -y0 * a.sin() + y1 * a.cos();
                        }
                        for j in 0..hd {
                            let ch = which * zdim + h * hd + j;
                            dgamma[ch] = dgamma[ch] + dx[j] * zhat[j] / sq;
                            dbeta[ch] = dbeta[ch] + dx[j];
                            dzhat[j] = dzhat[j] + dx[j] * (gamma[ch] + F::one()) / sq;
                        }
                    }
                    let mut m = F::zero();
                    for j in 0..hd {
                        m = m + dzhat[j] * zhat[j];
                    }
                    m = m / real(hd as f64);
                    for j in 0..hd {
                        dz[zat + j] = rs * (dzhat[j] - zhat[j] * m);
                    }
                }
            }
        }
    }

    /// Reference of [`super::forward_cached`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached<F: Real>(
        out: &mut [F],
        cache: &mut ChunkKvCache<F>,
        z: &[F],
        v: &[F],
        gamma: &[F],
        beta: &[F],
        s: &MegaAttnShape,
    ) -> Result<(), ChunkCallError> {
        check_io(z, v, gamma, beta, s);
        cache.check(s);
        assert_eq!(out.len(), s.b * s.l * s.vdim());
        check_call(&cache.count, s.l, s.chunk)?;
        let (l, hn, dz, dv, c) = (s.l, s.heads, s.dz, s.dv, s.chunk);
        let (zdim, vdim) = (s.zdim(), s.vdim());
        let eps: F = real(s.eps);
        for bi in 0..s.b {
            for t in 0..l {
                let pos = cache.count[bi];
                for h in 0..hn {
                    let (zhat, _) = normalize(z, (bi * l + t) * zdim + h * dz, dz, eps);
                    let q = project(&zhat, gamma, beta, 0, h, zdim, pos, s.rope_base);
                    let k = project(&zhat, gamma, beta, 1, h, zdim, pos, s.rope_base);
                    let kbase = (bi * hn + h) * c;
                    cache.k[(kbase + pos) * dz..(kbase + pos + 1) * dz].copy_from_slice(&k);
                    for d in 0..dv {
                        cache.v[(kbase + pos) * dv + d] = v[(bi * l + t) * vdim + h * dv + d];
                    }
                    let mut scores = vec![F::zero(); pos + 1];
                    let mut max = F::neg_infinity();
                    for (j, sc) in scores.iter_mut().enumerate() {
                        for (d, &qd) in q.iter().enumerate() {
                            *sc = *sc + qd * cache.k[(kbase + j) * dz + d];
                        }
                        max = max.max(*sc);
                    }
                    let mut sum = F::zero();
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum = sum + *sc;
                    }
                    for d in 0..dv {
                        let mut acc = F::zero();
                        for (j, sc) in scores.iter().enumerate() {
                            acc = acc + *sc * cache.v[(kbase + j) * dv + d];
                        }
                        out[(bi * l + t) * vdim + h * dv + d] = acc / sum;
                    }
                }
                cache.count[bi] = (pos + 1) % c;
            }
        }
        Ok(())
    }
}
