//! The slot decoders behind the serving engine: a sequence's logits must not depend on which
//! other sequences share its batch (batch invariance), nor on how its prompt was split into
//! prefill chunks. Both are checked bit for bit, on models wide enough that the CPU `gemm`
//! takes different paths for one row and for several.

use mega::backend::cpu::Cpu;
use mega::config::{FeedForward, MegabyteConfig, MegalodonConfig};
use mega::infer::megabyte_decoder::MegabyteDecoder;
use mega::infer::megalodon_stream::MegalodonStream;
use mega::model::megabyte::Megabyte;
use mega::model::megalodon::Megalodon;
use mega::model::{Decoder, ModelShape};

/// A MEGABYTE small enough for tests but with a 128-wide local model (its head product has
/// k = 128) and a 1024-wide global feed-forward, and weights large enough for peaked logits.
fn megabyte_cfg() -> MegabyteConfig {
    MegabyteConfig {
        vocab_size: 256,
        patch_size: 4,
        max_seq_len: 64,
        global_byte_dim: 64,
        global_dim: 256,
        global_layers: 2,
        global_heads: 4,
        local_dim: 128,
        local_layers: 2,
        local_heads: 2,
        ffn_mult: 4,
        activation: FeedForward::Relu,
        init_std: 0.05,
        head_bias: true,
    }
}

fn megalodon_cfg() -> MegalodonConfig {
    let mut c = MegalodonConfig::preset("tiny").unwrap();
    c.model_dim = 128;
    c.z_dim = 64;
    c.value_dim = 128;
    c.ffn_hidden_dim = 512;
    c.chunk_size = 8;
    c
}

fn text(seed: usize, len: usize) -> Vec<u8> {
    let src =
        b"It was the best of times, it was the worst of times; the age of wisdom, of foolishness. ";
    (0..len)
        .map(|i| src[(i * 7 + seed * 13) % src.len()])
        .collect()
}

/// Logits of `target` (prompt, then `follow` pushed one byte at a time) in slot `slot` of a
/// decoder whose other slots run `others` (each prompt, then the same continuation bytes as
/// the target, cycled), each advanced at most `chunk` units per call.
fn trace(
    dec: &mut dyn Decoder,
    slot: usize,
    target: &[u8],
    follow: &[u8],
    others: &[(usize, Vec<u8>)],
    chunk: usize,
) -> Vec<Vec<f32>> {
    dec.insert(slot, target);
    for (s, p) in others {
        dec.insert(*s, p);
    }
    let mut out = Vec::new();
    let slots: Vec<usize> = std::iter::once(slot)
        .chain(others.iter().map(|o| o.0))
        .collect();
    let mut step = 0;
    loop {
        let work: Vec<(usize, usize)> = slots
            .iter()
            .filter(|&&s| dec.pending(s) > 0)
            .map(|&s| (s, chunk))
            .collect();
        dec.advance(&work);
        if dec.pending(slot) == 0 {
            out.push(dec.slot_logits(slot).to_vec());
            if step == follow.len() {
                return out;
            }
            dec.push(slot, follow[step]);
            step += 1;
        }
        // The other rows decode too, so the batch composition keeps changing.
        for (s, _) in others {
            if dec.pending(*s) == 0 {
                dec.push(*s, follow[(step + *s) % follow.len()]);
            }
        }
    }
}

fn assert_bit_equal(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len(), "{what}: number of predictions");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(
            same,
            "{what}: prediction {i} differs (max |diff| {worst:e})"
        );
    }
    assert!(
        a.iter().flatten().any(|&x| x != a[0][0]),
        "{what}: degenerate logits"
    );
}

fn megabyte_model() -> (Megabyte, Cpu<f32>, Vec<Vec<f32>>) {
    let model = Megabyte::new(&megabyte_cfg());
    let be = Cpu::<f32>::new();
    let params = model.layout().upload(&be, &model.layout().init_host(3));
    (model, be, params)
}

