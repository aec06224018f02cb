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
//! The training path ([`forward`], [`backward`]) runs one task per (batch row, chunk) on the
//! rayon pool, the heads one after another on per-task scratch, with causal row blocks handed
//! to `gemm` and results written straight into the `[b, l, ·]` outputs. The forward keeps
//! nothing: the backward recomputes each block's queries, keys and probabilities from `z`
//! (flash-attention style), which costs a fraction of the block's GEMMs and spares training
//! a `[span × span]` probability block, post-RoPE queries and keys per head and layer. The
//! streaming path ([`forward_cached`]) keeps the post-RoPE keys and values of the current
//! partial chunk in a [`ChunkKvCache`]. Every output element is computed by the same
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

/// What [`forward`] leaves for [`backward`]: only the shape of the call it ran, so that a
/// backward at another shape (or without a forward) is caught. Everything the gradient needs
/// is recomputed from `z` and `v` (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct MegaAttnSaved<F> {
    filled_for: Option<MegaAttnShape>,
    _elem: std::marker::PhantomData<F>,
}

impl<F> MegaAttnSaved<F> {
    /// The shape of the forward that filled this record (`None` before any forward).
    pub fn filled_for(&self) -> Option<&MegaAttnShape> {
        self.filled_for.as_ref()
    }
}

/// An empty [`MegaAttnSaved`] for shape `s` (nothing is allocated).
pub fn saved_new<F: Real>(_s: &MegaAttnShape) -> MegaAttnSaved<F> {
    MegaAttnSaved {
        filled_for: None,
        _elem: std::marker::PhantomData,
    }
}

