//! KV-cached MEGABYTE decoding over slots (spec/megabyte.md §5), for continuous batching.
//!
//! A sequence's work is a series of *events*: event `n` reads the first `n` bytes of its
//! window and yields the prediction of byte `n`. When `n` is a multiple of `P` the global
//! model first takes one step at global position `n/P` (the pad patch for `n = 0`, else the
//! patch just completed), which conditions the `P` local positions of the new patch; then the
//! local model takes one step at slot `n mod P`. [`MegabyteDecoder::advance`] runs any number
//! of events for many sequences in one global and one local decode step (two local steps on a
//! backend whose streams overlap: the rows without a global step run theirs on the main
//! stream while the global step runs on the side stream, design.md §5): events of one
//! sequence attend to the keys of its earlier ones, so a prompt prefilled in chunks computes
//! exactly what it computes in one go, and local steps for patches already completed within
//! the call are skipped (the local cache restarts at every patch).
//!
//! Each event's arithmetic is the same whatever else is in the step, provided the matrix
//! products are batch-invariant. The CPU `gemm` path for a single row (`m = 1`) rounds
//! differently from the path for `m ≥ 2`, so a step with one row is padded with a throw-away
//! copy of that row (see [`pad_to_two`]).
//!
//! The caches are paged pools allocated once (docs/megabyte-model.md, "Serving cache"): the
//! global KV of every sequence lives in one pool per layer, `[blocks, block_size, D_G]`, at the
//! blocks of the slot's block table (handed out by the serving engine's allocator, or fixed
//! per slot for standalone generation); the local KV of slot `s` is block `s` of a local pool
//! with blocks of `P` positions. One more block in each pool takes the throw-away padding row.
//! When a window reaches the context length it slides to its last half and the caches are
//! rebuilt from it, into the same blocks.

use crate::backend::{Backend, PAD_ID};
use crate::model::megabyte::Megabyte;
use crate::model::transformer::KvPool;
use crate::model::Decoder;

/// One sequence's decoding state.
struct Row {
    /// The bytes of the model's context window (positions restart at its first byte).
    window: Vec<u8>,
    /// Events run so far: the caches reflect `window[..events - 1]` (nothing when 0).
    events: usize,
    /// `Some(end)`: the global steps of events `events..end` were issued on the side stream
    /// ([`InFlight`]); their local steps run in a later call, after it lands.
    awaiting: Option<usize>,
}

impl Row {
    /// Events still to run: one per window length `events..=window.len()`.
    fn pending(&self) -> usize {
        self.window.len() + 1 - self.events
    }
}

/// Events `first..end` of the sequence in `slot`, planned for one call.
struct Plan {
    slot: usize,
    first: usize,
    end: usize,
}

/// Global steps issued on the side stream by one [`Decoder::advance`] and not yet landed: the
/// new conditioning rows of the sequences that took one, written to `cond` by the next call
/// after it joins the streams.
struct InFlight<Buf> {
    /// `[r·P, D_L]`: `P` conditioning rows per sequence, in `slots` order.
    rows: Buf,
    /// The slot of each sequence; `None` once the sequence left its slot (its rows are
    /// dropped, and a new sequence in the slot must not get them).
    slots: Vec<Option<usize>>,
}

/// Batched incremental MEGABYTE decoder over a fixed number of slots.
pub struct MegabyteDecoder<'a, B: Backend> {
    model: &'a Megabyte,
    be: &'a B,
    p: &'a [B::Buf],
    slots: Vec<Option<Row>>,
    /// Global KV block ids of each slot, in position order.
    tables: Vec<Vec<u32>>,
    /// Global KV pool; its last block takes the padding row of single-row steps.
    global: KvPool<B>,
    /// Local KV pool, one block of `P` positions per slot plus the padding row's.
    local: KvPool<B>,
    /// `[slots·P, D_L]`: `W_GL` applied to the P slices of each slot's latest global output.
    cond: B::Buf,
    /// `[slots, 256]` next-byte logits, on the host.
    logits: Vec<f32>,
    /// Global steps still running on the side stream (only where streams overlap).
    in_flight: Option<InFlight<B::Buf>>,
}

