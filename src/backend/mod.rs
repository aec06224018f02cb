//! The backend seam: buffers plus fused operations, each with its forward and backward.
//!
//! Models (`crate::model`) are written once against [`Backend`]; the CPU backend
//! ([`cpu::Cpu`]) is the reference and the default, the CUDA backend plugs in behind the same
//! trait. The seam sits at the granularity of *fused* operations (attention, layer norm,
//! softmax cross-entropy, the MEGABYTE patch gathers ...) so that a GPU backend can run each
//! one as a single kernel.
//!
//! Conventions shared by every op:
//! - Buffers are flat, row-major and contiguous; shapes are passed explicitly.
//! - MEGABYTE stores a linear layer's weight `[in, out]` so `y = x · W + b`; MEGALODON keeps
//!   the official `(out, in)` layout and multiplies with `trans_b`. [`Backend::matmul`] serves
//!   both.
//! - Backward ops *accumulate* into gradient buffers (`+=`), so a parameter used twice
//!   (the tied MEGABYTE byte table) simply receives both contributions. Callers zero
//!   gradients once per step. The MEGALODON sequence ops (TimestepNorm, CEMA, chunked
//!   attention) overwrite their *input* gradients (`dx =`) and accumulate only into
//!   parameter gradients; each op says which.
//! - Index arrays (byte ids, positions, row lists) are host slices: they are tiny, and a
//!   device backend uploads them as part of the launch.

pub mod cpu;
pub mod cuda;

pub use cpu::megalodon_attention::{ChunkCallError, MegaAttnShape};

/// Sentinel in an id array meaning "use the learned pad vector instead of a table row".
pub const PAD_ID: u32 = u32::MAX;

/// Pointwise nonlinearity used inside feed-forward blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(x, 0)`, the MEGABYTE paper default.
    Relu,
    /// GELU, tanh approximation (as GPT-2 / llm.c).
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay: `p -= lr · wd · p`.
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// The five CEMA parameters of one MEGALODON layer (spec `megalodon.md` §4.1), official
/// layouts: `alpha`, `delta` `[d, n]`, `theta` `[d]`, `gamma` `[d, n, 2]` (re, im), `omega` `[d]`.
#[derive(Debug)]
pub struct CemaWeights<'a, T> {
    /// Input rate logits: `a = σ(alpha)`.
    pub alpha: &'a T,
    /// Damping logits: `|q| = 1 − σ(alpha)·σ(delta)`.
    pub delta: &'a T,
    /// Base-angle logits: the n-th angle is `σ(theta)·2π·n/N`, n = 1..N.
    pub theta: &'a T,
    /// Complex output projection, applied as `/√N`.
    pub gamma: &'a T,
    /// Real skip weight on the input.
    pub omega: &'a T,
}

/// Gradient buffers of [`CemaWeights`], same shapes.
#[derive(Debug)]
pub struct CemaWeightGrads<'a, T> {
    pub alpha: &'a mut T,
    pub delta: &'a mut T,
    pub theta: &'a mut T,
    pub gamma: &'a mut T,
    pub omega: &'a mut T,
}

/// The streaming statistics a TimestepNorm carries (spec §5.3): `count` `[b]` timesteps seen
/// (an integer held in the element type), `mean` and `var` `[b, g]` (population variance).
/// All zero is a fresh sequence: with count 0 the mean and variance have no effect.
#[derive(Debug)]
pub struct TsnStats<T> {
    pub count: T,
    pub mean: T,
    pub var: T,
}

impl<T> TsnStats<T> {
    /// Fresh statistics for `b` rows and `g` groups.
    pub fn fresh<B: Backend<Buf = T>>(be: &B, b: usize, g: usize) -> Self {
        TsnStats {
            count: be.zeros(b),
            mean: be.zeros(b * g),
            var: be.zeros(b * g),
        }
    }
}

/// Operations every backend provides. `Buf` is a device buffer of the backend's element type.
///
/// Shapes use these letters: `n` rows, `d`/`c` channels, `b` batch, `t` time, `h` heads,
/// `v` vocabulary. Every op documents which buffers it overwrites (`=`) and which it
/// accumulates into (`+=`).
pub trait Backend: Send + Sync {
    /// A buffer on this backend's device.
    type Buf: Send + Sync;
    /// What [`Backend::mega_attention_forward`] keeps for its backward.
    type MegaAttnSaved: Send + Sync;
    /// The post-RoPE keys and values of each row's current, partially filled attention
    /// chunk (MEGALODON streaming, spec §16.1).
    type ChunkCache: Send + Sync;

