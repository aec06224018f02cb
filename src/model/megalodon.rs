//! MEGALODON (spec `megalodon.md` §2–§8, docs/megalodon-model.md), as the official code
//! computes it: per layer
//!
//! ```text
//! Xn = TimestepNorm(X)                 M = RMSNorm(CEMA(Xn))·(w+1)
//! Z  = M·W_zᵀ + b_z                    V = SiLU(Xn·W_vᵀ + b_v)        R = SiLU(M·W_rᵀ + b_r)
//! O  = ChunkedNormalizedAttention(Z, V)                                 (per-head RMSNorm, γ/β, RoPE)
//! Ŷ  = X + M·W_h1ᵀ + b_h1 + (O ⊙ R)·W_h2ᵀ
//! U  = LayerNorm(Ŷ)·(w+1) + b          out = X + W_2·(SiLU(W_1 U) ⊙ W_3 U)   (two-hop residual)
//! ```
//!
//! then a final TimestepNorm and the head (`output.output.weight`, or the embedding when
//! `share_emb`). Parameters carry the official state-dict names and shapes; linear weights are
//! `(out, in)` and multiply with `trans_b`. Every forward op is paired with its backward; a
//! layer's forward saves a few tensors ([`LayerSaved`]) and the backward recomputes the rest
//! into buffers shared by every layer ([`LayerScratch`]). The streaming form of the
//! same layer (carried TimestepNorm, CEMA and chunk-cache state) is in
//! [`crate::infer::megalodon_stream`].

use super::language_model::{Decoder, LanguageModel, ModelShape};
use super::params::{many_mut, Init, ParamLayout};
use crate::backend::{Activation, Backend, CemaWeightGrads, CemaWeights, MegaAttnShape, TsnStats};
use crate::config::MegalodonConfig;
use crate::infer::megalodon_stream::{LayerState, MegalodonStream};

/// Parameter indices of one layer (official names in [`Megalodon::new`]).
#[derive(Clone, Debug)]
pub(crate) struct LayerParams {
    tn_w: usize,
    tn_b: usize,
    alpha: usize,
    delta: usize,
    theta: usize,
    cema_gamma: usize,
    omega: usize,
    rms_w: usize,
    wz_w: usize,
    wz_b: usize,
    wv_w: usize,
    wv_b: usize,
    wr_w: usize,
    wr_b: usize,
    wh1_w: usize,
    wh1_b: usize,
    wh2_w: usize,
    qk_gamma: usize,
    qk_beta: usize,
    ln_w: usize,
    ln_b: usize,
    fc1: usize,
    /// SwiGLU's linear branch; `None` without SwiGLU.
    fc3: Option<usize>,
    fc2: usize,
}

/// A MEGALODON model's structure: config, parameter layout and where each tensor lives.
/// Parameter *values* live in backend buffers owned by the caller, ordered as `layout`.
#[derive(Clone, Debug)]
pub struct Megalodon {
    pub cfg: MegalodonConfig,
    pub layout: ParamLayout,
    layers: Vec<LayerParams>,
    embed: usize,
    final_w: usize,
    final_b: usize,
    /// The head's weight: `output.output.weight`, or `embed` when tied.
    head: usize,
}

/// What one layer's forward keeps for its backward, for `b` rows of `l` tokens (the layer's
/// input is kept by the caller as the previous layer's output). Everything else the backward
/// reads is recomputed from these, the input and the parameters: the normalized input and
/// its statistics, `M`, the SiLU outputs, the attention output `O`, the gate product, `U`
/// and the FFN hidden (docs/megalodon-model.md, "Training memory").
pub(crate) struct LayerSaved<B: Backend> {
    /// `Xc = CEMA(Xn)` `[n, d]`, the RMSNorm input.
    xc: B::Buf,
    /// `Z` `[n, z]`.
    z: B::Buf,
    /// Pre-activations of `V` and of the gate `R` `[n, v]`.
    vpre: B::Buf,
    rpre: B::Buf,
    /// `Ŷ` `[n, d]`, the LayerNorm input.
    yhat: B::Buf,
    /// `F1 = U·W_1ᵀ` `[n, f]`, and SwiGLU's linear branch `F3 = U·W_3ᵀ` (`None` without).
    f1: B::Buf,
    f3: Option<B::Buf>,
}

/// Temporaries of one layer call, shared by every layer of a model: the forward's
/// intermediates that are not saved, and the backward's recomputed activations and
/// gradients. Buffers are reused by liveness (see the forward and backward for who holds
/// which when).
pub(crate) struct LayerScratch<B: Backend> {
    /// `[n, d]` buffers.
    dbuf: [B::Buf; 3],
    /// `[n, v]` buffers.
    vbuf: [B::Buf; 4],
    /// `[n, f]` buffers, or `None` when `f = v` and the FFN borrows `vbuf` (its phase never
    /// overlaps the attention's).
    fbuf: Option<[B::Buf; 3]>,
    /// `[n, z]`: the attention's `dZ`.
    dz: B::Buf,
    /// TimestepNorm statistics `[n, g]`.
    tn_mean: B::Buf,
    tn_rstd: B::Buf,
    /// RMSNorm and LayerNorm statistics `[n]`.
    rms_rstd: B::Buf,
    ln_mean: B::Buf,
    ln_rstd: B::Buf,
    /// Plus-one scales `[d]`.
    rms_w1: B::Buf,
    ln_w1: B::Buf,
}

