//! Tests of the training utilities: byte corpora, the learning-rate schedule, checkpoints and
//! the loss plot.

use std::fs;
use std::path::{Path, PathBuf};

use mega::train::checkpoint::{self, SaveOptions};
use mega::train::{
    write_loss_plot, ByteCorpus, Checkpoint, CheckpointError, DataError, HostTensor, LogPoint,
    LrSchedule, OptimizerState, TrainerState,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

// ---------------------------------------------------------------------------------------------
// Byte corpora

#[test]
fn corpus_single_file_reads_back_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random_bytes(5000, 1);
    let path = dir.path().join("data.bin");
    write(&path, &content);
    let corpus = ByteCorpus::open(&path).unwrap();
    assert_eq!(corpus.len(), 5000);
    assert_eq!(corpus.bytes(0..5000), content);
    assert_eq!(corpus.bytes(123..456), content[123..456]);
    assert_eq!(&*corpus.slice(4990..5000), &content[4990..]);
    assert!(corpus.bytes(7..7).is_empty());
}

#[test]
fn corpus_directory_concatenates_files_sorted_by_path_skipping_empty_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Written out of order on purpose; the sorted path order is a, b/c, b/d, z.
    write(&root.join("z.txt"), b"ZZZ");
    write(&root.join("b/d.txt"), b"dddd");
    write(&root.join("a.txt"), b"aa");
    write(&root.join("b/c.txt"), b"c");
    write(&root.join("b/empty.txt"), b"");
    let corpus = ByteCorpus::open(root).unwrap();
    assert_eq!(corpus.len(), 10);
    assert_eq!(corpus.bytes(0..10), b"aacddddZZZ");
    // Ranges crossing one and several file boundaries.
    assert_eq!(corpus.bytes(1..4), b"acd");
    assert_eq!(corpus.bytes(2..8), b"cddddZ");
    let files: Vec<(PathBuf, std::ops::Range<usize>)> =
        corpus.files().map(|(p, r)| (p.to_path_buf(), r)).collect();
    assert_eq!(
        files,
        vec![
            (root.join("a.txt"), 0..2),
            (root.join("b/c.txt"), 2..3),
            (root.join("b/d.txt"), 3..7),
            (root.join("z.txt"), 7..10),
        ]
    );
    let mut buf = [0u8; 4];
    corpus.copy_into(6, &mut buf);
    assert_eq!(&buf, b"dZZZ");
}

#[test]
fn corpus_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = ByteCorpus::open(&missing).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    let empty_dir = dir.path().join("empty");
    fs::create_dir(&empty_dir).unwrap();
    write(&empty_dir.join("zero.bin"), b"");
    let err = ByteCorpus::open(&empty_dir).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");

    let empty_file = dir.path().join("zero.bin");
    write(&empty_file, b"");
    assert!(matches!(
        ByteCorpus::open(&empty_file).unwrap_err(),
        DataError::Empty { .. }
    ));

    // A symlink loop cannot be read: an I/O error naming the path.
    let looped = dir.path().join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let err = ByteCorpus::open(&looped).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("loop"), "{err}");
}

#[test]
fn unigram_entropy_matches_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[u8], f64); 3] = [
        (b"aaaaaaa", 0.0),
        (b"abab", 1.0),
        // p = (1/2, 1/4, 1/4): 0.5*1 + 2*0.25*2 = 1.5 bits.
        (b"aabc", 1.5),
    ];
    for (i, (bytes, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.bin"));
        write(&path, bytes);
        let h = ByteCorpus::open(&path).unwrap().unigram_entropy_bits();
        assert!((h - expected).abs() < 1e-12, "{bytes:?}: {h} vs {expected}");
    }
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 4096).collect();
    let path = dir.path().join("uniform.bin");
    write(&path, &all);
    let h = ByteCorpus::open(&path).unwrap().unigram_entropy_bits();
    assert!((h - 8.0).abs() < 1e-9, "{h}");
}

fn corpus_of(dir: &Path, name: &str, bytes: &[u8]) -> ByteCorpus {
    let path = dir.join(name);
    write(&path, bytes);
    ByteCorpus::open(&path).unwrap()
}

