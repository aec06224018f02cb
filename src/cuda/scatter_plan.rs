//! Row scatter-add plans: the host half of the deterministic scatter-add kernels
//! (`rows_scatter_add_csr_*` in `kernels/megabyte_gathers.cu`).
//!
//! A scatter-add `dst[target(i)] += src[i]` parallelised over source rows either races or,
//! with atomics, adds in an order that depends on timing. The index arrays live on the host
//! (the backend seam passes them as slices), so the host groups the source rows by destination
//! row once, in increasing source order (CSR), and the kernel runs one destination row per
//! warp, adding its sources in that order: no atomics, and the same additions in the same
//! order as the CPU backend's `scatter_add_rows`.

use crate::backend::PAD_ID;

/// Why a plan could not be built: an index that does not fit its table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScatterPlanError {
    /// A source row targets a destination row past the table.
    #[error("{what}: index {index} at position {at} is outside the table of {rows} rows")]
    OutOfRange {
        /// Which index array.
        what: &'static str,
        /// Position in that array.
        at: usize,
        /// The offending value.
        index: usize,
        /// Rows of the destination table.
        rows: usize,
    },
    /// More source rows than a `u32` index can name.
    #[error("{0} source rows exceed the u32 indices the kernels take")]
    TooManyRows(usize),
    /// Index arrays whose lengths do not belong together.
    #[error("{0}")]
    Shape(String),
}

/// Source rows grouped by destination row: destination `r` receives
/// `sources[offsets[r]..offsets[r + 1]]`, in increasing order. Upload both arrays as `u32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowScatterPlan {
    /// `n_dst + 1` offsets into `sources`.
    pub offsets: Vec<u32>,
    /// Source row indices, grouped by destination.
    pub sources: Vec<u32>,
}

impl RowScatterPlan {
    /// The plan of `dst[target(i)] += src[i]` for source rows `i < n_src` whose target is
    /// `Some`; `what` names the index array in errors.
    pub fn new(
        what: &'static str,
        n_dst: usize,
        n_src: usize,
        target: impl Fn(usize) -> Option<usize>,
    ) -> Result<Self, ScatterPlanError> {
        if n_src > u32::MAX as usize {
            return Err(ScatterPlanError::TooManyRows(n_src));
        }
        let mut counts = vec![0u32; n_dst + 1];
        for i in 0..n_src {
            if let Some(r) = target(i) {
                if r >= n_dst {
                    return Err(ScatterPlanError::OutOfRange {
                        what,
                        at: i,
                        index: r,
                        rows: n_dst,
                    });
                }
                counts[r + 1] += 1;
            }
        }
        for r in 0..n_dst {
            counts[r + 1] += counts[r];
        }
        let offsets = counts;
        let mut next: Vec<u32> = offsets[..n_dst].to_vec();
        let mut sources = vec![0u32; offsets[n_dst] as usize];
        for i in 0..n_src {
            if let Some(r) = target(i) {
                sources[next[r] as usize] = i as u32;
                next[r] += 1;
            }
        }
        Ok(Self { offsets, sources })
    }