/// A streaming call's saved tensors and scratch (one set serves every layer).
pub(crate) struct LayerActs<B: Backend> {
    saved: LayerSaved<B>,
    scratch: LayerScratch<B>,
}

/// Where a layer's sequence state comes from.
pub(crate) enum Carry<'s, B: Backend> {
    /// A whole sequence from a fresh state; the attention records its call for backward.
    Fresh(&'s mut B::MegaAttnSaved),
    /// A streaming call continuing (and updating) a layer's carried state.
    Stream(&'s mut LayerState<B>),
}

/// Backward buffers that live across layers.
struct Grads<B: Backend> {
    d_logits: B::Buf,
    /// dL/d(current layer's output), walked down the stack.
    d_resid: B::Buf,
}

/// Activations of one full forward (and the buffers of its backward) for `b` rows of `t`
/// input tokens, reused across steps.
pub struct Workspace<B: Backend> {
    pub b: usize,
    pub t: usize,
    ids: Vec<u32>,
    targets: Vec<u32>,
    /// Layer inputs: `resid[i]` enters layer `i`, `resid[L]` the final norm.
    resid: Vec<B::Buf>,
    /// One per layer for training; a single one, overwritten by every layer, for inference.
    saved: Vec<LayerSaved<B>>,
    attn: Vec<B::MegaAttnSaved>,
    /// Shared by every layer; after a forward `dbuf[0]` holds the final norm's output and
    /// `tn_mean`/`tn_rstd` its statistics, which the head's backward reads.
    scratch: LayerScratch<B>,
    /// `[b·t, 256]` logits of the last forward (row `i·t + j` predicts byte `j + 1`).
    pub logits: B::Buf,
    /// `[b·t]` per-byte losses (nats) of the last [`LanguageModel::forward`].
    pub losses: B::Buf,
    grads: Option<Grads<B>>,
}

/// `y (= or +=) x·Wᵀ (+ bias)` for `x` `[rows, din]` and `W` `(dout, din)`.
#[allow(clippy::too_many_arguments)]
fn linear<B: Backend>(
    be: &B,
    y: &mut B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    bias: Option<&B::Buf>,
    rows: usize,
    din: usize,
    dout: usize,
    accumulate: bool,
) {
    be.matmul(y, x, w, rows, din, dout, false, true, accumulate);
    if let Some(bias) = bias {
        be.add_bias(y, bias, rows, dout);
    }
}

/// Backward of [`linear`]: `g[w] += dyᵀ·x`, `g[bias] += Σ dy`, and `dx (= or +=) dy·W` when
/// `dx = Some((buffer, accumulate))`.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backend>(
    be: &B,
    p: &[B::Buf],
    g: &mut [B::Buf],
    w: usize,
    bias: Option<usize>,
    dx: Option<(&mut B::Buf, bool)>,
    dy: &B::Buf,
    x: &B::Buf,
    rows: usize,
    din: usize,
    dout: usize,
) {
    be.matmul(&mut g[w], dy, x, dout, rows, din, true, false, true);
    if let Some(bias) = bias {
        be.bias_backward(&mut g[bias], dy, rows, dout);
    }
    if let Some((dx, accumulate)) = dx {
        be.matmul(dx, dy, &p[w], rows, dout, din, false, false, accumulate);
    }
}

impl<B: Backend> LayerSaved<B> {
    fn new(be: &B, c: &MegalodonConfig, n: usize) -> Self {
        let (d, z, v, f) = (c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim);
        LayerSaved {
            xc: be.zeros(n * d),
            z: be.zeros(n * z),
            vpre: be.zeros(n * v),
            rpre: be.zeros(n * v),
            yhat: be.zeros(n * d),
            f1: be.zeros(n * f),
            f3: c.swiglu.then(|| be.zeros(n * f)),
        }
    }
}

impl<B: Backend> LayerScratch<B> {
    fn new(be: &B, c: &MegalodonConfig, n: usize) -> Self {
        let (d, z, v, f, g) = (
            c.model_dim,
            c.z_dim,
            c.value_dim,
            c.ffn_hidden_dim,
            c.norm_num_groups,
        );
        LayerScratch {
            dbuf: std::array::from_fn(|_| be.zeros(n * d)),
            vbuf: std::array::from_fn(|_| be.zeros(n * v)),
            fbuf: (f != v).then(|| std::array::from_fn(|_| be.zeros(n * f))),
            dz: be.zeros(n * z),
            tn_mean: be.zeros(n * g),
            tn_rstd: be.zeros(n * g),
            rms_rstd: be.zeros(n),
            ln_mean: be.zeros(n),
            ln_rstd: be.zeros(n),
            rms_w1: be.zeros(d),
            ln_w1: be.zeros(d),
        }
    }
}

/// The three `[n, f]` buffers: `fbuf`, or the first three of `vbuf` when `f = v`.
fn ffn_bufs<'s, B: Backend>(
    fbuf: &'s mut Option<[B::Buf; 3]>,
    vbuf: &'s mut [B::Buf; 4],
) -> [&'s mut B::Buf; 3] {
    match fbuf {
        Some(f) => f.each_mut(),
        None => {
            let [a, b, c, _] = vbuf.each_mut();
            [a, b, c]
        }
    }
}

