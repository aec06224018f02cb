//! MEGABYTE (spec/megabyte.md §2, docs/megabyte-model.md): patch embedder, global model,
//! shared global-to-local projection, local model, tied byte head — forward and backward.

use super::language_model::{Decoder, LanguageModel, ModelShape};
use super::params::{many_mut, Init, ParamLayout};
use super::transformer::{Stack, StackActs, StackShape};
use crate::backend::{Backend, PAD_ID};
use crate::config::MegabyteConfig;
use crate::infer::megabyte_decoder::MegabyteDecoder;

/// Indices of the MEGABYTE-specific parameters in the layout.
#[derive(Clone, Debug)]
struct Embeds {
    g_tok: usize,
    g_pos: usize,
    g_pad: usize,
    in_proj: Option<(usize, usize)>,
    out_proj: Option<(usize, usize)>,
    gl: usize,
    l_tok: usize,
    l_pos: usize,
    l_pad: usize,
    head_bias: Option<usize>,
}

/// A MEGABYTE model's structure: config, parameter layout and the two stacks.
/// Parameter *values* live in backend buffers owned by the caller, ordered as `layout`.
#[derive(Clone, Debug)]
pub struct Megabyte {
    pub cfg: MegabyteConfig,
    pub layout: ParamLayout,
    pub global: Stack,
    pub local: Stack,
    e: Embeds,
}

impl Megabyte {
    /// Declare every parameter for `cfg` (which must be valid).
    pub fn new(cfg: &MegabyteConfig) -> Self {
        let mut layout = ParamLayout::default();
        let w = Init::TruncNormal(cfg.init_std);
        let (v, p, dg, dl) = (
            cfg.vocab_size,
            cfg.patch_size,
            cfg.global_byte_dim,
            cfg.local_dim,
        );
        let pd = cfg.patch_dim();
        let g_tok = layout.add("global.tok_emb", &[v, dg], w);
        let g_pos = layout.add("global.pos_emb", &[cfg.max_seq_len, dg], w);
        let g_pad = layout.add("global.pad", &[p, dg], w);
        let in_proj = cfg.has_global_projections().then(|| {
            (
                layout.add("global.in_proj.weight", &[pd, cfg.global_dim], w),
                layout.add("global.in_proj.bias", &[cfg.global_dim], Init::Zeros),
            )
        });
        let shape = |width, layers, heads| StackShape {
            width,
            layers,
            heads,
            ffn: cfg.activation,
            ffn_mult: cfg.ffn_mult,
            init_std: cfg.init_std,
        };
        let global = Stack::declare(
            &mut layout,
            "global",
            shape(cfg.global_dim, cfg.global_layers, cfg.global_heads),
        );
        let out_proj = cfg.has_global_projections().then(|| {
            (
                layout.add("global.out_proj.weight", &[cfg.global_dim, pd], w),
                layout.add("global.out_proj.bias", &[pd], Init::Zeros),
            )
        });
        let gl = layout.add("global_to_local.weight", &[dg, dl], w);
        let l_tok = layout.add("local.tok_emb", &[v, dl], w);
        let l_pos = layout.add("local.pos_emb", &[p, dl], w);
        let l_pad = layout.add("local.pad", &[dl], w);
        let local = Stack::declare(
            &mut layout,
            "local",
            shape(dl, cfg.local_layers, cfg.local_heads),
        );
        let head_bias = cfg
            .head_bias
            .then(|| layout.add("local.head_bias", &[v], Init::Zeros));
        let e = Embeds {
            head_bias,
            g_tok,
            g_pos,
            g_pad,
            in_proj,
            out_proj,
            gl,
            l_tok,
            l_pos,
            l_pad,
        };
        Megabyte {
            cfg: cfg.clone(),
            layout,
            global,
            local,
            e,
        }
    }

    /// Forward FLOPs per byte for a full context (2 per multiply-add; causal attention
    /// counted exactly, averaged over the context). Training costs 3× this.
    pub fn forward_flops_per_byte(&self) -> f64 {
        let c = &self.cfg;
        let (p, k) = (c.patch_size as f64, c.patches() as f64);
        let pd = c.patch_dim() as f64;
        let proj = if c.has_global_projections() {
            2.0 * 2.0 * pd * c.global_dim as f64
        } else {
            0.0
        };
        // Query at causal position i attends i+1 keys: 2·(i+1)·D for scores and again for values.
        let g_att = c.global_layers as f64 * 4.0 * c.global_dim as f64 * (k + 1.0) / 2.0;
        let l_att = c.local_layers as f64 * 4.0 * c.local_dim as f64 * (p + 1.0) / 2.0;
        (self.global.matmul_flops_per_pos() as f64 + proj + g_att) / p
            + 2.0 * (c.global_byte_dim * c.local_dim) as f64
            + self.local.matmul_flops_per_pos() as f64
            + l_att
            + 2.0 * (c.local_dim * c.vocab_size) as f64
    }

