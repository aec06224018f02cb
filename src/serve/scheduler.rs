//! Admission, block reservation, preemption and retirement: the bookkeeping half of the
//! continuous-batching loop, kept free of model code so its policy can be tested alone.
//!
//! Requests wait in FIFO order. One is admitted when a decode slot and the cache blocks its
//! prompt needs are free; admission stops at the first that does not fit, so a large request
//! is not starved by smaller ones behind it. Running sequences reserve more blocks as they
//! grow; when the pool is empty the youngest running sequence (the last admitted) is
//! preempted: its blocks are freed and it goes back to the head of the queue, to be
//! recomputed from its prompt and the bytes it has already produced.

use std::collections::{HashMap, VecDeque};

use super::block_allocator::{BlockAllocator, BlockId};

/// Sequence identifier (the request id).
pub type SeqId = u64;

/// Waiting queue, running set and every running sequence's block table.
#[derive(Debug)]
pub struct Scheduler {
    alloc: BlockAllocator,
    max_running: usize,
    waiting: VecDeque<SeqId>,
    /// Running sequences, oldest admission first.
    running: Vec<SeqId>,
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl Scheduler {
    /// A scheduler over `total_blocks` cache blocks and at most `max_running` sequences.
    pub fn new(total_blocks: usize, max_running: usize) -> Self {
        Self {
            alloc: BlockAllocator::new(total_blocks),
            max_running,
            waiting: VecDeque::new(),
            running: Vec::new(),
            tables: HashMap::new(),
        }
    }

    /// Queue a new sequence at the back.
    pub fn enqueue(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    /// Sequences waiting, head first.
    pub fn waiting(&self) -> &VecDeque<SeqId> {
        &self.waiting
    }

    /// Running sequences, oldest admission first.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Blocks in use and in all.
    pub fn blocks_used_total(&self) -> (usize, usize) {
        (self.alloc.used(), self.alloc.total())
    }

    /// The block table of a running sequence.
    pub fn blocks_of(&self, id: SeqId) -> &[BlockId] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Admit waiting sequences, head first, while a slot and the `need(id)` blocks each
    /// needs are free. Returns the admitted ids in order.
    pub fn admit(&mut self, mut need: impl FnMut(SeqId) -> usize) -> Vec<SeqId> {
        let mut admitted = Vec::new();
        while self.running.len() < self.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(blocks) = self.alloc.allocate(need(id)) else {
                break;
            };
            self.waiting.pop_front();
            self.tables.insert(id, blocks);
            self.running.push(id);
            admitted.push(id);
        }
        admitted
    }

    /// Make running sequence `id` hold at least `blocks` blocks, preempting the youngest
    /// running sequences while the pool is short (possibly `id` itself, which then stops).
    /// Preempted sequences lose their blocks and go back to the head of the queue, oldest
    /// first. Returns them, youngest first.
    pub fn reserve(&mut self, id: SeqId, blocks: usize) -> Vec<SeqId> {
        let mut preempted = Vec::new();
        loop {
            let Some(held) = self.tables.get(&id).map(Vec::len) else {
                return preempted;
            };
            if held >= blocks {
                return preempted;
            }
            if let Some(more) = self.alloc.allocate(blocks - held) {
                self.tables
                    .get_mut(&id)
                    .expect("running sequence has a table")
                    .extend(more);
                return preempted;
            }
            let victim = *self.running.last().expect("id itself is running");
            self.release(victim);
            self.waiting.push_front(victim);
            preempted.push(victim);
        }
    }

    /// Remove a running or waiting sequence for good, freeing its blocks.
    pub fn retire(&mut self, id: SeqId) {
        self.release(id);
        self.waiting.retain(|&w| w != id);
    }

    fn release(&mut self, id: SeqId) {
        if let Some(blocks) = self.tables.remove(&id) {
            self.alloc.release(blocks);
        }
        self.running.retain(|&r| r != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_in_fifo_order_until_slots_or_blocks_run_out() {
        let mut s = Scheduler::new(10, 3);
        for id in 1..=5 {
            s.enqueue(id);
        }
        // Need 4 blocks each: two fit in 10, the third waits although a slot is free.
        let admitted = s.admit(|_| 4);
        assert_eq!(admitted, vec![1, 2]);
        assert_eq!(s.blocks_used_total(), (8, 10));
        assert_eq!(
            s.waiting().iter().copied().collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        // A small request behind a large one does not overtake it.
        let admitted = s.admit(|id| if id == 3 { 5 } else { 1 });
        assert!(admitted.is_empty());
        s.retire(1);
        // 6 blocks free: 3 takes 5, then 4 the last block and the last slot.
        assert_eq!(s.admit(|id| if id == 3 { 5 } else { 1 }), vec![3, 4]);
        assert_eq!(s.blocks_used_total(), (10, 10));
        assert_eq!(
            s.admit(|_| 0),
            Vec::<SeqId>::new(),
            "three running is the limit"
        );
        assert_eq!(s.running(), &[2, 3, 4]);
    }

    #[test]
    fn reserve_preempts_youngest_first_and_requeues_at_head() {
        let mut s = Scheduler::new(6, 4);
        for id in 1..=4 {
            s.enqueue(id);
        }
        s.enqueue(9);
        assert_eq!(s.admit(|_| 1), vec![1, 2, 3, 4]);
        // Sequence 1 wants 4 blocks: 2 are free, it needs 1 more than that -> preempt 4.
        let pre = s.reserve(1, 4);
        assert_eq!(pre, vec![4]);
        assert_eq!(s.blocks_of(1).len(), 4);
        assert_eq!(s.running(), &[1, 2, 3]);
        assert_eq!(s.waiting().iter().copied().collect::<Vec<_>>(), vec![4, 9]);
        // Sequence 2 wants 3: preempts 3 and then itself (the youngest left), in that order.
        let pre = s.reserve(2, 4);
        assert_eq!(pre, vec![3, 2]);
        assert_eq!(s.running(), &[1]);
        assert_eq!(
            s.waiting().iter().copied().collect::<Vec<_>>(),
            vec![2, 3, 4, 9],
            "oldest preempted first, ahead of new requests"
        );
        assert_eq!(s.blocks_used_total(), (4, 6));
    }

    #[test]
    fn retiring_frees_blocks_for_reuse() {
        let mut s = Scheduler::new(4, 8);
        s.enqueue(1);
        s.enqueue(2);
        assert_eq!(s.admit(|_| 4), vec![1]);
        let held: Vec<BlockId> = s.blocks_of(1).to_vec();
        s.retire(1);
        assert_eq!(s.blocks_used_total(), (0, 4));
        assert_eq!(s.admit(|_| 4), vec![2]);
        let mut again = s.blocks_of(2).to_vec();
        let mut before = held;
        again.sort_unstable();
        before.sort_unstable();
        assert_eq!(again, before);
        // Retiring a waiting sequence removes it from the queue.
        s.enqueue(3);
        s.retire(3);
        assert!(s.waiting().is_empty());
    }
}
