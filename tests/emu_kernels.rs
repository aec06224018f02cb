//! The shipped CUDA kernels, run on the CPU emulator, against their Rust twins (the CPU
//! backend's ops) on random inputs: sizes 1, tile−1, tile, tile+1 and primes, NaN-filled
//! exact-size outputs, under every schedule of `Schedule::TEST_MATRIX` (through
//! `emu_check::sweep`).

#[path = "support/emu_check.rs"]
mod emu_check;
mod emu_support;

use emu_check::sweep;
use emu_support::{ids, rng, uniform};
use half::bf16;
use mega::backend::cpu::{embedding, loss};
use mega::emu::{launch, HostBuffer, LaunchConfig};

const VOCAB: usize = 256;

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// A forward case: `n` tokens of embedding width `d`.
#[derive(Debug)]
struct Rows {
    n: usize,
    d: usize,
}

/// A backward case: `n` rows of width `d` into a table of `vocab` rows, in `chunks` chunks.
#[derive(Debug)]
struct Scatter {
    vocab: usize,
    n: usize,
    d: usize,
    chunks: u32,
}

/// A cross-entropy case: `rows` rows of `v` logits.
#[derive(Debug)]
struct Logits {
    rows: usize,
    v: usize,
}

// ---- embedding forward ----------------------------------------------------------------------

/// Rows per block of the forward launch (block (32, ROWS)); with a grid of 2 blocks the rows
/// stride by 2·ROWS, the forward's tile.
const FWD_ROWS: u32 = 4;
const FWD_TILE: usize = 2 * FWD_ROWS as usize;

/// (tokens, width) pairs: 1, tile−1, tile, tile+1 and primes for both.
const FWD_SHAPES: [(usize, usize); 6] = [
    (1, 1),
    (FWD_TILE - 1, 31),
    (FWD_TILE, 32),
    (FWD_TILE + 1, 33),
    (13, 67),
    (31, 5),
];

fn fwd_config() -> LaunchConfig {
    LaunchConfig::new(2, (32, FWD_ROWS), 0)
}

#[test]
fn embedding_forward_f32_matches_cpu() {
    let mut r = rng(1);
    let cases = FWD_SHAPES.map(|(n, d)| Rows { n, d });
    sweep(
        "embedding_forward_f32_matches_cpu",
        cases,
        |&Rows { n, d }, schedules| {
            let table = uniform(&mut r, VOCAB * d, -1.0, 1.0);
            let tokens = ids(&mut r, n, VOCAB as u32);
            let base = uniform(&mut r, n * d, -1.0, 1.0);
            let (table_buf, ids_buf) = (
                HostBuffer::from_slice(&table),
                HostBuffer::from_slice(&tokens),
            );
            let (n_i, d_i, v_i) = (n as i32, d as i32, VOCAB as i32);
            for accumulate in [0i32, 1] {
                let mut want = base.clone();
                embedding::forward(&mut want, &table, &tokens, d, accumulate == 1);
                schedules.each(|_, checks| {
                    let out = if accumulate == 1 {
                        HostBuffer::from_slice(&base)
                    } else {
                        HostBuffer::filled(n * d, f32::NAN)
                    };
                    launch(
                        "embedding_forward_f32",
                        fwd_config(),
                        &[&out, &table_buf, &ids_buf, &n_i, &d_i, &v_i, &accumulate],
                    )
                    .unwrap();
                    checks.exact(&format!("out acc={accumulate}"), &out.to_vec(), &want);
                });
            }
        },
    );
}

#[test]
fn embedding_forward_bf16_matches_cpu() {
    let mut r = rng(2);
    let cases = FWD_SHAPES.map(|(n, d)| Rows { n, d });
    sweep(
        "embedding_forward_bf16_matches_cpu",
        cases,
        |&Rows { n, d }, schedules| {
            let table = to_bf16(&uniform(&mut r, VOCAB * d, -1.0, 1.0));
            let tokens = ids(&mut r, n, VOCAB as u32);
            let base = to_bf16(&uniform(&mut r, n * d, -1.0, 1.0));
            let (table_buf, ids_buf) = (
                HostBuffer::from_slice(&table),
                HostBuffer::from_slice(&tokens),
            );
            let (n_i, d_i, v_i) = (n as i32, d as i32, VOCAB as i32);
            for accumulate in [0i32, 1] {
                // The kernel adds in f32 and rounds once to bf16.
                let mut sum = from_bf16(&base);
                embedding::forward(&mut sum, &from_bf16(&table), &tokens, d, accumulate == 1);
                let want: Vec<u16> = to_bf16(&sum).iter().map(|b| b.to_bits()).collect();
                schedules.each(|_, checks| {
                    let out = if accumulate == 1 {
                        HostBuffer::from_slice(&base)
                    } else {
                        HostBuffer::filled(n * d, bf16::NAN)
                    };
                    launch(
                        "embedding_forward_bf16",
                        fwd_config(),
                        &[&out, &table_buf, &ids_buf, &n_i, &d_i, &v_i, &accumulate],
                    )
                    .unwrap();
                    let got: Vec<u16> = out.to_vec().iter().map(|b| b.to_bits()).collect();
                    checks.exact(&format!("out bits acc={accumulate}"), &got, &want);
                });
            }
        },
    );
}