impl<'a, B: Backend> MegabyteDecoder<'a, B> {
    /// One sequence per prompt, each prefilled with its prompt. Prompts longer than the
    /// context keep their last `max_seq_len − 1` bytes in the window.
    pub fn new(model: &'a Megabyte, be: &'a B, p: &'a [B::Buf], prompts: &[&[u8]]) -> Self {
        let mut dec = Self::with_slots(model, be, p, prompts.len(), model.cfg.patches());
        for (slot, prompt) in prompts.iter().enumerate() {
            dec.insert(slot, prompt);
        }
        dec.complete(&(0..prompts.len()).collect::<Vec<_>>());
        dec
    }

    /// `slots` empty slots, each owning the global KV blocks for a full context (blocks of
    /// `block_size` positions, slot `s` holding the `s`-th run of them): standalone use,
    /// without an allocator.
    pub fn with_slots(
        model: &'a Megabyte,
        be: &'a B,
        p: &'a [B::Buf],
        slots: usize,
        block_size: usize,
    ) -> Self {
        let per_slot = Self::blocks_per_context(model, block_size);
        let mut dec = Self::with_pool(model, be, p, slots, block_size, slots * per_slot);
        for slot in 0..slots {
            let first = (slot * per_slot) as u32;
            dec.set_block_table(slot, &(first..first + per_slot as u32).collect::<Vec<_>>());
        }
        dec
    }

    /// `slots` empty slots over a global KV pool of `blocks` blocks of `block_size` positions,
    /// allocated here once; a slot's blocks come from [`Decoder::set_block_table`].
    pub fn with_pool(
        model: &'a Megabyte,
        be: &'a B,
        p: &'a [B::Buf],
        slots: usize,
        block_size: usize,
        blocks: usize,
    ) -> Self {
        let c = &model.cfg;
        let block_size = block_size.max(1);
        MegabyteDecoder {
            model,
            be,
            p,
            slots: (0..slots).map(|_| None).collect(),
            tables: vec![Vec::new(); slots],
            global: model.global.kv_pool(be, blocks + 1, block_size),
            local: model.local.kv_pool(be, slots + 1, c.patch_size),
            cond: be.zeros(slots * c.patch_size * c.local_dim),
            logits: vec![0.0; slots * c.vocab_size],
            in_flight: None,
        }
    }

    /// Bytes of every cache buffer this decoder allocated (both KV pools with their padding
    /// blocks, the conditioning, the host logits): what `--cache-memory` must cover.
    pub fn cache_bytes(&self) -> usize {
        let be = self.be;
        let pool = |p: &KvPool<B>| p.k.iter().chain(&p.v).map(|b| be.len(b)).sum::<usize>();
        let floats =
            pool(&self.global) + pool(&self.local) + be.len(&self.cond) + self.logits.len();
        floats * std::mem::size_of::<f32>()
    }

    /// Global KV blocks of `block_size` positions one full context needs.
    pub fn blocks_per_context(model: &Megabyte, block_size: usize) -> usize {
        model.cfg.patches().div_ceil(block_size.max(1))
    }

    /// Number of slots.
    pub fn rows(&self) -> usize {
        self.slots.len()
    }

    /// `[slots, 256]` next-byte logits of every slot.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Append `next[i]` to the sequence in slot `i` (every slot occupied) and compute the
    /// next logits.
    pub fn step(&mut self, next: &[u8]) {
        Decoder::step(self, next)
    }

    /// Bytes of the global cache per position (keys and values of every global layer, f32).
    pub fn global_bytes_per_position(model: &Megabyte) -> usize {
        model.global.kv_bytes_per_position()
    }

