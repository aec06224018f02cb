//! A pre-norm decoder-only transformer stack (MEGABYTE's global and local models), with its
//! forward, its backward and a KV-cached decode step, written against the backend seam.
//!
//! Block: `x += Attn(LN1(x))`, `x += FFN(LN2(x))`; a final LayerNorm after the last block.
//! Pairs each forward op with its backward in the llm.c manner: the forward saves exactly
//! what the backward reads, in [`StackActs`].

use super::params::{many_mut, Init, ParamLayout};
use crate::backend::{Activation, Backend};
use crate::config::FeedForward;

/// Variance floor of every LayerNorm in a MEGABYTE stack (GPT-2 / PyTorch's default).
const LN_EPS: f32 = 1e-5;

/// The hyper-parameters of one stack.
#[derive(Clone, Copy, Debug)]
pub struct StackShape {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: FeedForward,
    pub ffn_mult: usize,
    /// Std of the truncated-normal initialization of its matrices.
    pub init_std: f32,
}

/// Parameter indices of one block.
#[derive(Clone, Debug)]
struct Block {
    ln1_w: usize,
    ln1_b: usize,
    qkv_w: usize,
    qkv_b: usize,
    out_w: usize,
    out_b: usize,
    ln2_w: usize,
    ln2_b: usize,
    fc_w: usize,
    fc_b: usize,
    proj_w: usize,
    proj_b: usize,
}

/// A transformer stack: its shape and where its parameters live in the model's layout.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Model width `D`.
    pub width: usize,
    pub heads: usize,
    /// Feed-forward hidden width `F`.
    pub hidden: usize,
    pub ffn: FeedForward,
    blocks: Vec<Block>,
    lnf_w: usize,
    lnf_b: usize,
}

/// Everything one forward pass saves for its backward pass, plus backward scratch.
/// Allocated once per `(rows, seq)` shape and reused across steps.
pub struct StackActs<B: Backend> {
    /// Batch rows `b` and sequence length `t` this workspace was sized for.
    pub b: usize,
    pub t: usize,
    resid: Vec<B::Buf>,
    resid_mid: Vec<B::Buf>,
    ln1: Vec<B::Buf>,
    ln1_mean: Vec<B::Buf>,
    ln1_rstd: Vec<B::Buf>,
    qkv: Vec<B::Buf>,
    att: Vec<B::Buf>,
    atty: Vec<B::Buf>,
    ln2: Vec<B::Buf>,
    ln2_mean: Vec<B::Buf>,
    ln2_rstd: Vec<B::Buf>,
    fc: Vec<B::Buf>,
    act: Vec<B::Buf>,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    /// The stack's output `[b·t, D]` after the final LayerNorm.
    pub out: B::Buf,
    scratch: Option<Scratch<B>>,
}

struct Scratch<B: Backend> {
    d_resid: B::Buf,
    d_small: B::Buf,
    d_act: B::Buf,
    d_fc: B::Buf,
    d_qkv: B::Buf,
}

/// A paged KV cache of one stack: per layer, a key pool and a value pool of `blocks` blocks
/// of `block_size` positions, `[blocks, block_size, D]` each. Which blocks hold a sequence's
/// positions is the caller's business (its block table); the pool only stores entries.
pub struct KvPool<B: Backend> {
    /// Blocks in each pool.
    pub blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Key pools, one per layer.
    pub k: Vec<B::Buf>,
    /// Value pools, one per layer.
    pub v: Vec<B::Buf>,
}