#[test]
fn embedding_forward_writes_nan_rows_for_ids_out_of_range() {
    let d = 33usize;
    let table = uniform(&mut rng(3), VOCAB * d, -1.0, 1.0);
    let tokens = vec![5u32, VOCAB as u32, 7, u32::MAX];
    let out = HostBuffer::filled(tokens.len() * d, 0.0f32);
    let (n_i, d_i, v_i) = (tokens.len() as i32, d as i32, VOCAB as i32);
    launch(
        "embedding_forward_f32",
        fwd_config(),
        &[
            &out,
            &HostBuffer::from_slice(&table),
            &HostBuffer::from_slice(&tokens),
            &n_i,
            &d_i,
            &v_i,
            &0i32,
        ],
    )
    .unwrap();
    let got = out.to_vec();
    for (i, &id) in tokens.iter().enumerate() {
        let row = &got[i * d..(i + 1) * d];
        if (id as usize) < VOCAB {
            assert_eq!(row, &table[id as usize * d..(id as usize + 1) * d]);
        } else {
            assert!(row.iter().all(|v| v.is_nan()), "row {i}");
        }
    }
}

// ---- embedding backward ---------------------------------------------------------------------

/// Columns per block of the backward (its tile) and threads per block.
const BWD_TILE: usize = 32;
const BWD_THREADS: u32 = 256;

/// (tokens, width, chunks): width 1, tile−1, tile, tile+1 and primes; token counts likewise.
const BWD_SHAPES: [(usize, usize, u32); 6] = [
    (1, 1, 1),
    (31, BWD_TILE - 1, 1),
    (32, BWD_TILE, 3),
    (33, BWD_TILE + 1, 2),
    (97, 67, 3),
    (5, 37, 4),
];

/// Grid of the backward: fewer column blocks than tiles for wide rows, so blocks also stride.
fn bwd_config(d: usize, chunks: u32, vocab: usize) -> LaunchConfig {
    let tiles = d.div_ceil(BWD_TILE) as u32;
    LaunchConfig::new(
        (tiles.min(2), chunks),
        BWD_THREADS,
        (vocab * BWD_TILE * 4) as u32,
    )
}

/// Token ids with a few out of range (which the kernels must skip).
fn ids_with_invalid(r: &mut rand_chacha::ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    let mut tokens = ids(r, n, vocab as u32);
    for i in (3..n).step_by(7) {
        tokens[i] = vocab as u32 + i as u32;
    }
    tokens
}

/// The CPU twin on the valid tokens only.
fn backward_reference(
    dtable: &[f32],
    dout: &[f32],
    tokens: &[u32],
    d: usize,
    vocab: usize,
) -> Vec<f32> {
    let mut want = dtable.to_vec();
    let (valid_ids, valid_rows): (Vec<u32>, Vec<&[f32]>) = tokens
        .iter()
        .zip(dout.chunks(d.max(1)))
        .filter(|(&id, _)| (id as usize) < vocab)
        .map(|(&id, row)| (id, row))
        .unzip();
    let rows: Vec<f32> = valid_rows.concat();
    embedding::backward(&mut want, &rows, &valid_ids, d);
    want
}