#[test]
fn split_takes_the_last_fraction_as_validation() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..100u8).collect();
    let split = corpus_of(dir.path(), "c", &bytes)
        .split(None, 0.25)
        .unwrap();
    assert_eq!(split.train.len(), 75);
    assert_eq!(split.valid.len(), 25);
    assert_eq!(&*split.train.slice(0..75), &bytes[..75]);
    assert_eq!(&*split.valid.slice(0..25), &bytes[75..]);
}

#[test]
fn split_uses_an_explicit_validation_corpus_whole() {
    let dir = tempfile::tempdir().unwrap();
    let train = corpus_of(dir.path(), "t", b"training bytes");
    let valid = corpus_of(dir.path(), "v", b"held out");
    let split = train.split(Some(valid), 0.5).unwrap();
    assert_eq!(&*split.train.slice(0..14), b"training bytes");
    assert_eq!(&*split.valid.slice(0..8), b"held out");
}

#[test]
fn split_rejects_bad_fractions_and_tiny_corpora() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
        let err = corpus_of(dir.path(), "c", b"0123456789")
            .split(None, bad)
            .unwrap_err();
        assert!(
            matches!(err, DataError::InvalidFraction { .. }),
            "{bad}: {err}"
        );
    }
    let err = corpus_of(dir.path(), "one", b"x")
        .split(None, 0.05)
        .unwrap_err();
    assert!(matches!(err, DataError::TooSmallToSplit { .. }), "{err}");
    assert!(err.to_string().contains("one"), "{err}");
}

#[test]
fn check_window_reports_the_part_that_is_too_short() {
    let dir = tempfile::tempdir().unwrap();
    let split = corpus_of(dir.path(), "c", &[7u8; 100])
        .split(None, 0.1)
        .unwrap();
    assert!(split.check_window(10).is_ok());
    let err = split.check_window(11).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::PartTooShort {
                part: "validation",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("validation"), "{err}");
    let err = split.check_window(91).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::PartTooShort {
                part: "training",
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        split.check_window(0).unwrap_err(),
        DataError::ZeroSeqLen
    ));
}

#[test]
fn train_batches_are_windows_of_the_training_part_determined_by_seed_and_step() {
    let dir = tempfile::tempdir().unwrap();
    // Training bytes are < 200, validation bytes are >= 200: no window may contain the latter.
    let mut bytes: Vec<u8> = (0..4000).map(|i| (i % 200) as u8).collect();
    bytes.extend(std::iter::repeat_n(250u8, 1000));
    let path = dir.path().join("multi");
    // Spread over files so windows cross boundaries.
    for (i, chunk) in bytes.chunks(700).enumerate() {
        write(&path.join(format!("{i:02}")), chunk);
    }
    let split = ByteCorpus::open(&path).unwrap().split(None, 0.2).unwrap();
    assert_eq!(split.train.len(), 4000);
    let (batch, seq_len) = (8, 64);

    let a = split.train_batch(42, 7, batch, seq_len);
    assert_eq!(a.len(), batch * seq_len);
    assert_eq!(
        a,
        split.train_batch(42, 7, batch, seq_len),
        "same (seed, step)"
    );
    assert_ne!(a, split.train_batch(42, 8, batch, seq_len), "another step");
    assert_ne!(a, split.train_batch(43, 7, batch, seq_len), "another seed");

    for (row, window) in a.chunks(seq_len).enumerate() {
        let start = split.train_window_start(42, 7, row as u64, seq_len);
        assert!(start + seq_len <= 4000);
        assert_eq!(window, &bytes[start..start + seq_len], "row {row}");
        assert!(window.iter().all(|&b| b < 200));
    }

    // Ranks drawing their own rows reproduce the global batch.
    let mut joined = split.train_rows(42, 7, 0..3, seq_len);
    joined.extend(split.train_rows(42, 7, 3..8, seq_len));
    assert_eq!(joined, a);
}

#[test]
fn train_window_starts_cover_every_offset_about_uniformly() {
    let dir = tempfile::tempdir().unwrap();
    let split = corpus_of(dir.path(), "c", &[1u8; 20])
        .split(None, 0.5)
        .unwrap();
    // 10 training bytes, windows of 8: starts 0, 1, 2 only.
    let mut counts = [0usize; 3];
    for step in 0..3000 {
        counts[split.train_window_start(5, step, 0, 8)] += 1;
    }
    for c in counts {
        // Expected 1000 each; 4.5 standard deviations is about 116.
        assert!((880..=1120).contains(&c), "{counts:?}");
    }
}