impl<B: Backend> LayerActs<B> {
    pub(crate) fn new(be: &B, c: &MegalodonConfig, b: usize, l: usize) -> Self {
        LayerActs {
            saved: LayerSaved::new(be, c, b * l),
            scratch: LayerScratch::new(be, c, b * l),
        }
    }
}

impl Megalodon {
    /// Declare every parameter for `cfg` under the official names, in the official order.
    /// The config is not validated here (so parameter counts can be taken for any
    /// vocabulary); the trainer and the CLI validate it first.
    pub fn new(cfg: &MegalodonConfig) -> Self {
        let mut layout = ParamLayout::default();
        let (v, d, z, vd, n, f) = (
            cfg.vocab_size,
            cfg.model_dim,
            cfg.z_dim,
            cfg.value_dim,
            cfg.cema_ndim,
            cfg.ffn_hidden_dim,
        );
        // "he" init of the official code: kaiming_normal_(a=√5) = Normal(0, 1/(3·fan_in)).
        let he = |fan_in: usize| Init::Normal((1.0 / (3.0 * fan_in as f64)).sqrt() as f32);
        let table = Init::TruncNormalCut {
            std: (1.0 / (d as f64).sqrt()) as f32,
            cut: 3.0,
        };
        let embed = layout.add("embed.weight", &[v, d], table);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let m = format!("layers.{i}.mega");
                let ffn = format!("layers.{i}.nffn");
                let mut add = |name: String, shape: &[usize], init| layout.add(name, shape, init);
                LayerParams {
                    tn_w: add(format!("{m}.timenorm.weight"), &[d], Init::Zeros),
                    tn_b: add(format!("{m}.timenorm.bias"), &[d], Init::Zeros),
                    alpha: add(format!("{m}.cema.alpha"), &[d, n, 1], Init::Normal(0.2)),
                    delta: add(format!("{m}.cema.delta"), &[d, n, 1], Init::Normal(0.2)),
                    theta: add(format!("{m}.cema.theta"), &[d, 1, 1], Init::CemaTheta),
                    cema_gamma: add(
                        format!("{m}.cema.gamma"),
                        &[d, n, 2],
                        Init::RealPartNormal(1.0),
                    ),
                    omega: add(
                        format!("{m}.cema.omega"),
                        &[d, 1],
                        Init::TruncNormalCut {
                            std: 0.25,
                            cut: 4.0,
                        },
                    ),
                    rms_w: add(format!("{m}.rmsnorm.weight"), &[d], Init::Zeros),
                    wz_w: add(format!("{m}.wz.weight"), &[z, d], he(d)),
                    wz_b: add(format!("{m}.wz.bias"), &[z], Init::Zeros),
                    wv_w: add(format!("{m}.wv.weight"), &[vd, d], he(d)),
                    wv_b: add(format!("{m}.wv.bias"), &[vd], Init::Zeros),
                    wr_w: add(format!("{m}.wr.weight"), &[vd, d], he(d)),
                    wr_b: add(format!("{m}.wr.bias"), &[vd], Init::Zeros),
                    wh1_w: add(format!("{m}.wh1.weight"), &[d, d], he(d)),
                    wh1_b: add(format!("{m}.wh1.bias"), &[d], Init::Zeros),
                    wh2_w: add(format!("{m}.wh2.weight"), &[d, vd], he(vd)),
                    qk_gamma: add(format!("{m}.gamma"), &[2, z], Init::Zeros),
                    qk_beta: add(format!("{m}.beta"), &[2, z], Init::Zeros),
                    ln_w: add(format!("{ffn}.norm.weight"), &[d], Init::Zeros),
                    ln_b: add(format!("{ffn}.norm.bias"), &[d], Init::Zeros),
                    fc1: add(format!("{ffn}.fc1.weight"), &[f, d], he(d)),
                    fc3: cfg
                        .swiglu
                        .then(|| add(format!("{ffn}.fc3.weight"), &[f, d], he(d))),
                    fc2: add(format!("{ffn}.fc2.weight"), &[d, f], he(f)),
                }
            })
            .collect();
        let final_w = layout.add("output.final_norm.weight", &[d], Init::Zeros);
        let final_b = layout.add("output.final_norm.bias", &[d], Init::Zeros);
        let head = if cfg.share_emb {
            embed
        } else {
            layout.add("output.output.weight", &[v, d], table)
        };
        Megalodon {
            cfg: cfg.clone(),
            layout,
            layers,
            embed,
            final_w,
            final_b,
            head,
        }
    }

    /// Parameter indices of every layer.
    pub(crate) fn layer_params(&self) -> &[LayerParams] {
        &self.layers
    }

    /// Forward FLOPs per byte (2 per multiply-add) for a sequence of whole chunks: the
    /// matmuls, the in-chunk attention (a query at chunk position i sees i + 1 keys), CEMA's
    /// complex recurrence (about 8 real FLOPs per state element) and the head. Training
    /// costs about 3× this.
    pub fn forward_flops_per_byte(&self) -> f64 {
        let c = &self.cfg;
        let (d, z, v, f, n) = (
            c.model_dim as f64,
            c.z_dim as f64,
            c.value_dim as f64,
            c.ffn_hidden_dim as f64,
            c.cema_ndim as f64,
        );
        let ffn_mats = if c.swiglu { 3.0 } else { 2.0 };
        let mats = d * z + 2.0 * d * v + d * d + v * d + ffn_mats * d * f;
        let keys = (c.chunk_size as f64 + 1.0) / 2.0;
        let attn = keys * (z + v);
        let cema = 4.0 * d * n;
        c.num_layers as f64 * 2.0 * (mats + attn + cema) + 2.0 * d * c.vocab_size as f64
    }

    /// The attention call shape for `b` rows of `l` tokens.
    pub(crate) fn attn_shape(&self, b: usize, l: usize) -> MegaAttnShape {
        let c = &self.cfg;
        MegaAttnShape {
            b,
            l,
            heads: c.num_heads,
            dz: c.head_z(),
            dv: c.head_v(),
            chunk: c.chunk_size,
            rope_base: c.rope_base,
            eps: c.norm_eps,
        }
    }

    fn cema_weights<'p, B: Backend>(
        &self,
        p: &'p [B::Buf],
        lp: &LayerParams,
    ) -> CemaWeights<'p, B::Buf> {
        CemaWeights {
            alpha: &p[lp.alpha],
            delta: &p[lp.delta],
            theta: &p[lp.theta],
            gamma: &p[lp.cema_gamma],
            omega: &p[lp.omega],
        }
    }

    /// `out = X0 = Embed[ids]` (× √D when `scale_emb`).
    pub(crate) fn embed<B: Backend>(&self, be: &B, p: &[B::Buf], out: &mut B::Buf, ids: &[u32]) {
        be.embedding_forward(out, &p[self.embed], ids, self.cfg.model_dim, false);
        if self.cfg.scale_emb {
            be.scale(out, (self.cfg.model_dim as f32).sqrt());
        }
    }

    /// `logits = Hn · W_headᵀ` for `rows` rows.
    pub(crate) fn head<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        logits: &mut B::Buf,
        hn: &B::Buf,
        rows: usize,
    ) {
        let c = &self.cfg;
        be.matmul(
            logits,
            hn,
            &p[self.head],
            rows,
            c.model_dim,
            c.vocab_size,
            false,
            true,
            false,
        );
    }

    /// The final TimestepNorm's weight and bias.
    pub(crate) fn final_norm<'p, B: Backend>(&self, p: &'p [B::Buf]) -> (&'p B::Buf, &'p B::Buf) {
        (&p[self.final_w], &p[self.final_b])
    }

    /// One layer over `b` rows of `l` tokens: `out = Layer(x)`, with `a` as its buffers.
    /// With [`Carry::Stream`] the TimestepNorm, CEMA and attention continue (and update) the
    /// layer's carried state; the call must then respect the chunk rules of spec §16.2.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        lp: &LayerParams,
        a: &mut LayerActs<B>,
        x: &B::Buf,
        out: &mut B::Buf,
        b: usize,
        l: usize,
        carry: Carry<B>,
    ) {
        self.layer_forward_parts(be, p, lp, &mut a.saved, &mut a.scratch, x, out, b, l, carry);
    }

    /// [`Megalodon::layer_forward`] saving into `sv`, with temporaries in `s`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward_parts<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        lp: &LayerParams,
        sv: &mut LayerSaved<B>,
        s: &mut LayerScratch<B>,
        x: &B::Buf,
        out: &mut B::Buf,
        b: usize,
        l: usize,
        mut carry: Carry<B>,
    ) {
        let c = &self.cfg;
        let (d, z, v, f, g, nn) = (
            c.model_dim,
            c.z_dim,
            c.value_dim,
            c.ffn_hidden_dim,
            c.norm_num_groups,
            c.cema_ndim,
        );
        let n = b * l;
        let eps = c.norm_eps as f32;
        let cw = self.cema_weights::<B>(p, lp);
        let (tn_w, tn_b) = (&p[lp.tn_w], &p[lp.tn_b]);
        // Xn, then U once Xn is dead; M.
        let [xn, m, _] = s.dbuf.each_mut();

        // (a) TimestepNorm and CEMA, from a fresh or the carried state. A one-token call
        // takes the step forms; a longer one the call forms, whose new state replaces the old.
        match &mut carry {
            Carry::Fresh(_) => {
                be.timestep_norm_forward(
                    xn,
                    &mut s.tn_mean,
                    &mut s.tn_rstd,
                    None,
                    x,
                    tn_w,
                    tn_b,
                    None,
                    b,
                    l,
                    d,
                    g,
                    eps,
                );
                be.cema_forward(&mut sv.xc, None, xn, &cw, None, b, l, d, nn);
            }
            Carry::Stream(st) if l == 1 => {
                be.timestep_norm_step(xn, &mut st.tsn, x, tn_w, tn_b, b, d, g, eps);
                be.cema_step(&mut sv.xc, &mut st.h, xn, &cw, b, d, nn);
            }
            Carry::Stream(st) => {
                let mut tsn_next = TsnStats::fresh(be, b, g);
                be.timestep_norm_forward(
                    xn,
                    &mut s.tn_mean,
                    &mut s.tn_rstd,
                    Some(&mut tsn_next),
                    x,
                    tn_w,
                    tn_b,
                    Some(&st.tsn),
                    b,
                    l,
                    d,
                    g,
                    eps,
                );
                st.tsn = tsn_next;
                let mut h_next = be.zeros(b * d * nn * 2);
                be.cema_forward(
                    &mut sv.xc,
                    Some(&mut h_next),
                    xn,
                    &cw,
                    Some(&st.h),
                    b,
                    l,
                    d,
                    nn,
                );
                st.h = h_next;
            }
        }

        // Shared representation M, then Z, V (from Xn) and the gate R.
        be.add_scalar(&mut s.rms_w1, &p[lp.rms_w], 1.0);
        be.rmsnorm_forward(m, &mut s.rms_rstd, &sv.xc, &s.rms_w1, n, d, eps);
        let lin = |y: &mut B::Buf, x: &B::Buf, w: usize, bias: Option<usize>, din, dout, acc| {
            linear(be, y, x, &p[w], bias.map(|i| &p[i]), n, din, dout, acc)
        };
        lin(&mut sv.z, m, lp.wz_w, Some(lp.wz_b), d, z, false);
        let [v_act, o, r, _] = s.vbuf.each_mut();
        lin(&mut sv.vpre, xn, lp.wv_w, Some(lp.wv_b), d, v, false);
        be.activation_forward(Activation::Silu, v_act, &sv.vpre);
        lin(&mut sv.rpre, m, lp.wr_w, Some(lp.wr_b), d, v, false);
        be.activation_forward(Activation::Silu, r, &sv.rpre);

        // (b) Attention, gate, output projection and the first residual.
        let shape = self.attn_shape(b, l);
        let (qk_g, qk_b) = (&p[lp.qk_gamma], &p[lp.qk_beta]);
        match carry {
            Carry::Fresh(saved) => {
                be.mega_attention_forward(o, saved, &sv.z, v_act, qk_g, qk_b, &shape)
            }
            Carry::Stream(st) => be
                .mega_attention_forward_cached(o, &mut st.kv, &sv.z, v_act, qk_g, qk_b, &shape)
                .expect("the stream splits calls by the chunk rules"),
        }
        // A = O ⊙ R, into V's buffer (V is dead after the attention).
        let gated = v_act;
        be.mul(gated, o, r);
        be.copy(&mut sv.yhat, x);
        lin(&mut sv.yhat, m, lp.wh1_w, Some(lp.wh1_b), d, d, true);
        lin(&mut sv.yhat, gated, lp.wh2_w, None, v, d, true);

        // (c) FFN with the two-hop residual: out = X + FFN(LN(Ŷ)).
        let u = xn;
        be.add_scalar(&mut s.ln_w1, &p[lp.ln_w], 1.0);
        be.layernorm_forward(
            u,
            &mut s.ln_mean,
            &mut s.ln_rstd,
            &sv.yhat,
            &s.ln_w1,
            &p[lp.ln_b],
            n,
            d,
            eps,
        );
        lin(&mut sv.f1, u, lp.fc1, None, d, f, false);
        let [s1, fh, _] = ffn_bufs::<B>(&mut s.fbuf, &mut s.vbuf);
        match (lp.fc3, sv.f3.as_mut()) {
            (Some(fc3), Some(f3)) => {
                be.activation_forward(Activation::Silu, s1, &sv.f1);
                lin(f3, u, fc3, None, d, f, false);
                be.mul(fh, s1, f3);
            }
            _ => be.activation_forward(Activation::Silu, fh, &sv.f1),
        }
        be.copy(out, x);
        lin(out, fh, lp.fc2, None, f, d, true);
    }

    /// Backward of [`Megalodon::layer_forward`] (fresh state): on entry `d_resid` holds
    /// dL/d`out`, on return dL/d`x`; parameter gradients accumulate into `g`. Recomputes
    /// what the forward did not save (see [`LayerSaved`]) into `s`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        g: &mut [B::Buf],
        lp: &LayerParams,
        sv: &LayerSaved<B>,
        attn: &mut B::MegaAttnSaved,
        x: &B::Buf,
        s: &mut LayerScratch<B>,
        d_resid: &mut B::Buf,
        b: usize,
        l: usize,
    ) {
        let c = &self.cfg;
        let (d, z, v, f, gr, nn) = (
            c.model_dim,
            c.z_dim,
            c.value_dim,
            c.ffn_hidden_dim,
            c.norm_num_groups,
            c.cema_ndim,
        );
        let n = b * l;
        let eps = c.norm_eps as f32;
        let silu = Activation::Silu;
        let lin = |g: &mut [B::Buf],
                   w: usize,
                   bias: Option<usize>,
                   dx: Option<(&mut B::Buf, bool)>,
                   dy: &B::Buf,
                   x: &B::Buf,
                   din: usize,
                   dout: usize| {
            linear_backward(be, p, g, w, bias, dx, dy, x, n, din, dout)
        };
        let [d0, d1, d2] = s.dbuf.each_mut();

        // (c) out = X + Fh·W2ᵀ; Fh = SiLU(F1) ⊙ F3 (or SiLU(F1)); U = LN(Ŷ).
        // Recompute U (d0); dU → d1, dŶ → d2.
        let u = &mut *d0;
        be.add_scalar(&mut s.ln_w1, &p[lp.ln_w], 1.0);
        be.layernorm_forward(
            u,
            &mut s.ln_mean,
            &mut s.ln_rstd,
            &sv.yhat,
            &s.ln_w1,
            &p[lp.ln_b],
            n,
            d,
            eps,
        );
        let d_u = &mut *d1;
        {
            let [f0, f1, f2] = ffn_bufs::<B>(&mut s.fbuf, &mut s.vbuf);
            match (lp.fc3, &sv.f3) {
                (Some(fc3), Some(f3)) => {
                    // f0 = S1 = SiLU(F1), f1 = Fh; dFh → f2; then dF3 → f1, dS1 → f0, dF1 → f2.
                    be.activation_forward(silu, f0, &sv.f1);
                    be.mul(f1, f0, f3);
                    lin(g, lp.fc2, None, Some((&mut *f2, false)), d_resid, f1, f, d);
                    be.mul(f1, f2, f0);
                    be.mul(f0, f2, f3);
                    be.fill_zero(f2);
                    be.activation_backward(silu, f2, &sv.f1, f0);
                    lin(g, lp.fc1, None, Some((&mut *d_u, false)), f2, u, d, f);
                    lin(g, fc3, None, Some((&mut *d_u, true)), f1, u, d, f);
                }
                _ => {
                    // f1 = Fh = SiLU(F1); dFh → f2; dF1 → f0.
                    be.activation_forward(silu, f1, &sv.f1);
                    lin(g, lp.fc2, None, Some((&mut *f2, false)), d_resid, f1, f, d);
                    be.fill_zero(f0);
                    be.activation_backward(silu, f0, &sv.f1, f2);
                    lin(g, lp.fc1, None, Some((&mut *d_u, false)), f0, u, d, f);
                }
            }
        }
        let d_yhat = &mut *d2;
        be.fill_zero(d_yhat);
        {
            let [dw, db] = many_mut(g, [lp.ln_w, lp.ln_b]);
            be.layernorm_backward(
                d_yhat, dw, db, d_u, &sv.yhat, &s.ln_w1, &s.ln_mean, &s.ln_rstd, n, d,
            );
        }
        be.add_assign(d_resid, d_yhat);

        // (b) Ŷ = X + M·W_h1ᵀ + b_h1 + A·W_h2ᵀ, A = O ⊙ R, R = SiLU(M·W_rᵀ + b_r),
        // O = Attn(Z, V). Recompute M (d0), V, O, R, A; dM → d1.
        let m = &mut *d0;
        be.add_scalar(&mut s.rms_w1, &p[lp.rms_w], 1.0);
        be.rmsnorm_forward(m, &mut s.rms_rstd, &sv.xc, &s.rms_w1, n, d, eps);
        let d_m = &mut *d1;
        let (qk_g, qk_b) = (&p[lp.qk_gamma], &p[lp.qk_beta]);
        let shape = self.attn_shape(b, l);
        let [v0, v1, v2, v3] = s.vbuf.each_mut();
        // v0 = V, v1 = O, v2 = R, v3 = A.
        be.activation_forward(silu, v0, &sv.vpre);
        be.mega_attention_forward(v1, attn, &sv.z, v0, qk_g, qk_b, &shape);
        be.activation_forward(silu, v2, &sv.rpre);
        be.mul(v3, v1, v2);
        lin(
            g,
            lp.wh1_w,
            Some(lp.wh1_b),
            Some((&mut *d_m, false)),
            d_yhat,
            m,
            d,
            d,
        );
        // dA overwrites A once W_h2's gradient has read it.
        be.matmul(&mut g[lp.wh2_w], d_yhat, v3, d, n, v, true, false, true);
        be.matmul(v3, d_yhat, &p[lp.wh2_w], n, d, v, false, false, false);
        // v0 = dR = dA ⊙ O (V is recomputed below), v1 = dO = dA ⊙ R, v2 = dRpre.
        be.mul(v0, v3, v1);
        be.mul(v1, v3, v2);
        be.fill_zero(v2);
        be.activation_backward(silu, v2, &sv.rpre, v0);
        lin(
            g,
            lp.wr_w,
            Some(lp.wr_b),
            Some((&mut *d_m, true)),
            v2,
            m,
            d,
            v,
        );
        // v0 = V again; dV → v3.
        be.activation_forward(silu, v0, &sv.vpre);
        {
            let [dgam, dbeta] = many_mut(g, [lp.qk_gamma, lp.qk_beta]);
            be.mega_attention_backward(
                &mut s.dz, v3, dgam, dbeta, v1, &sv.z, v0, qk_g, qk_b, attn, &shape,
            );
        }
        lin(
            g,
            lp.wz_w,
            Some(lp.wz_b),
            Some((&mut *d_m, true)),
            &s.dz,
            m,
            d,
            z,
        );

        // (a) M = RMSNorm(Xc)·(w+1), Xc = CEMA(Xn), V = SiLU(Xn·W_vᵀ + b_v), Xn = TSN(X).
        // dXc → d2; recompute Xn (d0); dXn → d1; dVpre → v2; dX → d2.
        let d_xc = &mut *d2;
        be.fill_zero(d_xc);
        be.rmsnorm_backward(
            d_xc,
            &mut g[lp.rms_w],
            d_m,
            &sv.xc,
            &s.rms_w1,
            &s.rms_rstd,
            n,
            d,
        );
        let xn = &mut *d0;
        be.timestep_norm_forward(
            xn,
            &mut s.tn_mean,
            &mut s.tn_rstd,
            None,
            x,
            &p[lp.tn_w],
            &p[lp.tn_b],
            None,
            b,
            l,
            d,
            gr,
            eps,
        );
        let d_xn = &mut *d1;
        {
            let [alpha, delta, theta, gamma, omega] =
                many_mut(g, [lp.alpha, lp.delta, lp.theta, lp.cema_gamma, lp.omega]);
            let mut cg = CemaWeightGrads {
                alpha,
                delta,
                theta,
                gamma,
                omega,
            };
            be.cema_backward(
                d_xn,
                &mut cg,
                None,
                d_xc,
                None,
                xn,
                &self.cema_weights::<B>(p, lp),
                None,
                b,
                l,
                d,
                nn,
            );
        }
        be.fill_zero(v2);
        be.activation_backward(silu, v2, &sv.vpre, v3);
        lin(
            g,
            lp.wv_w,
            Some(lp.wv_b),
            Some((&mut *d_xn, true)),
            v2,
            xn,
            d,
            v,
        );
        let d_x = &mut *d2;
        {
            let [dw, db] = many_mut(g, [lp.tn_w, lp.tn_b]);
            be.timestep_norm_backward(
                d_x,
                dw,
                db,
                None,
                d_xn,
                None,
                x,
                &p[lp.tn_w],
                &s.tn_mean,
                &s.tn_rstd,
                None,
                b,
                l,
                d,
                gr,
            );
        }
        be.add_assign(d_resid, d_x);
    }

    /// A workspace for `b` rows of `t` input tokens; `train` adds backward buffers and one
    /// set of saved tensors per layer (inference overwrites a single set). Any `t ≥ 1` works
    /// here (the last chunk may be partial); training lengths are checked by
    /// [`ModelShape::check_seq_len`].
    pub fn workspace<B: Backend>(&self, be: &B, b: usize, t: usize, train: bool) -> Workspace<B> {
        assert!(b > 0 && t > 0, "empty MEGALODON batch ({b} × {t})");
        let c = &self.cfg;
        let n = b * t;
        let layers = c.num_layers;
        let kept = if train { layers } else { 1 };
        Workspace {
            b,
            t,
            ids: Vec::new(),
            targets: Vec::new(),
            resid: (0..=layers).map(|_| be.zeros(n * c.model_dim)).collect(),
            saved: (0..kept).map(|_| LayerSaved::new(be, c, n)).collect(),
            attn: (0..layers)
                .map(|_| be.mega_attention_saved(&self.attn_shape(b, t)))
                .collect(),
            scratch: LayerScratch::new(be, c, n),
            logits: be.zeros(n * c.vocab_size),
            losses: be.zeros(n),
            grads: train.then(|| Grads {
                d_logits: be.zeros(n * c.vocab_size),
                d_resid: be.zeros(n * c.model_dim),
            }),
        }
    }

    /// Full forward over `inputs` (`[ws.b, ws.t]` bytes, each row a fresh sequence): fills
    /// `ws.logits`, where row `i·t + j` is the prediction for the byte after `inputs[i, j]`.
    pub fn forward_inputs<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        ws: &mut Workspace<B>,
        inputs: &[u8],
    ) {
        let c = &self.cfg;
        let (b, t) = (ws.b, ws.t);
        assert_eq!(inputs.len(), b * t, "batch has the wrong number of bytes");
        ws.ids = inputs.iter().map(|&x| x as u32).collect();
        self.embed(be, p, &mut ws.resid[0], &ws.ids);
        let kept = ws.saved.len();
        for (i, lp) in self.layers.iter().enumerate() {
            let (done, rest) = ws.resid.split_at_mut(i + 1);
            self.layer_forward_parts(
                be,
                p,
                lp,
                &mut ws.saved[i.min(kept - 1)],
                &mut ws.scratch,
                &done[i],
                &mut rest[0],
                b,
                t,
                Carry::Fresh(&mut ws.attn[i]),
            );
        }
        let (fw, fb) = self.final_norm::<B>(p);
        let s = &mut ws.scratch;
        let hn = &mut s.dbuf[0];
        be.timestep_norm_forward(
            hn,
            &mut s.tn_mean,
            &mut s.tn_rstd,
            None,
            &ws.resid[c.num_layers],
            fw,
            fb,
            None,
            b,
            t,
            c.model_dim,
            c.norm_num_groups,
            c.norm_eps as f32,
        );
        self.head(be, p, &mut ws.logits, hn, b * t);
    }

    /// Forward over `windows` (`[b, t + 1]`): inputs are each window's first `t` bytes,
    /// targets its last `t`. Returns the mean next-byte cross-entropy in nats.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        ws: &mut Workspace<B>,
        windows: &[u8],
    ) -> f64 {
        let (b, t) = (ws.b, ws.t);
        assert_eq!(
            windows.len(),
            b * (t + 1),
            "batch has the wrong number of bytes"
        );
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for w in windows.chunks_exact(t + 1) {
            inputs.extend_from_slice(&w[..t]);
            targets.extend(w[1..].iter().map(|&x| x as u32));
        }
        self.forward_inputs(be, p, ws, &inputs);
        ws.targets = targets;
        be.cross_entropy_forward(&mut ws.losses, &ws.logits, &ws.targets, self.cfg.vocab_size);
        be.sum(&ws.losses) / (b * t) as f64
    }

    /// Backward of the last [`Megalodon::forward`] on `ws` for the mean loss: accumulates
    /// into `g` (one buffer per parameter).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        g: &mut [B::Buf],
        ws: &mut Workspace<B>,
    ) {
        let c = &self.cfg;
        let (b, t) = (ws.b, ws.t);
        let n = b * t;
        let (d, v) = (c.model_dim, c.vocab_size);
        assert_eq!(
            ws.targets.len(),
            n,
            "backward needs a forward with targets first"
        );
        let gr = ws
            .grads
            .as_mut()
            .expect("workspace was built for inference only");

        be.cross_entropy_backward(&mut gr.d_logits, &ws.logits, &ws.targets, v, 1.0 / n as f32);
        // Head: logits = Hn · W_headᵀ, Hn still in dbuf[0] from the forward. The final
        // norm's input gradient lands in d_resid.
        {
            let s = &mut ws.scratch;
            let [hn, d_x, _] = s.dbuf.each_mut();
            be.matmul(
                &mut g[self.head],
                &gr.d_logits,
                hn,
                v,
                n,
                d,
                true,
                false,
                true,
            );
            be.matmul(
                d_x,
                &gr.d_logits,
                &p[self.head],
                n,
                v,
                d,
                false,
                false,
                false,
            );
            let [dw, db] = many_mut(g, [self.final_w, self.final_b]);
            be.timestep_norm_backward(
                &mut gr.d_resid,
                dw,
                db,
                None,
                d_x,
                None,
                &ws.resid[c.num_layers],
                &p[self.final_w],
                &s.tn_mean,
                &s.tn_rstd,
                None,
                b,
                t,
                d,
                c.norm_num_groups,
            );
        }
        for (i, lp) in self.layers.iter().enumerate().rev() {
            self.layer_backward(
                be,
                p,
                g,
                lp,
                &ws.saved[i],
                &mut ws.attn[i],
                &ws.resid[i],
                &mut ws.scratch,
                &mut gr.d_resid,
                b,
                t,
            );
        }
        if c.scale_emb {
            be.scale(&mut gr.d_resid, (d as f32).sqrt());
        }
        be.embedding_backward(&mut g[self.embed], &gr.d_resid, &ws.ids, d);
    }
}

