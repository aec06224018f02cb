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

/// Incremental generation: logits for the next byte of every row, and a step that appends
/// one byte per row.
pub trait Decoder {
    /// Number of rows.
    fn rows(&self) -> usize;
    /// `[rows, 256]` next-byte logits.
    fn logits(&self) -> &[f32];
    /// Append `next[i]` to row `i` and compute the next logits.
    fn step(&mut self, next: &[u8]);
}