    /// Global patch-embedder inputs for `bytes` (`[b, t]`): one row per patch position,
    /// shifted by one patch (position 0 is the pad patch). Returns `(ids, positions)`.
    pub fn global_inputs(&self, bytes: &[u8], b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
        let p = self.cfg.patch_size;
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        for row in 0..b {
            for i in 0..t {
                if i < p {
                    ids.push(PAD_ID);
                    pos.push(0);
                } else {
                    ids.push(bytes[row * t + i - p] as u32);
                    pos.push((i - p) as u32);
                }
            }
        }
        (ids, pos)
    }

    /// Local inputs for `bytes` (`[b, t]`): byte `t−1` shifted into slot `t mod P`, the pad
    /// at slot 0. Returns `(ids, slots)`.
    pub fn local_inputs(&self, bytes: &[u8], b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
        let p = self.cfg.patch_size;
        let mut ids = Vec::with_capacity(b * t);
        let mut slots = Vec::with_capacity(b * t);
        for row in 0..b {
            for i in 0..t {
                let q = i % p;
                ids.push(if q == 0 {
                    PAD_ID
                } else {
                    bytes[row * t + i - 1] as u32
                });
                slots.push(q as u32);
            }
        }
        (ids, slots)
    }

    /// A workspace for batches of `b` sequences of `t` bytes (`t` a multiple of P, ≤ T).
    pub fn workspace<B: Backend>(&self, be: &B, b: usize, t: usize, train: bool) -> Workspace<B> {
        let c = &self.cfg;
        assert!(
            t % c.patch_size == 0 && t <= c.max_seq_len && t > 0,
            "bad sequence length {t}"
        );
        let k = t / c.patch_size;
        let (pd, dl, v) = (c.patch_dim(), c.local_dim, c.vocab_size);
        let n = b * t;
        let proj = c.has_global_projections();
        Workspace {
            b,
            t,
            g_in: be.zeros(b * k * pd),
            g_x: proj.then(|| be.zeros(b * k * c.global_dim)),
            global: self.global.acts(be, b, k, train),
            g_out: proj.then(|| be.zeros(b * k * pd)),
            l_in: be.zeros(n * dl),
            local: self.local.acts(be, b * k, c.patch_size, train),
            logits: be.zeros(n * v),
            losses: be.zeros(n),
            grads: train.then(|| WorkGrads {
                d_logits: be.zeros(n * v),
                d_lout: be.zeros(n * dl),
                d_lin: be.zeros(n * dl),
                d_gsplit: be.zeros(n * c.global_byte_dim),
                d_gstack: be.zeros(b * k * c.global_dim),
                d_gx: be.zeros(b * k * c.global_dim),
                d_gin: be.zeros(b * k * pd),
            }),
            targets: Vec::new(),
            g_ids: Vec::new(),
            g_pos: Vec::new(),
            l_ids: Vec::new(),
            l_slots: Vec::new(),
        }
    }