#[test]
fn valid_windows_are_consecutive_and_capped_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; 1000];
    let valid: Vec<u8> = (0..105).map(|i| i as u8).collect();
    bytes.extend(&valid);
    let split = corpus_of(dir.path(), "c", &bytes)
        .split(Some(corpus_of(dir.path(), "v", &valid)), 0.05)
        .unwrap();
    let all = split.valid_windows(10, 100);
    assert_eq!(all.len(), 10, "105 bytes hold 10 whole windows");
    for (i, w) in all.iter().enumerate() {
        assert_eq!(w, &valid[i * 10..i * 10 + 10]);
    }
    // 10 available, 4 wanted: windows floor(i*10/4) = 0, 2, 5, 7.
    let capped = split.valid_windows(10, 4);
    let expected: Vec<Vec<u8>> = [0, 2, 5, 7]
        .iter()
        .map(|&k| valid[k * 10..k * 10 + 10].to_vec())
        .collect();
    assert_eq!(capped, expected);
    assert!(split.valid_windows(200, 4).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1e-12)
}

#[test]
fn lr_schedule_matches_hand_computed_values() {
    let s = LrSchedule {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        total_steps: 110,
    };
    let expected = [
        (0, 1e-4),  // 1/10 of the peak
        (4, 5e-4),  // 5/10
        (9, 1e-3),  // 10/10
        (10, 1e-3), // decay starts at the peak
        // progress 1/4: 1e-4 + 9e-4 * (1 + cos(pi/4)) / 2 = 1e-4 + 9e-4 * 0.8535534
        (35, 8.681981e-4),
        (60, 5.5e-4), // progress 1/2: midway
        // progress 3/4: 1e-4 + 9e-4 * 0.1464466
        (85, 2.318019e-4),
        (110, 1e-4),
        (5000, 1e-4),
    ];
    for (step, lr) in expected {
        assert!(
            close(s.lr_at(step), lr),
            "step {step}: {} vs {lr}",
            s.lr_at(step)
        );
    }
    // Non-increasing during decay.
    for step in 10..110 {
        assert!(s.lr_at(step + 1) <= s.lr_at(step));
    }
}

#[test]
fn lr_schedule_without_warmup_starts_at_the_peak() {
    let s = LrSchedule {
        max_lr: 2e-3,
        min_lr: 0.0,
        warmup_steps: 0,
        total_steps: 4,
    };
    // cos(pi * k / 4) for k = 0..3: 1, 0.7071068, 0, -0.7071068.
    let expected = [2e-3, 1.7071068e-3, 1e-3, 2.928932e-4, 0.0];
    for (step, lr) in expected.iter().enumerate() {
        let got = s.lr_at(step as u64);
        assert!((got - lr).abs() < 1e-9, "step {step}: {got} vs {lr}");
    }
}

