//! Bits per byte on a byte sequence, with the paper's evaluation options (spec/megabyte.md
//! §5.5): basic non-overlapping windows, sliding windows (stride T/2, only the second half of
//! each later window is scored), and strided inference (a second pass shifted by P/2; each
//! byte is scored by the pass in which it sits in the first half of its patch).

use super::super::backend::Backend;
use crate::model::megabyte::{Megabyte, Workspace};

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

fn spans(len: usize, t: usize, sliding: bool) -> Vec<Span> {
    let mut out = Vec::new();
    if len < t {
        return out;
    }
    if sliding {
        let stride = t / 2;
        let mut start = 0;
        out.push(Span {
            start,
            from: 0,
            to: t,
        });
        while start + stride + t <= len {
            start += stride;
            out.push(Span {
                start,
                from: t - stride,
                to: t,
            });
        }
    } else {
        let mut start = 0;
        while start + t <= len {
            out.push(Span {
                start,
                from: 0,
                to: t,
            });
            start += t;
        }
    }
    out
}

/// Per-byte losses (nats) for a list of window starts, run in batches of `ws.b`.
fn window_losses<B: Backend>(
    be: &B,
    model: &Megabyte,
    params: &[B::Buf],
    ws: &mut Workspace<B>,
    bytes: &[u8],
    starts: &[usize],
) -> Vec<Vec<f32>> {
    let t = ws.t;
    let mut out = Vec::with_capacity(starts.len());
    for chunk in starts.chunks(ws.b) {
        let mut batch = Vec::with_capacity(ws.b * t);
        for i in 0..ws.b {
            let s = chunk[i.min(chunk.len() - 1)];
            batch.extend_from_slice(&bytes[s..s + t]);
        }
        model.forward(be, params, ws, &batch);
        let losses = be.download(&ws.losses);
        for i in 0..chunk.len() {
            out.push(losses[i * t..(i + 1) * t].to_vec());
        }
    }
    out
}

/// Evaluate bits per byte of `bytes` with windows of `ws.t` bytes.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Megabyte,
    params: &[B::Buf],
    ws: &mut Workspace<B>,
    bytes: &[u8],
    mode: EvalMode,
) -> EvalResult {
    let t = ws.t;
    let half = model.cfg.patch_size / 2;
    let spans = spans(bytes.len(), t, mode.sliding_window);
    let starts: Vec<usize> = spans.iter().map(|s| s.start).collect();
    let base = window_losses(be, model, params, ws, bytes, &starts);
    let mut passes = base.len();
    let shifted = if mode.strided && half > 0 {
        let shifted_starts: Vec<usize> = starts
            .iter()
            .map(|&s| s + half)
            .filter(|&s| s + t <= bytes.len())
            .collect();
        passes += shifted_starts.len();
        window_losses(be, model, params, ws, bytes, &shifted_starts)
    } else {
        Vec::new()
    };
    let p = model.cfg.patch_size;
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (w, span) in spans.iter().enumerate() {
        for i in span.from..span.to {
            // A byte in the second half of its patch takes the shifted pass's prediction,
            // where it sits P/2 earlier in its patch, when that pass exists.
            let loss = if i % p >= half && w < shifted.len() && !shifted.is_empty() {
                shifted[w][i - half]
            } else {
                base[w][i]
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
            for s in spans(len, t, sliding) {
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
