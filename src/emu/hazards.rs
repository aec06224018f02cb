//! Stream hazard checking: the emulator runs every operation synchronously, in the order it is
//! issued, so work on two streams that a GPU would run concurrently always gives the right
//! answer here, even when an event wait is missing. This module finds those missing waits.
//!
//! Each stream keeps a vector clock: how many operations of every stream it is known to run
//! after. An operation ticks its own stream's entry; recording an event snapshots the clock,
//! and waiting on the event merges the snapshot into the waiting stream's clock; a host
//! synchronisation (a download, `synchronize`) merges the synchronised streams' clocks into a
//! host clock that every later operation starts from, since it is issued after the host saw
//! that work finish. Every device byte range an operation reads or writes is logged with its
//! stream and tick. A new access on stream `s` conflicts with a logged access of another stream
//! `t` when the ranges overlap, at least one of them writes, and `s`'s clock does not cover the
//! logged tick: nothing orders the two, so on a GPU they may run in either order or at once.
//!
//! Kernel launches read every pointer argument's extent (the buffer or view it passes) and
//! write the ones whose pointee is not `const` in the kernel's signature, so a kernel that only
//! reads through a pointer must declare it `const T*` (spec/cuda-emulation.md). A fresh
//! allocation forgets what was logged at its addresses (the memory is a new object).

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;

/// The streams of a device: work is issued on the current one ([`super::DeviceApi::set_stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StreamId {
    /// The stream everything runs on unless a caller forks work onto the side stream.
    #[default]
    Main,
    /// The second stream, for work that may overlap the main stream's (MEGABYTE's global
    /// decode step, while the main stream runs the local steps of the other rows).
    Side,
}

impl StreamId {
    /// Every stream, in index order.
    pub const ALL: [StreamId; STREAMS] = [StreamId::Main, StreamId::Side];

    /// Position in [`StreamId::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamId::Main => "main",
            StreamId::Side => "side",
        })
    }
}

/// Number of streams a device has.
pub const STREAMS: usize = 2;

/// Ticks of every stream that some point of the work is known to follow.
type Clock = [u64; STREAMS];

fn merge(into: &mut Clock, other: &Clock) {
    for (a, b) in into.iter_mut().zip(other) {
        *a = (*a).max(*b);
    }
}

/// One range of device bytes an operation reads or writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Device addresses `[start, end)`.
    pub bytes: Range<usize>,
    /// Whether the operation may write them (a write may also read).
    pub write: bool,
}

impl Access {
    /// A read of `bytes`.
    pub fn read(bytes: Range<usize>) -> Self {
        Self {
            bytes,
            write: false,
        }
    }

    /// A (possible) write of `bytes`.
    pub fn write(bytes: Range<usize>) -> Self {
        Self { bytes, write: true }
    }
}

/// Two unordered accesses to the same bytes on different streams, at least one a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stream hazard ({kind}): {later} on the {later_stream} stream {later_verb} bytes \
     [{start:#x}, {end:#x}) that {earlier} on the {earlier_stream} stream {earlier_verb}, \
     and no event orders the two"
)]
pub struct Hazard {
    /// `read after write`, `write after read` or `write after write` (in issue order).
    pub kind: &'static str,
    /// The operation issued first (a kernel name, `gemm`, `copy_dtod`, ...).
    pub earlier: String,
    /// Its stream.
    pub earlier_stream: StreamId,
    /// `wrote` or `read`.
    pub earlier_verb: &'static str,
    /// The operation that conflicts with it.
    pub later: String,
    /// Its stream.
    pub later_stream: StreamId,
    /// `writes` or `reads`.
    pub later_verb: &'static str,
    /// First byte of the overlap.
    pub start: usize,
    /// End of the overlap.
    pub end: usize,
}

/// A logged access.
#[derive(Debug, Clone)]
struct Record {
    bytes: Range<usize>,
    write: bool,
    tick: u64,
    op: String,
}

/// Events kept for waits; older ones are forgotten, as on the GPU side.
const KEPT_EVENTS: usize = 4096;

/// What the checker has seen, for tests that must prove the streams were used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Operations issued on each stream ([`StreamId::index`] order).
    pub ops: [u64; STREAMS],
    /// Operations issued while the other stream had issued work they were not ordered after:
    /// on a GPU these may run at the same time as that work.
    pub overlapped: u64,
}

/// The vector clocks and access log of one device.
#[derive(Debug, Default)]
pub struct HazardChecker {
    current: StreamId,
    clocks: [Clock; STREAMS],
    host: Clock,
    events: VecDeque<(u64, Clock)>,
    next_event: u64,
    log: [Vec<Record>; STREAMS],
    /// Log lengths after the last pruning (pruning runs when a log doubles).
    pruned_len: [usize; STREAMS],
    overlapped: u64,
}

