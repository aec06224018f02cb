//! A pool of fixed-size cache blocks with a free list. MEGABYTE sequences hold one block per
//! `block_size` global positions (a block table that grows as they decode); MEGALODON
//! sequences hold one block each (a stream slot of constant size).

/// Index of one cache block.
pub type BlockId = u32;

/// Hands out block ids from a fixed pool; freed blocks are reused most recently freed first.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    total: usize,
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// A pool of `total` free blocks.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            // Reversed so that the first allocations get 0, 1, 2, …
            free: (0..total as BlockId).rev().collect(),
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not handed out.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks handed out.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Takes `n` blocks, or none (and `None`) when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool. Panics on a block that is out of range or already free
    /// (a scheduler bug that would otherwise hand one block to two sequences).
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            assert!((b as usize) < self.total, "block {b} out of range");
            assert!(!self.free.contains(&b), "block {b} freed twice");
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_exhausted_then_refuses_without_taking_any() {
        let mut a = BlockAllocator::new(5);
        let x = a.allocate(3).unwrap();
        assert_eq!(x.len(), 3);
        assert_eq!(a.free(), 2);
        assert!(a.allocate(3).is_none());
        assert_eq!(a.free(), 2, "a refused allocation takes nothing");
        let y = a.allocate(2).unwrap();
        assert_eq!(a.used(), 5);
        let mut all: Vec<BlockId> = x.iter().chain(&y).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            vec![0, 1, 2, 3, 4],
            "every block handed out exactly once"
        );
        assert!(a.allocate(1).is_none());
    }

    #[test]
    fn freed_blocks_are_reused() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(4).unwrap();
        a.release(x[1..3].iter().copied());
        assert_eq!(a.free(), 2);
        let mut again = a.allocate(2).unwrap();
        again.sort_unstable();
        let mut expected = x[1..3].to_vec();
        expected.sort_unstable();
        assert_eq!(again, expected);
        assert_eq!(a.allocate(0), Some(vec![]));
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn double_free_is_caught() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate(1).unwrap();
        a.release(x.clone());
        a.release(x);
    }
}