    /// Fixed bytes per slot: local cache, conditioning and logits.
    pub fn slot_bytes(model: &Megabyte) -> usize {
        let c = &model.cfg;
        let local = 2 * c.local_layers * c.patch_size * c.local_dim;
        (local + c.patch_size * c.local_dim + c.vocab_size) * std::mem::size_of::<f32>()
    }

    fn row(&self, slot: usize) -> &Row {
        self.slots[slot]
            .as_ref()
            .unwrap_or_else(|| panic!("slot {slot} is empty"))
    }

    /// Global steps for every event `e ≡ 0 (mod P)` of the plans. Returns the new
    /// conditioning rows `[r·P, D_L]` of the `r` sequences that took one, with their slots;
    /// [`MegabyteDecoder::write_cond`] stores them (this may run on the side stream, while
    /// the main stream's local steps read `cond`).
    fn run_global(&mut self, plans: &[Plan]) -> Option<InFlight<B::Buf>> {
        let (m, be, p) = (self.model, self.be, self.p);
        let c = &m.cfg;
        let e = m.embeds();
        let (pp, dg, dl, pd) = (c.patch_size, c.global_byte_dim, c.local_dim, c.patch_dim());
        // (plan index, global position) of every step, in plan order then position order.
        let mut steps: Vec<(usize, usize)> = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            let first_patch = plan.first.div_ceil(pp);
            let last_patch = (plan.end - 1) / pp;
            steps.extend((first_patch..=last_patch).map(|g| (k, g)));
        }
        if steps.is_empty() {
            return None;
        }
        // Each step row reads and writes its sequence's blocks; the padding row the scratch block.
        let bs = self.global.block_size;
        let scratch = (self.global.blocks - 1) as u32;
        let width = steps
            .iter()
            .map(|&(k, _)| self.tables[plans[k].slot].len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = Vec::with_capacity((steps.len() + 1) * width);
        for &(k, g) in &steps {
            let table = &self.tables[plans[k].slot];
            assert!(
                g / bs < table.len(),
                "slot {}: block table of {} blocks does not reach global position {g}",
                plans[k].slot,
                table.len()
            );
            tables.extend_from_slice(table);
            tables.extend(std::iter::repeat_n(scratch, width - table.len()));
        }
        let mut ids = Vec::with_capacity(steps.len() * pp);
        let mut pos = Vec::with_capacity(steps.len() * pp);
        for &(k, g) in &steps {
            if g == 0 {
                ids.extend(std::iter::repeat_n(PAD_ID, pp));
                pos.extend(std::iter::repeat_n(0u32, pp));
            } else {
                let w = &self.row(plans[k].slot).window;
                ids.extend(w[(g - 1) * pp..g * pp].iter().map(|&x| x as u32));
                pos.extend(((g - 1) * pp..g * pp).map(|t| t as u32));
            }
        }
        let (ids, pos) = pad_ids(&ids, &pos, pp);
        let s = ids.len() / pp;
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
        let mut gpos: Vec<u32> = steps.iter().map(|&(_, g)| g as u32).collect();
        if s > steps.len() {
            gpos.push(0);
            tables.extend(std::iter::repeat_n(scratch, width));
        }
        let g = m.global.decode_step(
            be,
            p,
            &mut self.global,
            &tables,
            g_x.as_ref().unwrap_or(&g_in),
            &gpos,
        );
        // The latest global output of every sequence that stepped conditions its patch.
        let mut last_step = Vec::new();
        let mut cond_slots = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            if let Some(i) = steps.iter().rposition(|st| st.0 == k) {
                last_step.push(i as u32);
                cond_slots.push(plan.slot);
            }
        }
        let r = cond_slots.len();
        let last_idx = pad_to_two(&last_step);
        let r2 = last_idx.len();
        let mut last = be.zeros(r2 * c.global_dim);
        be.gather_rows(&mut last, &g, &last_idx, c.global_dim);
        let last_out = project(be, p, e.out_proj, &last, r2, c.global_dim, pd);
        let mut cond = be.zeros(r2 * pp * dl);
        be.matmul(
            &mut cond,
            last_out.as_ref().unwrap_or(&last),
            &p[e.gl],
            r2 * pp,
            dg,
            dl,
            false,
            false,
            false,
        );
        let mut real = be.zeros(r * pp * dl);
        let real_rows: Vec<u32> = (0..(r * pp) as u32).collect();
        be.gather_rows(&mut real, &cond, &real_rows, dl);
        Some(InFlight {
            rows: real,
            slots: cond_slots.into_iter().map(Some).collect(),
        })
    }

    /// Stores the conditioning rows of `new` in `cond`, for the sequences still in their slot.
    fn write_cond(&mut self, new: InFlight<B::Buf>) {
        let (be, c) = (self.be, &self.model.cfg);
        let (pp, dl) = (c.patch_size, c.local_dim);
        let kept: Vec<(usize, usize)> = new
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.map(|s| (i, s)))
            .collect();
        let dst: Vec<u32> = kept
            .iter()
            .flat_map(|&(_, slot)| (0..pp).map(move |q| (slot * pp + q) as u32))
            .collect();
        if kept.len() == new.slots.len() {
            be.scatter_rows(&mut self.cond, &new.rows, &dst, dl);
        } else if !kept.is_empty() {
            let src: Vec<u32> = kept
                .iter()
                .flat_map(|&(i, _)| (0..pp).map(move |q| (i * pp + q) as u32))
                .collect();
            let mut rows = be.zeros(src.len() * dl);
            be.gather_rows(&mut rows, &new.rows, &src, dl);
            be.scatter_rows(&mut self.cond, &rows, &dst, dl);
        }
    }

    /// Waits for the global steps of the previous call and stores their conditioning.
    fn land(&mut self) {
        if let Some(new) = self.in_flight.take() {
            self.be.join();
            self.write_cond(new);
        }
    }

    /// This call's plan for each `(slot, max)` of `work`: a row whose global steps are in
    /// flight finishes exactly those events; any other runs up to `max` more.
    fn plans(&self, work: &[(usize, usize)]) -> Vec<Plan> {
        work.iter()
            .filter_map(|&(slot, max)| {
                let row = self.row(slot);
                let end = match row.awaiting {
                    Some(end) => end,
                    None => row.events + max.min(row.pending()),
                };
                (end > row.events).then_some(Plan {
                    slot,
                    first: row.events,
                    end,
                })
            })
            .collect()
    }

    /// Whether `plan` includes a global step (an event at a patch boundary).
    fn needs_global(&self, plan: &Plan) -> bool {
        let pp = self.model.cfg.patch_size;
        self.row(plan.slot).awaiting.is_none() && plan.first.div_ceil(pp) <= (plan.end - 1) / pp
    }

    fn finish(&mut self, plans: &[Plan]) {
        for plan in plans {
            if let Some(row) = self.slots[plan.slot].as_mut() {
                row.events = plan.end;
                row.awaiting = None;
            }
        }
    }

    /// Where streams overlap: lands the previous call's global steps, issues this call's on
    /// the side stream, and meanwhile runs on the main stream the local steps of every row
    /// whose conditioning is ready. A row that takes a global step runs its local steps in
    /// the next call, so the global model's latency is hidden from every other row, and a
    /// step costs about max(global, local) instead of their sum (docs/perf.md §8.6).
    fn advance_overlapped(&mut self, work: &[(usize, usize)]) {
        self.land();
        let plans = self.plans(work);
        let (global, local): (Vec<Plan>, Vec<Plan>) =
            plans.into_iter().partition(|p| self.needs_global(p));
        if !global.is_empty() {
            let be = self.be;
            self.in_flight = be.fork(|| self.run_global(&global));
            for plan in &global {
                if let Some(row) = self.slots[plan.slot].as_mut() {
                    row.awaiting = Some(plan.end);
                }
            }
        }
        self.run_local(&local);
        self.finish(&local);
    }

    /// Runs every queued event of `slots` until their logits are current.
    pub fn complete(&mut self, slots: &[usize]) {
        Decoder::complete(self, slots)
    }

    /// Local steps for the events of each plan's last patch; computes the logits of every
    /// plan that reaches the end of its window.
    fn run_local(&mut self, plans: &[Plan]) {
        let (m, be, p) = (self.model, self.be, self.p);
        let c = &m.cfg;
        let e = m.embeds();
        let (pp, dl) = (c.patch_size, c.local_dim);
        if plans.is_empty() {
            return;
        }
        // (plan index, event) of every local step.
        let mut steps: Vec<(usize, usize)> = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            let last = plan.end - 1;
            let from = plan.first.max(last - last % pp);
            steps.extend((from..=last).map(|ev| (k, ev)));
        }
        let mut cond_rows = Vec::with_capacity(steps.len());
        let mut ids = Vec::with_capacity(steps.len());
        let mut slots_q = Vec::with_capacity(steps.len());
        for &(k, ev) in &steps {
            let q = ev % pp;
            let slot = plans[k].slot;
            cond_rows.push((slot * pp + q) as u32);
            ids.push(if q == 0 {
                PAD_ID
            } else {
                self.row(slot).window[ev - 1] as u32
            });
            slots_q.push(q as u32);
        }
        let pad = steps.len() == 1;
        if pad {
            cond_rows.push(cond_rows[0]);
            ids.push(ids[0]);
            slots_q.push(slots_q[0]);
        }
        let s = ids.len();
        let mut l_in = be.zeros(s * dl);
        be.gather_rows(&mut l_in, &self.cond, &cond_rows, dl);
        be.local_embed_forward(
            &mut l_in,
            &p[e.l_tok],
            &p[e.l_pos],
            &p[e.l_pad],
            &ids,
            &slots_q,
            dl,
        );
        // Slot `s`'s local cache is block `s` of the local pool; the padding row's is the last.
        let mut lpos = slots_q.clone();
        let mut tables: Vec<u32> = steps.iter().map(|&(k, _)| plans[k].slot as u32).collect();
        if pad {
            lpos[1] = 0;
            tables.push((self.local.blocks - 1) as u32);
        }
        let out = m
            .local
            .decode_step(be, p, &mut self.local, &tables, &l_in, &lpos);
        // Logits for the plans that finish their window.
        let mut head_rows = Vec::new();
        let mut head_slots = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            if plan.end == self.row(plan.slot).window.len() + 1 {
                let i = steps
                    .iter()
                    .rposition(|st| st.0 == k)
                    .expect("a plan runs its last event locally");
                head_rows.push(i as u32);
                head_slots.push(plan.slot);
            }
        }
        if head_rows.is_empty() {
            return;
        }
        let v = c.vocab_size;
        for (rows, slots) in head_rows
            .chunks(HEAD_GROUP)
            .zip(head_slots.chunks(HEAD_GROUP))
        {
            let idx = pad_to_two(rows);
            let mut last = be.zeros(idx.len() * dl);
            be.gather_rows(&mut last, &out, &idx, dl);
            let logits = self.head(&last, idx.len());
            for (j, &slot) in slots.iter().enumerate() {
                self.logits[slot * v..(slot + 1) * v].copy_from_slice(&logits[j * v..(j + 1) * v]);
            }
        }
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
}