impl HazardChecker {
    /// A checker with every stream idle, issuing on the main stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream later operations are issued on.
    pub fn stream(&self) -> StreamId {
        self.current
    }

    /// Issues later operations on `stream`.
    pub fn set_stream(&mut self, stream: StreamId) {
        self.current = stream;
    }

    /// Checks and logs one operation on the current stream. On a hazard nothing is logged.
    pub fn issue(&mut self, op: &str, accesses: &[Access]) -> Result<(), Hazard> {
        let s = self.current.index();
        let mut clock = self.clocks[s];
        merge(&mut clock, &self.host);
        clock[s] += 1;
        for access in accesses.iter().filter(|a| !a.bytes.is_empty()) {
            self.check(op, access, &clock)?;
        }
        if (0..STREAMS).any(|t| t != s && self.clocks[t][t] > clock[t]) {
            self.overlapped += 1;
        }
        self.clocks[s] = clock;
        let tick = clock[s];
        self.log[s].extend(
            accesses
                .iter()
                .filter(|a| !a.bytes.is_empty())
                .map(|a| Record {
                    bytes: a.bytes.clone(),
                    write: a.write,
                    tick,
                    op: op.to_string(),
                }),
        );
        if self.log[s].len() > 2 * self.pruned_len[s].max(64) {
            self.prune();
        }
        Ok(())
    }

    fn check(&self, op: &str, access: &Access, clock: &Clock) -> Result<(), Hazard> {
        let s = self.current.index();
        for (t, log) in self.log.iter().enumerate().filter(|&(t, _)| t != s) {
            let conflict = log.iter().rev().find(|r| {
                r.tick > clock[t]
                    && (r.write || access.write)
                    && r.bytes.start < access.bytes.end
                    && access.bytes.start < r.bytes.end
            });
            if let Some(r) = conflict {
                let kind = match (r.write, access.write) {
                    (true, false) => "read after write",
                    (false, true) => "write after read",
                    _ => "write after write",
                };
                let verb = |w: bool, past: bool| match (w, past) {
                    (true, true) => "wrote",
                    (false, true) => "read",
                    (true, false) => "writes",
                    (false, false) => "reads",
                };
                return Err(Hazard {
                    kind,
                    earlier: r.op.clone(),
                    earlier_stream: StreamId::ALL[t],
                    earlier_verb: verb(r.write, true),
                    later: op.to_string(),
                    later_stream: self.current,
                    later_verb: verb(access.write, false),
                    start: r.bytes.start.max(access.bytes.start),
                    end: r.bytes.end.min(access.bytes.end),
                });
            }
        }
        Ok(())
    }

    /// Drops the records no later operation can conflict with: those every other stream's
    /// clock (or the host's) already covers.
    fn prune(&mut self) {
        for t in 0..STREAMS {
            let known = (0..STREAMS)
                .filter(|&u| u != t)
                .map(|u| self.clocks[u][t].max(self.host[t]))
                .min()
                .unwrap_or(u64::MAX);
            self.log[t].retain(|r| r.tick > known);
            self.pruned_len[t] = self.log[t].len();
        }
    }

    /// Records an event after the current stream's work so far; returns its id.
    pub fn record_event(&mut self) -> u64 {
        let s = self.current.index();
        let mut clock = self.clocks[s];
        merge(&mut clock, &self.host);
        self.next_event += 1;
        self.events.push_back((self.next_event, clock));
        if self.events.len() > KEPT_EVENTS {
            self.events.pop_front();
        }
        self.next_event
    }

    /// Makes the current stream's later work follow event `id`. An event this checker never
    /// recorded is an error; one older than every kept event is complete (its work finished
    /// before thousands of later events were recorded).
    pub fn wait_event(&mut self, id: u64) -> Result<(), String> {
        if id == 0 || id > self.next_event {
            return Err(format!("wait on event {id}, which was never recorded"));
        }
        let s = self.current.index();
        match self.events.iter().find(|(e, _)| *e == id) {
            Some((_, clock)) => {
                let clock = *clock;
                merge(&mut self.clocks[s], &clock);
            }
            None => {
                let host = self.host;
                merge(&mut self.clocks[s], &host);
            }
        }
        Ok(())
    }

    /// The host waited for the current stream's work (a download).
    pub fn synchronize_current(&mut self) {
        let clock = self.clocks[self.current.index()];
        merge(&mut self.host, &clock);
        self.prune();
    }

    /// The host waited for every stream's work.
    pub fn synchronize_all(&mut self) {
        for t in 0..STREAMS {
            let clock = self.clocks[t];
            merge(&mut self.host, &clock);
        }
        self.prune();
    }

