//! Bits per byte on a byte sequence, with the paper's evaluation options (spec/megabyte.md
//! §5.5): basic non-overlapping windows, sliding windows (stride T/2, only the second half of
//! each later window is scored), and strided inference (a second pass shifted by P/2; each
//! byte is scored by the pass in which it sits in the first half of its patch).

use crate::backend::Backend;
use crate::model::LanguageModel;

/// Evaluation options.
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalMode {
    pub strided: bool,
    pub sliding_window: bool,
}

/// The outcome of an evaluation.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct EvalResult {
    pub bits_per_byte: f64,
    pub bytes_scored: usize,
    pub forward_passes: usize,
}

/// One scored span: the window starting at `start`, scoring window indices `from..to`.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    from: usize,
    to: usize,
}

/// Spans over `len` bytes of windows that read `w` bytes and score their last `t`.
fn spans(len: usize, t: usize, w: usize, sliding: bool) -> Vec<Span> {
    let mut out = Vec::new();
    if len < w {
        return out;
    }
    let stride = if sliding { t / 2 } else { t };
    let mut start = 0;
    out.push(Span {
        start,
        from: 0,
        to: t,
    });
    while start + stride + w <= len {
        start += stride;
        out.push(Span {
            start,
            from: t - stride,
            to: t,
        });
    }
    out
}

/// Per-byte losses (nats), `[t]` per window, for windows of `window_len(t)` bytes run in
/// batches of the workspace's `b`. A short last batch is padded with copies of its last
/// window, whose losses are dropped.
pub fn batched_window_losses<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    params: &[B::Buf],
    ws: &mut M::Workspace,
    windows: &[&[u8]],
) -> Vec<Vec<f32>> {
    let (b, t) = model.workspace_shape(ws);
    let mut out = Vec::with_capacity(windows.len());
    for chunk in windows.chunks(b) {
        let mut batch = Vec::with_capacity(b * model.window_len(t));
        for i in 0..b {
            batch.extend_from_slice(chunk[i.min(chunk.len() - 1)]);
        }
        model.forward(be, params, ws, &batch);
        let losses = be.download(model.losses(ws));
        out.extend(losses.chunks(t).take(chunk.len()).map(<[f32]>::to_vec));
    }
    out
}

/// [`batched_window_losses`] for the windows of `bytes` starting at `starts`.
fn window_losses<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    params: &[B::Buf],
    ws: &mut M::Workspace,
    bytes: &[u8],
    starts: &[usize],
) -> Vec<Vec<f32>> {
    let (_, t) = model.workspace_shape(ws);
    let w = model.window_len(t);
    let windows: Vec<&[u8]> = starts.iter().map(|&s| &bytes[s..s + w]).collect();
    batched_window_losses(be, model, params, ws, &windows)
}

/// Evaluate bits per byte of `bytes` with the workspace's window length. Strided inference
/// needs a patch-based model; it is ignored (with `forward_passes` showing it) otherwise.
pub fn evaluate<B: Backend, M: LanguageModel<B>>(
    be: &B,
    model: &M,
    params: &[B::Buf],
    ws: &mut M::Workspace,
    bytes: &[u8],
    mode: EvalMode,
) -> EvalResult {
    let (_, t) = model.workspace_shape(ws);
    let w = model.window_len(t);
    let spans = spans(bytes.len(), t, w, mode.sliding_window);
    let starts: Vec<usize> = spans.iter().map(|s| s.start).collect();
    let base = window_losses(be, model, params, ws, bytes, &starts);
    let mut passes = base.len();
    let patch = model.patch_size().filter(|_| mode.strided).unwrap_or(0);
    let half = patch / 2;
    let shifted = if half > 0 {
        let shifted_starts: Vec<usize> = starts
            .iter()
            .map(|&s| s + half)
            .filter(|&s| s + w <= bytes.len())
            .collect();
        passes += shifted_starts.len();
        window_losses(be, model, params, ws, bytes, &shifted_starts)
    } else {
        Vec::new()
    };
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (wi, span) in spans.iter().enumerate() {
        for i in span.from..span.to {
            // A byte in the second half of its patch takes the shifted pass's prediction,
            // where it sits P/2 earlier in its patch, when that pass exists.
            let loss = if half > 0 && i % patch >= half && wi < shifted.len() {
                shifted[wi][i - half]
            } else {
                base[wi][i]
            };
            total += loss as f64;
            count += 1;
        }
    }
    EvalResult {
        bits_per_byte: total / count.max(1) as f64 / std::f64::consts::LN_2,
        bytes_scored: count,
        forward_passes: passes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_spans_cover_every_byte_once() {
        let (len, t) = (100, 16);
        for sliding in [false, true] {
            let mut hits = vec![0; len];
            for s in spans(len, t, t, sliding) {
                for i in s.from..s.to {
                    hits[s.start + i] += 1;
                }
            }
            let covered = hits.iter().take_while(|&&h| h == 1).count();
            assert!(hits.iter().all(|&h| h <= 1), "a byte was scored twice");
            assert!(
                covered >= len - t,
                "sliding={sliding}: only {covered} leading bytes scored"
            );
        }
    }
}
