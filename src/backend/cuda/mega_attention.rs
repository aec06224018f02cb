//! MEGALODON's chunk-local normalized attention on the device, unfused (spec/megalodon.md §6;
//! CPU twin: src/backend/cpu/megalodon_attention.rs): `kernels/mega_attention.cu` normalizes,
//! applies the affine and RoPE and lays Q, K, V out head-major; strided-batched GEMMs compute
//! every chunk's scores and products; `kernels/softmax.cu` takes the causal softmax (scale 1:
//! the normalization replaces the temperature). Nothing touches the host.
//!
//! **Whole chunks.** The head-major buffers are `[b, H, lpad, d]` with `lpad = chunks·span`,
//! so every (row, head, chunk) block is one `[span, ·]` matrix at a fixed stride and each
//! product is ONE strided-batched GEMM over `b·H·chunks` blocks, partial last chunk included.
//! The padding rows are zero (memset), which keeps them out of every real result: a padded
//! key sits above the causal diagonal of every real query; a padded query's row of the
//! probabilities is finite (its scores are 0) and meets only zero rows of `dout`, so its
//! contributions to `dK` and `dV` are exact zeros.
//!
//! **Saved for the backward:** Q and K after RoPE, V head-major and the per-row rstd — not the
//! probabilities: the backward recomputes them (one `Q·Kᵀ` GEMM and the softmax kernel, a
//! tenth of the backward's FLOPs at dv = 8·dz), because keeping `[span, span]` per head,
//! chunk and layer from forward to backward does not fit at paper lengths (docs/perf.md §8.4).
//! The CPU twin recomputes Q and K too; the fused kernels will recompute tile by tile.
//!
//! **Precision:** f32 throughout, also under [`super::Precision::Bf16Gemm`] (the chunk
//! products are a small share of a step's FLOPs; bf16 here is for the fused kernels).

use super::buffer::CudaBuf;
use super::{CudaBackend, NullArg};
use crate::backend::cpu::megalodon_attention::MegaAttnShape;
use crate::cuda::launch::{self as launch_shapes, mega_attention as attn_shape, softmax};
use crate::emu::{BufferAt, DeviceApi, KernelArg, MatrixLayout, StridedGemm};

/// What [`CudaBackend`]'s chunk-attention forward keeps for its backward (device buffers,
/// allocated by the first forward and reused while the shape stays the same).
pub struct DeviceMegaAttnSaved<D: DeviceApi> {
    filled_for: Option<MegaAttnShape>,
    buffers: Option<SavedBuffers<D>>,
}

struct SavedBuffers<D: DeviceApi> {
    /// Q and K after RoPE, `[b, H, lpad, dz]`.
    q: CudaBuf<D>,
    k: CudaBuf<D>,
    /// V head-major, `[b, H, lpad, dv]`.
    v: CudaBuf<D>,
    /// `1/√(mean(z²) + eps)` per (token, head), `[b·l·H]`.
    rstd: CudaBuf<D>,
}

impl<D: DeviceApi> DeviceMegaAttnSaved<D> {
    /// An empty record (nothing allocated until a forward fills it).
    pub fn new() -> Self {
        Self {
            filled_for: None,
            buffers: None,
        }
    }

    /// The shape of the forward that filled this record (`None` before any forward).
    pub fn filled_for(&self) -> Option<&MegaAttnShape> {
        self.filled_for.as_ref()
    }
}

impl<D: DeviceApi> Default for DeviceMegaAttnSaved<D> {
    fn default() -> Self {
        Self::new()
    }
}

/// The sizes of one call in the head-major, whole-chunk layout.
#[derive(Debug, Clone, Copy)]
struct ChunkLayout {
    s: MegaAttnShape,
    span: usize,
    chunks: usize,
    lpad: usize,
}

impl ChunkLayout {
    fn new(s: &MegaAttnShape) -> Self {
        assert!(
            s.heads > 0 && s.dz > 0 && s.dz % 2 == 0 && s.chunk > 0,
            "megalodon attention: heads > 0, chunk > 0 and an even dz > 0 (got {s:?})"
        );
        let (span, chunks) = (s.span(), s.n_chunks());
        Self {
            s: *s,
            span,
            chunks,
            lpad: span * chunks,
        }
    }

