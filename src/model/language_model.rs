//! What the trainer, the evaluator and the benchmarks need from a byte-level language model,
//! so they are written once for MEGABYTE, MEGALODON and the hybrid.

use super::params::ParamLayout;
use crate::backend::Backend;

/// A trainable byte-level language model on backend `B`.
///
/// A batch is `b` windows of [`LanguageModel::window_len`] bytes each (row-major). A model
/// scores `t` bytes per window: MEGABYTE predicts every byte of a `t`-byte window from the
/// bytes before it (its shifts are built into the inputs), MEGALODON reads `t + 1` bytes and
/// predicts bytes `1..=t`.
pub trait ModelShape {
    /// Parameter names, shapes and initializers, in buffer order.
    fn layout(&self) -> &ParamLayout;

    /// Bytes per window needed to score `t` bytes.
    fn window_len(&self, t: usize) -> usize;

    /// Check that `t` scored bytes per window is a length this model can train on.
    fn check_seq_len(&self, t: usize) -> Result<(), String>;

    /// Longest number of bytes scored per window (its training context).
    fn max_seq_len(&self) -> usize;

    /// Forward FLOPs per scored byte at full context (for throughput reports).
    fn forward_flops_per_byte(&self) -> f64;

    /// Patch size for patch-based models (MEGABYTE's strided evaluation), else `None`.
    fn patch_size(&self) -> Option<usize> {
        None
    }

    /// Whether AdamW weight decay applies to parameter `i`.
    fn decays(&self, i: usize) -> bool {
        self.layout().specs[i].shape.len() >= 2
    }
}

/// The backend-dependent half: workspaces, forward, backward and decoding on `B`.
pub trait LanguageModel<B: Backend>: ModelShape {
    /// Activations (and backward buffers) for one batch shape.
    type Workspace;

    /// A workspace for `b` windows scoring `t` bytes each; `train` adds backward buffers.
    fn workspace(&self, be: &B, b: usize, t: usize, train: bool) -> Self::Workspace;

    /// `(b, t)` of a workspace.
    fn workspace_shape(&self, ws: &Self::Workspace) -> (usize, usize);

    /// Forward over `windows` (`[b, window_len(t)]`); returns the mean loss in nats.
    fn forward(&self, be: &B, params: &[B::Buf], ws: &mut Self::Workspace, windows: &[u8]) -> f64;

    /// Per-byte losses `[b·t]` (nats) of the last forward.
    fn losses<'w>(&self, ws: &'w Self::Workspace) -> &'w B::Buf;

    /// `[b·t, 256]` logits of the last forward.
    fn logits<'w>(&self, ws: &'w Self::Workspace) -> &'w B::Buf;

    /// Backward of the last forward for the mean loss, accumulating into `grads`.
    fn backward(&self, be: &B, params: &[B::Buf], grads: &mut [B::Buf], ws: &mut Self::Workspace);

    /// A KV-cached / streaming decoder over `prompts`, prefilled.
    fn decoder<'a>(
        &'a self,
        be: &'a B,
        params: &'a [B::Buf],
        prompts: &[&[u8]],
    ) -> Box<dyn Decoder + 'a>;
}

/// Incremental generation over a fixed number of slots, each holding at most one sequence.
///
/// A sequence enters a free slot with [`Decoder::insert`], which only queues its prompt;
/// [`Decoder::advance`] runs queued bytes through the model, a bounded number per slot per
/// call (chunked prefill), for many slots at once; [`Decoder::push`] queues a sampled byte;
/// [`Decoder::remove`] frees the slot for reuse. A slot's logits are its next-byte prediction
/// once nothing is queued. The result for a sequence never depends on the other slots or on
/// how its bytes were split across `advance` calls.
pub trait Decoder {
    /// Number of slots.
    fn capacity(&self) -> usize;
    /// Start a sequence with `prompt` in free slot `slot` (nothing is computed yet).
    fn insert(&mut self, slot: usize, prompt: &[u8]);
    /// End the sequence in `slot`, freeing it (its block table stays until replaced).
    fn remove(&mut self, slot: usize);
    /// Give `slot` the paged-cache blocks `blocks`, in position order: MEGABYTE keeps global
    /// position `g` of the slot's sequence in block `blocks[g / block_size]` of its KV pool,
    /// so the table must reach every position [`Decoder::advance`] will write (see
    /// [`Decoder::cache_positions`]). Models whose state has constant size ignore it.
    fn set_block_table(&mut self, slot: usize, blocks: &[u32]) {
        let _ = (slot, blocks);
    }
    /// Queue one more byte (the one just sampled) for `slot`.
    fn push(&mut self, slot: usize, byte: u8);
    /// Units of work queued for `slot` and not yet run (bytes, plus one for a MEGABYTE
    /// sequence's initial pad step); 0 when its logits are current.
    fn pending(&self, slot: usize) -> usize;
    /// Run at most `max` queued units of every `(slot, max)` in `work`, batched together.
    /// Units may stay queued even when `max` allows them (MEGABYTE on a backend with
    /// overlapping streams runs a row's local steps in the call after its global step), so
    /// callers advance until [`Decoder::pending`] is 0, as [`Decoder::complete`] does.
    fn advance(&mut self, work: &[(usize, usize)]);
    /// Advance `slots` until each one's logits are current.
    fn complete(&mut self, slots: &[usize]) {
        loop {
            let work: Vec<(usize, usize)> = slots
                .iter()
                .filter(|&&s| self.pending(s) > 0)
                .map(|&s| (s, usize::MAX))
                .collect();
            if work.is_empty() {
                return;
            }
            self.advance(&work);
        }
    }
    /// `[256]` next-byte logits of `slot` (valid when `pending(slot) == 0`).
    fn slot_logits(&self, slot: usize) -> &[f32];
    /// Cache positions `slot` holds after running `more` further units (MEGABYTE global
    /// KV positions; 0 for models whose state has constant size).
    fn cache_positions(&self, slot: usize, more: usize) -> usize;

    /// Number of rows (slots).
    fn rows(&self) -> usize {
        self.capacity()
    }
    /// `[rows, 256]` next-byte logits of every slot.
    fn logits(&self) -> &[f32];
    /// Append `next[i]` to the sequence in slot `i` (every slot occupied) and compute the
    /// next logits.
    fn step(&mut self, next: &[u8]) {
        assert_eq!(next.len(), self.capacity());
        for (slot, &b) in next.iter().enumerate() {
            self.push(slot, b);
        }
        self.complete(&(0..self.capacity()).collect::<Vec<_>>());
    }
}