impl Stack {
    /// Declare the stack's parameters under `prefix` (e.g. `global`).
    pub fn declare(layout: &mut ParamLayout, prefix: &str, shape: StackShape) -> Self {
        let StackShape {
            width,
            layers,
            heads,
            ffn,
            ffn_mult,
            init_std: std,
        } = shape;
        let hidden = ffn_mult * width;
        let fc_out = if ffn == FeedForward::Swiglu {
            2 * hidden
        } else {
            hidden
        };
        let w = Init::TruncNormal(std);
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("{prefix}.layers.{i}");
                Block {
                    ln1_w: layout.add(format!("{p}.ln1.weight"), &[width], Init::Ones),
                    ln1_b: layout.add(format!("{p}.ln1.bias"), &[width], Init::Zeros),
                    qkv_w: layout.add(format!("{p}.attn.qkv.weight"), &[width, 3 * width], w),
                    qkv_b: layout.add(format!("{p}.attn.qkv.bias"), &[3 * width], Init::Zeros),
                    out_w: layout.add(format!("{p}.attn.out.weight"), &[width, width], w),
                    out_b: layout.add(format!("{p}.attn.out.bias"), &[width], Init::Zeros),
                    ln2_w: layout.add(format!("{p}.ln2.weight"), &[width], Init::Ones),
                    ln2_b: layout.add(format!("{p}.ln2.bias"), &[width], Init::Zeros),
                    fc_w: layout.add(format!("{p}.mlp.fc.weight"), &[width, fc_out], w),
                    fc_b: layout.add(format!("{p}.mlp.fc.bias"), &[fc_out], Init::Zeros),
                    proj_w: layout.add(format!("{p}.mlp.proj.weight"), &[hidden, width], w),
                    proj_b: layout.add(format!("{p}.mlp.proj.bias"), &[width], Init::Zeros),
                }
            })
            .collect();
        let lnf_w = layout.add(format!("{prefix}.ln_f.weight"), &[width], Init::Ones);
        let lnf_b = layout.add(format!("{prefix}.ln_f.bias"), &[width], Init::Zeros);
        Stack {
            width,
            heads,
            hidden,
            ffn,
            blocks,
            lnf_w,
            lnf_b,
        }
    }

    /// Number of blocks.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    fn fc_out(&self) -> usize {
        if self.ffn == FeedForward::Swiglu {
            2 * self.hidden
        } else {
            self.hidden
        }
    }

    fn scale(&self) -> f32 {
        1.0 / ((self.width / self.heads) as f32).sqrt()
    }

    /// Forward FLOPs per position of the matmuls (2 per multiply-add), excluding attention scores.
    pub fn matmul_flops_per_pos(&self) -> usize {
        let d = self.width;
        self.blocks.len() * 2 * (3 * d * d + d * d + d * self.fc_out() + self.hidden * d)
    }

    /// A workspace for `b` independent sequences of length `t`.
    pub fn acts<B: Backend>(&self, be: &B, b: usize, t: usize, with_scratch: bool) -> StackActs<B> {
        let n = b * t;
        let (d, l, h) = (self.width, self.blocks.len(), self.heads);
        let many = |size: usize| (0..l).map(|_| be.zeros(size)).collect::<Vec<_>>();
        let scratch = with_scratch.then(|| Scratch {
            d_resid: be.zeros(n * d),
            d_small: be.zeros(n * d),
            d_act: be.zeros(n * self.hidden),
            d_fc: be.zeros(n * self.fc_out()),
            d_qkv: be.zeros(n * 3 * d),
        });
        StackActs {
            b,
            t,
            resid: (0..=l).map(|_| be.zeros(n * d)).collect(),
            resid_mid: many(n * d),
            ln1: many(n * d),
            ln1_mean: many(n),
            ln1_rstd: many(n),
            qkv: many(n * 3 * d),
            att: many(b * h * t * t),
            atty: many(n * d),
            ln2: many(n * d),
            ln2_mean: many(n),
            ln2_rstd: many(n),
            fc: many(n * self.fc_out()),
            act: many(n * self.hidden),
            lnf_mean: be.zeros(n),
            lnf_rstd: be.zeros(n),
            out: be.zeros(n * d),
            scratch,
        }
    }

    /// Run the stack over `input` `[b·t, D]` (causal within each of the `b` rows);
    /// the result is in `acts.out`.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        acts: &mut StackActs<B>,
        input: &B::Buf,
    ) {
        let (b, t, d, h) = (acts.b, acts.t, self.width, self.heads);
        let n = b * t;
        be.copy(&mut acts.resid[0], input);
        for (l, blk) in self.blocks.iter().enumerate() {
            be.layernorm_forward(
                &mut acts.ln1[l],
                &mut acts.ln1_mean[l],
                &mut acts.ln1_rstd[l],
                &acts.resid[l],
                &p[blk.ln1_w],
                &p[blk.ln1_b],
                n,
                d,
                LN_EPS,
            );
            be.matmul(
                &mut acts.qkv[l],
                &acts.ln1[l],
                &p[blk.qkv_w],
                n,
                d,
                3 * d,
                false,
                false,
                false,
            );
            be.add_bias(&mut acts.qkv[l], &p[blk.qkv_b], n, 3 * d);
            be.attention_forward(
                &mut acts.atty[l],
                &mut acts.att[l],
                &acts.qkv[l],
                b,
                t,
                d,
                h,
                self.scale(),
            );
            // resid_mid = resid + atty·W_o + b_o, with the residual add fused into the GEMM.
            be.copy(&mut acts.resid_mid[l], &acts.resid[l]);
            be.matmul(
                &mut acts.resid_mid[l],
                &acts.atty[l],
                &p[blk.out_w],
                n,
                d,
                d,
                false,
                false,
                true,
            );
            be.add_bias(&mut acts.resid_mid[l], &p[blk.out_b], n, d);
            be.layernorm_forward(
                &mut acts.ln2[l],
                &mut acts.ln2_mean[l],
                &mut acts.ln2_rstd[l],
                &acts.resid_mid[l],
                &p[blk.ln2_w],
                &p[blk.ln2_b],
                n,
                d,
                LN_EPS,
            );
            let f = self.fc_out();
            be.matmul(
                &mut acts.fc[l],
                &acts.ln2[l],
                &p[blk.fc_w],
                n,
                d,
                f,
                false,
                false,
                false,
            );
            be.add_bias(&mut acts.fc[l], &p[blk.fc_b], n, f);
            self.ffn_act(be, &mut acts.act[l], &acts.fc[l], n);
            let next = &mut acts.resid[l + 1];
            be.copy(next, &acts.resid_mid[l]);
            be.matmul(
                next,
                &acts.act[l],
                &p[blk.proj_w],
                n,
                self.hidden,
                d,
                false,
                false,
                true,
            );
            be.add_bias(next, &p[blk.proj_b], n, d);
        }
        let last = &acts.resid[self.blocks.len()];
        be.layernorm_forward(
            &mut acts.out,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            last,
            &p[self.lnf_w],
            &p[self.lnf_b],
            n,
            d,
            LN_EPS,
        );
    }

    fn ffn_act<B: Backend>(&self, be: &B, out: &mut B::Buf, fc: &B::Buf, n: usize) {
        match self.ffn {
            FeedForward::Relu => be.activation_forward(Activation::Relu, out, fc),
            FeedForward::Gelu => be.activation_forward(Activation::Gelu, out, fc),
            FeedForward::Swiglu => be.swiglu_forward(out, fc, n, self.hidden),
        }
    }

    /// Backward of [`Stack::forward`]: accumulates parameter gradients into `g` and writes
    /// (`=`) the gradient of the input into `d_input`.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        g: &mut [B::Buf],
        acts: &mut StackActs<B>,
        d_out: &B::Buf,
        d_input: &mut B::Buf,
    ) {
        let (b, t, d, h) = (acts.b, acts.t, self.width, self.heads);
        let n = b * t;
        let f = self.fc_out();
        let s = acts
            .scratch
            .as_mut()
            .expect("stack workspace allocated without backward scratch");
        be.fill_zero(&mut s.d_resid);
        {
            let [dw, db] = many_mut(g, [self.lnf_w, self.lnf_b]);
            be.layernorm_backward(
                &mut s.d_resid,
                dw,
                db,
                d_out,
                &acts.resid[self.blocks.len()],
                &p[self.lnf_w],
                &acts.lnf_mean,
                &acts.lnf_rstd,
                n,
                d,
            );
        }
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            // FFN: resid[l+1] = resid_mid + act(LN2(resid_mid)·W_fc + b_fc)·W_proj + b_proj
            be.bias_backward(&mut g[blk.proj_b], &s.d_resid, n, d);
            be.matmul(
                &mut g[blk.proj_w],
                &acts.act[l],
                &s.d_resid,
                self.hidden,
                n,
                d,
                true,
                false,
                true,
            );
            be.matmul(
                &mut s.d_act,
                &s.d_resid,
                &p[blk.proj_w],
                n,
                d,
                self.hidden,
                false,
                true,
                false,
            );
            be.fill_zero(&mut s.d_fc);
            match self.ffn {
                FeedForward::Relu => {
                    be.activation_backward(Activation::Relu, &mut s.d_fc, &acts.fc[l], &s.d_act)
                }
                FeedForward::Gelu => {
                    be.activation_backward(Activation::Gelu, &mut s.d_fc, &acts.fc[l], &s.d_act)
                }
                FeedForward::Swiglu => {
                    be.swiglu_backward(&mut s.d_fc, &acts.fc[l], &s.d_act, n, self.hidden)
                }
            }
            be.bias_backward(&mut g[blk.fc_b], &s.d_fc, n, f);
            be.matmul(
                &mut g[blk.fc_w],
                &acts.ln2[l],
                &s.d_fc,
                d,
                n,
                f,
                true,
                false,
                true,
            );
            be.matmul(
                &mut s.d_small,
                &s.d_fc,
                &p[blk.fc_w],
                n,
                f,
                d,
                false,
                true,
                false,
            );
            {
                let [dw, db] = many_mut(g, [blk.ln2_w, blk.ln2_b]);
                be.layernorm_backward(
                    &mut s.d_resid,
                    dw,
                    db,
                    &s.d_small,
                    &acts.resid_mid[l],
                    &p[blk.ln2_w],
                    &acts.ln2_mean[l],
                    &acts.ln2_rstd[l],
                    n,
                    d,
                );
            }
            // Attention: resid_mid = resid[l] + Attn(LN1(resid[l]))·W_o + b_o
            be.bias_backward(&mut g[blk.out_b], &s.d_resid, n, d);
            be.matmul(
                &mut g[blk.out_w],
                &acts.atty[l],
                &s.d_resid,
                d,
                n,
                d,
                true,
                false,
                true,
            );
            be.matmul(
                &mut s.d_small,
                &s.d_resid,
                &p[blk.out_w],
                n,
                d,
                d,
                false,
                true,
                false,
            );
            be.fill_zero(&mut s.d_qkv);
            be.attention_backward(
                &mut s.d_qkv,
                &s.d_small,
                &acts.qkv[l],
                &acts.att[l],
                b,
                t,
                d,
                h,
                self.scale(),
            );
            be.bias_backward(&mut g[blk.qkv_b], &s.d_qkv, n, 3 * d);
            be.matmul(
                &mut g[blk.qkv_w],
                &acts.ln1[l],
                &s.d_qkv,
                d,
                n,
                3 * d,
                true,
                false,
                true,
            );
            be.matmul(
                &mut s.d_small,
                &s.d_qkv,
                &p[blk.qkv_w],
                n,
                3 * d,
                d,
                false,
                true,
                false,
            );
            {
                let [dw, db] = many_mut(g, [blk.ln1_w, blk.ln1_b]);
                be.layernorm_backward(
                    &mut s.d_resid,
                    dw,
                    db,
                    &s.d_small,
                    &acts.resid[l],
                    &p[blk.ln1_w],
                    &acts.ln1_mean[l],
                    &acts.ln1_rstd[l],
                    n,
                    d,
                );
            }
        }
        be.copy(d_input, &s.d_resid);
    }

    /// A zeroed KV pool of `blocks` blocks of `block_size` positions, allocated once.
    pub fn kv_pool<B: Backend>(&self, be: &B, blocks: usize, block_size: usize) -> KvPool<B> {
        let size = blocks * block_size * self.width;
        KvPool {
            blocks,
            block_size,
            k: (0..self.blocks.len()).map(|_| be.zeros(size)).collect(),
            v: (0..self.blocks.len()).map(|_| be.zeros(size)).collect(),
        }
    }

    /// Bytes of keys and values per cached position (f32, every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.blocks.len() * self.width * std::mem::size_of::<f32>()
    }

    /// One decode step: row `i` of `x` (`[s, D]`) is the input at position `pos[i]` of its
    /// sequence, whose cache lives in the blocks `tables[i·mb..(i+1)·mb]` of `pool`
    /// (`mb = tables.len() / s`, the block ids in position order). Appends every row's key and
    /// value, then attends each row to its positions `0..=pos[i]`, and returns the stack's
    /// output `[s, D]`. Rows may belong to the same sequence (chunked prefill): they share a
    /// block table, and each attends to the keys of those at earlier positions.
    pub fn decode_step<B: Backend>(
        &self,
        be: &B,
        p: &[B::Buf],
        pool: &mut KvPool<B>,
        tables: &[u32],
        x: &B::Buf,
        pos: &[u32],
    ) -> B::Buf {
        let s = pos.len();
        let (d, h, f) = (self.width, self.heads, self.fc_out());
        let lens: Vec<u32> = pos.iter().map(|&q| q + 1).collect();
        assert!(s > 0 && tables.len() % s == 0, "one block table per row");
        let mb = tables.len() / s;
        let bs = pool.block_size;
        let entries: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let q = q as usize;
                assert!(q / bs < mb, "position {q} beyond row {i}'s block table");
                let blk = tables[i * mb + q / bs] as usize;
                assert!(blk < pool.blocks, "block {blk} outside the pool");
                (blk * bs + q % bs) as u32
            })
            .collect();
        let mut resid = be.zeros(s * d);
        be.copy(&mut resid, x);
        let mut ln = be.zeros(s * d);
        let (mut mean, mut rstd) = (be.zeros(s), be.zeros(s));
        let mut qkv = be.zeros(s * 3 * d);
        let mut atty = be.zeros(s * d);
        let mut fc = be.zeros(s * f);
        let mut act = be.zeros(s * self.hidden);
        for (l, blk) in self.blocks.iter().enumerate() {
            be.layernorm_forward(
                &mut ln,
                &mut mean,
                &mut rstd,
                &resid,
                &p[blk.ln1_w],
                &p[blk.ln1_b],
                s,
                d,
                LN_EPS,
            );
            be.matmul(
                &mut qkv,
                &ln,
                &p[blk.qkv_w],
                s,
                d,
                3 * d,
                false,
                false,
                false,
            );
            be.add_bias(&mut qkv, &p[blk.qkv_b], s, 3 * d);
            be.kv_append(&mut pool.k[l], &mut pool.v[l], &qkv, &entries, d);
            be.attention_decode(
                &mut atty,
                &qkv,
                &pool.k[l],
                &pool.v[l],
                &lens,
                tables,
                pool.block_size,
                d,
                h,
                self.scale(),
            );
            be.matmul(
                &mut resid,
                &atty,
                &p[blk.out_w],
                s,
                d,
                d,
                false,
                false,
                true,
            );
            be.add_bias(&mut resid, &p[blk.out_b], s, d);
            be.layernorm_forward(
                &mut ln,
                &mut mean,
                &mut rstd,
                &resid,
                &p[blk.ln2_w],
                &p[blk.ln2_b],
                s,
                d,
                LN_EPS,
            );
            be.matmul(&mut fc, &ln, &p[blk.fc_w], s, d, f, false, false, false);
            be.add_bias(&mut fc, &p[blk.fc_b], s, f);
            self.ffn_act(be, &mut act, &fc, s);
            be.matmul(
                &mut resid,
                &act,
                &p[blk.proj_w],
                s,
                self.hidden,
                d,
                false,
                false,
                true,
            );
            be.add_bias(&mut resid, &p[blk.proj_b], s, d);
        }
        let mut out = be.zeros(s * d);
        be.layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &resid,
            &p[self.lnf_w],
            &p[self.lnf_b],
            s,
            d,
            LN_EPS,
        );
        out
    }
}
