//! The MEGABYTE input embedders (spec §2.1 and §2.3): token + position lookups with a
//! learned pad vector wherever an id is [`PAD_ID`], and their scatter-add gradients.

use rayon::prelude::*;

use super::parallel::min_rows;
use super::scatter_add::scatter_add_rows;
use super::Real;
use crate::backend::PAD_ID;

fn row<'a, F>(table: &'a [F], r: usize, d: usize, what: &str) -> &'a [F] {
    assert!(
        (r + 1) * d <= table.len(),
        "{what}: row {r} out of range {}",
        table.len() / d.max(1)
    );
    &table[r * d..(r + 1) * d]
}

/// Global patch embedding: viewing `out` `[rows, p·dg]` as `[rows·p, dg]`, flat row `i` is
/// `pad[i mod p]` when `ids[i]` is [`PAD_ID`], else `tok[ids[i]] + pos[positions[i]]` (overwrites).
#[allow(clippy::too_many_arguments)]
pub fn patch_forward<F: Real>(
    out: &mut [F],
    tok: &[F],
    pos: &[F],
    pad: &[F],
    ids: &[u32],
    positions: &[u32],
    p: usize,
    dg: usize,
) {
    check_patch_shapes(out, pad, ids, positions, p, dg);
    if dg == 0 {
        return;
    }
    out.par_chunks_mut(dg)
        .enumerate()
        .with_min_len(min_rows(dg))
        .for_each(|(i, o)| {
            if ids[i] == PAD_ID {
                o.copy_from_slice(row(pad, i % p, dg, "patch_embed pad"));
            } else {
                let t = row(tok, ids[i] as usize, dg, "patch_embed tok");
                let e = row(pos, positions[i] as usize, dg, "patch_embed pos");
                for j in 0..dg {
                    o[j] = t[j] + e[j];
                }
            }
        });
}

/// Gradient of [`patch_forward`]: `dtok`, `dpos`, `dpad` `+=`, deterministic.
#[allow(clippy::too_many_arguments)]
pub fn patch_backward<F: Real>(
    dtok: &mut [F],
    dpos: &mut [F],
    dpad: &mut [F],
    dout: &[F],
    ids: &[u32],
    positions: &[u32],
    p: usize,
    dg: usize,
) {
    check_patch_shapes(dout, dpad, ids, positions, p, dg);
    let real = |i: usize| ids[i] != PAD_ID;
    scatter_add_rows(dtok, dout, dg, |i| real(i).then(|| ids[i] as usize));
    scatter_add_rows(dpos, dout, dg, |i| real(i).then(|| positions[i] as usize));
    scatter_add_rows(dpad, dout, dg, |i| (!real(i)).then_some(i % p));
}

fn check_patch_shapes<F>(
    out: &[F],
    pad: &[F],
    ids: &[u32],
    positions: &[u32],
    p: usize,
    dg: usize,
) {
    assert!(p > 0, "patch_embed: patch size must be positive");
    assert_eq!(ids.len() % p, 0, "patch_embed: ids must be [rows, p]");
    assert_eq!(
        positions.len(),
        ids.len(),
        "patch_embed: positions must match ids"
    );
    assert_eq!(
        out.len(),
        ids.len() * dg,
        "patch_embed: out must be [rows, p·dg]"
    );
    assert_eq!(pad.len(), p * dg, "patch_embed: pad must be [p, dg]");
}

/// Local input embedding, accumulated:
/// `out[i] += (ids[i] == PAD_ID ? pad : tok[ids[i]]) + pos[slots[i]]`, rows of width `d`.
#[allow(clippy::too_many_arguments)]
pub fn local_forward<F: Real>(
    out: &mut [F],
    tok: &[F],
    pos: &[F],
    pad: &[F],
    ids: &[u32],
    slots: &[u32],
    d: usize,
) {
    check_local_shapes(out, pad, ids, slots, d);
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(i, o)| {
            let t = if ids[i] == PAD_ID {
                pad
            } else {
                row(tok, ids[i] as usize, d, "local_embed tok")
            };
            let e = row(pos, slots[i] as usize, d, "local_embed pos");
            for j in 0..d {
                o[j] = o[j] + (t[j] + e[j]);
            }
        });
}