    /// `b·H·chunks`: the number of `[span, ·]` blocks.
    fn blocks(&self) -> usize {
        self.s.b * self.s.heads * self.chunks
    }

    fn head_major(&self, d: usize) -> usize {
        self.s.b * self.s.heads * self.lpad * d
    }

    fn padded(&self) -> bool {
        self.lpad != self.s.l
    }

    /// Head-major operand of width `d`: block `i` at `i·span·d`, rows `d` apart.
    fn heads(&self, d: usize) -> MatrixLayout {
        MatrixLayout::new(0, d, self.span * d)
    }

    /// The `[span, span]` blocks of scores and probabilities.
    fn square(&self) -> MatrixLayout {
        MatrixLayout::new(0, self.span, self.span * self.span)
    }

    /// One product over every block.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (m, k, n): (usize, usize, usize),
        trans_a: bool,
        trans_b: bool,
        out: MatrixLayout,
        a: MatrixLayout,
        b: MatrixLayout,
    ) -> StridedGemm {
        StridedGemm {
            m,
            k,
            n,
            batch: self.blocks(),
            trans_a,
            trans_b,
            a,
            b,
            out,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// The shapes of a chunk-attention call's inputs and output (spec §6 layouts).
fn check_io<D: DeviceApi>(
    out: &CudaBuf<D>,
    z: &CudaBuf<D>,
    v: &CudaBuf<D>,
    gamma: &CudaBuf<D>,
    beta: &CudaBuf<D>,
    s: &MegaAttnShape,
) {
    let (zdim, vdim, tokens) = (s.zdim(), s.vdim(), s.b * s.l);
    let shapes = [
        (z.len(), tokens * zdim, "z must be [b, l, H·dz]"),
        (v.len(), tokens * vdim, "v must be [b, l, H·dv]"),
        (out.len(), tokens * vdim, "out must be [b, l, H·dv]"),
        (gamma.len(), 2 * zdim, "gamma must be [2, H·dz]"),
        (beta.len(), 2 * zdim, "beta must be [2, H·dz]"),
    ];
    for (got, want, what) in shapes {
        assert_eq!(got, want, "megalodon attention: {what}");
    }
}

fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("CUDA backend: {what} = {x} exceeds i32"))
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// `out = a·b` per block, every operand a sole buffer or view (its offset added).
    fn chunk_gemm(&self, out: &CudaBuf<D>, a: &CudaBuf<D>, b: &CudaBuf<D>, mut g: StridedGemm) {
        g.out.offset += out.offset();
        g.a.offset += a.offset();
        g.b.offset += b.offset();
        self.device
            .gemm_strided_batched_f32(out.allocation(), a.allocation(), b.allocation(), &g)
            .unwrap_or_else(|e| super::fail("megalodon attention gemm", e));
    }

    /// `probs = causal softmax(Q·Kᵀ)` per block, in place over the scores (no temperature).
    fn chunk_probabilities(
        &self,
        probs: &CudaBuf<D>,
        q: &CudaBuf<D>,
        k: &CudaBuf<D>,
        cl: &ChunkLayout,
    ) {
        let (sp, dz) = (cl.span, cl.s.dz);
        let scores = cl.gemm(
            (sp, dz, sp),
            false,
            true,
            cl.square(),
            cl.heads(dz),
            cl.heads(dz),
        );
        self.chunk_gemm(probs, q, k, scores);
        let (rows, t, one) = (
            int(cl.blocks() * sp, "softmax rows"),
            int(sp, "span"),
            1.0f32,
        );
        self.run(
            "causal_softmax_forward_f32",
            softmax::rows(cl.blocks() * sp),
            &[probs.block(), probs.block(), &rows, &t, &one],
        );
    }

    /// `mega_attn_project_forward_f32`: Q `[b, H, q_rows, dz]` and K `[b, H, k_rows, dz]`
    /// after norm, affine and RoPE, and rstd `[b·l·H]`, from `[z, gamma, beta]`; row `bi`'s
    /// tokens at chunk positions `offsets[bi] + t` (K rows likewise; null offsets: 0), taken
    /// modulo `span`.
    fn project_forward(
        &self,
        [q, k, rstd]: [&CudaBuf<D>; 3],
        [z, gamma, beta]: [&CudaBuf<D>; 3],
        offsets: &dyn KernelArg,
        s: &MegaAttnShape,
        span: usize,
        (q_rows, k_rows): (usize, usize),
    ) {
        let [b, l, heads, dz] = [s.b, s.l, s.heads, s.dz].map(|x| int(x, "attention size"));
        let (span, q_rows, k_rows) = (int(span, "span"), int(q_rows, "rows"), int(k_rows, "rows"));
        let inv_sqrt_dz = 1.0f32 / (s.dz as f32).sqrt();
        let (eps, base) = (s.eps as f32, s.rope_base as f32);
        self.run(
            "mega_attn_project_forward_f32",
            attn_shape::rows(s.b * s.l * s.heads),
            &[
                q.block(),
                k.block(),
                rstd.block(),
                z.block(),
                gamma.block(),
                beta.block(),
                offsets,
                &b,
                &l,
                &heads,
                &dz,
                &span,
                &q_rows,
                &k_rows,
                &eps,
                &inv_sqrt_dz,
                &base,
            ],
        );
    }

    /// A head-major buffer of width `d` (zeroed when the last chunk is padded).
    fn head_major_buffer(&self, cl: &ChunkLayout, d: usize) -> CudaBuf<D> {
        let mut buf = self.alloc(cl.head_major(d));
        if cl.padded() {
            self.fill_zero_on_device(&mut buf);
        }
        buf
    }

    /// `[b, l, H·d]` → head-major `dst` (its padding rows untouched).
    fn rows_to_heads(&self, dst: &CudaBuf<D>, src: &CudaBuf<D>, cl: &ChunkLayout, d: usize) {
        self.rows_to_heads_at(dst, src, cl, d, &NullArg::<u32>::new());
    }

    /// [`Self::rows_to_heads`] with row `bi`'s tokens landing from row `offsets[bi]` on
    /// (a `[b]` u32 device array, or null for 0).
    fn rows_to_heads_at(
        &self,
        dst: &CudaBuf<D>,
        src: &CudaBuf<D>,
        cl: &ChunkLayout,
        d: usize,
        offsets: &dyn KernelArg,
    ) {
        let s = &cl.s;
        let args = self.layout_args(cl, d);
        self.run(
            "mega_attn_to_heads_f32",
            launch_shapes::elementwise(src.len()),
            &[
                dst.block(),
                src.block(),
                offsets,
                &args[0],
                &args[1],
                &args[2],
                &args[3],
                &args[4],
            ],
        );
        debug_assert_eq!(src.len(), s.b * s.l * s.heads * d);
    }

    /// Head-major `src` → `[b, l, H·d]` (overwritten).
    fn heads_to_rows(&self, dst: &CudaBuf<D>, src: &CudaBuf<D>, cl: &ChunkLayout, d: usize) {
        let args = self.layout_args(cl, d);
        self.run(
            "mega_attn_from_heads_f32",
            launch_shapes::elementwise(dst.len()),
            &[
                dst.block(),
                src.block(),
                &args[0],
                &args[1],
                &args[2],
                &args[3],
                &args[4],
            ],
        );
    }

    fn layout_args(&self, cl: &ChunkLayout, d: usize) -> [i32; 5] {
        let s = &cl.s;
        [
            int(s.b, "b"),
            int(s.l, "l"),
            int(s.heads, "heads"),
            int(d, "head width"),
            int(cl.lpad, "padded length"),
        ]
    }

    /// [`Backend::mega_attention_forward`](crate::backend::Backend::mega_attention_forward)
    /// on the device.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mega_attention_forward_on_device(
        &self,
        out: &mut CudaBuf<D>,
        saved: &mut DeviceMegaAttnSaved<D>,
        z: &CudaBuf<D>,
        v: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        beta: &CudaBuf<D>,
        s: &MegaAttnShape,
    ) {
        let cl = ChunkLayout::new(s);
        let tokens = s.b * s.l;
        check_io(out, z, v, gamma, beta, s);
        saved.filled_for = Some(*s);
        if tokens == 0 {
            saved.buffers = None;
            return;
        }
        let q = self.head_major_buffer(&cl, s.dz);
        let k = self.head_major_buffer(&cl, s.dz);
        let vh = self.head_major_buffer(&cl, s.dv);
        let probs = self.alloc(cl.blocks() * cl.span * cl.span);
        let rstd = self.alloc(tokens * s.heads);
        let nul = NullArg::<u32>::new();
        let rows = (cl.lpad, cl.lpad);
        self.project_forward([&q, &k, &rstd], [z, gamma, beta], &nul, s, cl.span, rows);
        self.rows_to_heads(&vh, v, &cl, s.dv);
        let sp = cl.span;
        self.chunk_probabilities(&probs, &q, &k, &cl);
        // O = P·V per block, back to [b, l, H·dv].
        let oh = self.alloc(cl.head_major(s.dv));
        let values = cl.gemm(
            (sp, sp, s.dv),
            false,
            false,
            cl.heads(s.dv),
            cl.square(),
            cl.heads(s.dv),
        );
        self.chunk_gemm(&oh, &probs, &vh, values);
        out.invalidate_shadow();
        self.heads_to_rows(out, &oh, &cl, s.dv);
        drop(probs);
        saved.buffers = Some(SavedBuffers { q, k, v: vh, rstd });
    }

    /// [`Backend::mega_attention_backward`](crate::backend::Backend::mega_attention_backward)
    /// on the device: `dz`, `dv` overwritten, `dgamma`, `dbeta` accumulated.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mega_attention_backward_on_device(
        &self,
        dz: &mut CudaBuf<D>,
        dv: &mut CudaBuf<D>,
        dgamma: &mut CudaBuf<D>,
        dbeta: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        z: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        saved: &DeviceMegaAttnSaved<D>,
        s: &MegaAttnShape,
    ) {
        assert_eq!(
            saved.filled_for.as_ref(),
            Some(s),
            "megalodon attention: backward needs a forward at the same shape"
        );
        let cl = ChunkLayout::new(s);
        let (zdim, vdim) = (s.zdim(), s.vdim());
        let tokens = s.b * s.l;
        assert_eq!(
            dz.len(),
            tokens * zdim,
            "megalodon attention: dz must be [b, l, H·dz]"
        );
        assert_eq!(
            dv.len(),
            tokens * vdim,
            "megalodon attention: dv must be [b, l, H·dv]"
        );
        assert_eq!(
            dout.len(),
            tokens * vdim,
            "megalodon attention: dout must be [b, l, H·dv]"
        );
        assert_eq!(
            dgamma.len(),
            2 * zdim,
            "megalodon attention: dgamma must be [2, H·dz]"
        );
        assert_eq!(
            dbeta.len(),
            2 * zdim,
            "megalodon attention: dbeta must be [2, H·dz]"
        );
        let Some(sb) = saved.buffers.as_ref() else {
            return; // no tokens: nothing to write
        };
        let sp = cl.span;
        let probs = self.alloc(cl.blocks() * sp * sp);
        self.chunk_probabilities(&probs, &sb.q, &sb.k, &cl);
        let doh = self.head_major_buffer(&cl, s.dv);
        self.rows_to_heads(&doh, dout, &cl, s.dv);
        // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P)) in place.
        let ds = self.alloc(cl.blocks() * sp * sp);
        let dprobs = cl.gemm(
            (sp, s.dv, sp),
            false,
            true,
            cl.square(),
            cl.heads(s.dv),
            cl.heads(s.dv),
        );
        self.chunk_gemm(&ds, &doh, &sb.v, dprobs);
        let (rows, t, one) = (
            int(cl.blocks() * sp, "softmax rows"),
            int(sp, "span"),
            1.0f32,
        );
        self.run(
            "causal_softmax_backward_f32",
            softmax::rows(cl.blocks() * sp),
            &[ds.block(), probs.block(), ds.block(), &rows, &t, &one],
        );
        // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO.
        let dq = self.alloc(cl.head_major(s.dz));
        let dk = self.alloc(cl.head_major(s.dz));
        let dvh = self.alloc(cl.head_major(s.dv));
        let hz = cl.heads(s.dz);
        self.chunk_gemm(
            &dq,
            &ds,
            &sb.k,
            cl.gemm((sp, sp, s.dz), false, false, hz, cl.square(), hz),
        );
        self.chunk_gemm(
            &dk,
            &ds,
            &sb.q,
            cl.gemm((sp, sp, s.dz), true, false, hz, cl.square(), hz),
        );
        let hv = cl.heads(s.dv);
        self.chunk_gemm(
            &dvh,
            &probs,
            &doh,
            cl.gemm((sp, sp, s.dv), true, false, hv, cl.square(), hv),
        );
        dv.invalidate_shadow();
        self.heads_to_rows(dv, &dvh, &cl, s.dv);
        // Through RoPE, the affine and the RMSNorm; the affine's gradients as column sums.
        let gsum = self.alloc(tokens * 2 * zdim);
        let bsum = self.alloc(tokens * 2 * zdim);
        let dims = self.layout_args(&cl, s.dz);
        let inv_sqrt_dz = 1.0f32 / (s.dz as f32).sqrt();
        let base = s.rope_base as f32;
        let span = int(sp, "span");
        dz.invalidate_shadow();
        let dz_out: &CudaBuf<D> = dz;
        self.run(
            "mega_attn_project_backward_f32",
            attn_shape::rows(tokens * s.heads),
            &[
                dz_out.block(),
                gsum.block(),
                bsum.block(),
                dq.block(),
                dk.block(),
                z.block(),
                sb.rstd.block(),
                gamma.block(),
                &dims[0],
                &dims[1],
                &dims[2],
                &dims[3],
                &span,
                &dims[4],
                &inv_sqrt_dz,
                &base,
            ],
        );
        use crate::backend::Backend;
        self.bias_backward(dgamma, &gsum, tokens, 2 * zdim);
        self.bias_backward(dbeta, &bsum, tokens, 2 * zdim);
    }
}

