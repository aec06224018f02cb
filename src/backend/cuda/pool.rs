//! A size-class memory pool over a [`DeviceApi`]: freed allocations are kept per size class
//! and handed out again, so a training loop that asks for the same shapes every step stops
//! allocating after its first step (device allocation and free are slow, and synchronising on
//! a GPU).

use std::sync::{Arc, Mutex};

use super::free_lists::{FreeLists, StreamGate};
use crate::emu::{DeviceApi, DeviceError};

/// Smallest size class, in elements: tiny buffers (biases, per-row statistics) share one.
pub const MIN_CLASS: usize = 256;

/// The capacity an allocation of `len` elements gets: at least [`MIN_CLASS`], else `len`
/// rounded up to one of four classes per power of two (`2^k · {5, 6, 7, 8}/4`), so at most
/// a quarter of an allocation is slack.
pub fn size_class(len: usize) -> usize {
    if len <= MIN_CLASS {
        return MIN_CLASS;
    }
    let top = len.next_power_of_two();
    let step = top / 8;
    len.div_ceil(step) * step
}

/// What the pool holds, in elements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Elements allocated from the device and not yet given back (in use + cached).
    pub allocated: usize,
    /// Elements of allocations currently handed out.
    pub in_use: usize,
    /// Elements of freed allocations waiting for reuse.
    pub cached: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that allocated from the device (size-class blocks and arenas).
    pub misses: u64,
    /// Arena allocations alive (each holds many buffers: parameters, gradients, moments).
    pub arenas: usize,
}

/// Free lists per size class (stream-aware, see [`FreeLists`]), plus accounting.
pub struct MemoryPool<D: DeviceApi> {
    free: FreeLists<D::Buffer<f32>>,
    gate: Arc<StreamGate>,
    stats: Mutex<PoolStats>,
}

impl<D: DeviceApi> Default for MemoryPool<D> {
    fn default() -> Self {
        Self::with_gate(Arc::new(StreamGate::new()))
    }
}

impl<D: DeviceApi> MemoryPool<D> {
    /// An empty pool, on a device whose work stays on the main stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty pool whose reuse follows `gate`'s forks and joins.
    pub fn with_gate(gate: Arc<StreamGate>) -> Self {
        Self {
            free: FreeLists::default(),
            gate,
            stats: Mutex::new(PoolStats::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolStats> {
        // Every update is a few counters, so a poisoned lock is still usable.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// At a join: blocks freed during the fork become ready for either stream.
    pub fn release_held(&self) {
        self.free.release_held();
    }

    /// An allocation of at least `len` elements (exactly [`size_class`]`(len)`); its contents
    /// are whatever the last user left.
    pub fn take(&self, device: &D, len: usize) -> Result<D::Buffer<f32>, DeviceError> {
        let class = size_class(len);
        if let Some(block) = self.free.pop(&self.gate, class) {
            let mut st = self.lock();
            st.hits += 1;
            st.cached -= class;
            st.in_use += class;
            return Ok(block);
        }
        let block = device.alloc_zeros::<f32>(class)?;
        let mut st = self.lock();
        st.misses += 1;
        st.allocated += class;
        st.in_use += class;
        Ok(block)
    }

    /// Returns an allocation made by [`MemoryPool::take`] for reuse.
    pub fn give_back(&self, block: D::Buffer<f32>) {
        use crate::emu::DeviceBuffer;
        let class = block.len();
        {
            let mut st = self.lock();
            st.in_use -= class;
            st.cached += class;
        }
        self.free.push(&self.gate, class, block);
    }

    /// A dedicated allocation of exactly `len` zeroed elements, for an arena of many buffers:
    /// counted in the stats, never cached (arenas are few, long-lived and of unique sizes).
    pub fn take_arena(&self, device: &D, len: usize) -> Result<D::Buffer<f32>, DeviceError> {
        let block = device.alloc_zeros::<f32>(len)?;
        let mut st = self.lock();
        st.misses += 1;
        st.allocated += len;
        st.in_use += len;
        st.arenas += 1;
        Ok(block)
    }

    /// Frees an allocation made by [`MemoryPool::take_arena`].
    pub fn release_arena(&self, block: D::Buffer<f32>) {
        use crate::emu::DeviceBuffer;
        let len = block.len();
        {
            let mut st = self.lock();
            st.allocated -= len;
            st.in_use -= len;
            st.arenas -= 1;
        }
        drop(block);
    }

    /// Frees every cached allocation that either stream may use back to the device (those
    /// held for one stream during a fork stay until the join).
    pub fn trim(&self) {
        let drained = self.free.drain_ready();
        let mut st = self.lock();
        st.allocated -= drained;
        st.cached -= drained;
    }

    /// Current accounting.
    pub fn stats(&self) -> PoolStats {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::EmulatedDevice;

    #[test]
    fn size_classes_bound_the_slack() {
        assert_eq!(size_class(0), MIN_CLASS);
        assert_eq!(size_class(1), MIN_CLASS);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 320);
        assert_eq!(size_class(320), 320);
        assert_eq!(size_class(321), 384);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(1025), 1280);
        for len in (1..5000).chain([65_537, 1 << 20, (1 << 20) + 1]) {
            let c = size_class(len);
            assert!(c >= len, "class {c} below {len}");
            assert!(
                len <= MIN_CLASS || 4 * (c - len) < c,
                "{len} → {c}: slack over 25 %"
            );
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }

    #[test]
    fn freed_blocks_are_reused_by_their_class_only() {
        let dev = EmulatedDevice::new();
        let pool = MemoryPool::<EmulatedDevice>::new();
        let a = pool.take(&dev, 1000).unwrap();
        assert_eq!(a.len(), 1024);
        let a_ptr = a.as_ptr();
        pool.give_back(a);
        // Another size in the same class gets the same block back.
        let b = pool.take(&dev, 900).unwrap();
        assert_eq!(b.as_ptr(), a_ptr);
        // A different class does not.
        let c = pool.take(&dev, 1100).unwrap();
        assert_ne!(c.as_ptr(), a_ptr);
        assert_eq!(c.len(), 1280);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
        assert_eq!(s.in_use, 1024 + 1280);
        assert_eq!(s.cached, 0);
        pool.give_back(b);
        pool.give_back(c);
    }

    #[test]
    fn live_blocks_never_overlap() {
        let dev = EmulatedDevice::new();
        let pool = MemoryPool::<EmulatedDevice>::new();
        let mut live = Vec::new();
        // Take, free every other one, take again: every live block is disjoint.
        for round in 0..3 {
            for len in [10usize, 300, 300, 5000, 257, 1] {
                live.push(pool.take(&dev, len + round).unwrap());
            }
            let keep: Vec<_> = live
                .drain(..)
                .enumerate()
                .filter_map(|(i, b)| {
                    if i % 2 == 0 {
                        Some(b)
                    } else {
                        pool.give_back(b);
                        None
                    }
                })
                .collect();
            live = keep;
        }
        let mut ranges: Vec<(usize, usize)> = live
            .iter()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + 4 * b.len()))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "blocks {:?} and {:?} overlap", w[0], w[1]);
        }
        for b in live {
            pool.give_back(b);
        }
    }