/// Gradient of [`local_forward`]: `dtok`, `dpos`, `dpad` `+=`, deterministic.
#[allow(clippy::too_many_arguments)]
pub fn local_backward<F: Real>(
    dtok: &mut [F],
    dpos: &mut [F],
    dpad: &mut [F],
    dout: &[F],
    ids: &[u32],
    slots: &[u32],
    d: usize,
) {
    check_local_shapes(dout, dpad, ids, slots, d);
    let real = |i: usize| ids[i] != PAD_ID;
    scatter_add_rows(dtok, dout, d, |i| real(i).then(|| ids[i] as usize));
    scatter_add_rows(dpad, dout, d, |i| (!real(i)).then_some(0));
    scatter_add_rows(dpos, dout, d, |i| Some(slots[i] as usize));
}

fn check_local_shapes<F>(out: &[F], pad: &[F], ids: &[u32], slots: &[u32], d: usize) {
    assert_eq!(slots.len(), ids.len(), "local_embed: slots must match ids");
    assert_eq!(
        out.len(),
        ids.len() * d,
        "local_embed: out must be [ids, d]"
    );
    assert_eq!(pad.len(), d, "local_embed: pad must be [d]");
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::{Real, PAD_ID};

    /// Global patch embedding, one element at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn patch_forward<F: Real>(
        out: &mut [F],
        tok: &[F],
        pos: &[F],
        pad: &[F],
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        super::check_patch_shapes(out, pad, ids, positions, p, dg);
        let rows = ids.len() / p;
        for r in 0..rows {
            for q in 0..p {
                let i = r * p + q;
                for j in 0..dg {
                    let o = r * p * dg + q * dg + j;
                    out[o] = if ids[i] == PAD_ID {
                        pad[q * dg + j]
                    } else {
                        tok[ids[i] as usize * dg + j] + pos[positions[i] as usize * dg + j]
                    };
                }
            }
        }
    }

    /// Gradient of the global patch embedding, accumulated in order of `i`.
    #[allow(clippy::too_many_arguments)]
    pub fn patch_backward<F: Real>(
        dtok: &mut [F],
        dpos: &mut [F],
        dpad: &mut [F],
        dout: &[F],
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        super::check_patch_shapes(dout, dpad, ids, positions, p, dg);
        let rows = ids.len() / p;
        for r in 0..rows {
            for q in 0..p {
                let i = r * p + q;
                for j in 0..dg {
                    let g = dout[r * p * dg + q * dg + j];
                    if ids[i] == PAD_ID {
                        dpad[q * dg + j] = dpad[q * dg + j] + g;
                    } else {
                        let t = ids[i] as usize * dg + j;
                        let e = positions[i] as usize * dg + j;
                        dtok[t] = dtok[t] + g;
                        dpos[e] = dpos[e] + g;
                    }
                }
            }
        }
    }

    /// Local input embedding, accumulated onto `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn local_forward<F: Real>(
        out: &mut [F],
        tok: &[F],
        pos: &[F],
        pad: &[F],
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        super::check_local_shapes(out, pad, ids, slots, d);
        for i in 0..ids.len() {
            for j in 0..d {
                let t = if ids[i] == PAD_ID {
                    pad[j]
                } else {
                    tok[ids[i] as usize * d + j]
                };
                let e = pos[slots[i] as usize * d + j];
                out[i * d + j] = out[i * d + j] + (t + e);
            }
        }
    }

    /// Gradient of the local input embedding, accumulated in order of `i`.
    #[allow(clippy::too_many_arguments)]
    pub fn local_backward<F: Real>(
        dtok: &mut [F],
        dpos: &mut [F],
        dpad: &mut [F],
        dout: &[F],
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        super::check_local_shapes(dout, dpad, ids, slots, d);
        for i in 0..ids.len() {
            for j in 0..d {
                let g = dout[i * d + j];
                if ids[i] == PAD_ID {
                    dpad[j] = dpad[j] + g;
                } else {
                    let t = ids[i] as usize * d + j;
                    dtok[t] = dtok[t] + g;
                }
                let e = slots[i] as usize * d + j;
                dpos[e] = dpos[e] + g;
            }
        }
    }
}