fn megalodon_model() -> (Megalodon, Cpu<f32>, Vec<Vec<f32>>) {
    let model = Megalodon::new(&megalodon_cfg());
    let be = Cpu::<f32>::new();
    let params = model.layout().upload(&be, &model.layout().init_host(3));
    (model, be, params)
}

fn others() -> Vec<(usize, Vec<u8>)> {
    // Four other prompts of different lengths (one empty) in the other slots.
    vec![
        (0, text(1, 9)),
        (1, text(2, 30)),
        (3, Vec::new()),
        (4, text(3, 5)),
    ]
}

#[test]
fn megabyte_logits_do_not_depend_on_the_rest_of_the_batch() {
    let (model, be, params) = megabyte_model();
    // 70 bytes in all: the 64-byte window slides once on the way.
    let (target, follow) = (text(0, 23), text(5, 47));
    let mut alone = MegabyteDecoder::with_slots(&model, &be, &params, 1, 4);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let mut batch = MegabyteDecoder::with_slots(&model, &be, &params, 5, 4);
    let b = trace(&mut batch, 2, &target, &follow, &others(), usize::MAX);
    assert_bit_equal("megabyte alone vs batch of 5", &a, &b);
}

#[test]
fn megalodon_logits_do_not_depend_on_the_rest_of_the_batch() {
    let (model, be, params) = megalodon_model();
    let (target, follow) = (text(0, 23), text(5, 30));
    let mut alone = MegalodonStream::new(&model, &be, &params, 1);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let mut batch = MegalodonStream::new(&model, &be, &params, 5);
    let b = trace(&mut batch, 2, &target, &follow, &others(), usize::MAX);
    assert_bit_equal("megalodon alone vs batch of 5", &a, &b);
}

/// Eight other sequences: the decode batch then holds more rows than the padding minimum,
/// so the target's row count really changes from step to step.
fn many_others() -> Vec<(usize, Vec<u8>)> {
    (0..9)
        .filter(|&s| s != 2)
        .map(|s| (s, text(s + 1, 3 * s)))
        .collect()
}

#[test]
fn megabyte_logits_do_not_depend_on_a_larger_batch() {
    let (model, be, params) = megabyte_model();
    let (target, follow) = (text(0, 23), text(5, 47));
    let mut alone = MegabyteDecoder::with_slots(&model, &be, &params, 1, 4);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let mut batch = MegabyteDecoder::with_slots(&model, &be, &params, 9, 4);
    let b = trace(&mut batch, 2, &target, &follow, &many_others(), 5);
    assert_bit_equal("megabyte alone vs batch of 9", &a, &b);
}

#[test]
fn megalodon_logits_do_not_depend_on_a_larger_batch() {
    let (model, be, params) = megalodon_model();
    let (target, follow) = (text(0, 23), text(5, 30));
    let mut alone = MegalodonStream::new(&model, &be, &params, 1);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let mut batch = MegalodonStream::new(&model, &be, &params, 9);
    let b = trace(&mut batch, 2, &target, &follow, &many_others(), 5);
    assert_bit_equal("megalodon alone vs batch of 9", &a, &b);
}

/// Twenty rows: more than the CPU matmul's few-row kernel takes at once, so the decode batch
/// must be split without changing any row's arithmetic.
#[test]
fn megalodon_logits_do_not_depend_on_a_batch_of_twenty() {
    let (model, be, params) = megalodon_model();
    let (target, follow) = (text(0, 23), text(5, 30));
    let mut alone = MegalodonStream::new(&model, &be, &params, 1);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let crowd: Vec<(usize, Vec<u8>)> = (0..20)
        .filter(|&s| s != 7)
        .map(|s| (s, text(s + 1, s % 6)))
        .collect();
    let mut batch = MegalodonStream::new(&model, &be, &params, 20);
    let b = trace(&mut batch, 7, &target, &follow, &crowd, 5);
    assert_bit_equal("megalodon alone vs batch of 20", &a, &b);
}