    /// A fresh allocation now occupies `bytes`: what was logged there belonged to memory that
    /// has been freed.
    pub fn forget(&mut self, bytes: Range<usize>) {
        for log in &mut self.log {
            log.retain(|r| r.bytes.end <= bytes.start || bytes.end <= r.bytes.start);
        }
    }

    /// Operations per stream, and how many were issued unordered with the other stream's work.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            ops: std::array::from_fn(|t| self.clocks[t][t]),
            overlapped: self.overlapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(c: &mut HazardChecker, s: StreamId, op: &str, a: &[Access]) -> Result<(), Hazard> {
        c.set_stream(s);
        c.issue(op, a)
    }

    #[test]
    fn each_unordered_conflict_kind_is_reported_and_reads_do_not_conflict() {
        use StreamId::{Main, Side};
        let cases = [
            (
                Access::write(0..8),
                Access::read(4..12),
                Some("read after write"),
            ),
            (
                Access::read(0..8),
                Access::write(4..12),
                Some("write after read"),
            ),
            (
                Access::write(0..8),
                Access::write(7..8),
                Some("write after write"),
            ),
            (Access::read(0..8), Access::read(0..8), None),
            (Access::write(0..8), Access::write(8..16), None),
        ];
        for (first, second, kind) in cases {
            let mut c = HazardChecker::new();
            on(&mut c, Main, "producer", std::slice::from_ref(&first)).unwrap();
            let got = on(&mut c, Side, "consumer", std::slice::from_ref(&second));
            match kind {
                Some(kind) => {
                    let h = got.unwrap_err();
                    assert_eq!(h.kind, kind, "{first:?} then {second:?}");
                    assert_eq!(
                        (h.earlier.as_str(), h.later.as_str()),
                        ("producer", "consumer")
                    );
                    assert_eq!((h.earlier_stream, h.later_stream), (Main, Side));
                    let msg = h.to_string();
                    assert!(msg.contains("producer on the main stream"), "{msg}");
                }
                None => got.unwrap(),
            }
        }
    }

    #[test]
    fn an_event_wait_orders_the_streams_and_only_the_work_before_the_event() {
        use StreamId::{Main, Side};
        let mut c = HazardChecker::new();
        on(&mut c, Main, "a", &[Access::write(0..4)]).unwrap();
        let e = c.record_event();
        on(&mut c, Main, "b", &[Access::write(16..20)]).unwrap();
        c.set_stream(Side);
        c.wait_event(e).unwrap();
        // After the event: ordered. Written after the event was recorded: not.
        on(&mut c, Side, "c", &[Access::read(0..4)]).unwrap();
        let h = on(&mut c, Side, "d", &[Access::read(16..20)]).unwrap_err();
        assert_eq!(h.earlier, "b");
        // The side stream's writes are unordered with the main stream until it waits.
        on(&mut c, Side, "e", &[Access::write(32..36)]).unwrap();
        assert!(on(&mut c, Main, "f", &[Access::read(32..36)]).is_err());
        let joined = {
            c.set_stream(Side);
            c.record_event()
        };
        c.set_stream(Main);
        c.wait_event(joined).unwrap();
        on(&mut c, Main, "f", &[Access::read(32..36)]).unwrap();
        assert!(c.wait_event(99).is_err());
        let stats = c.stats();
        assert_eq!(stats.ops, [3, 2], "refused operations are not counted");
        assert!(stats.overlapped >= 1);
    }

    #[test]
    fn a_host_synchronisation_orders_everything_issued_after_it() {
        use StreamId::{Main, Side};
        let mut c = HazardChecker::new();
        on(&mut c, Side, "w", &[Access::write(0..4)]).unwrap();
        c.set_stream(Main);
        // A download on the main stream does not wait for the side stream...
        c.synchronize_current();
        assert!(on(&mut c, Main, "r", &[Access::read(0..4)]).is_err());
        // ...a full synchronisation does.
        c.synchronize_all();
        on(&mut c, Main, "r", &[Access::read(0..4)]).unwrap();
        // A fresh allocation over logged bytes starts clean.
        on(&mut c, Side, "w2", &[Access::write(8..12)]).unwrap();
        c.forget(8..12);
        on(&mut c, Main, "w3", &[Access::write(8..12)]).unwrap();
    }

    #[test]
    fn the_log_stays_small_on_one_stream_with_downloads() {
        let mut c = HazardChecker::new();
        for i in 0..10_000usize {
            c.issue("k", &[Access::write(i * 4..i * 4 + 4)]).unwrap();
            if i % 100 == 0 {
                c.synchronize_current();
            }
        }
        assert!(c.log[0].len() <= 256, "{}", c.log[0].len());
    }
}