#[test]
fn lr_schedule_validation() {
    let ok = LrSchedule {
        max_lr: 1e-3,
        min_lr: 1e-5,
        warmup_steps: 1,
        total_steps: 2,
    };
    assert!(ok.validate().is_ok());
    assert!(LrSchedule { min_lr: 1e-2, ..ok }.validate().is_err());
    assert!(LrSchedule {
        max_lr: f32::NAN,
        ..ok
    }
    .validate()
    .is_err());
    let err = LrSchedule { min_lr: -1.0, ..ok }.validate().unwrap_err();
    assert!(err.to_string().contains("min_lr"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

fn sample_checkpoint(seed: u64) -> Checkpoint {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensor = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        HostTensor::new(name, shape, data)
    };
    // Names in an order that is not sorted, to check the order is kept.
    let mut model = vec![
        tensor("z.embed", vec![16, 8]),
        tensor("a.bias", vec![8]),
        tensor("m.scalar", vec![]),
        tensor("layers.0.w", vec![4, 2, 3]),
    ];
    // Values that a lossy format would not keep bit-exactly.
    model[0].data[0] = -0.0;
    model[0].data[1] = f32::from_bits(1); // smallest subnormal
    model[0].data[2] = f32::from_bits(0x7fc0_1234); // NaN with a payload
    model[0].data[3] = f32::INFINITY;
    let moments = |model: &[HostTensor], scale: f32| -> Vec<HostTensor> {
        model
            .iter()
            .map(|t| {
                HostTensor::new(
                    t.name.clone(),
                    t.shape.clone(),
                    t.data.iter().map(|x| x * scale).collect(),
                )
            })
            .collect()
    };
    let optimizer = OptimizerState {
        m: moments(&model, 0.1),
        v: moments(&model, 0.01),
    };
    Checkpoint {
        config: serde_json::json!({"model": "megabyte", "patch": 4, "seed": seed}),
        optimizer: Some(optimizer),
        trainer: Some(TrainerState {
            step: 1000 + seed,
            seed,
            bytes_seen: 123_456_789_012,
            skipped_steps: 2,
            elapsed_s: 3601.123456789,
            history: vec![
                LogPoint {
                    step: 0,
                    train_loss: Some(5.545177),
                    valid_bpb: None,
                    lr: 1e-4,
                },
                LogPoint {
                    step: 100,
                    train_loss: Some(1.2345679),
                    valid_bpb: Some(1.7654321),
                    lr: 9.87654e-4,
                },
            ],
            extra: serde_json::json!({"rng": [1, 2, 3]}),
        }),
        model,
    }
}

fn assert_tensors_bit_equal(a: &[HostTensor], b: &[HostTensor]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape);
        let xb: Vec<u32> = x.data.iter().map(|v| v.to_bits()).collect();
        let yb: Vec<u32> = y.data.iter().map(|v| v.to_bits()).collect();
        assert_eq!(xb, yb, "tensor {}", x.name);
    }
}

fn assert_checkpoints_bit_equal(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.config, b.config);
    assert_tensors_bit_equal(&a.model, &b.model);
    match (&a.optimizer, &b.optimizer) {
        (Some(x), Some(y)) => {
            assert_tensors_bit_equal(&x.m, &y.m);
            assert_tensors_bit_equal(&x.v, &y.v);
        }
        (None, None) => {}
        _ => panic!("optimizer presence differs"),
    }
    assert_eq!(a.trainer, b.trainer);
}

/// Which of two checkpoints `loaded` is, compared by trainer step.
fn trainer_step(c: &Checkpoint) -> u64 {
    c.trainer.as_ref().unwrap().step
}

fn generation_file(dir: &Path, name: &str) -> PathBuf {
    checkpoint::current_generation_dir(dir).unwrap().join(name)
}

#[test]
fn checkpoint_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt_dir = dir.path().join("run/ckpt");
    let original = sample_checkpoint(1);
    checkpoint::save(&ckpt_dir, &original).unwrap();
    let loaded = checkpoint::load(&ckpt_dir).unwrap();
    assert_checkpoints_bit_equal(&original, &loaded);
    assert_eq!(checkpoint::load_config(&ckpt_dir).unwrap(), original.config);

    let model_only = checkpoint::load_model_only(&ckpt_dir).unwrap();
    assert!(model_only.optimizer.is_none());
    assert_tensors_bit_equal(&original.model, &model_only.model);
    assert_eq!(model_only.trainer, original.trainer);
}

#[test]
fn checkpoint_without_optional_parts_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = sample_checkpoint(2);
    original.optimizer = None;
    original.trainer = None;
    checkpoint::save(dir.path(), &original).unwrap();
    let gen = checkpoint::current_generation_dir(dir.path()).unwrap();
    assert!(!gen.join("optimizer.safetensors").exists());
    assert!(!gen.join("trainer.json").exists());
    assert_checkpoints_bit_equal(&original, &checkpoint::load(dir.path()).unwrap());
}