    /// Destination rows.
    pub fn n_dst(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The source rows of destination `r`, in the order they are added.
    pub fn sources_of(&self, r: usize) -> &[u32] {
        &self.sources[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }
}

/// The three scatters of one embedder backward: into the token table, the position table and
/// the pad rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedScatterPlans {
    /// Non-pad rows into the token table, by id.
    pub tok: RowScatterPlan,
    /// Rows into the position table.
    pub pos: RowScatterPlan,
    /// Pad rows into the pad table.
    pub pad: RowScatterPlan,
}

/// Plans for the backward of the MEGABYTE patch embedder (`Backend::patch_embed_backward`):
/// flat row `i` of `dout` `[ids, dg]` goes to `dpad[i mod p]` when `ids[i]` is [`PAD_ID`],
/// else to `dtok[ids[i]]` and `dpos[positions[i]]`.
pub fn patch_embed_plans(
    ids: &[u32],
    positions: &[u32],
    p: usize,
    tok_rows: usize,
    pos_rows: usize,
) -> Result<EmbedScatterPlans, ScatterPlanError> {
    if p == 0 || ids.len() % p != 0 || positions.len() != ids.len() {
        return Err(ScatterPlanError::Shape(format!(
            "patch_embed: {} ids and {} positions do not form rows of p = {p}",
            ids.len(),
            positions.len()
        )));
    }
    let real = |i: usize| ids[i] != PAD_ID;
    Ok(EmbedScatterPlans {
        tok: RowScatterPlan::new("patch_embed ids", tok_rows, ids.len(), |i| {
            real(i).then(|| ids[i] as usize)
        })?,
        pos: RowScatterPlan::new("patch_embed positions", pos_rows, ids.len(), |i| {
            real(i).then(|| positions[i] as usize)
        })?,
        pad: RowScatterPlan::new("patch_embed pad", p, ids.len(), |i| {
            (!real(i)).then_some(i % p)
        })?,
    })
}

/// Plans for the backward of the MEGABYTE local embedder (`Backend::local_embed_backward`):
/// row `i` goes to `dpad[0]` when `ids[i]` is [`PAD_ID`], else to `dtok[ids[i]]`, and always
/// to `dpos[slots[i]]`.
pub fn local_embed_plans(
    ids: &[u32],
    slots: &[u32],
    tok_rows: usize,
    pos_rows: usize,
) -> Result<EmbedScatterPlans, ScatterPlanError> {
    if slots.len() != ids.len() {
        return Err(ScatterPlanError::Shape(format!(
            "local_embed: {} ids but {} slots",
            ids.len(),
            slots.len()
        )));
    }
    let real = |i: usize| ids[i] != PAD_ID;
    Ok(EmbedScatterPlans {
        tok: RowScatterPlan::new("local_embed ids", tok_rows, ids.len(), |i| {
            real(i).then(|| ids[i] as usize)
        })?,
        pos: RowScatterPlan::new("local_embed slots", pos_rows, ids.len(), |i| {
            Some(slots[i] as usize)
        })?,
        pad: RowScatterPlan::new("local_embed pad", 1, ids.len(), |i| (!real(i)).then_some(0))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_sources_by_destination_in_source_order() {
        let targets = [Some(2), None, Some(0), Some(2), Some(2), Some(0)];
        let plan = RowScatterPlan::new("t", 4, targets.len(), |i| targets[i]).unwrap();
        assert_eq!(plan.offsets, vec![0, 2, 2, 5, 5]);
        assert_eq!(plan.sources_of(0), &[2, 5]);
        assert_eq!(plan.sources_of(1), &[] as &[u32]);
        assert_eq!(plan.sources_of(2), &[0, 3, 4]);
        assert_eq!(plan.sources_of(3), &[] as &[u32]);
        assert_eq!(plan.n_dst(), 4);
    }

    #[test]
    fn out_of_range_targets_are_errors_not_panics() {
        let err = RowScatterPlan::new("ids", 3, 2, |i| Some(i * 5)).unwrap_err();
        assert_eq!(
            err,
            ScatterPlanError::OutOfRange {
                what: "ids",
                at: 1,
                index: 5,
                rows: 3
            }
        );
        assert!(err.to_string().contains("outside the table of 3 rows"));
    }

    /// Applying a plan by hand equals the direct scatter loop.
    #[test]
    fn patch_plans_reproduce_the_scatter_loop() {
        let (p, tok_rows, pos_rows) = (3, 5, 7);
        let ids = [1, PAD_ID, 4, 1, 1, PAD_ID];
        let positions = [0, 1, 2, 3, 6, 5];
        let plans = patch_embed_plans(&ids, &positions, p, tok_rows, pos_rows).unwrap();
        let apply = |plan: &RowScatterPlan| -> Vec<Vec<u32>> {
            (0..plan.n_dst())
                .map(|r| plan.sources_of(r).to_vec())
                .collect()
        };
        let mut tok = vec![Vec::new(); tok_rows];
        let mut pos = vec![Vec::new(); pos_rows];
        let mut pad = vec![Vec::new(); p];
        for (i, (&id, &at)) in ids.iter().zip(&positions).enumerate() {
            if id == PAD_ID {
                pad[i % p].push(i as u32);
            } else {
                tok[id as usize].push(i as u32);
                pos[at as usize].push(i as u32);
            }
        }
        assert_eq!(apply(&plans.tok), tok);
        assert_eq!(apply(&plans.pos), pos);
        assert_eq!(apply(&plans.pad), pad);
    }

    #[test]
    fn local_plans_send_every_row_to_its_slot() {
        let ids = [PAD_ID, 2, 0];
        let slots = [0, 1, 0];
        let plans = local_embed_plans(&ids, &slots, 3, 2).unwrap();
        assert_eq!(plans.pad.sources_of(0), &[0]);
        assert_eq!(plans.tok.sources_of(2), &[1]);
        assert_eq!(plans.tok.sources_of(0), &[2]);
        assert_eq!(plans.pos.sources_of(0), &[0, 2]);
        assert_eq!(plans.pos.sources_of(1), &[1]);
    }

    #[test]
    fn mismatched_index_arrays_are_errors() {
        assert!(matches!(
            patch_embed_plans(&[1, 2], &[0], 2, 4, 4),
            Err(ScatterPlanError::Shape(_))
        ));
        assert!(matches!(
            patch_embed_plans(&[1, 2, 3], &[0, 0, 0], 2, 4, 4),
            Err(ScatterPlanError::Shape(_))
        ));
        assert!(matches!(
            local_embed_plans(&[1], &[], 4, 4),
            Err(ScatterPlanError::Shape(_))
        ));
        assert!(matches!(
            local_embed_plans(&[9], &[0], 4, 4),
            Err(ScatterPlanError::OutOfRange { index: 9, .. })
        ));
    }
}