impl ModelShape for Megalodon {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn window_len(&self, t: usize) -> usize {
        t + 1
    }

    fn check_seq_len(&self, t: usize) -> Result<(), String> {
        let c = self.cfg.chunk_size;
        if t == 0 || (t >= c && t % c != 0) {
            return Err(format!(
                "sequence length {t} must be positive and either shorter than the chunk size {c} or a multiple of it"
            ));
        }
        Ok(())
    }

    /// Eight chunks: the paper's 32K-token training context at chunk 4096.
    fn max_seq_len(&self) -> usize {
        8 * self.cfg.chunk_size
    }

    fn forward_flops_per_byte(&self) -> f64 {
        Megalodon::forward_flops_per_byte(self)
    }

    /// Every tensor, as the official code's plain AdamW does (spec §12); the plus-one
    /// parameterisation makes decay pull the norm scales towards 1.
    fn decays(&self, _i: usize) -> bool {
        true
    }
}

impl<B: Backend> LanguageModel<B> for Megalodon {
    type Workspace = Workspace<B>;

    fn workspace(&self, be: &B, b: usize, t: usize, train: bool) -> Workspace<B> {
        Megalodon::workspace(self, be, b, t, train)
    }

    fn workspace_shape(&self, ws: &Workspace<B>) -> (usize, usize) {
        (ws.b, ws.t)
    }

    fn forward(&self, be: &B, params: &[B::Buf], ws: &mut Workspace<B>, windows: &[u8]) -> f64 {
        Megalodon::forward(self, be, params, ws, windows)
    }

    fn losses<'w>(&self, ws: &'w Workspace<B>) -> &'w B::Buf {
        &ws.losses
    }

    fn logits<'w>(&self, ws: &'w Workspace<B>) -> &'w B::Buf {
        &ws.logits
    }

    fn backward(&self, be: &B, params: &[B::Buf], grads: &mut [B::Buf], ws: &mut Workspace<B>) {
        Megalodon::backward(self, be, params, grads, ws)
    }

    fn decoder<'a>(
        &'a self,
        be: &'a B,
        params: &'a [B::Buf],
        prompts: &[&[u8]],
    ) -> Box<dyn Decoder + 'a> {
        Box::new(MegalodonStream::with_prompts(self, be, params, prompts))
    }
}