#[test]
fn checkpoint_manifest_records_true_sizes_and_checksums() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample_checkpoint(3)).unwrap();
    let gen = checkpoint::current_generation_dir(dir.path()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(gen.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "trainer.json"
        ]
    );
    for f in files {
        let bytes = fs::read(gen.join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["size"].as_u64().unwrap(), bytes.len() as u64);
        assert_eq!(
            f["crc32"].as_u64().unwrap(),
            u64::from(crc32fast::hash(&bytes))
        );
    }
    // No temp files are left behind.
    for entry in fs::read_dir(&gen)
        .unwrap()
        .chain(fs::read_dir(dir.path()).unwrap())
    {
        let name = entry.unwrap().file_name();
        assert!(!name.to_string_lossy().ends_with(".tmp"), "{name:?}");
    }
}

#[test]
fn truncated_model_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample_checkpoint(4)).unwrap();
    let model = generation_file(dir.path(), "model.safetensors");
    let bytes = fs::read(&model).unwrap();
    fs::write(&model, &bytes[..bytes.len() - 10]).unwrap();
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Truncated { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("truncated") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn flipped_byte_is_a_checksum_error_in_every_file() {
    for name in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
    ] {
        let dir = tempfile::tempdir().unwrap();
        checkpoint::save(dir.path(), &sample_checkpoint(5)).unwrap();
        let path = generation_file(dir.path(), name);
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = checkpoint::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Checksum { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("checksum") && msg.contains(name), "{msg}");
    }
}

#[test]
fn load_model_only_does_not_read_the_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample_checkpoint(6)).unwrap();
    fs::remove_file(generation_file(dir.path(), "optimizer.safetensors")).unwrap();
    assert!(checkpoint::load_model_only(dir.path()).is_ok());
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
}

#[test]
fn missing_or_empty_checkpoint_directory_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("never-saved");
    let err = checkpoint::load(&missing).unwrap_err();
    assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("never-saved"), "{err}");
    assert!(!checkpoint::exists(&missing));

    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
}

#[test]
fn a_generation_directory_loads_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let original = sample_checkpoint(7);
    checkpoint::save(&dir.path().join("a"), &original).unwrap();
    let gen = checkpoint::current_generation_dir(&dir.path().join("a")).unwrap();
    let copy = dir.path().join("copy");
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(&gen).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    assert_checkpoints_bit_equal(&original, &checkpoint::load(&copy).unwrap());
}

#[test]
fn a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint() {
    let old = sample_checkpoint(10);
    let new = sample_checkpoint(20);
    let mut committed_at = None;
    for crash_after in 1.. {
        let dir = tempfile::tempdir().unwrap();
        checkpoint::save(dir.path(), &old).unwrap();
        let options = SaveOptions {
            keep_previous: 0,
            crash_after_steps: Some(crash_after),
        };
        let result = checkpoint::save_with(dir.path(), &new, &options);
        let loaded = checkpoint::load(dir.path())
            .unwrap_or_else(|e| panic!("after a crash at step {crash_after} nothing loads: {e}"));
        if trainer_step(&loaded) == trainer_step(&new) {
            assert_checkpoints_bit_equal(&new, &loaded);
            committed_at.get_or_insert(crash_after);
        } else {
            assert_checkpoints_bit_equal(&old, &loaded);
            assert!(
                committed_at.is_none(),
                "went back to the old checkpoint at step {crash_after}"
            );
        }
        // The next save works and cleans up whatever the crash left.
        let third = sample_checkpoint(30);
        checkpoint::save(dir.path(), &third).unwrap();
        assert_checkpoints_bit_equal(&third, &checkpoint::load(dir.path()).unwrap());
        let mut entries: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(
            entries.len(),
            2,
            "leftovers after crash at {crash_after}: {entries:?}"
        );
        assert_eq!(entries[0], "LATEST");

        if result.is_ok() {
            break;
        }
        let err = result.unwrap_err();
        assert!(
            matches!(err, CheckpointError::SimulatedCrash { .. }),
            "{err}"
        );
        assert!(crash_after < 100, "the save never finishes");
    }
    let committed_at = committed_at.expect("the new checkpoint was never committed");
    assert!(
        committed_at > 10,
        "committed suspiciously early, at step {committed_at}"
    );
}