    /// Short name for logs (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    // ---- streams ------------------------------------------------------------------------
    /// Runs `side`, whose work may overlap the work issued after `fork` returns until the
    /// next [`Backend::join`]. On the CUDA backend `side`'s operations go to a second stream
    /// that first waits for everything issued before the fork; what `side` returns (and
    /// every buffer it wrote) may be used only after the join, and work issued between fork
    /// and join must not write what `side` reads. The default runs `side` in place: on the
    /// CPU every op has finished when it returns.
    fn fork<R>(&self, side: impl FnOnce() -> R) -> R
    where
        Self: Sized,
    {
        side()
    }
    /// Orders all later work after the work of every [`Backend::fork`] so far. The default
    /// does nothing.
    fn join(&self) {}
    /// Whether work issued between [`Backend::fork`] and [`Backend::join`] can overlap the
    /// forked work, so splitting a step to create that overlap pays (the CUDA backend's two
    /// streams). The default, for backends that compute each op when called, is `false`.
    fn overlaps_streams(&self) -> bool {
        false
    }

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `n` elements.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Copy host f32 data to a new buffer.
    fn upload(&self, host: &[f32]) -> Self::Buf;
    /// Zero-filled buffers of the given lengths, allocated together: a device backend packs
    /// them into one allocation (a model's parameters, gradients, optimizer moments); the
    /// default allocates each with [`Backend::zeros`].
    fn zeros_many(&self, lens: &[usize]) -> Vec<Self::Buf> {
        lens.iter().map(|&n| self.zeros(n)).collect()
    }
    /// Copies of the host slices in new buffers allocated together, as
    /// [`Backend::zeros_many`]; the default uploads each with [`Backend::upload`].
    fn upload_many(&self, hosts: &[&[f32]]) -> Vec<Self::Buf> {
        hosts.iter().map(|h| self.upload(h)).collect()
    }
    /// Copy a buffer back to the host as f32.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Number of elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// `dst = src` (equal lengths).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// `buf = 0`.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// `dst += src` (equal lengths).
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// `buf *= s`.
    fn scale(&self, buf: &mut Self::Buf, s: f32);
    /// `Σ buf²`, accumulated in f64 (for global-norm clipping); deterministic.
    fn sum_squares(&self, buf: &Self::Buf) -> f64;
    /// `Σ buf`, accumulated in f64 (loss reductions); deterministic.
    fn sum(&self, buf: &Self::Buf) -> f64;
    /// `out[i] = src[rows[i]]` for rows of width `d`.
    fn gather_rows(&self, out: &mut Self::Buf, src: &Self::Buf, rows: &[u32], d: usize);
    /// `dst[rows[i]] = src[i]` for rows of width `d`.
    fn scatter_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, rows: &[u32], d: usize);

    // ---- dense ----------------------------------------------------------------------------
    /// `out[m,n] (= or +=) op(a)[m,k] · op(b)[k,n]` where `op(a)` is `a` stored `[m,k]`, or
    /// `aᵀ` of `a` stored `[k,m]` when `trans_a`; likewise for `b`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    );
    /// `out[i,j] += bias[j]` for `out` of shape `[n, d]`.
    fn add_bias(&self, out: &mut Self::Buf, bias: &Self::Buf, n: usize, d: usize);
    /// `dbias[j] += Σ_i dout[i,j]`.
    fn bias_backward(&self, dbias: &mut Self::Buf, dout: &Self::Buf, n: usize, d: usize);

    // ---- normalization --------------------------------------------------------------------
    /// LayerNorm over the last dim: `out = (x-μ)·rstd·w + b`, `rstd = 1/√(var + eps)`; saves
    /// `mean`, `rstd` `[n]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        n: usize,
        d: usize,
        eps: f32,
    );
    /// `dx += …`, `dw += …`, `db += …`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        d: usize,
    );
    /// RMSNorm over the last dim: `out = x·rstd·w`, `rstd = 1/√(mean(x²)+eps)`; saves `rstd` `[n]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        d: usize,
        eps: f32,
    );
    /// `dx += …`, `dw += …`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        d: usize,
    );

    // ---- pointwise ------------------------------------------------------------------------
    /// `out = act(x)` elementwise.
    fn activation_forward(&self, act: Activation, out: &mut Self::Buf, x: &Self::Buf);
    /// `dx += act'(x) · dout`.
    fn activation_backward(
        &self,
        act: Activation,
        dx: &mut Self::Buf,
        x: &Self::Buf,
        dout: &Self::Buf,
    );
    /// `out = a ⊙ b` elementwise (equal lengths).
    fn mul(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf);
    /// `out = x + s` elementwise (MEGALODON's plus-one norm scales: stored `w`, applied `w + 1`).
    fn add_scalar(&self, out: &mut Self::Buf, x: &Self::Buf, s: f32);
    /// SwiGLU: `x` is `[n, 2h]` holding `[a | g]` per row; `out[n,h] = silu(a) ⊙ g`.
    fn swiglu_forward(&self, out: &mut Self::Buf, x: &Self::Buf, n: usize, h: usize);
    /// `dx += …` for the `[n, 2h]` input.
    fn swiglu_backward(
        &self,
        dx: &mut Self::Buf,
        x: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
        h: usize,
    );

    // ---- attention ------------------------------------------------------------------------
    /// Causal multi-head attention, training form. `qkv` is `[b, t, 3c]` with per row
    /// `[q | k | v]`, head `i` occupying channels `i·c/h .. (i+1)·c/h` of each part.
    /// `out = [b, t, c]`; `att = [b, h, t, t]` receives the softmax probabilities (entries
    /// above the diagonal are 0) for the backward pass. Scores are scaled by `scale`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        att: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    );
    /// `dqkv += …` given `dout` and the saved `att`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        att: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    );
    /// Decode form over a paged KV cache: one query per row. `qkv` is `[b, 3c]` (only the
    /// `q` part is read). `k_cache`, `v_cache` are pools of `c`-wide entries grouped in blocks
    /// of `block_size`, `[n_blocks, block_size, c]`; `block_table` is `[b, max_blocks]`
    /// (row-major, `max_blocks = block_table.len() / b`) and row `r`'s position `p` lives at
    /// entry `block_table[r·max_blocks + p / block_size]·block_size + p % block_size`. Row `r`
    /// attends to its positions `0..lens[r]` (the caller has already appended this step's key
    /// and value); table entries past a row's last needed block are ignored. Rows may share
    /// blocks. A contiguous `[b, t_max, c]` cache is the case `block_size = t_max`,
    /// `block_table = [0, 1, …, b−1]`. `out = [b, c]`. The result for a row does not depend on
    /// the other rows, the block size or where its blocks sit in the pool.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        lens: &[u32],
        block_table: &[u32],
        block_size: usize,
        c: usize,
        h: usize,
        scale: f32,
    );
    /// Append keys and values: for row `r` of `qkv` (`[n, 3c]`), copy its `k` and `v` parts
    /// into entry `entries[r]` of the caches, viewed as flat lists of `c`-wide entries (for the
    /// paged pools of [`Backend::attention_decode`], entry `block·block_size + offset`).
    fn kv_append(
        &self,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        qkv: &Self::Buf,
        entries: &[u32],
        c: usize,
    );

    // ---- MEGALODON (spec megalodon.md) ------------------------------------------------------
    /// TimestepNorm (§5) over a call of `l` tokens: `x`, `y` `[b, l, d]`, `d` channels in `g`
    /// groups; statistics cover every timestep so far, including those behind `state_in`
    /// (`None`: a fresh sequence). Plus-one scale: `y = x̂·(w + 1) + bias`. Writes `y` and, for
    /// the backward, the cumulative `saved_mean`, `saved_rstd` `[b, l, g]`; `state_out`, when
    /// given, receives the statistics after the last token (it must not be `state_in`).
    #[allow(clippy::too_many_arguments)]
    fn timestep_norm_forward(
        &self,
        y: &mut Self::Buf,
        saved_mean: &mut Self::Buf,
        saved_rstd: &mut Self::Buf,
        state_out: Option<&mut TsnStats<Self::Buf>>,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: &Self::Buf,
        state_in: Option<&TsnStats<Self::Buf>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
        eps: f32,
    );
    /// Backward of [`Backend::timestep_norm_forward`]: `dx =` (overwritten), `dw +=`, `db +=`.
    /// `dstate_out` is the gradient arriving at the returned `(mean, var)` (zero when `None`);
    /// `dstate_in`, when given, is overwritten with the gradient of the carried-in
    /// `(mean, var)`. `state_in` must be the state the forward started from.
    #[allow(clippy::too_many_arguments)]
    fn timestep_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dstate_in: Option<(&mut Self::Buf, &mut Self::Buf)>,
        dy: &Self::Buf,
        dstate_out: Option<(&Self::Buf, &Self::Buf)>,
        x: &Self::Buf,
        w: &Self::Buf,
        saved_mean: &Self::Buf,
        saved_rstd: &Self::Buf,
        state_in: Option<&TsnStats<Self::Buf>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
    );
    /// One token per row (`x`, `y` `[b, d]`), merged into `state` in place: the decoding form
    /// of [`Backend::timestep_norm_forward`].
    #[allow(clippy::too_many_arguments)]
    fn timestep_norm_step(
        &self,
        y: &mut Self::Buf,
        state: &mut TsnStats<Self::Buf>,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: &Self::Buf,
        b: usize,
        d: usize,
        g: usize,
        eps: f32,
    );
    /// CEMA (§4) over a call of `l` tokens: `y = CEMA(x)`, `x`, `y` `[b, l, d]`, expansion `n`,
    /// starting from the complex state `h0` `[b, d, n, 2]` (zero when `None`); `h_out`, when
    /// given, receives the state after the last token (it must not be `h0`).
    #[allow(clippy::too_many_arguments)]
    fn cema_forward(
        &self,
        y: &mut Self::Buf,
        h_out: Option<&mut Self::Buf>,
        x: &Self::Buf,
        p: &CemaWeights<Self::Buf>,
        h0: Option<&Self::Buf>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    );
    /// Backward of [`Backend::cema_forward`]: `dx =` (overwritten), parameter gradients `+=`;
    /// `dh0`, when given, is overwritten with the gradient of the carried-in state; `dh_out`
    /// is the gradient arriving at `h_out` (zero when `None`).
    #[allow(clippy::too_many_arguments)]
    fn cema_backward(
        &self,
        dx: &mut Self::Buf,
        g: &mut CemaWeightGrads<Self::Buf>,
        dh0: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        dh_out: Option<&Self::Buf>,
        x: &Self::Buf,
        p: &CemaWeights<Self::Buf>,
        h0: Option<&Self::Buf>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    );
    /// One token per row (`x`, `y` `[b, d]`), advancing `h` `[b, d, n, 2]` in place.
    #[allow(clippy::too_many_arguments)]
    fn cema_step(
        &self,
        y: &mut Self::Buf,
        h: &mut Self::Buf,
        x: &Self::Buf,
        p: &CemaWeights<Self::Buf>,
        b: usize,
        d: usize,
        n: usize,
    );
    /// Buffers for what [`Backend::mega_attention_forward`] saves at shape `s`.
    fn mega_attention_saved(&self, s: &MegaAttnShape) -> Self::MegaAttnSaved;
    /// MEGALODON's normalized chunk-local attention (§6) over whole sequences from chunk
    /// position 0: per-head RMSNorm of `z` `[b, l, H·dz]`, `Q, K = Ẑ·(γ[0|1]+1)/√dz + β[0|1]`
    /// (`gamma`, `beta` `[2, H·dz]`), RoPE at positions inside each chunk of `s.chunk` tokens,
    /// causal softmax within chunks without temperature, times `v` `[b, l, H·dv]`.
    /// Writes `out` `[b, l, H·dv]` and `saved`. The last chunk may be partial.
    #[allow(clippy::too_many_arguments)]
    fn mega_attention_forward(
        &self,
        out: &mut Self::Buf,
        saved: &mut Self::MegaAttnSaved,
        z: &Self::Buf,
        v: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        s: &MegaAttnShape,
    );
    /// Backward of [`Backend::mega_attention_forward`]: `dz =`, `dv =` (overwritten),
    /// `dgamma +=`, `dbeta +=`.
    #[allow(clippy::too_many_arguments)]
    fn mega_attention_backward(
        &self,
        dz: &mut Self::Buf,
        dv: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dout: &Self::Buf,
        z: &Self::Buf,
        v: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        saved: &Self::MegaAttnSaved,
        s: &MegaAttnShape,
    );
    /// An empty chunk cache for `b` rows (every row at chunk position 0).
    fn chunk_cache(
        &self,
        b: usize,
        heads: usize,
        dz: usize,
        dv: usize,
        chunk: usize,
    ) -> Self::ChunkCache;
    /// Copy row `src_row` of `src` (its keys, values and chunk position) into row `dst_row`
    /// of `dst`; both caches have the same heads, widths and chunk size.
    fn chunk_cache_copy_row(
        &self,
        dst: &mut Self::ChunkCache,
        dst_row: usize,
        src: &Self::ChunkCache,
        src_row: usize,
    );
    /// Streaming form of [`Backend::mega_attention_forward`]: `s.l` new tokens per row
    /// continue each row's partial chunk in `cache` (RoPE positions and causal keys follow
    /// on from the cached ones); a row's cache empties when its chunk fills. Writes `out`
    /// `[b, s.l, H·dv]`. Errors, before writing anything, when a row's call breaks the chunk
    /// rules of spec §16.2 (it straddles a chunk boundary, or starts at one with a length
    /// that is neither below the chunk size nor a multiple of it).
    #[allow(clippy::too_many_arguments)]
    fn mega_attention_forward_cached(
        &self,
        out: &mut Self::Buf,
        cache: &mut Self::ChunkCache,
        z: &Self::Buf,
        v: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        s: &MegaAttnShape,
    ) -> Result<(), ChunkCallError>;

    // ---- embeddings -----------------------------------------------------------------------
    /// `out[i] (= or +=) table[ids[i]]` for rows of width `d`.
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &[u32],
        d: usize,
        accumulate: bool,
    );
    /// `dtable[ids[i]] += dout[i]` (scatter-add, deterministic order).
    fn embedding_backward(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &[u32], d: usize);
    /// MEGABYTE patch embedder (spec/megabyte.md §2.1, one row per global position):
    /// `out[r, q·dg..(q+1)·dg] = ids[r·p+q] == PAD_ID ? pad[q] : tok[ids[r·p+q]] + pos[positions[r·p+q]]`.
    /// `out` is `[rows, p·dg]`, `pad` is `[p, dg]`.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed_forward(
        &self,
        out: &mut Self::Buf,
        tok: &Self::Buf,
        pos: &Self::Buf,
        pad: &Self::Buf,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    );
    /// Scatter-add the gradient of [`Backend::patch_embed_forward`] into `dtok`, `dpos`, `dpad`.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed_backward(
        &self,
        dtok: &mut Self::Buf,
        dpos: &mut Self::Buf,
        dpad: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    );
    /// MEGABYTE local input (spec §2.3), accumulated onto the projected global output:
    /// `out[i] += (ids[i] == PAD_ID ? pad : tok[ids[i]]) + pos[slots[i]]`, rows of width `d`.
    #[allow(clippy::too_many_arguments)]
    fn local_embed_forward(
        &self,
        out: &mut Self::Buf,
        tok: &Self::Buf,
        pos: &Self::Buf,
        pad: &Self::Buf,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    );
    /// Scatter-add the gradient of [`Backend::local_embed_forward`].
    #[allow(clippy::too_many_arguments)]
    fn local_embed_backward(
        &self,
        dtok: &mut Self::Buf,
        dpos: &mut Self::Buf,
        dpad: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    );

    // ---- loss -----------------------------------------------------------------------------
    /// Softmax cross-entropy per row: `losses[i] = logsumexp(logits[i]) − logits[i, targets[i]]`
    /// (nats), `logits` `[n, v]`, `losses` `[n]`.
    fn cross_entropy_forward(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[u32],
        v: usize,
    );
    /// `dlogits = (softmax(logits) − onehot(targets)) · dloss` (overwrites; `dloss` is the
    /// same for every row, e.g. `1/n` for a mean).
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[u32],
        v: usize,
        dloss: f32,
    );
    /// Row-wise log-softmax into `out` (sampling and log-probs).
    fn log_softmax(&self, out: &mut Self::Buf, logits: &Self::Buf, v: usize);

    // ---- optimizer ------------------------------------------------------------------------
    /// One AdamW update of `param` given `grad`, updating the moments `m`, `v` in place.
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: &AdamW,
    );
}