#[test]
fn embedding_backward_atomic_matches_cpu() {
    let mut r = rng(4);
    let cases = [(VOCAB, &BWD_SHAPES[..]), (11, &BWD_SHAPES[3..5])]
        .into_iter()
        .flat_map(|(vocab, shapes)| {
            shapes.iter().map(move |&(n, d, chunks)| Scatter {
                vocab,
                n,
                d,
                chunks,
            })
        });
    sweep(
        "embedding_backward_atomic_matches_cpu",
        cases,
        |case, schedules| {
            let &Scatter {
                vocab,
                n,
                d,
                chunks,
            } = case;
            let dtable = uniform(&mut r, vocab * d, -1.0, 1.0);
            let dout = uniform(&mut r, n * d, -1.0, 1.0);
            let tokens = ids_with_invalid(&mut r, n, vocab);
            let want = backward_reference(&dtable, &dout, &tokens, d, vocab);
            let (dout_buf, ids_buf) = (
                HostBuffer::from_slice(&dout),
                HostBuffer::from_slice(&tokens),
            );
            let dout_bf16 = to_bf16(&dout);
            let want_bf16 = backward_reference(&dtable, &from_bf16(&dout_bf16), &tokens, d, vocab);
            let dout_bf16_buf = HostBuffer::from_slice(&dout_bf16);
            let (n_i, d_i, v_i) = (n as i32, d as i32, vocab as i32);
            schedules.each(|_, checks| {
                let out = HostBuffer::from_slice(&dtable);
                launch(
                    "embedding_backward_atomic_f32",
                    bwd_config(d, chunks, vocab),
                    &[&out, &dout_buf, &ids_buf, &n_i, &d_i, &v_i],
                )
                .unwrap();
                checks.close_elementwise("dtable", &out.to_vec(), &want, 1e-6);
                let out = HostBuffer::from_slice(&dtable);
                launch(
                    "embedding_backward_atomic_bf16",
                    bwd_config(d, chunks, vocab),
                    &[&out, &dout_bf16_buf, &ids_buf, &n_i, &d_i, &v_i],
                )
                .unwrap();
                checks.close_elementwise("dtable (bf16 dout)", &out.to_vec(), &want_bf16, 1e-6);
            });
        },
    );
}

#[test]
fn embedding_backward_partials_and_reduce_match_cpu() {
    let mut r = rng(5);
    let cases = BWD_SHAPES.map(|(n, d, chunks)| Scatter {
        vocab: VOCAB,
        n,
        d,
        chunks,
    });
    sweep(
        "embedding_backward_partials_and_reduce_match_cpu",
        cases,
        |case, schedules| {
            let &Scatter {
                vocab,
                n,
                d,
                chunks,
            } = case;
            let dtable = uniform(&mut r, vocab * d, -1.0, 1.0);
            let dout = uniform(&mut r, n * d, -1.0, 1.0);
            let tokens = ids_with_invalid(&mut r, n, vocab);
            let want = backward_reference(&dtable, &dout, &tokens, d, vocab);
            let dout_bf16 = to_bf16(&dout);
            let want_bf16 = backward_reference(&dtable, &from_bf16(&dout_bf16), &tokens, d, vocab);
            let ids_buf = HostBuffer::from_slice(&tokens);
            let (n_i, d_i, v_i, c_i) = (n as i32, d as i32, vocab as i32, chunks as i32);
            let kernels = [
                (
                    "embedding_backward_partials_f32",
                    HostBuffer::from_slice(&dout).into_arg(),
                    &want,
                ),
                (
                    "embedding_backward_partials_bf16",
                    HostBuffer::from_slice(&dout_bf16).into_arg(),
                    &want_bf16,
                ),
            ];
            for (kernel, dout_buf, want) in &kernels {
                schedules.each(|_, checks| {
                    // The partials kernel must overwrite every element of its workspace.
                    let partials = HostBuffer::filled(chunks as usize * vocab * d, f32::NAN);
                    launch(
                        kernel,
                        bwd_config(d, chunks, vocab),
                        &[&partials, dout_buf.as_arg(), &ids_buf, &n_i, &d_i, &v_i],
                    )
                    .unwrap();
                    let out = HostBuffer::from_slice(&dtable);
                    launch(
                        "embedding_backward_reduce_f32",
                        LaunchConfig::new(3, 128, 0),
                        &[&out, &partials, &c_i, &v_i, &d_i],
                    )
                    .unwrap();
                    checks.close_elementwise(kernel, &out.to_vec(), want, 1e-6);
                });
            }
        },
    );
}

/// A dout buffer of either element type, for tables of kernel variants.
enum DoutBuffer {
    F32(HostBuffer<f32>),
    Bf16(HostBuffer<bf16>),
}

trait IntoArg {
    fn into_arg(self) -> DoutBuffer;
}

impl IntoArg for HostBuffer<f32> {
    fn into_arg(self) -> DoutBuffer {
        DoutBuffer::F32(self)
    }
}

impl IntoArg for HostBuffer<bf16> {
    fn into_arg(self) -> DoutBuffer {
        DoutBuffer::Bf16(self)
    }
}

impl DoutBuffer {
    fn as_arg(&self) -> &dyn mega::emu::KernelArg {
        match self {
            DoutBuffer::F32(b) => b,
            DoutBuffer::Bf16(b) => b,
        }
    }
}

// ---- cross-entropy --------------------------------------------------------------------------

/// Threads per block; the vocabulary is strided over them, so it is the tile.
const CE_THREADS: u32 = 256;
const CE_TILE: usize = CE_THREADS as usize;