/// MEGALODON's streaming chunk cache on the device (spec §16.1): the post-RoPE keys
/// `[b, H, chunk, dz]` and values `[b, H, chunk, dv]` of each row's current chunk, and on the
/// host how many tokens of it each row has seen. Entries past a row's count are stale but
/// finite (the buffers start zeroed), which the streaming softmax relies on: it writes exact
/// zeros there, and `0 · finite = 0` in the value product.
pub struct DeviceChunkCache<D: DeviceApi> {
    k: CudaBuf<D>,
    v: CudaBuf<D>,
    count: Vec<usize>,
    heads: usize,
    dz: usize,
    dv: usize,
    chunk: usize,
}

impl<D: DeviceApi> DeviceChunkCache<D> {
    /// Tokens of the current chunk each row has seen.
    pub fn counts(&self) -> &[usize] {
        &self.count
    }
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// An empty device chunk cache for `b` rows.
    pub(super) fn device_chunk_cache(
        &self,
        b: usize,
        heads: usize,
        dz: usize,
        dv: usize,
        chunk: usize,
    ) -> DeviceChunkCache<D> {
        use crate::backend::Backend;
        DeviceChunkCache {
            k: self.zeros(b * heads * chunk * dz),
            v: self.zeros(b * heads * chunk * dv),
            count: vec![0; b],
            heads,
            dz,
            dv,
            chunk,
        }
    }