#[test]
fn megabyte_chunked_prefill_equals_unchunked() {
    let (model, be, params) = megabyte_model();
    let (target, follow) = (text(0, 50), text(5, 6));
    let mut whole = MegabyteDecoder::with_slots(&model, &be, &params, 1, 4);
    let a = trace(&mut whole, 0, &target, &follow, &[], usize::MAX);
    for chunk in [1, 3, 4, 7] {
        let mut dec = MegabyteDecoder::with_slots(&model, &be, &params, 5, 4);
        let b = trace(&mut dec, 2, &target, &follow, &others(), chunk);
        assert_bit_equal(&format!("megabyte prefill in chunks of {chunk}"), &a, &b);
    }
}

#[test]
fn megalodon_chunked_prefill_equals_unchunked() {
    let (model, be, params) = megalodon_model();
    let (target, follow) = (text(0, 50), text(5, 6));
    let mut whole = MegalodonStream::new(&model, &be, &params, 1);
    let a = trace(&mut whole, 0, &target, &follow, &[], usize::MAX);
    for chunk in [1, 3, 8, 16] {
        let mut dec = MegalodonStream::new(&model, &be, &params, 5);
        let b = trace(&mut dec, 2, &target, &follow, &others(), chunk);
        assert_bit_equal(&format!("megalodon prefill in chunks of {chunk}"), &a, &b);
    }
}

#[test]
fn megabyte_slots_are_reused_after_removal() {
    let (model, be, params) = megabyte_model();
    let (target, follow) = (text(0, 11), text(5, 9));
    let mut fresh = MegabyteDecoder::with_slots(&model, &be, &params, 2, 4);
    let a = trace(&mut fresh, 1, &target, &follow, &[], usize::MAX);
    // The same slot, after another sequence used it and left.
    let mut reused = MegabyteDecoder::with_slots(&model, &be, &params, 2, 4);
    let _ = trace(&mut reused, 1, &text(7, 40), &follow, &[], usize::MAX);
    reused.remove(1);
    let b = trace(&mut reused, 1, &target, &follow, &[], usize::MAX);
    assert_bit_equal("megabyte reused slot", &a, &b);
}

#[test]
fn megalodon_slots_are_reused_after_removal() {
    let (model, be, params) = megalodon_model();
    let (target, follow) = (text(0, 11), text(5, 9));
    let mut fresh = MegalodonStream::new(&model, &be, &params, 2);
    let a = trace(&mut fresh, 1, &target, &follow, &[], usize::MAX);
    let mut reused = MegalodonStream::new(&model, &be, &params, 2);
    let _ = trace(&mut reused, 1, &text(7, 40), &follow, &[], usize::MAX);
    reused.remove(1);
    let b = trace(&mut reused, 1, &target, &follow, &[], usize::MAX);
    assert_bit_equal("megalodon reused slot", &a, &b);
}

/// The global KV cache is a paged pool: a sequence's logits must not depend on the block size
/// or on which blocks of the pool its positions land in (shuffled, non-contiguous tables).
#[test]
fn megabyte_logits_do_not_depend_on_where_the_blocks_sit() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (model, be, params) = megabyte_model();
    let (target, follow) = (text(0, 23), text(5, 47));
    let mut alone = MegabyteDecoder::with_slots(&model, &be, &params, 1, 4);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for bs in [1, 3, 5] {
        let per = MegabyteDecoder::<Cpu<f32>>::blocks_per_context(&model, bs);
        let slots = 5;
        let blocks = slots * per + 7;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.shuffle(&mut rng);
        let mut dec = MegabyteDecoder::with_pool(&model, &be, &params, slots, bs, blocks);
        for s in 0..slots {
            dec.set_block_table(s, &order[s * per..(s + 1) * per]);
        }
        let b = trace(&mut dec, 2, &target, &follow, &others(), 3);
        assert_bit_equal(
            &format!("megabyte paged in shuffled blocks of {bs}"),
            &a,
            &b,
        );
    }
}