    #[test]
    fn accounting_balances() {
        let dev = EmulatedDevice::new();
        let pool = MemoryPool::<EmulatedDevice>::new();
        let blocks: Vec<_> = [5usize, 700, 700, 3000]
            .iter()
            .map(|&n| pool.take(&dev, n).unwrap())
            .collect();
        let total: usize = [5usize, 700, 700, 3000]
            .iter()
            .map(|&n| size_class(n))
            .sum();
        assert_eq!(
            pool.stats(),
            PoolStats {
                allocated: total,
                in_use: total,
                cached: 0,
                hits: 0,
                misses: 4,
                arenas: 0,
            }
        );
        for b in blocks {
            pool.give_back(b);
        }
        let s = pool.stats();
        assert_eq!((s.allocated, s.in_use, s.cached), (total, 0, total));
        pool.trim();
        let s = pool.stats();
        assert_eq!((s.allocated, s.in_use, s.cached), (0, 0, 0));
        // After a trim the next request allocates again.
        let b = pool.take(&dev, 700).unwrap();
        assert_eq!(pool.stats().misses, 5);
        pool.give_back(b);
    }

    #[test]
    fn arenas_are_exact_counted_and_freed() {
        let dev = EmulatedDevice::new();
        let pool = MemoryPool::<EmulatedDevice>::new();
        let arena = pool.take_arena(&dev, 1001).unwrap();
        assert_eq!(arena.len(), 1001, "an arena is not rounded to a size class");
        assert_eq!(arena.to_vec(), vec![0.0; 1001]);
        let s = pool.stats();
        assert_eq!(
            (s.allocated, s.in_use, s.misses, s.arenas),
            (1001, 1001, 1, 1)
        );
        pool.release_arena(arena);
        let s = pool.stats();
        assert_eq!((s.allocated, s.in_use, s.cached, s.arenas), (0, 0, 0, 0));
        // Not cached: a same-size request allocates again.
        let b = pool.take(&dev, 1001).unwrap();
        assert_eq!(pool.stats().misses, 2);
        pool.give_back(b);
    }
}
