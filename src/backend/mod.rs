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
//! - A linear layer's weight is stored `[in, out]` so `y = x · W + b`.
//! - Backward ops *accumulate* into gradient buffers (`+=`), so a parameter used twice
//!   (the tied MEGABYTE byte table) simply receives both contributions. Callers zero
//!   gradients once per step.
//! - Index arrays (byte ids, positions, row lists) are host slices: they are tiny, and a
//!   device backend uploads them as part of the launch.

pub mod cpu;

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

/// Operations every backend provides. `Buf` is a device buffer of the backend's element type.
///
/// Shapes use these letters: `n` rows, `d`/`c` channels, `b` batch, `t` time, `h` heads,
/// `v` vocabulary. Every op documents which buffers it overwrites (`=`) and which it
/// accumulates into (`+=`).
pub trait Backend: Send + Sync {
    /// A buffer on this backend's device.
    type Buf: Send + Sync;

    /// Short name for logs (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `n` elements.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Copy host f32 data to a new buffer.
    fn upload(&self, host: &[f32]) -> Self::Buf;
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
    /// LayerNorm over the last dim (eps 1e-5): `out = (x-μ)·rstd·w + b`; saves `mean`, `rstd` `[n]`.
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
    /// RMSNorm over the last dim (eps 1e-6): `out = x·rstd·w`, `rstd = 1/√(mean(x²)+eps)`; saves `rstd` `[n]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        d: usize,
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
    /// Decode form: one query per row. `qkv` is `[b, 3c]` (only the `q` part is read);
    /// `k_cache`, `v_cache` are `[b, t_max, c]`; row `r` attends to its first `lens[r]` keys
    /// (the caller has already appended this step's key and value). `out = [b, c]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        lens: &[u32],
        t_max: usize,
        c: usize,
        h: usize,
        scale: f32,
    );
    /// Append keys and values: for row `r` of `qkv` (`[n, 3c]`), copy its `k` and `v` parts
    /// into entry `entries[r]` of the caches, viewed as flat lists of `c`-wide entries (for a
    /// `[rows, t_max, c]` cache, entry `row·t_max + position`).
    fn kv_append(
        &self,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        qkv: &Self::Buf,
        entries: &[u32],
        c: usize,
    );

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