#[test]
fn stale_temp_files_and_a_half_written_generation_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let old = sample_checkpoint(11);
    checkpoint::save(dir.path(), &old).unwrap();
    // What a crash in the middle of a later save could leave behind.
    write(&dir.path().join("LATEST.tmp"), b"gen-000");
    let partial = dir.path().join("gen-000009");
    write(&partial.join("config.json"), b"{}");
    write(&partial.join("model.safetensors.tmp"), b"\x01\x02");
    assert_checkpoints_bit_equal(&old, &checkpoint::load(dir.path()).unwrap());

    let new = sample_checkpoint(12);
    checkpoint::save(dir.path(), &new).unwrap();
    assert_checkpoints_bit_equal(&new, &checkpoint::load(dir.path()).unwrap());
    assert!(!partial.exists());
    assert!(!dir.path().join("LATEST.tmp").exists());
}

#[test]
fn keep_previous_keeps_older_generations() {
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        keep_previous: 1,
        ..SaveOptions::default()
    };
    for seed in 1..=3 {
        checkpoint::save_with(dir.path(), &sample_checkpoint(seed), &options).unwrap();
    }
    let mut gens: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    assert_eq!(gens, ["gen-000002", "gen-000003"]);
    assert_eq!(trainer_step(&checkpoint::load(dir.path()).unwrap()), 1003);

    // A complete generation that was never committed (crash just before LATEST moved) is not
    // a "previous" checkpoint: the next save drops it and keeps the committed one.
    let uncommitted = dir.path().join("gen-000010");
    fs::create_dir(&uncommitted).unwrap();
    for entry in fs::read_dir(dir.path().join("gen-000003")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), uncommitted.join(entry.file_name())).unwrap();
    }
    checkpoint::save_with(dir.path(), &sample_checkpoint(4), &options).unwrap();
    let mut gens: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    assert_eq!(gens, ["gen-000003", "gen-000011"]);
    assert_eq!(trainer_step(&checkpoint::load(dir.path()).unwrap()), 1004);
}

#[test]
fn inconsistent_checkpoints_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("c");
    let mut bad_shape = sample_checkpoint(13);
    bad_shape.model[1].shape = vec![9];
    let err = checkpoint::save(&target, &bad_shape).unwrap_err();
    assert!(matches!(err, CheckpointError::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("a.bias"), "{err}");
    assert!(!target.exists());

    let mut bad_moments = sample_checkpoint(14);
    bad_moments.optimizer.as_mut().unwrap().v.pop();
    let err = checkpoint::save(&target, &bad_moments).unwrap_err();
    assert!(err.to_string().contains("optimizer v"), "{err}");

    let mut duplicate = sample_checkpoint(15);
    duplicate.model[1].name = "z.embed".into();
    duplicate.optimizer = None;
    assert!(checkpoint::save(&target, &duplicate).is_err());
}

/// Replaces a file of the current generation and fixes its manifest entry, so that only the
/// content checks (not the checksum) can catch the problem.
fn replace_with_valid_checksum(dir: &Path, name: &str, bytes: &[u8]) {
    let gen = checkpoint::current_generation_dir(dir).unwrap();
    fs::write(gen.join(name), bytes).unwrap();
    let manifest_path = gen.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    for f in manifest["files"].as_array_mut().unwrap() {
        if f["name"] == name {
            f["size"] = serde_json::json!(bytes.len());
            f["crc32"] = serde_json::json!(crc32fast::hash(bytes));
        }
    }
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

#[test]
fn tensors_are_checked_even_when_the_checksum_matches() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = sample_checkpoint(16);
    ckpt.optimizer = None;
    checkpoint::save(dir.path(), &ckpt).unwrap();

    // A tensor stored as F16 instead of F32.
    let data = vec![0u8; 8];
    let view = TensorView::new(Dtype::F16, vec![4], &data).unwrap();
    let meta =
        std::collections::HashMap::from([("mega.tensor_order".to_string(), "[\"w\"]".to_string())]);
    let bytes = safetensors::serialize([("w", view)], Some(meta)).unwrap();
    replace_with_valid_checksum(dir.path(), "model.safetensors", &bytes);
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::BadTensor { .. }), "{err}");
    assert!(err.to_string().contains("F16"), "{err}");

    // A file whose order list forgets a tensor.
    let data = vec![0u8; 16];
    let a = TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap();
    let b = TensorView::new(Dtype::F32, vec![4], &data).unwrap();
    let meta =
        std::collections::HashMap::from([("mega.tensor_order".to_string(), "[\"a\"]".to_string())]);
    let bytes = safetensors::serialize([("a", a), ("b", b)], Some(meta)).unwrap();
    replace_with_valid_checksum(dir.path(), "model.safetensors", &bytes);
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CheckpointError::BadTensorFile { .. }),
        "{err}"
    );

    // Garbage that is not a safetensors file at all.
    replace_with_valid_checksum(dir.path(), "model.safetensors", b"not a tensor file");
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CheckpointError::BadTensorFile { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn optimizer_moments_must_match_the_model_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = sample_checkpoint(17);
    checkpoint::save(dir.path(), &ckpt).unwrap();
    // Save a checkpoint whose model lacks a tensor, and graft the old optimizer file onto it.
    let optimizer = fs::read(generation_file(dir.path(), "optimizer.safetensors")).unwrap();
    ckpt.model.pop();
    let opt = ckpt.optimizer.as_mut().unwrap();
    opt.m.pop();
    opt.v.pop();
    checkpoint::save(dir.path(), &ckpt).unwrap();
    replace_with_valid_checksum(dir.path(), "optimizer.safetensors", &optimizer);
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::BadTensor { .. }), "{err}");
    assert!(checkpoint::load_model_only(dir.path()).is_ok());
}

