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
//! `(out, in)` and multiply with `trans_b`. Every forward op is paired with its backward, the
//! forward saving exactly what the backward reads ([`LayerActs`]). The streaming form of the
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

/// Everything one layer's forward saves for its backward (and, in streaming, the layer's
/// scratch), for `b` rows of `l` tokens.
pub(crate) struct LayerActs<B: Backend> {
    xn: B::Buf,
    tn_mean: B::Buf,
    tn_rstd: B::Buf,
    xc: B::Buf,
    rms_w1: B::Buf,
    rms_rstd: B::Buf,
    m: B::Buf,
    z: B::Buf,
    vpre: B::Buf,
    v: B::Buf,
    rpre: B::Buf,
    r: B::Buf,
    o: B::Buf,
    a: B::Buf,
    yhat: B::Buf,
    ln_w1: B::Buf,
    ln_mean: B::Buf,
    ln_rstd: B::Buf,
    u: B::Buf,
    f1: B::Buf,
    /// SwiGLU only: `SiLU(f1)` and the linear branch.
    s1: Option<B::Buf>,
    f3: Option<B::Buf>,
    fh: B::Buf,
}

/// Where a layer's sequence state comes from.
pub(crate) enum Carry<'s, B: Backend> {
    /// A whole sequence from a fresh state; the attention saves for backward.
    Fresh(&'s mut B::MegaAttnSaved),
    /// A streaming call continuing (and updating) a layer's carried state.
    Stream(&'s mut LayerState<B>),
}

/// Backward buffers shared by every layer.
struct Scratch<B: Backend> {
    d_logits: B::Buf,
    d_resid: B::Buf,
    d_x: B::Buf,
    d_yhat: B::Buf,
    d_u: B::Buf,
    d_m: B::Buf,
    d_xc: B::Buf,
    d_xn: B::Buf,
    d_fh: B::Buf,
    d_f1: B::Buf,
    d_s1: Option<B::Buf>,
    d_f3: Option<B::Buf>,
    d_a: B::Buf,
    d_o: B::Buf,
    d_r: B::Buf,
    d_rpre: B::Buf,
    d_v: B::Buf,
    d_vpre: B::Buf,
    d_z: B::Buf,
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
    layers: Vec<LayerActs<B>>,
    attn: Vec<B::MegaAttnSaved>,
    fn_mean: B::Buf,
    fn_rstd: B::Buf,
    hn: B::Buf,
    /// `[b·t, 256]` logits of the last forward (row `i·t + j` predicts byte `j + 1`).
    pub logits: B::Buf,
    /// `[b·t]` per-byte losses (nats) of the last [`LanguageModel::forward`].
    pub losses: B::Buf,
    grads: Option<Scratch<B>>,
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

impl<B: Backend> LayerActs<B> {
    pub(crate) fn new(be: &B, c: &MegalodonConfig, b: usize, l: usize) -> Self {
        let n = b * l;
        let (d, z, v, f, g) = (
            c.model_dim,
            c.z_dim,
            c.value_dim,
            c.ffn_hidden_dim,
            c.norm_num_groups,
        );
        LayerActs {
            xn: be.zeros(n * d),
            tn_mean: be.zeros(n * g),
            tn_rstd: be.zeros(n * g),
            xc: be.zeros(n * d),
            rms_w1: be.zeros(d),
            rms_rstd: be.zeros(n),
            m: be.zeros(n * d),
            z: be.zeros(n * z),
            vpre: be.zeros(n * v),
            v: be.zeros(n * v),
            rpre: be.zeros(n * v),
            r: be.zeros(n * v),
            o: be.zeros(n * v),
            a: be.zeros(n * v),
            yhat: be.zeros(n * d),
            ln_w1: be.zeros(d),
            ln_mean: be.zeros(n),
            ln_rstd: be.zeros(n),
            u: be.zeros(n * d),
            f1: be.zeros(n * f),
            s1: c.swiglu.then(|| be.zeros(n * f)),
            f3: c.swiglu.then(|| be.zeros(n * f)),
            fh: be.zeros(n * f),
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

    /// One layer over `b` rows of `l` tokens: `out = Layer(x)`, saving into `a`. With
    /// [`Carry::Stream`] the TimestepNorm, CEMA and attention continue (and update) the
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

        // (a) TimestepNorm and CEMA, from a fresh or the carried state. A one-token call
        // takes the step forms; a longer one the call forms, whose new state replaces the old.
        match &mut carry {
            Carry::Fresh(_) => {
                be.timestep_norm_forward(
                    &mut a.xn,
                    &mut a.tn_mean,
                    &mut a.tn_rstd,
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
                be.cema_forward(&mut a.xc, None, &a.xn, &cw, None, b, l, d, nn);
            }
            Carry::Stream(st) if l == 1 => {
                be.timestep_norm_step(&mut a.xn, &mut st.tsn, x, tn_w, tn_b, b, d, g, eps);
                be.cema_step(&mut a.xc, &mut st.h, &a.xn, &cw, b, d, nn);
            }
            Carry::Stream(st) => {
                let mut tsn_next = TsnStats::fresh(be, b, g);
                be.timestep_norm_forward(
                    &mut a.xn,
                    &mut a.tn_mean,
                    &mut a.tn_rstd,
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
                    &mut a.xc,
                    Some(&mut h_next),
                    &a.xn,
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
        be.add_scalar(&mut a.rms_w1, &p[lp.rms_w], 1.0);
        be.rmsnorm_forward(&mut a.m, &mut a.rms_rstd, &a.xc, &a.rms_w1, n, d, eps);
        linear(
            be,
            &mut a.z,
            &a.m,
            &p[lp.wz_w],
            Some(&p[lp.wz_b]),
            n,
            d,
            z,
            false,
        );
        linear(
            be,
            &mut a.vpre,
            &a.xn,
            &p[lp.wv_w],
            Some(&p[lp.wv_b]),
            n,
            d,
            v,
            false,
        );
        be.activation_forward(Activation::Silu, &mut a.v, &a.vpre);
        linear(
            be,
            &mut a.rpre,
            &a.m,
            &p[lp.wr_w],
            Some(&p[lp.wr_b]),
            n,
            d,
            v,
            false,
        );
        be.activation_forward(Activation::Silu, &mut a.r, &a.rpre);

        // (b) Attention, gate, output projection and the first residual.
        let shape = self.attn_shape(b, l);
        let (qk_g, qk_b) = (&p[lp.qk_gamma], &p[lp.qk_beta]);
        match carry {
            Carry::Fresh(saved) => {
                be.mega_attention_forward(&mut a.o, saved, &a.z, &a.v, qk_g, qk_b, &shape)
            }
            Carry::Stream(st) => be
                .mega_attention_forward_cached(&mut a.o, &mut st.kv, &a.z, &a.v, qk_g, qk_b, &shape)
                .expect("the stream splits calls by the chunk rules"),
        }
        be.mul(&mut a.a, &a.o, &a.r);
        be.copy(&mut a.yhat, x);
        linear(
            be,
            &mut a.yhat,
            &a.m,
            &p[lp.wh1_w],
            Some(&p[lp.wh1_b]),
            n,
            d,
            d,
            true,
        );
        linear(be, &mut a.yhat, &a.a, &p[lp.wh2_w], None, n, v, d, true);

        // (c) FFN with the two-hop residual: out = X + FFN(LN(Ŷ)).
        be.add_scalar(&mut a.ln_w1, &p[lp.ln_w], 1.0);
        be.layernorm_forward(
            &mut a.u,
            &mut a.ln_mean,
            &mut a.ln_rstd,
            &a.yhat,
            &a.ln_w1,
            &p[lp.ln_b],
            n,
            d,
            eps,
        );
        linear(be, &mut a.f1, &a.u, &p[lp.fc1], None, n, d, f, false);
        match (lp.fc3, a.s1.as_mut(), a.f3.as_mut()) {
            (Some(fc3), Some(s1), Some(f3)) => {
                be.activation_forward(Activation::Silu, s1, &a.f1);
                linear(be, f3, &a.u, &p[fc3], None, n, d, f, false);
                be.mul(&mut a.fh, s1, f3);
            }
            _ => be.activation_forward(Activation::Silu, &mut a.fh, &a.f1),
        }
        be.copy(out, x);
        linear(be, out, &a.fh, &p[lp.fc2], None, n, f, d, true);
    }

    /// Backward of [`Megalodon::layer_forward`] (fresh state): on entry `d_resid` holds
    /// dL/d`out`, on return dL/d`x`; parameter gradients accumulate into `g`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        g: &mut [B::Buf],
        lp: &LayerParams,
        a: &LayerActs<B>,
        saved: &B::MegaAttnSaved,
        x: &B::Buf,
        s: &mut Scratch<B>,
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
        let silu = Activation::Silu;

        // (c) out = X + Fh·W2ᵀ; Fh = SiLU(F1) ⊙ F3 (or SiLU(F1)); U = LN(Ŷ).
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
        lin(
            g,
            lp.fc2,
            None,
            Some((&mut s.d_fh, false)),
            &s.d_resid,
            &a.fh,
            f,
            d,
        );
        be.fill_zero(&mut s.d_f1);
        match (lp.fc3, &a.s1, &a.f3, s.d_s1.as_mut(), s.d_f3.as_mut()) {
            (Some(fc3), Some(s1), Some(f3), Some(d_s1), Some(d_f3)) => {
                be.mul(d_s1, &s.d_fh, f3);
                be.mul(d_f3, &s.d_fh, s1);
                be.activation_backward(silu, &mut s.d_f1, &a.f1, d_s1);
                lin(
                    g,
                    lp.fc1,
                    None,
                    Some((&mut s.d_u, false)),
                    &s.d_f1,
                    &a.u,
                    d,
                    f,
                );
                lin(g, fc3, None, Some((&mut s.d_u, true)), d_f3, &a.u, d, f);
            }
            _ => {
                be.activation_backward(silu, &mut s.d_f1, &a.f1, &s.d_fh);
                lin(
                    g,
                    lp.fc1,
                    None,
                    Some((&mut s.d_u, false)),
                    &s.d_f1,
                    &a.u,
                    d,
                    f,
                );
            }
        }
        be.fill_zero(&mut s.d_yhat);
        {
            let [dw, db] = many_mut(g, [lp.ln_w, lp.ln_b]);
            be.layernorm_backward(
                &mut s.d_yhat,
                dw,
                db,
                &s.d_u,
                &a.yhat,
                &a.ln_w1,
                &a.ln_mean,
                &a.ln_rstd,
                n,
                d,
            );
        }
        be.add_assign(&mut s.d_resid, &s.d_yhat);

        // (b) Ŷ = X + M·W_h1ᵀ + b_h1 + A·W_h2ᵀ, A = O ⊙ R, R = SiLU(M·W_rᵀ + b_r).
        lin(
            g,
            lp.wh1_w,
            Some(lp.wh1_b),
            Some((&mut s.d_m, false)),
            &s.d_yhat,
            &a.m,
            d,
            d,
        );
        lin(
            g,
            lp.wh2_w,
            None,
            Some((&mut s.d_a, false)),
            &s.d_yhat,
            &a.a,
            v,
            d,
        );
        be.mul(&mut s.d_o, &s.d_a, &a.r);
        be.mul(&mut s.d_r, &s.d_a, &a.o);
        be.fill_zero(&mut s.d_rpre);
        be.activation_backward(silu, &mut s.d_rpre, &a.rpre, &s.d_r);
        lin(
            g,
            lp.wr_w,
            Some(lp.wr_b),
            Some((&mut s.d_m, true)),
            &s.d_rpre,
            &a.m,
            d,
            v,
        );
        {
            let [dgam, dbeta] = many_mut(g, [lp.qk_gamma, lp.qk_beta]);
            be.mega_attention_backward(
                &mut s.d_z,
                &mut s.d_v,
                dgam,
                dbeta,
                &s.d_o,
                &a.z,
                &a.v,
                &p[lp.qk_gamma],
                &p[lp.qk_beta],
                saved,
                &self.attn_shape(b, l),
            );
        }
        lin(
            g,
            lp.wz_w,
            Some(lp.wz_b),
            Some((&mut s.d_m, true)),
            &s.d_z,
            &a.m,
            d,
            z,
        );

        // (a) M = RMSNorm(Xc)·(w+1), Xc = CEMA(Xn), V = SiLU(Xn·W_vᵀ + b_v), Xn = TSN(X).
        be.fill_zero(&mut s.d_xc);
        be.rmsnorm_backward(
            &mut s.d_xc,
            &mut g[lp.rms_w],
            &s.d_m,
            &a.xc,
            &a.rms_w1,
            &a.rms_rstd,
            n,
            d,
        );
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
                &mut s.d_xn,
                &mut cg,
                None,
                &s.d_xc,
                None,
                &a.xn,
                &self.cema_weights::<B>(p, lp),
                None,
                b,
                l,
                d,
                nn,
            );
        }
        be.fill_zero(&mut s.d_vpre);
        be.activation_backward(silu, &mut s.d_vpre, &a.vpre, &s.d_v);
        lin(
            g,
            lp.wv_w,
            Some(lp.wv_b),
            Some((&mut s.d_xn, true)),
            &s.d_vpre,
            &a.xn,
            d,
            v,
        );
        {
            let [dw, db] = many_mut(g, [lp.tn_w, lp.tn_b]);
            be.timestep_norm_backward(
                &mut s.d_x,
                dw,
                db,
                None,
                &s.d_xn,
                None,
                x,
                &p[lp.tn_w],
                &a.tn_mean,
                &a.tn_rstd,
                None,
                b,
                l,
                d,
                gr,
            );
        }
        be.add_assign(&mut s.d_resid, &s.d_x);
    }

    /// A workspace for `b` rows of `t` input tokens; `train` adds backward buffers. Any
    /// `t ≥ 1` works here (the last chunk may be partial); training lengths are checked by
    /// [`ModelShape::check_seq_len`].
    pub fn workspace<B: Backend>(&self, be: &B, b: usize, t: usize, train: bool) -> Workspace<B> {
        assert!(b > 0 && t > 0, "empty MEGALODON batch ({b} × {t})");
        let c = &self.cfg;
        let n = b * t;
        let (d, z, v, f, g) = (
            c.model_dim,
            c.z_dim,
            c.value_dim,
            c.ffn_hidden_dim,
            c.norm_num_groups,
        );
        let layers = c.num_layers;
        Workspace {
            b,
            t,
            ids: Vec::new(),
            targets: Vec::new(),
            resid: (0..=layers).map(|_| be.zeros(n * d)).collect(),
            layers: (0..layers).map(|_| LayerActs::new(be, c, b, t)).collect(),
            attn: (0..layers)
                .map(|_| be.mega_attention_saved(&self.attn_shape(b, t)))
                .collect(),
            fn_mean: be.zeros(n * g),
            fn_rstd: be.zeros(n * g),
            hn: be.zeros(n * d),
            logits: be.zeros(n * c.vocab_size),
            losses: be.zeros(n),
            grads: train.then(|| Scratch {
                d_logits: be.zeros(n * c.vocab_size),
                d_resid: be.zeros(n * d),
                d_x: be.zeros(n * d),
                d_yhat: be.zeros(n * d),
                d_u: be.zeros(n * d),
                d_m: be.zeros(n * d),
                d_xc: be.zeros(n * d),
                d_xn: be.zeros(n * d),
                d_fh: be.zeros(n * f),
                d_f1: be.zeros(n * f),
                d_s1: c.swiglu.then(|| be.zeros(n * f)),
                d_f3: c.swiglu.then(|| be.zeros(n * f)),
                d_a: be.zeros(n * v),
                d_o: be.zeros(n * v),
                d_r: be.zeros(n * v),
                d_rpre: be.zeros(n * v),
                d_v: be.zeros(n * v),
                d_vpre: be.zeros(n * v),
                d_z: be.zeros(n * z),
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
        for (i, lp) in self.layers.iter().enumerate() {
            let (done, rest) = ws.resid.split_at_mut(i + 1);
            self.layer_forward(
                be,
                p,
                lp,
                &mut ws.layers[i],
                &done[i],
                &mut rest[0],
                b,
                t,
                Carry::Fresh(&mut ws.attn[i]),
            );
        }
        let (fw, fb) = self.final_norm::<B>(p);
        be.timestep_norm_forward(
            &mut ws.hn,
            &mut ws.fn_mean,
            &mut ws.fn_rstd,
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
        self.head(be, p, &mut ws.logits, &ws.hn, b * t);
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
        let s = ws
            .grads
            .as_mut()
            .expect("workspace was built for inference only");

        be.cross_entropy_backward(&mut s.d_logits, &ws.logits, &ws.targets, v, 1.0 / n as f32);
        // Head: logits = Hn · W_headᵀ. The final norm's input gradient lands in d_resid.
        be.matmul(
            &mut g[self.head],
            &s.d_logits,
            &ws.hn,
            v,
            n,
            d,
            true,
            false,
            true,
        );
        be.matmul(
            &mut s.d_x,
            &s.d_logits,
            &p[self.head],
            n,
            v,
            d,
            false,
            false,
            false,
        );
        {
            let [dw, db] = many_mut(g, [self.final_w, self.final_b]);
            be.timestep_norm_backward(
                &mut s.d_resid,
                dw,
                db,
                None,
                &s.d_x,
                None,
                &ws.resid[c.num_layers],
                &p[self.final_w],
                &ws.fn_mean,
                &ws.fn_rstd,
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
                &ws.layers[i],
                &ws.attn[i],
                &ws.resid[i],
                s,
                b,
                t,
            );
        }
        if c.scale_emb {
            be.scale(&mut s.d_resid, (d as f32).sqrt());
        }
        be.embedding_backward(&mut g[self.embed], &s.d_resid, &ws.ids, d);
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