    /// Row `src_row` of `src` (keys, values, count) into row `dst_row` of `dst`: one device
    /// copy each for keys and values (a row's heads are contiguous).
    pub(super) fn device_chunk_cache_copy_row(
        &self,
        dst: &mut DeviceChunkCache<D>,
        dst_row: usize,
        src: &DeviceChunkCache<D>,
        src_row: usize,
    ) {
        assert!(
            (dst.heads, dst.dz, dst.dv, dst.chunk) == (src.heads, src.dz, src.dv, src.chunk),
            "chunk caches of different shapes"
        );
        assert!(
            dst_row < dst.count.len() && src_row < src.count.len(),
            "row out of range"
        );
        for (d, s, width) in [(&dst.k, &src.k, dst.dz), (&dst.v, &src.v, dst.dv)] {
            let n = dst.heads * dst.chunk * width;
            self.device
                .copy_dtod(
                    BufferAt::new(d.allocation(), d.offset() + dst_row * n),
                    BufferAt::new(s.allocation(), s.offset() + src_row * n),
                    n,
                )
                .unwrap_or_else(|e| super::fail("chunk cache row copy", e));
        }
        dst.count[dst_row] = src.count[src_row];
    }

    /// [`Backend::mega_attention_forward_cached`](crate::backend::Backend::mega_attention_forward_cached)
    /// on the device. Calls made of whole chunks from chunk position 0 are the training
    /// forward (and leave every row's chunk empty); otherwise each row's `l` tokens continue
    /// its chunk at `count[row]`: Q for the new tokens, K and V appended to the cache,
    /// scores against the whole cached chunk with the offset causal softmax, `P·V`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mega_attention_forward_cached_on_device(
        &self,
        out: &mut CudaBuf<D>,
        cache: &mut DeviceChunkCache<D>,
        z: &CudaBuf<D>,
        v: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        beta: &CudaBuf<D>,
        s: &MegaAttnShape,
    ) -> Result<(), crate::backend::ChunkCallError> {
        use crate::backend::cpu::megalodon_attention::check_call;
        assert!(
            (cache.heads, cache.dz, cache.dv, cache.chunk) == (s.heads, s.dz, s.dv, s.chunk)
                && cache.count.len() == s.b,
            "chunk cache does not match the call's shape"
        );
        let tokens = s.b * s.l;
        check_io(out, z, v, gamma, beta, s);
        check_call(&cache.count, s.l, s.chunk)?;
        if tokens == 0 {
            return Ok(());
        }
        if s.l >= s.chunk {
            // Whole chunks from position 0 (check_call allows nothing else): the training
            // forward; each row's last chunk is complete, so its cache ends empty.
            let mut saved = DeviceMegaAttnSaved::new();
            self.mega_attention_forward_on_device(out, &mut saved, z, v, gamma, beta, s);
            cache.count.iter_mut().for_each(|c| *c = 0);
            return Ok(());
        }
        let chunk = s.chunk;
        // The layout of the new tokens: one block of l rows per (row, head).
        let cl = ChunkLayout {
            s: *s,
            span: s.l,
            chunks: 1,
            lpad: s.l,
        };
        let offsets: Vec<u32> = cache
            .count
            .iter()
            .map(|&c| u32::try_from(c).expect("chunk position fits u32"))
            .collect();
        let offsets = self.indices(&offsets);
        let q = self.alloc(cl.head_major(s.dz));
        let rstd = self.alloc(tokens * s.heads);
        cache.k.invalidate_shadow();
        cache.v.invalidate_shadow();
        let qkr = [&q, &cache.k, &rstd];
        self.project_forward(qkr, [z, gamma, beta], &offsets, s, chunk, (s.l, chunk));
        let cache_layout = ChunkLayout {
            s: *s,
            span: chunk,
            chunks: 1,
            lpad: chunk,
        };
        self.rows_to_heads_at(&cache.v, v, &cache_layout, s.dv, &offsets);
        // S[l, chunk] = Q·K_cacheᵀ per (row, head); entries past a query's keys are masked.
        let (l, bh) = (s.l, s.b * s.heads);
        let probs = self.alloc(bh * l * chunk);
        let gemm =
            |m, k, n, trans_b, out: MatrixLayout, a: MatrixLayout, b: MatrixLayout| StridedGemm {
                m,
                k,
                n,
                batch: bh,
                trans_a: false,
                trans_b,
                a,
                b,
                out,
                alpha: 1.0,
                beta: 0.0,
            };
        let square = MatrixLayout::new(0, chunk, l * chunk);
        let q_heads = MatrixLayout::new(0, s.dz, l * s.dz);
        let k_cache = MatrixLayout::new(0, s.dz, chunk * s.dz);
        self.chunk_gemm(
            &probs,
            &q,
            &cache.k,
            gemm(l, s.dz, chunk, true, square, q_heads, k_cache),
        );
        let (rows, t, li, hi) = (
            int(bh * l, "softmax rows"),
            int(chunk, "chunk"),
            int(l, "l"),
            int(s.heads, "heads"),
        );
        self.run(
            "mega_attn_cached_softmax_f32",
            attn_shape::rows(bh * l),
            &[probs.block(), probs.block(), &offsets, &rows, &t, &li, &hi],
        );
        let oh = self.alloc(cl.head_major(s.dv));
        let o_heads = MatrixLayout::new(0, s.dv, l * s.dv);
        let v_cache = MatrixLayout::new(0, s.dv, chunk * s.dv);
        self.chunk_gemm(
            &oh,
            &probs,
            &cache.v,
            gemm(l, chunk, s.dv, false, o_heads, square, v_cache),
        );
        out.invalidate_shadow();
        self.heads_to_rows(out, &oh, &cl, s.dv);
        for c in &mut cache.count {
            *c = (*c + l) % chunk;
        }
        Ok(())
    }
}
