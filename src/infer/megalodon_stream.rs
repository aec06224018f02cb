//! Streaming MEGALODON inference (spec `megalodon.md` §16): a batch of rows, each at its own
//! offset, fed calls of any size. Per layer a row carries its TimestepNorm statistics, its
//! CEMA state and the keys and values of its current partial attention chunk; the final
//! TimestepNorm carries statistics too. That is all the state there is, so memory does not
//! grow with the number of bytes processed.
//!
//! A row's call is split into pieces that obey the official call rules (§16.2): a piece never
//! straddles a chunk boundary, and a piece starting at a boundary is shorter than a chunk or
//! a whole number of chunks (capped near [`MAX_CALL_TOKENS`] so long prompts keep bounded
//! activations). With these rules streaming reproduces the full-sequence forward. Rows whose
//! next pieces have the same length run together; when that is not the whole batch, their
//! state is moved into a smaller batch and back.

use crate::backend::{Backend, TsnStats};
use crate::model::megalodon::{Carry, LayerActs, Megalodon};
use crate::model::Decoder;

/// Whole chunks per call from a chunk boundary are capped so a call holds about this many
/// tokens (at least one chunk).
pub const MAX_CALL_TOKENS: usize = 4096;

/// One layer's carried state for every row of a batch.
pub struct LayerState<B: Backend> {
    /// TimestepNorm statistics: count `[b]`, mean and var `[b, G]`.
    pub(crate) tsn: TsnStats<B::Buf>,
    /// CEMA state `[b, D, N, 2]`.
    pub(crate) h: B::Buf,
    /// Post-RoPE keys and values of each row's partial chunk.
    pub(crate) kv: B::ChunkCache,
}

/// The carried state of every layer and of the final norm, for `rows` rows.
struct StreamState<B: Backend> {
    layers: Vec<LayerState<B>>,
    final_norm: TsnStats<B::Buf>,
}

/// Which logits [`MegalodonStream::feed`] returns per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One `[256]` row per fed byte.
    All,
    /// Only the prediction after the row's last fed byte (nothing for a row fed no bytes).
    Last,
}

/// Length of the next piece of a call for a row at chunk position `at` (< `chunk`) with
/// `remaining` > 0 bytes to go (spec §16.2).
pub fn piece_len(at: usize, remaining: usize, chunk: usize) -> usize {
    if at > 0 {
        remaining.min(chunk - at)
    } else if remaining < chunk {
        remaining
    } else {
        let max_chunks = (MAX_CALL_TOKENS / chunk).max(1);
        (remaining / chunk).min(max_chunks) * chunk
    }
}

/// A batch of MEGALODON sequences consumed incrementally.
pub struct MegalodonStream<'a, B: Backend> {
    model: &'a Megalodon,
    be: &'a B,
    p: &'a [B::Buf],
    state: StreamState<B>,
    /// Bytes consumed so far, per row.
    consumed: Vec<usize>,
    /// `[rows, V]`: the prediction after each row's latest byte (zeros before its first).
    next_logits: Vec<f32>,
    /// Bytes queued per row by the slot interface ([`Decoder`]) and not yet fed.
    queued: Vec<Vec<u8>>,
    /// Throw-away rows after the real ones in `state`, so that a call over every row holds
    /// at least [`min_call_rows_bytes`] rows without copying the state.
    pad_rows: usize,
    /// Chunk position of the padding rows (they only need to agree with the row they copy).
    pad_at: usize,
}

impl<B: Backend> StreamState<B> {
    fn fresh(model: &Megalodon, be: &B, rows: usize) -> Self {
        let c = &model.cfg;
        let (d, n, g) = (c.model_dim, c.cema_ndim, c.norm_num_groups);
        StreamState {
            layers: (0..c.num_layers)
                .map(|_| LayerState {
                    tsn: TsnStats::fresh(be, rows, g),
                    h: be.zeros(rows * d * n * 2),
                    kv: be.chunk_cache(rows, c.num_heads, c.head_z(), c.head_v(), c.chunk_size),
                })
                .collect(),
            final_norm: TsnStats::fresh(be, rows, g),
        }
    }
}

fn gather_stats<B: Backend>(
    be: &B,
    src: &TsnStats<B::Buf>,
    idx: &[u32],
    g: usize,
) -> TsnStats<B::Buf> {
    let mut out = TsnStats::fresh(be, idx.len(), g);
    be.gather_rows(&mut out.count, &src.count, idx, 1);
    be.gather_rows(&mut out.mean, &src.mean, idx, g);
    be.gather_rows(&mut out.var, &src.var, idx, g);
    out
}

