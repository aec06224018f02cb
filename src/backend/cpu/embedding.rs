//! Plain table lookup (`out[i] = table[ids[i]]`) and its scatter-add gradient.

use rayon::prelude::*;

use super::parallel::min_rows;
use super::scatter_add::scatter_add_rows;
use super::Real;

/// `out[i] (= or +=) table[ids[i]]` for rows of width `d`.
pub fn forward<F: Real>(out: &mut [F], table: &[F], ids: &[u32], d: usize, accumulate: bool) {
    assert_eq!(out.len(), ids.len() * d, "embedding: out must be [ids, d]");
    if d == 0 {
        return;
    }
    let rows = table.len() / d;
    out.par_chunks_mut(d)
        .zip(ids.par_iter())
        .with_min_len(min_rows(d))
        .for_each(|(o, &id)| {
            let id = id as usize;
            assert!(id < rows, "embedding: id {id} out of range {rows}");
            let t = &table[id * d..(id + 1) * d];
            if accumulate {
                o.iter_mut().zip(t).for_each(|(o, &v)| *o = *o + v);
            } else {
                o.copy_from_slice(t);
            }
        });
}

/// `dtable[ids[i]] += dout[i]`, deterministic (see [`super::scatter_add`]).
pub fn backward<F: Real>(dtable: &mut [F], dout: &[F], ids: &[u32], d: usize) {
    assert_eq!(
        dout.len(),
        ids.len() * d,
        "embedding: dout must be [ids, d]"
    );
    scatter_add_rows(dtable, dout, d, |i| Some(ids[i] as usize));
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// `out[i] (= or +=) table[ids[i]]`.
    pub fn forward<F: Real>(out: &mut [F], table: &[F], ids: &[u32], d: usize, accumulate: bool) {
        assert_eq!(out.len(), ids.len() * d);
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..d {
                let v = table[id as usize * d + j];
                out[i * d + j] = if accumulate { out[i * d + j] + v } else { v };
            }
        }
    }

    /// `dtable[ids[i]] += dout[i]`, in order of `i`.
    pub fn backward<F: Real>(dtable: &mut [F], dout: &[F], ids: &[u32], d: usize) {
        assert_eq!(dout.len(), ids.len() * d);
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..d {
                let k = id as usize * d + j;
                dtable[k] = dtable[k] + dout[i * d + j];
            }
        }
    }
}
