//! Free lists of cached device buffers that stay correct with two streams.
//!
//! On one stream, a buffer can go back to its free list as soon as its last operation was
//! enqueued: whoever takes it next enqueues after that operation. With a second stream that is
//! no longer true. A buffer freed by side-stream work may still be in use by it, so the main
//! stream must not get it until it waited for the side stream; and a buffer freed by the main
//! stream after the fork point may still be in use by main-stream work the side stream does not
//! wait for. So while a fork is open ([`StreamGate`]), a freed buffer is *held* for the stream
//! that freed it: that stream may take it again (its own work is in order), the other may not.
//! At the join, after which the main stream follows both streams' work, every held buffer
//! becomes ready for any stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::emu::hazards::STREAMS;
use crate::emu::StreamId;

/// Which stream the backend issues on, and whether side-stream work may still be running:
/// shared by the backend (which forks and joins) and its pools (which decide where a freed
/// buffer may go).
#[derive(Debug, Default)]
pub struct StreamGate {
    on_side: AtomicBool,
    fork_open: AtomicBool,
}

impl StreamGate {
    /// Main stream current, no fork open.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream work is issued on.
    pub fn stream(&self) -> StreamId {
        if self.on_side.load(Ordering::Acquire) {
            StreamId::Side
        } else {
            StreamId::Main
        }
    }

    /// Whether side-stream work may be unordered with the main stream.
    pub fn fork_open(&self) -> bool {
        self.fork_open.load(Ordering::Acquire)
    }

    /// Work now goes to `stream`; switching to the side stream opens a fork.
    pub fn switch_to(&self, stream: StreamId) {
        if stream == StreamId::Side {
            self.fork_open.store(true, Ordering::Release);
        }
        self.on_side
            .store(stream == StreamId::Side, Ordering::Release);
    }

    /// The main stream waited for the side stream: the fork is closed.
    pub fn close(&self) {
        self.on_side.store(false, Ordering::Release);
        self.fork_open.store(false, Ordering::Release);
    }
}

struct Lists<B> {
    /// Safe for either stream.
    ready: HashMap<usize, Vec<B>>,
    /// Freed during the open fork, by stream ([`StreamId::index`]).
    held: [HashMap<usize, Vec<B>>; STREAMS],
}

/// Free buffers by capacity, held per stream while a fork is open (see the module doc).
pub struct FreeLists<B> {
    lists: Mutex<Lists<B>>,
}

impl<B> Default for FreeLists<B> {
    fn default() -> Self {
        Self {
            lists: Mutex::new(Lists {
                ready: HashMap::new(),
                held: std::array::from_fn(|_| HashMap::new()),
            }),
        }
    }
}

impl<B> FreeLists<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lists<B>> {
        // Every update is one push, pop or move, so a poisoned lock still holds consistent
        // lists.
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free buffer of `capacity` that work on `gate`'s current stream may use.
    pub fn pop(&self, gate: &StreamGate, capacity: usize) -> Option<B> {
        let mut lists = self.lock();
        if let Some(b) = lists.ready.get_mut(&capacity).and_then(Vec::pop) {
            return Some(b);
        }
        lists.held[gate.stream().index()]
            .get_mut(&capacity)
            .and_then(Vec::pop)
    }

    /// Takes back a buffer of `capacity` whose last use was enqueued on the current stream.
    pub fn push(&self, gate: &StreamGate, capacity: usize, buffer: B) {
        let mut lists = self.lock();
        let list = if gate.fork_open() {
            &mut lists.held[gate.stream().index()]
        } else {
            &mut lists.ready
        };
        list.entry(capacity).or_default().push(buffer);
    }

    /// At a join: every held buffer becomes ready.
    pub fn release_held(&self) {
        let mut lists = self.lock();
        let held: Vec<_> = lists
            .held
            .iter_mut()
            .flat_map(|h| h.drain().collect::<Vec<_>>())
            .collect();
        for (capacity, buffers) in held {
            lists.ready.entry(capacity).or_default().extend(buffers);
        }
    }

    /// Removes every ready buffer; returns the sum of their capacities.
    pub fn drain_ready(&self) -> usize {
        let mut lists = self.lock();
        lists
            .ready
            .drain()
            .map(|(capacity, buffers)| capacity * buffers.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_freed_during_a_fork_stays_with_its_stream_until_the_join() {
        let gate = StreamGate::new();
        let lists = FreeLists::<&str>::default();
        lists.push(&gate, 8, "before");
        // Freed before the fork: either stream may take it.
        gate.switch_to(StreamId::Side);
        assert_eq!(lists.pop(&gate, 8), Some("before"));
        lists.push(&gate, 8, "side");
        gate.switch_to(StreamId::Main);
        assert_eq!(
            lists.pop(&gate, 8),
            None,
            "the side stream may still use it"
        );
        lists.push(&gate, 8, "main");
        assert_eq!(
            lists.pop(&gate, 8),
            Some("main"),
            "in order on its own stream"
        );
        lists.push(&gate, 8, "main");
        gate.switch_to(StreamId::Side);
        assert_eq!(lists.pop(&gate, 8), Some("side"));
        assert_eq!(lists.pop(&gate, 8), None, "main's is not the side stream's");
        lists.push(&gate, 8, "side");
        gate.close();
        lists.release_held();
        let mut after: Vec<_> = std::iter::from_fn(|| lists.pop(&gate, 8)).collect();
        after.sort();
        assert_eq!(after, ["main", "side"]);
        assert_eq!(lists.drain_ready(), 0);
        lists.push(&gate, 8, "x");
        lists.push(&gate, 16, "y");
        assert_eq!(lists.drain_ready(), 24);
    }
}