fn scatter_stats<B: Backend>(
    be: &B,
    dst: &mut TsnStats<B::Buf>,
    src: &TsnStats<B::Buf>,
    idx: &[u32],
    g: usize,
) {
    be.scatter_rows(&mut dst.count, &src.count, idx, 1);
    be.scatter_rows(&mut dst.mean, &src.mean, idx, g);
    be.scatter_rows(&mut dst.var, &src.var, idx, g);
}

impl<'a, B: Backend> MegalodonStream<'a, B> {
    /// `rows` fresh sequences.
    pub fn new(model: &'a Megalodon, be: &'a B, p: &'a [B::Buf], rows: usize) -> Self {
        let pad_rows = decode_min_rows(model).saturating_sub(rows);
        MegalodonStream {
            model,
            be,
            p,
            state: StreamState::fresh(model, be, rows + pad_rows),
            pad_rows,
            pad_at: 0,
            consumed: vec![0; rows],
            next_logits: vec![0.0; rows * model.cfg.vocab_size],
            queued: vec![Vec::new(); rows],
        }
    }

    /// Bytes of carried state per row (f32): every layer's norm statistics, CEMA state and
    /// partial-chunk keys and values, plus the final norm and the logits.
    pub fn slot_bytes(model: &Megalodon) -> usize {
        let c = &model.cfg;
        let (d, n, g) = (c.model_dim, c.cema_ndim, c.norm_num_groups);
        let tsn = 1 + 2 * g;
        let kv = c.chunk_size * (c.z_dim + c.value_dim) + 1;
        let layer = tsn + d * n * 2 + kv;
        (c.num_layers * layer + tsn + c.vocab_size) * std::mem::size_of::<f32>()
    }

    /// Copy the carried state of state row `from` into state row `to`.
    fn copy_row_state(&mut self, from: usize, to: usize) {
        let (model, be) = (self.model, self.be);
        let c = &model.cfg;
        let g = c.norm_num_groups;
        let h_width = c.model_dim * c.cema_ndim * 2;
        let (src, dst) = ([from as u32], [to as u32]);
        let mut tmp = be.chunk_cache(1, c.num_heads, c.head_z(), c.head_v(), c.chunk_size);
        let mut h = be.zeros(h_width);
        for st in self.state.layers.iter_mut() {
            let stats = gather_stats(be, &st.tsn, &src, g);
            scatter_stats(be, &mut st.tsn, &stats, &dst, g);
            be.gather_rows(&mut h, &st.h, &src, h_width);
            be.scatter_rows(&mut st.h, &h, &dst, h_width);
            be.chunk_cache_copy_row(&mut tmp, 0, &st.kv, from);
            be.chunk_cache_copy_row(&mut st.kv, to, &tmp, 0);
        }
        let stats = gather_stats(be, &self.state.final_norm, &src, g);
        scatter_stats(be, &mut self.state.final_norm, &stats, &dst, g);
    }

    /// Reset row `r` to a fresh sequence.
    fn reset_row(&mut self, r: usize) {
        let (model, be) = (self.model, self.be);
        let c = &model.cfg;
        let g = c.norm_num_groups;
        let fresh = StreamState::fresh(model, be, 1);
        let h_width = c.model_dim * c.cema_ndim * 2;
        let idx = [r as u32];
        for (st, f) in self.state.layers.iter_mut().zip(&fresh.layers) {
            scatter_stats(be, &mut st.tsn, &f.tsn, &idx, g);
            be.scatter_rows(&mut st.h, &f.h, &idx, h_width);
            be.chunk_cache_copy_row(&mut st.kv, r, &f.kv, 0);
        }
        scatter_stats(be, &mut self.state.final_norm, &fresh.final_norm, &idx, g);
        self.consumed[r] = 0;
        let v = c.vocab_size;
        self.next_logits[r * v..(r + 1) * v].fill(0.0);
        self.queued[r].clear();
    }

    /// One fresh sequence per prompt, each prefilled with its prompt.
    pub fn with_prompts(
        model: &'a Megalodon,
        be: &'a B,
        p: &'a [B::Buf],
        prompts: &[&[u8]],
    ) -> Self {
        let mut s = Self::new(model, be, p, prompts.len());
        for (slot, prompt) in prompts.iter().enumerate() {
            s.insert(slot, prompt);
        }
        let work: Vec<(usize, usize)> = (0..prompts.len()).map(|r| (r, usize::MAX)).collect();
        s.advance(&work);
        s
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.consumed.len()
    }