#[test]
fn a_bad_pointer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample_checkpoint(18)).unwrap();
    fs::write(dir.path().join("LATEST"), "../elsewhere\n").unwrap();
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::BadPointer { .. }), "{err}");
    fs::write(dir.path().join("LATEST"), "gen-000077\n").unwrap();
    let err = checkpoint::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("gen-000077"), "{err}");
}

#[test]
fn non_finite_log_values_survive_a_save() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = sample_checkpoint(19);
    ckpt.trainer.as_mut().unwrap().history.push(LogPoint {
        step: 7,
        train_loss: Some(f32::NAN),
        valid_bpb: Some(f32::INFINITY),
        lr: f32::NAN,
    });
    checkpoint::save(dir.path(), &ckpt).unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    let last = *loaded.trainer.unwrap().history.last().unwrap();
    assert_eq!(last.step, 7);
    assert_eq!(last.train_loss, None);
    assert_eq!(last.valid_bpb, None);
    assert!(last.lr.is_nan());
}

// ---------------------------------------------------------------------------------------------
// Loss plot

#[test]
fn loss_plot_is_an_svg_with_curves_axes_and_legend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.svg");
    let history: Vec<LogPoint> = (0..50)
        .map(|i| LogPoint {
            step: i * 10,
            train_loss: Some(4.0 / (1.0 + i as f32 * 0.1)),
            valid_bpb: (i % 10 == 0).then_some(5.0 / (1.0 + i as f32 * 0.1)),
            lr: 1e-3,
        })
        .collect();
    write_loss_plot(&path, &history, "enwik8 megabyte").unwrap();
    let svg = fs::read_to_string(&path).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..80]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("<polyline") || svg.contains("<path"));
    for label in [
        "enwik8 megabyte",
        "step",
        "bits per byte",
        "train loss (bits/byte)",
        "validation bpb",
    ] {
        assert!(svg.contains(label), "missing {label:?}");
    }
}

#[test]
fn loss_plot_of_an_empty_history_says_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.svg");
    write_loss_plot(&path, &[], "nothing yet").unwrap();
    let svg = fs::read_to_string(&path).unwrap();
    assert!(svg.contains("<svg") && svg.contains("no data"));

    // Only non-finite values: nothing plottable either.
    let history = [LogPoint {
        step: 3,
        train_loss: Some(f32::NAN),
        valid_bpb: None,
        lr: 0.0,
    }];
    write_loss_plot(&path, &history, "nan").unwrap();
    assert!(fs::read_to_string(&path).unwrap().contains("no data"));
}

#[test]
fn loss_plot_into_a_missing_directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/loss.svg");
    let history = [LogPoint {
        step: 0,
        train_loss: Some(1.0),
        valid_bpb: None,
        lr: 0.0,
    }];
    let err = write_loss_plot(&path, &history, "x").unwrap_err();
    assert!(err.to_string().contains("loss.svg"), "{err}");
}
