//! Arenas: many buffers carved from one device allocation (llm.c's discipline, cuda-and-crates
//! §3.1). A model's parameters, gradients and each AdamW moment are one arena each
//! ([`crate::backend::Backend::zeros_many`] / [`crate::backend::Backend::upload_many`]), so a
//! training state is four allocations instead of four per tensor, its memory is fixed up
//! front, and an op over all of it could run as one launch.
//!
//! Under [`Precision::Bf16Gemm`] an uploaded arena (the parameters: `ParamLayout::upload`)
//! also gets a bf16 shadow of the same layout, the weights' working copy for the GEMMs
//! ([`super::shadow`]); zeroed arenas (gradients, moments) do not.

use std::sync::Arc;

use super::buffer::{Allocation, CudaBuf, Release};
use super::{fail, CudaBackend, Precision};
use crate::emu::DeviceApi;

/// Every view of an arena starts at a multiple of this many elements (256 bytes of f32, the
/// alignment cudaMalloc gives and cuBLAS and vector loads prefer).
pub const ARENA_ALIGN: usize = 64;

/// Offsets of buffers of `lens` elements packed in order, each at a multiple of
/// [`ARENA_ALIGN`], and the arena's total length (at least 1: devices may refuse empty
/// allocations).
pub fn arena_layout(lens: &[usize]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(lens.len());
    let mut end = 0usize;
    for &len in lens {
        let start = end.next_multiple_of(ARENA_ALIGN);
        offsets.push(start);
        end = start + len;
    }
    (offsets, end.max(1))
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// An arena holding views of `lens` elements at `offsets` (from [`arena_layout`]); with
    /// `image` (the whole arena's contents) written before any view exists, and then, under
    /// `Bf16Gemm`, a bf16 shadow (allocated when a GEMM first reads one of the views).
    fn arena(
        &self,
        lens: &[usize],
        offsets: &[usize],
        total: usize,
        image: Option<&[f32]>,
    ) -> Vec<CudaBuf<D>> {
        let mut block = self
            .pool
            .take_arena(&self.device, total)
            .unwrap_or_else(|e| fail("arena allocation", e));
        if let Some(image) = image {
            self.device
                .write(image, &mut block)
                .unwrap_or_else(|e| fail("arena upload", e));
        }
        let mut alloc = Allocation::new(block, self.pool.clone(), Release::Arena);
        if image.is_some() && self.precision == Precision::Bf16Gemm {
            alloc = alloc.with_shadow();
        }
        let alloc = Arc::new(alloc);
        offsets
            .iter()
            .zip(lens)
            .map(|(&offset, &len)| {
                CudaBuf::view(alloc.clone(), offset, len).expect("the layout fits the arena")
            })
            .collect()
    }

    /// [`crate::backend::Backend::zeros_many`]: one zeroed arena (device allocations start
    /// zeroed, so nothing else is written).
    pub(super) fn zeros_in_arena(&self, lens: &[usize]) -> Vec<CudaBuf<D>> {
        let (offsets, total) = arena_layout(lens);
        self.arena(lens, &offsets, total, None)
    }

    /// [`crate::backend::Backend::upload_many`]: one arena, filled by a single host-to-device
    /// copy of all the slices (zeros in the alignment gaps).
    pub(super) fn upload_to_arena(&self, hosts: &[&[f32]]) -> Vec<CudaBuf<D>> {
        let lens: Vec<usize> = hosts.iter().map(|h| h.len()).collect();
        let (offsets, total) = arena_layout(&lens);
        let mut image = vec![0.0f32; total];
        for (&offset, host) in offsets.iter().zip(hosts) {
            image[offset..offset + host.len()].copy_from_slice(host);
        }
        self.arena(&lens, &offsets, total, Some(&image))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_view_and_packs_in_order() {
        let lens = [10usize, 64, 0, 1, 130];
        let (offsets, total) = arena_layout(&lens);
        assert_eq!(offsets, vec![0, 64, 128, 128, 192]);
        assert_eq!(total, 192 + 130);
        for (i, (&o, &l)) in offsets.iter().zip(&lens).enumerate() {
            assert_eq!(o % ARENA_ALIGN, 0);
            assert!(o + l <= total);
            if let Some(&next) = offsets.get(i + 1) {
                assert!(o + l <= next, "views {i} and {} overlap", i + 1);
            }
        }
        assert_eq!(arena_layout(&[]), (vec![], 1));
        assert_eq!(arena_layout(&[0, 0]), (vec![0, 0], 1));
    }
}