    /// Bytes consumed so far by each row.
    pub fn consumed(&self) -> &[usize] {
        &self.consumed
    }

    /// `[rows, 256]`: the next-byte logits after each row's latest byte (all zero, i.e.
    /// uniform, for a row that has consumed nothing).
    pub fn next_logits(&self) -> &[f32] {
        &self.next_logits
    }

    /// Append `tokens[r]` to row `r` (any lengths, empty included) and return, per row, the
    /// logits `which` asks for, `[k, 256]` flattened.
    pub fn feed(&mut self, tokens: &[&[u8]], which: Logits) -> Vec<Vec<f32>> {
        let rows = self.rows();
        assert_eq!(tokens.len(), rows, "one token slice per row");
        let (v, chunk) = (self.model.cfg.vocab_size, self.model.cfg.chunk_size);
        let mut out = vec![Vec::new(); rows];
        let mut done = vec![0usize; rows];
        loop {
            let lens: Vec<usize> = (0..rows)
                .map(|r| match tokens[r].len() - done[r] {
                    0 => 0,
                    rem => piece_len(self.consumed[r] % chunk, rem, chunk),
                })
                .collect();
            let mut distinct: Vec<usize> = lens.iter().copied().filter(|&l| l > 0).collect();
            distinct.sort_unstable();
            distinct.dedup();
            if distinct.is_empty() {
                break;
            }
            for len in distinct {
                let sel: Vec<usize> = (0..rows).filter(|&r| lens[r] == len).collect();
                let flat: Vec<u8> = sel
                    .iter()
                    .flat_map(|&r| tokens[r][done[r]..done[r] + len].iter().copied())
                    .collect();
                let logits = self.run_rows(&sel, &flat, len, which);
                let per = if which == Logits::All { len } else { 1 };
                for (k, &r) in sel.iter().enumerate() {
                    let mine = &logits[k * per * v..(k + 1) * per * v];
                    if which == Logits::Last {
                        out[r].clear();
                    }
                    out[r].extend_from_slice(mine);
                    self.next_logits[r * v..(r + 1) * v].copy_from_slice(&mine[(per - 1) * v..]);
                    done[r] += len;
                    self.consumed[r] += len;
                }
            }
        }
        out
    }

    /// Run `len` bytes for each row in `sel` (ascending), `flat` `[sel.len(), len]`.
    fn run_rows(&mut self, sel: &[usize], flat: &[u8], len: usize, which: Logits) -> Vec<f32> {
        self.run_rows_padded(sel, flat, len, which, 0)
    }

    /// [`Self::run_rows`] in a call of at least `min_rows` rows: missing rows are copies of
    /// the first, whose results are dropped.
    fn run_rows_padded(
        &mut self,
        sel: &[usize],
        flat: &[u8],
        len: usize,
        which: Logits,
        min_rows: usize,
    ) -> Vec<f32> {
        let (model, be, p) = (self.model, self.be, self.p);
        let real = sel.len();
        let all = real + self.pad_rows;
        if real == self.rows() && min_rows <= all {
            // Every row: run on the state in place; padding rows get copies of row 0's bytes,
            // after a copy of its state when their chunk position has drifted from its own.
            let chunk = model.cfg.chunk_size;
            let at = self.consumed[sel[0]] % chunk;
            if self.pad_rows > 0 && self.pad_at != at {
                for q in real..all {
                    self.copy_row_state(sel[0], q);
                }
            }
            self.pad_at = (at + len) % chunk;
            let mut flat = flat.to_vec();
            for _ in real..all {
                flat.extend_from_within(..len);
            }
            let mut logits = run_call(model, be, p, &mut self.state, &flat, all, len, which);
            logits.truncate(logits.len() / all * real);
            return logits;
        }
        let c = &model.cfg;
        let g = c.norm_num_groups;
        let h_width = c.model_dim * c.cema_ndim * 2;
        let rows = real.max(min_rows);
        let mut all: Vec<usize> = sel.to_vec();
        all.resize(rows, sel[0]);
        let mut flat = flat.to_vec();
        for _ in real..rows {
            flat.extend_from_within(..len);
        }
        let idx: Vec<u32> = all.iter().map(|&r| r as u32).collect();
        let mut sub = StreamState {
            layers: self
                .state
                .layers
                .iter()
                .map(|st| {
                    let mut h = be.zeros(rows * h_width);
                    be.gather_rows(&mut h, &st.h, &idx, h_width);
                    let mut kv =
                        be.chunk_cache(rows, c.num_heads, c.head_z(), c.head_v(), c.chunk_size);
                    for (k, &r) in all.iter().enumerate() {
                        be.chunk_cache_copy_row(&mut kv, k, &st.kv, r);
                    }
                    LayerState {
                        tsn: gather_stats(be, &st.tsn, &idx, g),
                        h,
                        kv,
                    }
                })
                .collect(),
            final_norm: gather_stats(be, &self.state.final_norm, &idx, g),
        };
        let mut logits = run_call(model, be, p, &mut sub, &flat, rows, len, which);
        // Keep the real rows only.
        let keep: Vec<u32> = (0..real as u32).collect();
        let real_idx = &idx[..real];
        for (st, part) in self.state.layers.iter_mut().zip(&sub.layers) {
            let kept = gather_stats(be, &part.tsn, &keep, g);
            scatter_stats(be, &mut st.tsn, &kept, real_idx, g);
            let mut h = be.zeros(real * h_width);
            be.gather_rows(&mut h, &part.h, &keep, h_width);
            be.scatter_rows(&mut st.h, &h, real_idx, h_width);
            for (k, &r) in sel.iter().enumerate() {
                be.chunk_cache_copy_row(&mut st.kv, r, &part.kv, k);
            }
        }
        let kept = gather_stats(be, &sub.final_norm, &keep, g);
        scatter_stats(be, &mut self.state.final_norm, &kept, real_idx, g);
        logits.truncate(logits.len() / rows * real);
        logits
    }
}