    /// Forward pass over `bytes` (`[ws.b, ws.t]`): fills `ws.logits` (`[b·t, 256]`) and
    /// returns the mean cross-entropy in nats.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        ws: &mut Workspace<B>,
        bytes: &[u8],
    ) -> f64 {
        let c = &self.cfg;
        let (b, t) = (ws.b, ws.t);
        assert_eq!(bytes.len(), b * t, "batch has the wrong number of bytes");
        let n = b * t;
        let k = t / c.patch_size;
        let e = &self.e;
        (ws.g_ids, ws.g_pos) = self.global_inputs(bytes, b, t);
        (ws.l_ids, ws.l_slots) = self.local_inputs(bytes, b, t);
        ws.targets = bytes.iter().map(|&x| x as u32).collect();

        be.patch_embed_forward(
            &mut ws.g_in,
            &p[e.g_tok],
            &p[e.g_pos],
            &p[e.g_pad],
            &ws.g_ids,
            &ws.g_pos,
            c.patch_size,
            c.global_byte_dim,
        );
        if let (Some((w, bias)), Some(g_x)) = (e.in_proj, ws.g_x.as_mut()) {
            be.matmul(
                g_x,
                &ws.g_in,
                &p[w],
                b * k,
                c.patch_dim(),
                c.global_dim,
                false,
                false,
                false,
            );
            be.add_bias(g_x, &p[bias], b * k, c.global_dim);
            self.global.forward(be, p, &mut ws.global, g_x);
        } else {
            self.global.forward(be, p, &mut ws.global, &ws.g_in);
        }
        let g_out = match (e.out_proj, ws.g_out.as_mut()) {
            (Some((w, bias)), Some(g_out)) => {
                be.matmul(
                    g_out,
                    &ws.global.out,
                    &p[w],
                    b * k,
                    c.global_dim,
                    c.patch_dim(),
                    false,
                    false,
                    false,
                );
                be.add_bias(g_out, &p[bias], b * k, c.patch_dim());
                &*g_out
            }
            _ => &ws.global.out,
        };
        // [B·K, P·D_G] is [B·T, D_G] in memory: one GEMM projects every slice with W_GL.
        be.matmul(
            &mut ws.l_in,
            g_out,
            &p[e.gl],
            n,
            c.global_byte_dim,
            c.local_dim,
            false,
            false,
            false,
        );
        be.local_embed_forward(
            &mut ws.l_in,
            &p[e.l_tok],
            &p[e.l_pos],
            &p[e.l_pad],
            &ws.l_ids,
            &ws.l_slots,
            c.local_dim,
        );
        self.local.forward(be, p, &mut ws.local, &ws.l_in);
        be.matmul(
            &mut ws.logits,
            &ws.local.out,
            &p[e.l_tok],
            n,
            c.local_dim,
            c.vocab_size,
            false,
            true,
            false,
        );
        if let Some(hb) = e.head_bias {
            be.add_bias(&mut ws.logits, &p[hb], n, c.vocab_size);
        }
        be.cross_entropy_forward(&mut ws.losses, &ws.logits, &ws.targets, c.vocab_size);
        be.sum(&ws.losses) / n as f64
    }

    /// Backward of the last [`Megabyte::forward`] on `ws` for the mean loss: accumulates
    /// into `g` (one buffer per parameter).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        g: &mut [B::Buf],
        ws: &mut Workspace<B>,
    ) {
        let c = &self.cfg;
        let e = &self.e;
        let (b, t) = (ws.b, ws.t);
        let (n, k) = (b * t, t / c.patch_size);
        let (v, dl, dg, dgw, pd) = (
            c.vocab_size,
            c.local_dim,
            c.global_byte_dim,
            c.global_dim,
            c.patch_dim(),
        );
        let wg = ws
            .grads
            .as_mut()
            .expect("workspace was built for inference only");

        be.cross_entropy_backward(&mut wg.d_logits, &ws.logits, &ws.targets, v, 1.0 / n as f32);
        if let Some(hb) = e.head_bias {
            be.bias_backward(&mut g[hb], &wg.d_logits, n, v);
        }
        // Tied head: logits = l_out · E_lembᵀ.
        be.matmul(
            &mut g[e.l_tok],
            &wg.d_logits,
            &ws.local.out,
            v,
            n,
            dl,
            true,
            false,
            true,
        );
        be.matmul(
            &mut wg.d_lout,
            &wg.d_logits,
            &p[e.l_tok],
            n,
            v,
            dl,
            false,
            false,
            false,
        );
        self.local
            .backward(be, p, g, &mut ws.local, &wg.d_lout, &mut wg.d_lin);
        {
            let [dtok, dpos, dpad] = many_mut(g, [e.l_tok, e.l_pos, e.l_pad]);
            be.local_embed_backward(dtok, dpos, dpad, &wg.d_lin, &ws.l_ids, &ws.l_slots, dl);
        }
        let g_out = ws.g_out.as_ref().unwrap_or(&ws.global.out);
        be.matmul(&mut g[e.gl], g_out, &wg.d_lin, dg, n, dl, true, false, true);
        be.matmul(
            &mut wg.d_gsplit,
            &wg.d_lin,
            &p[e.gl],
            n,
            dl,
            dg,
            false,
            true,
            false,
        );
        if let Some((w, bias)) = e.out_proj {
            be.bias_backward(&mut g[bias], &wg.d_gsplit, b * k, pd);
            be.matmul(
                &mut g[w],
                &ws.global.out,
                &wg.d_gsplit,
                dgw,
                b * k,
                pd,
                true,
                false,
                true,
            );
            be.matmul(
                &mut wg.d_gstack,
                &wg.d_gsplit,
                &p[w],
                b * k,
                pd,
                dgw,
                false,
                true,
                false,
            );
        } else {
            be.copy(&mut wg.d_gstack, &wg.d_gsplit);
        }
        self.global
            .backward(be, p, g, &mut ws.global, &wg.d_gstack, &mut wg.d_gx);
        if let (Some((w, bias)), Some(_)) = (e.in_proj, ws.g_x.as_ref()) {
            be.bias_backward(&mut g[bias], &wg.d_gx, b * k, dgw);
            be.matmul(
                &mut g[w],
                &ws.g_in,
                &wg.d_gx,
                pd,
                b * k,
                dgw,
                true,
                false,
                true,
            );
            be.matmul(
                &mut wg.d_gin,
                &wg.d_gx,
                &p[w],
                b * k,
                dgw,
                pd,
                false,
                true,
                false,
            );
        } else {
            be.copy(&mut wg.d_gin, &wg.d_gx);
        }
        let [dtok, dpos, dpad] = many_mut(g, [e.g_tok, e.g_pos, e.g_pad]);
        be.patch_embed_backward(
            dtok,
            dpos,
            dpad,
            &wg.d_gin,
            &ws.g_ids,
            &ws.g_pos,
            c.patch_size,
            dg,
        );
    }

    pub(crate) fn embeds(&self) -> EmbedIdx {
        let e = &self.e;
        EmbedIdx {
            g_tok: e.g_tok,
            g_pos: e.g_pos,
            g_pad: e.g_pad,
            in_proj: e.in_proj,
            out_proj: e.out_proj,
            gl: e.gl,
            l_tok: e.l_tok,
            l_pos: e.l_pos,
            l_pad: e.l_pad,
            head_bias: e.head_bias,
        }
    }
}