impl<B: Backend> MegabyteDecoder<'_, B> {
    /// The sequence in `slot` leaves it: conditioning still in flight for it is dropped.
    fn forget_in_flight(&mut self, slot: usize) {
        if let Some(f) = self.in_flight.as_mut() {
            for s in f.slots.iter_mut().filter(|s| **s == Some(slot)) {
                *s = None;
            }
        }
    }
}

impl<B: Backend> Drop for MegabyteDecoder<'_, B> {
    fn drop(&mut self) {
        // Side-stream work must not outlive the decoder whose buffers it writes unjoined:
        // the pools hold the buffers it freed until a join.
        if self.in_flight.take().is_some() {
            self.be.join();
        }
    }
}

/// The head's product (`trans_b`) runs in groups of at most this many rows, the range in
/// which the CPU backend's small-row path gives every row the same result whatever the count.
const HEAD_GROUP: usize = 16;

/// Row indices with a single row repeated, so no matrix product sees `m = 1` (whose `gemm`
/// path rounds differently from the batched one and would make results batch-dependent).
fn pad_to_two(rows: &[u32]) -> Vec<u32> {
    let mut idx = rows.to_vec();
    if idx.len() == 1 {
        idx.push(idx[0]);
    }
    idx
}

/// Global inputs of one step padded to two patches (see [`pad_to_two`]).
fn pad_ids(ids: &[u32], pos: &[u32], pp: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut ids, mut pos) = (ids.to_vec(), pos.to_vec());
    if ids.len() == pp {
        ids.extend_from_within(..pp);
        pos.extend_from_within(..pp);
    }
    (ids, pos)
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