/// Most decoding rows in one model call: the CPU backend computes `x·Wᵀ` products of up to
/// this many rows with its few-row kernel (`backend::cpu::matmul::small_m::MAX_ROWS`), whose
/// rows are independent of each other; more rows go to gemm, whose per-row sums differ.
const DECODE_GROUP_ROWS: usize = crate::backend::cpu::matmul::small_m::MAX_ROWS;

/// Fewest rows per decoding call: none extra when the few-row kernel covers the padding
/// minimum (its rows never depend on the row count), else [`min_call_rows_bytes`].
fn decode_min_rows(model: &Megalodon) -> usize {
    let min = min_call_rows_bytes(model);
    if min <= DECODE_GROUP_ROWS {
        1
    } else {
        min
    }
}

/// Fewest rows·bytes per call for which the CPU `gemm` gives every row of the model's
/// `x·Wᵀ` products the same result whatever the row count: it has a separate path for a
/// single row and, for `x·Wᵀ`, one for outputs of at most 256 elements (rows × width).
fn min_call_rows_bytes(model: &Megalodon) -> usize {
    let c = &model.cfg;
    let narrowest = [
        c.z_dim,
        c.value_dim,
        c.model_dim,
        c.ffn_hidden_dim,
        c.vocab_size,
    ]
    .into_iter()
    .min()
    .unwrap_or(1)
    .max(1);
    (256 / narrowest + 1).max(2)
}

/// One legal call of `l` bytes for each of the `b` rows of `state`; returns the host logits
/// `which` asks for (`[b·l, V]` or `[b, V]`).
#[allow(clippy::too_many_arguments)]
fn run_call<B: Backend>(
    model: &Megalodon,
    be: &B,
    p: &[B::Buf],
    state: &mut StreamState<B>,
    tokens: &[u8],
    b: usize,
    l: usize,
    which: Logits,
) -> Vec<f32> {
    let c = &model.cfg;
    let (d, g, v) = (c.model_dim, c.norm_num_groups, c.vocab_size);
    let n = b * l;
    let eps = c.norm_eps as f32;
    let ids: Vec<u32> = tokens.iter().map(|&x| x as u32).collect();
    let mut x = be.zeros(n * d);
    model.embed(be, p, &mut x, &ids);
    let mut y = be.zeros(n * d);
    let mut acts = LayerActs::new(be, c, b, l);
    for (lp, st) in model.layer_params().iter().zip(state.layers.iter_mut()) {
        model.layer_forward(be, p, lp, &mut acts, &x, &mut y, b, l, Carry::Stream(st));
        std::mem::swap(&mut x, &mut y);
    }
    let (fw, fb) = model.final_norm::<B>(p);
    let mut hn = be.zeros(n * d);
    if l == 1 {
        be.timestep_norm_step(&mut hn, &mut state.final_norm, &x, fw, fb, b, d, g, eps);
    } else {
        let mut next = TsnStats::fresh(be, b, g);
        let (mut sm, mut sr) = (be.zeros(n * g), be.zeros(n * g));
        be.timestep_norm_forward(
            &mut hn,
            &mut sm,
            &mut sr,
            Some(&mut next),
            &x,
            fw,
            fb,
            Some(&state.final_norm),
            b,
            l,
            d,
            g,
            eps,
        );
        state.final_norm = next;
    }
    let (rows, src) = match which {
        Logits::Last if l > 1 => {
            let idx: Vec<u32> = (0..b).map(|i| (i * l + l - 1) as u32).collect();
            let mut last = be.zeros(b * d);
            be.gather_rows(&mut last, &hn, &idx, d);
            (b, last)
        }
        _ => (if which == Logits::All { n } else { b }, hn),
    };
    let mut logits = be.zeros(rows * v);
    model.head(be, p, &mut logits, &src, rows);
    be.download(&logits)
}