/// Parameter indices of the embedding-side tensors, for the generation code.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EmbedIdx {
    pub g_tok: usize,
    pub g_pos: usize,
    pub g_pad: usize,
    pub in_proj: Option<(usize, usize)>,
    pub out_proj: Option<(usize, usize)>,
    pub gl: usize,
    pub l_tok: usize,
    pub l_pos: usize,
    pub l_pad: usize,
    pub head_bias: Option<usize>,
}

/// Activations of one MEGABYTE forward (and the buffers of its backward), sized for a
/// batch shape and reused across steps.
pub struct Workspace<B: Backend> {
    pub b: usize,
    pub t: usize,
    g_in: B::Buf,
    g_x: Option<B::Buf>,
    global: StackActs<B>,
    g_out: Option<B::Buf>,
    l_in: B::Buf,
    local: StackActs<B>,
    /// `[b·t, 256]` logits of the last forward.
    pub logits: B::Buf,
    /// `[b·t]` per-byte losses (nats) of the last forward.
    pub losses: B::Buf,
    grads: Option<WorkGrads<B>>,
    targets: Vec<u32>,
    g_ids: Vec<u32>,
    g_pos: Vec<u32>,
    l_ids: Vec<u32>,
    l_slots: Vec<u32>,
}

struct WorkGrads<B: Backend> {
    d_logits: B::Buf,
    d_lout: B::Buf,
    d_lin: B::Buf,
    d_gsplit: B::Buf,
    d_gstack: B::Buf,
    d_gx: B::Buf,
    d_gin: B::Buf,
}

impl ModelShape for Megabyte {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn window_len(&self, t: usize) -> usize {
        t
    }

    fn check_seq_len(&self, t: usize) -> Result<(), String> {
        let p = self.cfg.patch_size;
        if t == 0 || t % p != 0 || t > self.cfg.max_seq_len {
            return Err(format!(
                "sequence length {t} must be a positive multiple of the patch size {p} and at most max_seq_len {}",
                self.cfg.max_seq_len
            ));
        }
        Ok(())
    }

    fn max_seq_len(&self) -> usize {
        self.cfg.max_seq_len
    }

    fn forward_flops_per_byte(&self) -> f64 {
        Megabyte::forward_flops_per_byte(self)
    }

    fn patch_size(&self) -> Option<usize> {
        Some(self.cfg.patch_size)
    }
}

impl<B: Backend> LanguageModel<B> for Megabyte {
    type Workspace = Workspace<B>;

    fn workspace(&self, be: &B, b: usize, t: usize, train: bool) -> Workspace<B> {
        Megabyte::workspace(self, be, b, t, train)
    }

    fn workspace_shape(&self, ws: &Workspace<B>) -> (usize, usize) {
        (ws.b, ws.t)
    }

    fn forward(&self, be: &B, params: &[B::Buf], ws: &mut Workspace<B>, windows: &[u8]) -> f64 {
        Megabyte::forward(self, be, params, ws, windows)
    }

    fn losses<'w>(&self, ws: &'w Workspace<B>) -> &'w B::Buf {
        &ws.losses
    }

    fn logits<'w>(&self, ws: &'w Workspace<B>) -> &'w B::Buf {
        &ws.logits
    }

    fn backward(&self, be: &B, params: &[B::Buf], grads: &mut [B::Buf], ws: &mut Workspace<B>) {
        Megabyte::backward(self, be, params, grads, ws)
    }

    fn decoder<'a>(
        &'a self,
        be: &'a B,
        params: &'a [B::Buf],
        prompts: &[&[u8]],
    ) -> Box<dyn Decoder + 'a> {
        Box::new(MegabyteDecoder::new(self, be, params, prompts))
    }
}
