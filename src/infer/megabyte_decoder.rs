//! KV-cached batched MEGABYTE decoding (spec/megabyte.md §5): the global model runs once per
//! patch, only for the rows that just completed one; the local model runs once per byte for
//! every row, with a local cache that restarts at each patch boundary. Rows may sit at
//! different phases (ragged prompts).

use crate::backend::{Backend, PAD_ID};
use crate::model::megabyte::Megabyte;
use crate::model::transformer::{CacheSet, KvCache};

/// One sequence's decoding state.
struct Row<B: Backend> {
    /// Every byte of the sequence so far (prompt and generated).
    bytes: Vec<u8>,
    /// Offset in `bytes` where the model's context window starts (positions restart there).
    start: usize,
    /// Global KV cache: one entry per global position (pad patch + each completed patch).
    global: KvCache<B>,
}

impl<B: Backend> Row<B> {
    fn window(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Batched incremental decoder over a fixed set of rows.
pub struct MegabyteDecoder<'a, B: Backend> {
    model: &'a Megabyte,
    be: &'a B,
    p: &'a [B::Buf],
    rows: Vec<Row<B>>,
    /// Local KV cache `[rows, P, D_L]` per local layer.
    local: KvCache<B>,
    /// `[rows·P, D_L]`: `W_GL` applied to the P slices of each row's latest global output.
    cond: B::Buf,
    /// `[rows, 256]` next-byte logits, on the host.
    logits: Vec<f32>,
}

impl<'a, B: Backend> MegabyteDecoder<'a, B> {
    /// Prefill every row with its prompt. Prompts longer than the context keep their last
    /// `max_seq_len − 1` bytes in the window.
    pub fn new(model: &'a Megabyte, be: &'a B, p: &'a [B::Buf], prompts: &[&[u8]]) -> Self {
        let c = &model.cfg;
        let rows = prompts.len();
        let mut dec = MegabyteDecoder {
            model,
            be,
            p,
            rows: Vec::with_capacity(rows),
            local: model.local.kv_cache(be, rows, c.patch_size),
            cond: be.zeros(rows * c.patch_size * c.local_dim),
            logits: vec![0.0; rows * c.vocab_size],
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let start = prompt.len().saturating_sub(c.max_seq_len - 1);
            dec.rows.push(Row {
                bytes: prompt.to_vec(),
                start,
                global: model.global.kv_cache(be, 1, c.patches()),
            });
            dec.prefill(i, dec.rows[i].bytes.len());
        }
        dec
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Next-byte logits of every row, `[rows, 256]`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// All bytes of row `i` so far.
    pub fn bytes(&self, i: usize) -> &[u8] {
        &self.rows[i].bytes
    }

    /// Run the model on row `i`'s window up to (not including) absolute byte `end`, filling
    /// its global cache, its conditioning and its local cache, and its logits row.
    fn prefill(&mut self, i: usize, end: usize) {
        let (m, be, p) = (self.model, self.be, self.p);
        let c = &m.cfg;
        let e = m.embeds();
        let (pp, dg, dl, pd) = (c.patch_size, c.global_byte_dim, c.local_dim, c.patch_dim());
        let row = &mut self.rows[i];
        let w = &row.bytes[row.start..end];
        let n = w.len();
        let (ks, ps) = (n / pp, n % pp);

        // Global: positions 0..=ks (pad patch, then the ks completed patches).
        let gt = (ks + 1) * pp;
        let mut padded = w[..ks * pp].to_vec();
        padded.resize(gt, 0);
        let (ids, pos) = m.global_inputs(&padded, 1, gt);
        let mut g_in = be.zeros((ks + 1) * pd);
        be.patch_embed_forward(
            &mut g_in,
            &p[e.g_tok],
            &p[e.g_pos],
            &p[e.g_pad],
            &ids,
            &pos,
            pp,
            dg,
        );
        let mut acts = m.global.acts(be, 1, ks + 1, false);
        let g_x = project(be, p, e.in_proj, &g_in, ks + 1, pd, c.global_dim);
        m.global
            .forward(be, p, &mut acts, g_x.as_ref().unwrap_or(&g_in));
        m.global
            .fill_cache_from_forward(be, &acts, &mut row.global, 0);
        let mut last = be.zeros(c.global_dim);
        be.gather_rows(&mut last, &acts.out, &[ks as u32], c.global_dim);
        let last_out = project(be, p, e.out_proj, &last, 1, c.global_dim, pd);
        let mut cond = be.zeros(pp * dl);
        be.matmul(
            &mut cond,
            last_out.as_ref().unwrap_or(&last),
            &p[e.gl],
            pp,
            dg,
            dl,
            false,
            false,
            false,
        );
        let cond_rows: Vec<u32> = (0..pp).map(|q| (i * pp + q) as u32).collect();
        be.scatter_rows(&mut self.cond, &cond, &cond_rows, dl);

        // Local: positions 0..=ps of the current patch.
        let lt = ps + 1;
        let mut l_in = be.zeros(lt * dl);
        be.gather_rows(&mut l_in, &self.cond, &cond_rows[..lt], dl);
        let ids: Vec<u32> = (0..lt)
            .map(|q| {
                if q == 0 {
                    PAD_ID
                } else {
                    w[ks * pp + q - 1] as u32
                }
            })
            .collect();
        let slots: Vec<u32> = (0..lt as u32).collect();
        be.local_embed_forward(
            &mut l_in,
            &p[e.l_tok],
            &p[e.l_pos],
            &p[e.l_pad],
            &ids,
            &slots,
            dl,
        );
        let mut lacts = m.local.acts(be, 1, lt, false);
        m.local.forward(be, p, &mut lacts, &l_in);
        m.local
            .fill_cache_from_forward(be, &lacts, &mut self.local, i);
        let mut out = be.zeros(dl);
        be.gather_rows(&mut out, &lacts.out, &[ps as u32], dl);
        let logits = self.head(&out, 1);
        self.logits[i * c.vocab_size..(i + 1) * c.vocab_size].copy_from_slice(&logits);
    }

    /// `out · E_lembᵀ` for `rows` rows, on the host.
    fn head(&self, out: &B::Buf, rows: usize) -> Vec<f32> {
        let c = &self.model.cfg;
        let mut logits = self.be.zeros(rows * c.vocab_size);
        let e = self.model.embeds();
        self.be.matmul(
            &mut logits,
            out,
            &self.p[e.l_tok],
            rows,
            c.local_dim,
            c.vocab_size,
            false,
            true,
            false,
        );
        if let Some(hb) = e.head_bias {
            self.be
                .add_bias(&mut logits, &self.p[hb], rows, c.vocab_size);
        }
        self.be.download(&logits)
    }

    /// Append `next[i]` to row `i` for every row and compute the next logits.
    pub fn step(&mut self, next: &[u8]) {
        assert_eq!(next.len(), self.rows.len());
        let (m, be, p) = (self.model, self.be, self.p);
        let c = &m.cfg;
        let e = m.embeds();
        let (pp, dg, dl, pd) = (c.patch_size, c.global_byte_dim, c.local_dim, c.patch_dim());
        let rows = self.rows.len();
        for (i, &byte) in next.iter().enumerate() {
            self.rows[i].bytes.push(byte);
            if self.rows[i].window().len() == c.max_seq_len {
                // Context full: slide to the last half and rebuild the caches from the window
                // minus its newest byte, which the step below then consumes as usual.
                let row = &mut self.rows[i];
                row.start = row.bytes.len() - c.max_seq_len / 2;
                let end = row.bytes.len() - 1;
                self.prefill(i, end);
            }
        }
        // Rows that just completed a patch take one global step.
        let lens: Vec<usize> = self.rows.iter().map(|r| r.window().len()).collect();
        let due: Vec<usize> = (0..rows).filter(|&i| lens[i] % pp == 0).collect();
        if !due.is_empty() {
            let s = due.len();
            let mut ids = Vec::with_capacity(s * pp);
            let mut pos = Vec::with_capacity(s * pp);
            for &i in &due {
                let (w, n) = (self.rows[i].window(), lens[i]);
                ids.extend(w[n - pp..].iter().map(|&x| x as u32));
                pos.extend((n - pp..n).map(|t| t as u32));
            }
            let mut g_in = be.zeros(s * pd);
            be.patch_embed_forward(
                &mut g_in,
                &p[e.g_tok],
                &p[e.g_pos],
                &p[e.g_pad],
                &ids,
                &pos,
                pp,
                dg,
            );
            let g_x = project(be, p, e.in_proj, &g_in, s, pd, c.global_dim);
            let gpos: Vec<u32> = due.iter().map(|&i| (lens[i] / pp) as u32).collect();
            let mut caches = Vec::with_capacity(s);
            let mut due_iter = due.iter().peekable();
            for (i, r) in self.rows.iter_mut().enumerate() {
                if due_iter.peek() == Some(&&i) {
                    caches.push(&mut r.global);
                    due_iter.next();
                }
            }
            let g = m.global.decode_step(
                be,
                p,
                &mut CacheSet::PerRow(caches),
                g_x.as_ref().unwrap_or(&g_in),
                &gpos,
            );
            let g_out = project(be, p, e.out_proj, &g, s, c.global_dim, pd);
            let mut cond = be.zeros(s * pp * dl);
            be.matmul(
                &mut cond,
                g_out.as_ref().unwrap_or(&g),
                &p[e.gl],
                s * pp,
                dg,
                dl,
                false,
                false,
                false,
            );
            let rows_idx: Vec<u32> = due
                .iter()
                .flat_map(|&i| (0..pp).map(move |q| (i * pp + q) as u32))
                .collect();
            be.scatter_rows(&mut self.cond, &cond, &rows_idx, dl);
        }
        // Every row takes one local step at its slot.
        let slots: Vec<u32> = lens.iter().map(|&n| (n % pp) as u32).collect();
        let cond_rows: Vec<u32> = (0..rows).map(|i| (i * pp) as u32 + slots[i]).collect();
        let ids: Vec<u32> = (0..rows)
            .map(|i| {
                if slots[i] == 0 {
                    PAD_ID
                } else {
                    self.rows[i].window()[lens[i] - 1] as u32
                }
            })
            .collect();
        let mut l_in = be.zeros(rows * dl);
        be.gather_rows(&mut l_in, &self.cond, &cond_rows, dl);
        be.local_embed_forward(
            &mut l_in,
            &p[e.l_tok],
            &p[e.l_pos],
            &p[e.l_pad],
            &ids,
            &slots,
            dl,
        );
        let out = m.local.decode_step(
            be,
            p,
            &mut CacheSet::Batched(&mut self.local),
            &l_in,
            &slots,
        );
        self.logits = self.head(&out, rows);
    }
}

/// `x · W + b` for an optional projection `(W, b)` of shape `[din, dout]`; `None` when absent.
fn project<B: Backend>(
    be: &B,
    p: &[B::Buf],
    proj: Option<(usize, usize)>,
    x: &B::Buf,
    rows: usize,
    din: usize,
    dout: usize,
) -> Option<B::Buf> {
    proj.map(|(w, b)| {
        let mut y = be.zeros(rows * dout);
        be.matmul(&mut y, x, &p[w], rows, din, dout, false, false, false);
        be.add_bias(&mut y, &p[b], rows, dout);
        y
    })
}

impl<B: Backend> crate::model::Decoder for MegabyteDecoder<'_, B> {
    fn rows(&self) -> usize {
        MegabyteDecoder::rows(self)
    }

    fn logits(&self) -> &[f32] {
        MegabyteDecoder::logits(self)
    }

    fn step(&mut self, next: &[u8]) {
        MegabyteDecoder::step(self, next)
    }
}