/// (rows, vocab): vocab 1, tile−1, tile, tile+1 and primes.
const CE_SHAPES: [(usize, usize); 6] = [
    (1, 1),
    (3, CE_TILE - 1),
    (2, CE_TILE),
    (5, CE_TILE + 1),
    (4, 31),
    (2, 509),
];

/// Grid of 3 blocks: rows past the third stride.
fn ce_config() -> LaunchConfig {
    LaunchConfig::new(3, CE_THREADS, 0)
}

#[test]
fn cross_entropy_forward_matches_cpu() {
    let mut r = rng(6);
    let cases = CE_SHAPES.map(|(rows, v)| Logits { rows, v });
    sweep(
        "cross_entropy_forward_matches_cpu",
        cases,
        |&Logits { rows, v }, schedules| {
            let logits = uniform(&mut r, rows * v, -8.0, 8.0);
            let targets = ids(&mut r, rows, v as u32);
            let mut want = vec![0.0f32; rows];
            loss::cross_entropy_forward(&mut want, &logits, &targets, v);
            let (logits_buf, targets_buf) = (
                HostBuffer::from_slice(&logits),
                HostBuffer::from_slice(&targets),
            );
            let (rows_i, v_i) = (rows as i32, v as i32);
            schedules.each(|_, checks| {
                let losses = HostBuffer::filled(rows, f32::NAN);
                launch(
                    "cross_entropy_forward_f32",
                    ce_config(),
                    &[&losses, &logits_buf, &targets_buf, &rows_i, &v_i],
                )
                .unwrap();
                checks.close_elementwise("losses", &losses.to_vec(), &want, 2e-6);
            });
        },
    );
}

#[test]
fn cross_entropy_backward_matches_cpu_also_in_place() {
    let mut r = rng(7);
    let dloss = 0.37f32;
    let cases = CE_SHAPES.map(|(rows, v)| Logits { rows, v });
    sweep(
        "cross_entropy_backward_matches_cpu_also_in_place",
        cases,
        |&Logits { rows, v }, schedules| {
            let logits = uniform(&mut r, rows * v, -8.0, 8.0);
            let targets = ids(&mut r, rows, v as u32);
            let mut want = vec![0.0f32; rows * v];
            loss::cross_entropy_backward(&mut want, &logits, &targets, v, dloss);
            let (logits_buf, targets_buf) = (
                HostBuffer::from_slice(&logits),
                HostBuffer::from_slice(&targets),
            );
            let (rows_i, v_i) = (rows as i32, v as i32);
            schedules.each(|_, checks| {
                let dlogits = HostBuffer::filled(rows * v, f32::NAN);
                launch(
                    "cross_entropy_backward_f32",
                    ce_config(),
                    &[&dlogits, &logits_buf, &targets_buf, &dloss, &rows_i, &v_i],
                )
                .unwrap();
                checks.close_elementwise("dlogits", &dlogits.to_vec(), &want, 2e-6);
                // dlogits may alias logits.
                let in_place = HostBuffer::from_slice(&logits);
                launch(
                    "cross_entropy_backward_f32",
                    ce_config(),
                    &[&in_place, &in_place, &targets_buf, &dloss, &rows_i, &v_i],
                )
                .unwrap();
                checks.close_elementwise("dlogits in place", &in_place.to_vec(), &want, 2e-6);
            });
        },
    );
}

#[test]
fn cross_entropy_gives_nan_for_targets_out_of_range() {
    let (rows, v) = (3usize, 40usize);
    let logits = uniform(&mut rng(8), rows * v, -4.0, 4.0);
    let targets = vec![2u32, v as u32, 39];
    let (rows_i, v_i) = (rows as i32, v as i32);
    let (logits_buf, targets_buf) = (
        HostBuffer::from_slice(&logits),
        HostBuffer::from_slice(&targets),
    );
    let losses = HostBuffer::filled(rows, 0.0f32);
    launch(
        "cross_entropy_forward_f32",
        ce_config(),
        &[&losses, &logits_buf, &targets_buf, &rows_i, &v_i],
    )
    .unwrap();
    let dlogits = HostBuffer::filled(rows * v, 0.0f32);
    launch(
        "cross_entropy_backward_f32",
        ce_config(),
        &[&dlogits, &logits_buf, &targets_buf, &1.0f32, &rows_i, &v_i],
    )
    .unwrap();
    let (losses, dlogits) = (losses.to_vec(), dlogits.to_vec());
    for (row, &t) in targets.iter().enumerate() {
        let grad = &dlogits[row * v..(row + 1) * v];
        if (t as usize) < v {
            assert!(losses[row].is_finite() && grad.iter().all(|g| g.is_finite()));
        } else {
            assert!(
                losses[row].is_nan() && grad.iter().all(|g| g.is_nan()),
                "row {row}"
            );
        }
    }
}