impl<B: Backend> Decoder for MegabyteDecoder<'_, B> {
    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn insert(&mut self, slot: usize, prompt: &[u8]) {
        assert!(self.slots[slot].is_none(), "slot {slot} is occupied");
        let c = &self.model.cfg;
        let start = prompt.len().saturating_sub(c.max_seq_len - 1);
        self.forget_in_flight(slot);
        self.slots[slot] = Some(Row {
            window: prompt[start..].to_vec(),
            events: 0,
            awaiting: None,
        });
        let v = c.vocab_size;
        self.logits[slot * v..(slot + 1) * v].fill(0.0);
    }

    fn remove(&mut self, slot: usize) {
        self.forget_in_flight(slot);
        self.slots[slot] = None;
    }

    fn set_block_table(&mut self, slot: usize, blocks: &[u32]) {
        let pool = self.global.blocks - 1;
        assert!(
            blocks.iter().all(|&b| (b as usize) < pool),
            "slot {slot}: block id outside the pool of {pool}"
        );
        self.tables[slot].clear();
        self.tables[slot].extend_from_slice(blocks);
    }

    fn push(&mut self, slot: usize, byte: u8) {
        let max = self.model.cfg.max_seq_len;
        let row = self.slots[slot]
            .as_mut()
            .unwrap_or_else(|| panic!("slot {slot} is empty"));
        row.window.push(byte);
        if row.window.len() == max {
            // Context full: keep the last half and rebuild the caches from it.
            row.window.drain(..max - max / 2);
            row.events = 0;
        }
    }

    fn pending(&self, slot: usize) -> usize {
        self.row(slot).pending()
    }

    fn advance(&mut self, work: &[(usize, usize)]) {
        if self.be.overlaps_streams() {
            return self.advance_overlapped(work);
        }
        // Global steps, then local steps, in one call (after landing any in flight, should
        // the backend's overlap have been switched off meanwhile).
        self.land();
        let plans = self.plans(work);
        if let Some(new) = self.run_global(&plans) {
            self.write_cond(new);
        }
        self.run_local(&plans);
        self.finish(&plans);
    }

    fn slot_logits(&self, slot: usize) -> &[f32] {
        let v = self.model.cfg.vocab_size;
        &self.logits[slot * v..(slot + 1) * v]
    }

    fn cache_positions(&self, slot: usize, more: usize) -> usize {
        let row = self.row(slot);
        let events = row.events + more.min(row.pending());
        if events == 0 {
            0
        } else {
            (events - 1) / self.model.cfg.patch_size + 1
        }
    }

    fn logits(&self) -> &[f32] {
        &self.logits
    }
}