fn check_saved<F>(saved: &MegaAttnSaved<F>, s: &MegaAttnShape) {
    assert_eq!(
        saved.filled_for.as_ref(),
        Some(s),
        "megalodon attention: backward needs a forward at the same shape"
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

/// Scores `Q[r0..r1]·K[0..offset + r1]ᵀ` into rows `probs_rs` apart, then the causal softmax
/// of each row in place (query `i` sees keys `0..=offset + i`; zeros after, up to `probs_rs`).
#[allow(clippy::too_many_arguments)]
fn causal_probs<F: Real>(
    probs: &mut [F],
    probs_rs: usize,
    q: &[F],
    k: &[F],
    r0: usize,
    r1: usize,
    offset: usize,
    dz: usize,
) {
    mm(
        &mut probs[r0 * probs_rs..],
        probs_rs,
        (&q[r0 * dz..], dz, 1),
        (k, 1, dz),
        r1 - r0,
        offset + r1,
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
}

/// Causal softmax attention of `nq` queries over `offset + nq` keys, query `i` seeing keys
/// `0..=offset + i` (the bottom-right aligned mask of a cached prefix).
///
/// `q [nq, dz]` and `k [offset+nq, dz]` are contiguous; `v` holds key rows of `dv` values
/// `v_rs` apart. Writes `out` (`nq` rows of `dv`, `out_rs` apart) and the probabilities into
/// rows `probs_rs` apart (zero past each row's last visible key, up to `probs_rs`).
#[allow(clippy::too_many_arguments)]
fn attend<F: Real>(
    out: (&mut [F], usize),
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
    let (out, out_rs) = out;
    let (v, v_rs) = v;
    let mut r0 = 0;
    while r0 < nq {
        let r1 = (r0 + ROW_BLOCK).min(nq);
        causal_probs(probs, probs_rs, q, k, r0, r1, offset, dz);
        mm(
            &mut out[r0 * out_rs..],
            out_rs,
            (&probs[r0 * probs_rs..], probs_rs, 1),
            (v, v_rs, 1),
            r1 - r0,
            dv,
            offset + r1,
            false,
        );
        r0 = r1;
    }
}

/// Gradients of [`attend`] with `offset = 0` (one whole training block of `n` rows):
/// overwrites `dq, dk [n, dz]` and the `n` rows of `dv_out` (`dv` values, `dv_rs` apart);
/// `ds` is scratch of `n` rows `probs_rs` apart.
#[allow(clippy::too_many_arguments)]
fn attend_backward<F: Real>(
    dq: &mut [F],
    dk: &mut [F],
    dv_out: (&mut [F], usize),
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
    let (dv_out, dv_rs) = dv_out;
    dk.fill(F::zero());
    for i in 0..n {
        dv_out[i * dv_rs..i * dv_rs + dv].fill(F::zero());
    }
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + ROW_BLOCK).min(n);
        let rows = r1 - r0;
        // dV[0..r1] += P[r0..r1, 0..r1]ᵀ · dO[r0..r1]
        mm(
            dv_out,
            dv_rs,
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

/// What every training block of a call shares: the RoPE table and the Q/K affine.
struct BlockCtx<F> {
    s: MegaAttnShape,
    cos: Vec<F>,
    sin: Vec<F>,
    aff: QkAffine<F>,
    eps: F,
}

/// One task's scratch, reused across its heads: post-RoPE `q`, `k` and the per-row rstd of
/// one head, the block's probabilities and, for the backward, their gradients.
struct BlockScratch<F> {
    q: Vec<F>,
    k: Vec<F>,
    rstd: Vec<F>,
    probs: Vec<F>,
    dq: Vec<F>,
    dk: Vec<F>,
    ds: Vec<F>,
}

impl<F: Real> BlockScratch<F> {
    fn new(s: &MegaAttnShape, backward: bool) -> Self {
        let (span, dz) = (s.span(), s.dz);
        let grad = |len: usize| {
            if backward {
                vec![F::zero(); len]
            } else {
                Vec::new()
            }
        };
        Self {
            q: vec![F::zero(); span * dz],
            k: vec![F::zero(); span * dz],
            rstd: vec![F::zero(); span],
            probs: vec![F::zero(); span * span],
            dq: grad(span * dz),
            dk: grad(span * dz),
            ds: grad(span * span),
        }
    }
}

impl<F: Real> BlockCtx<F> {
    fn new(gamma: &[F], beta: &[F], s: &MegaAttnShape) -> Self {
        let (cos, sin) = rope_table::<F>(s.span(), s.dz, s.rope_base);
        Self {
            s: *s,
            cos,
            sin,
            aff: QkAffine::new(gamma, beta, s.zdim(), s.dz),
            eps: real(s.eps),
        }
    }

    /// Queries, keys and rstd of head `hi` for the `n` rows of `zb` (the block's `z` rows,
    /// `H·dz` wide) into `sc`.
    fn project(&self, sc: &mut BlockScratch<F>, zb: &[F], hi: usize, n: usize) {
        let (dz, zdim) = (self.s.dz, self.s.zdim());
        let half = dz / 2;
        let hz = hi * dz..(hi + 1) * dz;
        let aff_h = (
            &self.aff.gq[hz.clone()],
            &self.aff.bq[hz.clone()],
            &self.aff.gk[hz.clone()],
            &self.aff.bk[hz],
        );
        for i in 0..n {
            sc.rstd[i] = project_row(
                &mut sc.q[i * dz..(i + 1) * dz],
                &mut sc.k[i * dz..(i + 1) * dz],
                &zb[i * zdim + hi * dz..][..dz],
                aff_h,
                &self.cos[i * half..(i + 1) * half],
                &self.sin[i * half..(i + 1) * half],
                self.eps,
            );
        }
    }
}

/// Runs `f(bi, c, scratch, rows, part)` for every (batch row `bi`, chunk `c`) block in
/// parallel, with per-task [`BlockScratch`]. Each of `outs` (a `[b, l, w]` buffer and its
/// row width `w`) is handed as the block's rows; `parts` is cut into one `part_len` slice
/// per block, in (row, chunk) order.
fn for_each_block<F: Real, const K: usize>(
    outs: [(&mut [F], usize); K],
    parts: &mut [F],
    part_len: usize,
    s: &MegaAttnShape,
    backward: bool,
    f: impl Fn(usize, usize, &mut BlockScratch<F>, [&mut [F]; K], &mut [F]) + Sync,
) {
    let (l, span, n_chunks) = (s.l, s.span(), s.n_chunks());
    let n_blocks = s.b * n_chunks;
    assert_eq!(parts.len(), n_blocks * part_len, "one part per block");
    let mut per_out = outs.map(|(buf, w)| {
        buf.chunks_mut(l * w)
            .flat_map(move |row| row.chunks_mut(span * w))
            .collect::<Vec<_>>()
            .into_iter()
    });
    let mut part_iter = parts.chunks_mut(part_len.max(1));
    let tasks: Vec<([&mut [F]; K], &mut [F])> = (0..n_blocks)
        .map(|_| {
            let rows = std::array::from_fn(|j| per_out[j].next().expect("one slice per block"));
            let part = if part_len == 0 {
                &mut [][..]
            } else {
                part_iter.next().expect("one part per block")
            };
            (rows, part)
        })
        .collect();
    tasks.into_par_iter().enumerate().for_each_init(
        || BlockScratch::new(s, backward),
        |sc, (blk, (rows, part))| f(blk / n_chunks, blk % n_chunks, sc, rows, part),
    );
}

/// Forward over whole sequences starting at chunk position 0: writes `out [b, l, H·dv]` and
/// records the shape in `saved`. Any `l` works; the last chunk of a row may be partial.
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
    assert_eq!(out.len(), s.b * s.l * s.vdim(), "out must be [b, l, H·dv]");
    saved.filled_for = Some(*s);
    if s.b == 0 || s.l == 0 {
        return;
    }
    let (l, heads, dz, dv) = (s.l, s.heads, s.dz, s.dv);
    let (zdim, vdim, span) = (s.zdim(), s.vdim(), s.span());
    let ctx = BlockCtx::new(gamma, beta, s);
    for_each_block([(out, vdim)], &mut [], 0, s, false, |bi, c, sc, [ob], _| {
        let t0 = bi * l + c * span;
        let n = ob.len() / vdim;
        let zb = &z[t0 * zdim..(t0 + n) * zdim];
        for hi in 0..heads {
            ctx.project(sc, zb, hi, n);
            attend(
                (&mut ob[hi * dv..], vdim),
                &mut sc.probs,
                span,
                &sc.q,
                &sc.k,
                (&v[t0 * vdim + hi * dv..], vdim),
                n,
                0,
                dz,
                dv,
            );
        }
    });
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
/// `dgamma`, `dbeta` `[2, H·dz]`, from `dout [b, l, H·dv]`, recomputing each block's queries,
/// keys and probabilities.
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
    let span = s.span();
    let half = hd / 2;
    let ctx = BlockCtx::new(gamma, beta, s);
    let inv_sqrt: F = F::one() / real::<F>(hd as f64).sqrt();
    let inv_dz: F = F::one() / real::<F>(hd as f64);
    // Per block and head: dγ0, dγ1, dβ0, dβ1, summed afterwards in a fixed order.
    let n_blocks = s.b * s.n_chunks();
    let mut parts = vec![F::zero(); n_blocks * heads * 4 * hd];
    let part_len = heads * 4 * hd;
    let outs = [(dz, zdim), (dv, vdim)];
    for_each_block(
        outs,
        &mut parts,
        part_len,
        s,
        true,
        |bi, c, sc, [dzc, dvc], part| {
            let t0 = bi * l + c * span;
            let n = dzc.len() / zdim;
            let zb = &z[t0 * zdim..(t0 + n) * zdim];
            for hi in 0..heads {
                ctx.project(sc, zb, hi, n);
                let mut r0 = 0;
                while r0 < n {
                    let r1 = (r0 + ROW_BLOCK).min(n);
                    causal_probs(&mut sc.probs, span, &sc.q, &sc.k, r0, r1, 0, hd);
                    r0 = r1;
                }
                attend_backward(
                    &mut sc.dq,
                    &mut sc.dk,
                    (&mut dvc[hi * hv..], vdim),
                    &mut sc.ds,
                    (&dout[t0 * vdim + hi * hv..], vdim),
                    (&v[t0 * vdim + hi * hv..], vdim),
                    &sc.q,
                    &sc.k,
                    &sc.probs,
                    span,
                    n,
                    hd,
                    hv,
                );
                let hz = hi * hd..(hi + 1) * hd;
                let (gq, gk) = (&ctx.aff.gq[hz.clone()], &ctx.aff.gk[hz]);
                let (dg, rest) = part[hi * 4 * hd..(hi + 1) * 4 * hd].split_at_mut(2 * hd);
                let (dgq, dgk) = dg.split_at_mut(hd);
                let (dbq, dbk) = rest.split_at_mut(hd);
                let (dq, dk) = (&sc.dq, &sc.dk);
                for i in 0..n {
                    let zrow = &zb[i * zdim + hi * hd..][..hd];
                    let rs = sc.rstd[i];
                    let (cs, sn) = (&ctx.cos[i * half..], &ctx.sin[i * half..]);
                    let dzr = &mut dzc[i * zdim + hi * hd..][..hd];
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
            }
        },
    );
    // Per head, blocks in (row, chunk) order: the same sums whatever the thread count.
    let mut acc = vec![F::zero(); 4 * zdim];
    for part in parts.chunks(heads * 4 * hd) {
        for hi in 0..heads {
            for which in 0..4 {
                for j in 0..hd {
                    let a = &mut acc[which * zdim + hi * hd + j];
                    *a = *a + part[(hi * 4 + which) * hd + j];
                }
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
                    (&mut o_bh[t0 * dv..(t0 + n) * dv], dv),
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

    /// Everything the forward computes on the way, `[b, H, l, ·]` per head: per-token rstd,
    /// post-RoPE queries and keys, and the probabilities `[b, H, n_chunks, span, span]`.
    struct Full<F> {
        rstd: Vec<F>,
        q: Vec<F>,
        k: Vec<F>,
        probs: Vec<F>,
    }

    /// Reference of [`super::forward`].
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
        assert_eq!(out.len(), s.b * s.l * s.vdim());
        full_forward(out, z, v, gamma, beta, s);
        saved.filled_for = Some(*s);
    }

    /// The forward's output into `out` and its intermediates.
    fn full_forward<F: Real>(
        out: &mut [F],
        z: &[F],
        v: &[F],
        gamma: &[F],
        beta: &[F],
        s: &MegaAttnShape,
    ) -> Full<F> {
        let span = s.span();
        let mut saved = Full {
            rstd: vec![F::zero(); s.b * s.heads * s.l],
            q: vec![F::zero(); s.b * s.l * s.zdim()],
            k: vec![F::zero(); s.b * s.l * s.zdim()],
            probs: vec![F::zero(); s.b * s.heads * s.n_chunks() * span * span],
        };
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
        saved
    }

    /// Reference of [`super::backward`] (recomputes the forward's intermediates).
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
        let saved = full_forward(&mut vec![F::zero(); v.len()], z, v, gamma, beta, s);
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