/// A MEGABYTE small enough for the CUDA backend on the emulator, whose kernels run thread by
/// thread.
fn small_megabyte_cfg() -> MegabyteConfig {
    MegabyteConfig {
        global_byte_dim: 16,
        global_dim: 64,
        global_layers: 1,
        global_heads: 2,
        local_dim: 32,
        local_layers: 1,
        local_heads: 2,
        ffn_mult: 2,
        max_seq_len: 32,
        ..megabyte_cfg()
    }
}

/// Runs the batch-of-5 trace on the CUDA backend over the emulator, whose hazard checker fails
/// any operation that touches bytes another stream's unordered work wrote (or writes bytes it
/// read); returns the target's logits alone and in the batch, and the stream statistics of the
/// batch run.
fn emulated_megabyte_traces(
    join_waits: bool,
    stream_overlap: bool,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, mega::emu::StreamStats) {
    use mega::backend::cuda::CudaBackend;
    use mega::emu::EmulatedDevice;
    let model = Megabyte::new(&small_megabyte_cfg());
    let be = CudaBackend::new(EmulatedDevice::new());
    let params = model.layout().upload(&be, &model.layout().init_host(3));
    let (target, follow) = (text(0, 11), text(5, 13));
    let mut alone = MegabyteDecoder::with_slots(&model, &be, &params, 1, 4);
    let a = trace(&mut alone, 0, &target, &follow, &[], usize::MAX);
    be.set_join_waits(join_waits);
    be.set_stream_overlap(stream_overlap);
    let before = be.device().stream_stats();
    let mut batch = MegabyteDecoder::with_slots(&model, &be, &params, 5, 4);
    let b = trace(&mut batch, 2, &target, &follow, &others(), usize::MAX);
    let after = be.device().stream_stats();
    let delta = mega::emu::StreamStats {
        ops: [after.ops[0] - before.ops[0], after.ops[1] - before.ops[1]],
        overlapped: after.overlapped - before.overlapped,
    };
    (a, b, delta)
}

/// Rows at a patch boundary take their global step on the side stream while the main stream
/// runs the other rows' local steps (design.md §5). The logits stay bit-identical to decoding
/// the sequence alone, the side stream carries work, main-stream work is issued unordered with
/// it (on a GPU it may run at the same time), and no operation races another.
#[test]
fn megabyte_global_steps_overlap_local_steps_without_stream_hazards() {
    let (alone, batch, streams) = emulated_megabyte_traces(true, true);
    eprintln!(
        "stream overlap: {} ops on main, {} on side, {} main ops issued unordered with side work",
        streams.ops[0], streams.ops[1], streams.overlapped
    );
    assert_bit_equal("emulated megabyte alone vs batch of 5", &alone, &batch);
    assert!(
        streams.ops[1] > 0,
        "no work on the side stream: {streams:?}"
    );
    assert!(
        streams.overlapped > 0,
        "no main-stream work overlapped the side stream: {streams:?}"
    );
}

/// The same run with the join's wait removed: the main stream then reads the side stream's
/// new conditioning rows, and reuses the buffers it freed, without waiting for it; the hazard
/// checker must report the first such access.
#[test]
fn a_missing_join_wait_is_reported_as_a_stream_hazard() {
    let result = std::panic::catch_unwind(|| emulated_megabyte_traces(false, true));
    let payload = result.expect_err("the planted missing wait went unnoticed");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        message.contains("stream hazard (")
            && message.contains("on the main stream")
            && message.contains("on the side stream"),
        "unexpected failure: {message}"
    );
}

/// `--stream-overlap off`: the same logits, with every operation on the main stream.
#[test]
fn without_stream_overlap_megabyte_decodes_in_order_on_one_stream() {
    let (alone, batch, streams) = emulated_megabyte_traces(true, false);
    assert_bit_equal("emulated megabyte, one stream", &alone, &batch);
    assert_eq!(streams.ops[1], 0, "{streams:?}");
    assert!(streams.ops[0] > 0 && streams.overlapped == 0, "{streams:?}");
}