impl<B: Backend> Decoder for MegalodonStream<'_, B> {
    fn capacity(&self) -> usize {
        self.rows()
    }

    fn insert(&mut self, slot: usize, prompt: &[u8]) {
        self.reset_row(slot);
        self.queued[slot] = prompt.to_vec();
    }

    fn remove(&mut self, slot: usize) {
        self.queued[slot].clear();
    }

    fn push(&mut self, slot: usize, byte: u8) {
        self.queued[slot].push(byte);
    }

    fn pending(&self, slot: usize) -> usize {
        self.queued[slot].len()
    }

    /// Sequences with one byte queued (decoding) run together in one call; longer queues
    /// (prefill) run alone, one chunk-aligned piece of at most one chunk per call, taking the
    /// budget up to the next chunk boundary. Every call holds at least
    /// [`min_call_rows_bytes`] rows × bytes (padded with copies), so the pieces of a
    /// sequence depend on its bytes alone and its arithmetic on nothing else: results do not
    /// depend on the budget or on the other slots.
    fn advance(&mut self, work: &[(usize, usize)]) {
        let (v, chunk) = (self.model.cfg.vocab_size, self.model.cfg.chunk_size);
        let min = min_call_rows_bytes(self.model);
        // Prefill calls always hold more rows·bytes than the few-row kernel takes, so every
        // prefill product goes through gemm whatever the piece length.
        let prefill_min = min.max(DECODE_GROUP_ROWS + 1);
        let decode_min = decode_min_rows(self.model);
        let mut decoding = Vec::new();
        for &(slot, max) in work {
            let queued = self.queued[slot].len();
            let mut left = max.min(queued);
            if left == 0 {
                continue;
            }
            if queued == 1 {
                decoding.push(slot);
                continue;
            }
            let mut done = 0;
            while left > 0 {
                let at = self.consumed[slot] % chunk;
                let len = (chunk - at).min(queued - done);
                let piece = self.queued[slot][done..done + len].to_vec();
                let logits = self.run_rows_padded(
                    &[slot],
                    &piece,
                    len,
                    Logits::Last,
                    prefill_min.div_ceil(len).max(2),
                );
                self.next_logits[slot * v..(slot + 1) * v].copy_from_slice(&logits[..v]);
                self.consumed[slot] += len;
                done += len;
                left = left.saturating_sub(len);
            }
            self.queued[slot].drain(..done);
        }
        if decoding.is_empty() {
            return;
        }
        decoding.sort_unstable();
        // Groups of at most DECODE_GROUP_ROWS rows: a call's row count then never crosses from
        // the CPU matmul's few-row kernel into gemm (whose per-row sums differ), so a row's
        // bytes do not depend on how many other rows decode with it.
        for group in decoding.chunks(DECODE_GROUP_ROWS) {
            let flat: Vec<u8> = group.iter().map(|&r| self.queued[r][0]).collect();
            let logits = self.run_rows_padded(group, &flat, 1, Logits::Last, decode_min);
            for (k, &r) in group.iter().enumerate() {
                self.next_logits[r * v..(r + 1) * v].copy_from_slice(&logits[k * v..(k + 1) * v]);
                self.consumed[r] += 1;
                self.queued[r].clear();
            }
        }
    }

    fn slot_logits(&self, slot: usize) -> &[f32] {
        let v = self.model.cfg.vocab_size;
        &self.next_logits[slot * v..(slot + 1) * v]
    }

    fn cache_positions(&self, _slot: usize, _more: usize) -> usize {
        0
    }

    fn logits(&self) -> &[f32] {
        self.next_logits()
    }
}
