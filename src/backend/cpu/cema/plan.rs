//! How a CEMA call is cut into independent tasks: blocks of channels × chunks of time.
//!
//! The cut depends on the shape only (never on the thread count), so results are the same
//! bit for bit on every machine size and every run.

use crate::backend::cpu::parallel::MIN_TASK_ELEMS;

/// Channels per task: the inner loops run across these, contiguous in `x` and `y`. At N = 16
/// a block's state and coefficients (7 arrays of N × 32) stay in L1.
pub const BLOCK_WIDTH: usize = 32;

/// Enough tasks to keep a few dozen threads busy with some slack for load balance.
const TARGET_TASKS: usize = 64;

/// Shortest chunk worth the carry passes a split costs.
const MIN_CHUNK: usize = 256;

/// The time-chunk length [`super::forward`] and [`super::backward`] use: the whole call when
/// batch rows × channel blocks already give enough tasks, otherwise time is split so they do
/// (a long single sequence), with chunks of at least 256 tokens.
pub fn auto_chunk_len(b: usize, l: usize, d: usize) -> usize {
    let blocks = b * d.div_ceil(BLOCK_WIDTH);
    if blocks >= TARGET_TASKS || l < 2 * MIN_CHUNK {
        return l.max(1);
    }
    let chunks = TARGET_TASKS
        .div_ceil(blocks.max(1))
        .min(l / MIN_CHUNK)
        .max(1);
    l.div_ceil(chunks)
}

/// The task grid of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiling {
    pub b: usize,
    pub l: usize,
    pub d: usize,
    pub n: usize,
    pub chunk_len: usize,
    /// Chunks of time (at least 1, also when `l = 0`).
    pub chunks: usize,
    /// Blocks of channels.
    pub blocks: usize,
}

/// One task: batch row `bi`, channels `d0..d0 + w`, tokens `t0..t1` (chunk `c`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Task {
    pub bi: usize,
    pub c: usize,
    pub d0: usize,
    pub w: usize,
    pub t0: usize,
    pub t1: usize,
}

impl Tiling {
    pub fn new(b: usize, l: usize, d: usize, n: usize, chunk_len: usize) -> Self {
        let chunk_len = chunk_len.max(1);
        Self {
            b,
            l,
            d,
            n,
            chunk_len,
            chunks: l.div_ceil(chunk_len).max(1),
            blocks: d.div_ceil(BLOCK_WIDTH),
        }
    }

    /// Task number `i` in the order (batch row, chunk, channel block).
    pub fn task(&self, i: usize) -> Task {
        let blk = i % self.blocks;
        let c = (i / self.blocks) % self.chunks;
        let bi = i / (self.blocks * self.chunks);
        let d0 = blk * BLOCK_WIDTH;
        let t0 = (c * self.chunk_len).min(self.l);
        Task {
            bi,
            c,
            d0,
            w: BLOCK_WIDTH.min(self.d - d0),
            t0,
            t1: (t0 + self.chunk_len).min(self.l),
        }
    }

    /// Index of the task for (batch row, chunk, block).
    pub fn index(&self, bi: usize, c: usize, blk: usize) -> usize {
        (bi * self.chunks + c) * self.blocks + blk
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.b * self.chunks * self.blocks
    }

    /// Tasks one rayon job should take so a job touches at least [`MIN_TASK_ELEMS`] state
    /// values: tiny calls (decoding-sized) run inline instead of fanning out.
    pub fn min_tasks_per_job(&self) -> usize {
        let per_task = self.chunk_len.min(self.l.max(1)) * BLOCK_WIDTH.min(self.d) * self.n;
        MIN_TASK_ELEMS.div_ceil(per_task.max(1))
    }
}
