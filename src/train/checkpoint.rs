//! Crash-safe, verified checkpoints: model weights, optimizer moments and trainer state.
//!
//! # Layout
//!
//! ```text
//! DIR/
//!   LATEST                     one line: the name of the current generation, e.g. "gen-000007"
//!   gen-000007/
//!     config.json              the model/training configuration (free-form JSON)
//!     model.safetensors        f32 weights, tensor order kept in the header metadata
//!     optimizer.safetensors    AdamW moments "m.<name>" and "v.<name>" (when saved)
//!     trainer.json             step, seed, counters, loss history (when saved)
//!     manifest.json            every file above with its size and CRC32; written last
//! ```
//!
//! # Why a crash cannot lose the checkpoint
//!
//! A save never modifies a file that the current `LATEST` refers to. It writes a complete new
//! generation directory (each file to `NAME.tmp`, fsync, rename; the manifest last; then the
//! directory itself is fsynced), and only then replaces `LATEST` atomically (`LATEST.tmp`, fsync,
//! rename, fsync of `DIR`). The rename of `LATEST` is the single commit point:
//!
//! - a crash before it leaves `LATEST` naming the previous generation, which is untouched;
//!   the half-written new generation is ignored and removed by the next save;
//! - a crash after it finds the new generation complete and durable.
//!
//! Older generations are deleted only after the commit ([`SaveOptions::keep_previous`] of them
//! are kept). While a save runs, the disk holds two generations.
//!
//! [`load`] reads `LATEST`, or, when there is none, a manifest directly in `DIR` (so a generation
//! directory copied elsewhere loads too). It checks that every file in the manifest exists and
//! has the recorded size and CRC32, that tensors are f32 with data matching their shapes, and
//! that optimizer moments match the model tensors one for one. A failure is a one-line
//! [`CheckpointError`] naming the file.
//!
//! One writer per directory at a time; concurrent saves into one directory are not supported.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Deserializer, Serialize};

/// Name of the pointer file naming the current generation.
pub const POINTER_FILE: &str = "LATEST";
/// Name of the manifest in each generation directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the model weights file.
pub const MODEL_FILE: &str = "model.safetensors";
/// Name of the optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Name of the trainer state file.
pub const TRAINER_FILE: &str = "trainer.json";

const GENERATION_PREFIX: &str = "gen-";
const TEMP_SUFFIX: &str = ".tmp";
const MANIFEST_FORMAT: &str = "mega-checkpoint";
const MANIFEST_VERSION: u32 = 1;
/// Safetensors header metadata key holding the tensor order as a JSON array of names.
const ORDER_KEY: &str = "mega.tensor_order";
const M_PREFIX: &str = "m.";
const V_PREFIX: &str = "v.";

/// Errors from saving or loading a checkpoint. Each message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint directory does not exist.
    #[error("checkpoint directory {path} does not exist")]
    NotFound {
        /// The directory.
        path: PathBuf,
    },
    /// The directory exists but holds neither a `LATEST` pointer nor a manifest.
    #[error("no checkpoint in {path}: neither LATEST nor manifest.json is present")]
    NoCheckpoint {
        /// The directory.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("checkpoint I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The `LATEST` pointer does not name a generation directory.
    #[error("checkpoint pointer {path} is invalid: {reason}")]
    BadPointer {
        /// The pointer file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The manifest is readable JSON but not a valid manifest.
    #[error("checkpoint manifest {path} is invalid: {reason}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file listed in the manifest is absent.
    #[error("checkpoint file {path} is missing (it is listed in the manifest)")]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A file is shorter than the manifest records.
    #[error(
        "checkpoint file {path} is truncated: {actual} bytes, the manifest records {expected}"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        actual: u64,
        /// The size in the manifest.
        expected: u64,
    },
    /// A file is longer than the manifest records.
    #[error("checkpoint file {path} has {actual} bytes, the manifest records {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        actual: u64,
        /// The size in the manifest.
        expected: u64,
    },
    /// A file's CRC32 differs from the manifest: its contents are corrupt.
    #[error("checkpoint file {path} is corrupt: CRC32 checksum {actual:08x} does not match the manifest's {expected:08x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum of the bytes on disk.
        actual: u32,
        /// The checksum in the manifest.
        expected: u32,
    },
    /// A JSON file does not parse.
    #[error("cannot parse checkpoint file {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A safetensors file is malformed.
    #[error("invalid tensor file {path}: {reason}")]
    BadTensorFile {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A tensor is malformed, missing or inconsistent with the model.
    #[error("tensor {tensor} in {path}: {reason}")]
    BadTensor {
        /// The file holding (or that should hold) the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint handed to [`save`] is inconsistent; nothing was written.
    #[error("refusing to save checkpoint to {path}: {reason}")]
    InvalidInput {
        /// The target directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A crash injected by [`SaveOptions::crash_after_steps`] (tests only).
    #[error("simulated crash after {steps} file-system steps while saving to {path}")]
    SimulatedCrash {
        /// The target directory.
        path: PathBuf,
        /// Steps completed before the simulated crash.
        steps: usize,
    },
}

/// A named f32 tensor in host memory, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Parameter name, e.g. `global.layers.0.attn.wq`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor; panics if `data` does not have `shape`'s element count (a caller bug).
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        let name = name.into();
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor {name}: data length does not match shape {shape:?}"
        );
        Self { name, shape, data }
    }

    /// Number of elements the shape declares (None on overflow).
    pub fn declared_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

/// AdamW moments: one `m` and one `v` tensor per model tensor, same names, shapes and order.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// First moments.
    pub m: Vec<HostTensor>,
    /// Second moments.
    pub v: Vec<HostTensor>,
}

/// One entry of the loss history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogPoint {
    /// 0-based optimizer step.
    pub step: u64,
    /// Mean training loss in nats per byte, when measured at this step. A non-finite value is
    /// stored as null and reads back as `None`.
    pub train_loss: Option<f32>,
    /// Validation bits per byte, when measured at this step (non-finite: as `train_loss`).
    pub valid_bpb: Option<f32>,
    /// Learning rate used at this step (a non-finite value reads back as NaN).
    #[serde(deserialize_with = "null_as_nan")]
    pub lr: f32,
}

/// Everything the training loop needs to resume where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run's data/initialization seed.
    pub seed: u64,
    /// Training bytes consumed so far.
    pub bytes_seen: u64,
    /// Steps skipped because of a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Wall-clock training time so far, in seconds.
    pub elapsed_s: f64,
    /// Loss history.
    #[serde(default)]
    pub history: Vec<LogPoint>,
    /// Anything else the trainer wants back on resume.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A complete checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Model and training configuration (free-form JSON, written as `config.json`).
    pub config: serde_json::Value,
    /// Model parameters, in the model's order.
    pub model: Vec<HostTensor>,
    /// Optimizer moments (absent in inference-only checkpoints).
    pub optimizer: Option<OptimizerState>,
    /// Trainer state (absent in inference-only checkpoints).
    pub trainer: Option<TrainerState>,
}

/// Options for [`save_with`].
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// How many generations older than the new one to keep on disk (0: only the new one).
    pub keep_previous: usize,
    /// Tests only: stop the save, as if the process died, after this many file-system steps.
    #[doc(hidden)]
    pub crash_after_steps: Option<usize>,
}

/// One file of a generation, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestEntry {
    name: String,
    size: u64,
    crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    files: Vec<ManifestEntry>,
}

/// Saves `ckpt` under `dir` (created if needed), keeping no older generation.
/// See the module documentation for the crash-safety scheme.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
    save_with(dir, ckpt, &SaveOptions::default())
}

/// Saves `ckpt` under `dir` with explicit options.
pub fn save_with(
    dir: &Path,
    ckpt: &Checkpoint,
    options: &SaveOptions,
) -> Result<(), CheckpointError> {
    validate_for_save(dir, ckpt)?;
    let mut steps = CrashPoint {
        dir,
        done: 0,
        crash_after: options.crash_after_steps,
    };

    fs::create_dir_all(dir).map_err(io_error(dir))?;
    steps.tick()?;
    let previous = committed_generation(dir);
    let generations = list_generations(dir)?;
    let next = generations.iter().map(|(n, _)| n + 1).max().unwrap_or(1);
    let gen_name = format!("{GENERATION_PREFIX}{next:06}");
    let gen_dir = dir.join(&gen_name);
    fs::create_dir(&gen_dir).map_err(io_error(&gen_dir))?;
    steps.tick()?;

    let mut entries = Vec::new();
    let config = serde_json::to_vec_pretty(&ckpt.config)
        .map_err(|source| json_error(dir.join(CONFIG_FILE), source))?;
    entries.push(write_bytes_file(
        &gen_dir,
        CONFIG_FILE,
        &config,
        &mut steps,
    )?);
    entries.push(write_tensor_file(
        &gen_dir,
        MODEL_FILE,
        &[("", &ckpt.model)],
        &mut steps,
    )?);
    if let Some(opt) = &ckpt.optimizer {
        entries.push(write_tensor_file(
            &gen_dir,
            OPTIMIZER_FILE,
            &[(M_PREFIX, &opt.m), (V_PREFIX, &opt.v)],
            &mut steps,
        )?);
    }
    if let Some(trainer) = &ckpt.trainer {
        let bytes = serde_json::to_vec_pretty(trainer)
            .map_err(|source| json_error(gen_dir.join(TRAINER_FILE), source))?;
        entries.push(write_bytes_file(
            &gen_dir,
            TRAINER_FILE,
            &bytes,
            &mut steps,
        )?);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        version: MANIFEST_VERSION,
        files: entries,
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|source| json_error(gen_dir.join(MANIFEST_FILE), source))?;
    write_bytes_file(&gen_dir, MANIFEST_FILE, &manifest_bytes, &mut steps)?;
    sync_dir(&gen_dir)?;
    sync_dir(dir)?;

    // The commit point: after this rename the new generation is the checkpoint.
    write_bytes_file(
        dir,
        POINTER_FILE,
        format!("{gen_name}\n").as_bytes(),
        &mut steps,
    )?;
    sync_dir(dir)?;

    remove_old_generations(dir, next, previous, options.keep_previous, &mut steps)
}

/// Loads and verifies the whole checkpoint in `dir`.
pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    load_impl(dir, true)
}

/// Loads and verifies everything except the optimizer state, which is neither read nor checked
/// (for inference and evaluation). `optimizer` is `None` in the result.
pub fn load_model_only(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    load_impl(dir, false)
}

/// Loads and verifies only `config.json` (e.g. to build the model before loading weights).
pub fn load_config(dir: &Path) -> Result<serde_json::Value, CheckpointError> {
    let (gen_dir, manifest) = open_manifest(dir)?;
    let entry = manifest_entry(&gen_dir, &manifest, CONFIG_FILE)?;
    let bytes = read_verified(&gen_dir, entry)?;
    parse_json(&gen_dir.join(CONFIG_FILE), &bytes)
}

/// True when `dir` holds a checkpoint pointer or manifest (nothing is verified).
pub fn exists(dir: &Path) -> bool {
    dir.join(POINTER_FILE).is_file() || dir.join(MANIFEST_FILE).is_file()
}

/// The directory holding the current generation's files (for diagnostics such as `mega info`).
pub fn current_generation_dir(dir: &Path) -> Result<PathBuf, CheckpointError> {
    resolve_generation(dir)
}

fn load_impl(dir: &Path, with_optimizer: bool) -> Result<Checkpoint, CheckpointError> {
    let (gen_dir, manifest) = open_manifest(dir)?;

    let config_bytes = read_verified(&gen_dir, manifest_entry(&gen_dir, &manifest, CONFIG_FILE)?)?;
    let config = parse_json(&gen_dir.join(CONFIG_FILE), &config_bytes)?;

    let model_path = gen_dir.join(MODEL_FILE);
    let model_map = map_verified(&gen_dir, manifest_entry(&gen_dir, &manifest, MODEL_FILE)?)?;
    let mut model_groups = read_tensor_file(&model_path, &model_map, &[""])?;
    let model = model_groups.pop().unwrap_or_default();

    let optimizer = match find_entry(&manifest, OPTIMIZER_FILE) {
        Some(entry) if with_optimizer => {
            let path = gen_dir.join(OPTIMIZER_FILE);
            let map = map_verified(&gen_dir, entry)?;
            let mut groups = read_tensor_file(&path, &map, &[M_PREFIX, V_PREFIX])?;
            let v = groups.pop().unwrap_or_default();
            let m = groups.pop().unwrap_or_default();
            check_moments_match_model(&path, &model, &m, "m")?;
            check_moments_match_model(&path, &model, &v, "v")?;
            Some(OptimizerState { m, v })
        }
        _ => None,
    };

    let trainer = match find_entry(&manifest, TRAINER_FILE) {
        Some(entry) => {
            let bytes = read_verified(&gen_dir, entry)?;
            Some(parse_json(&gen_dir.join(TRAINER_FILE), &bytes)?)
        }
        None => None,
    };

    Ok(Checkpoint {
        config,
        model,
        optimizer,
        trainer,
    })
}

/// Counts file-system steps of a save so tests can stop it at any point.
struct CrashPoint<'a> {
    dir: &'a Path,
    done: usize,
    crash_after: Option<usize>,
}

impl CrashPoint<'_> {
    fn tick(&mut self) -> Result<(), CheckpointError> {
        self.done += 1;
        if self.crash_after == Some(self.done) {
            return Err(CheckpointError::SimulatedCrash {
                path: self.dir.to_path_buf(),
                steps: self.done,
            });
        }
        Ok(())
    }
}

fn validate_for_save(dir: &Path, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
    let invalid = |reason: String| CheckpointError::InvalidInput {
        path: dir.to_path_buf(),
        reason,
    };
    let check_group = |what: &str, tensors: &[HostTensor]| -> Result<(), CheckpointError> {
        let mut names = HashSet::new();
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("{what} tensor {} appears twice", t.name)));
            }
            if t.declared_len() != Some(t.data.len()) {
                return Err(invalid(format!(
                    "{what} tensor {} has {} values but shape {:?}",
                    t.name,
                    t.data.len(),
                    t.shape
                )));
            }
        }
        Ok(())
    };
    check_group("model", &ckpt.model)?;
    if let Some(opt) = &ckpt.optimizer {
        check_group("optimizer m", &opt.m)?;
        check_group("optimizer v", &opt.v)?;
        for (what, moments) in [("m", &opt.m), ("v", &opt.v)] {
            if let Some(reason) = moments_mismatch(&ckpt.model, moments) {
                return Err(invalid(format!("optimizer {what}: {reason}")));
            }
        }
    }
    Ok(())
}

/// Why `moments` does not pair one-for-one with `model`, if it does not.
fn moments_mismatch(model: &[HostTensor], moments: &[HostTensor]) -> Option<String> {
    if model.len() != moments.len() {
        return Some(format!(
            "{} tensors for {} model tensors",
            moments.len(),
            model.len()
        ));
    }
    model.iter().zip(moments).find_map(|(p, m)| {
        (p.name != m.name || p.shape != m.shape).then(|| {
            format!(
                "tensor {} {:?} does not match model tensor {} {:?}",
                m.name, m.shape, p.name, p.shape
            )
        })
    })
}

fn check_moments_match_model(
    path: &Path,
    model: &[HostTensor],
    moments: &[HostTensor],
    which: &str,
) -> Result<(), CheckpointError> {
    match moments_mismatch(model, moments) {
        None => Ok(()),
        Some(reason) => Err(CheckpointError::BadTensor {
            path: path.to_path_buf(),
            tensor: which.to_string(),
            reason,
        }),
    }
}

/// Writes `NAME.tmp`, fsyncs it, renames it to `NAME`; returns its manifest entry.
fn write_bytes_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    steps: &mut CrashPoint,
) -> Result<ManifestEntry, CheckpointError> {
    let tmp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    drop(file);
    steps.tick()?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_error(&path))?;
    steps.tick()?;
    Ok(ManifestEntry {
        name: name.to_string(),
        size: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    })
}

/// An f32 tensor viewed for safetensors serialization.
struct F32View<'a>(&'a HostTensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes groups of tensors (each group's names prefixed) to one safetensors file, recording
/// each group's order in the header metadata; same temp/fsync/rename protocol as JSON files.
fn write_tensor_file(
    dir: &Path,
    name: &str,
    groups: &[(&str, &Vec<HostTensor>)],
    steps: &mut CrashPoint,
) -> Result<ManifestEntry, CheckpointError> {
    let tmp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut views = Vec::new();
    let mut metadata = HashMap::new();
    for (prefix, tensors) in groups {
        let order: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let order_json =
            serde_json::to_string(&order).map_err(|source| json_error(tmp.clone(), source))?;
        metadata.insert(order_key(prefix), order_json);
        views.extend(
            tensors
                .iter()
                .map(|t| (format!("{prefix}{}", t.name), F32View(t))),
        );
    }
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        CheckpointError::BadTensorFile {
            path: tmp.clone(),
            reason: e.to_string(),
        }
    })?;
    // Checksum what actually reached the file, then make it durable.
    let file = File::open(&tmp).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    let size = file.metadata().map_err(io_error(&tmp))?.len();
    // SAFETY: the temp file was just written by this process and nothing else writes it.
    let map = unsafe { Mmap::map(&file) }.map_err(io_error(&tmp))?;
    let crc32 = crc32fast::hash(&map);
    drop(map);
    steps.tick()?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_error(&path))?;
    steps.tick()?;
    Ok(ManifestEntry {
        name: name.to_string(),
        size,
        crc32,
    })
}

fn order_key(prefix: &str) -> String {
    if prefix.is_empty() {
        ORDER_KEY.to_string()
    } else {
        format!("{ORDER_KEY}.{}", prefix.trim_end_matches('.'))
    }
}

/// Reads a safetensors file into one tensor list per prefix, in the recorded order.
fn read_tensor_file(
    path: &Path,
    bytes: &[u8],
    prefixes: &[&str],
) -> Result<Vec<Vec<HostTensor>>, CheckpointError> {
    let bad_file = |reason: String| CheckpointError::BadTensorFile {
        path: path.to_path_buf(),
        reason,
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad_file(e.to_string()))?;
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad_file(e.to_string()))?;
    let header = metadata.metadata().clone().unwrap_or_default();
    let mut claimed = 0usize;
    let mut groups = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        let key = order_key(prefix);
        let order: Vec<String> = match header.get(&key) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| bad_file(format!("header entry {key} is not a list of names: {e}")))?,
            None => {
                return Err(bad_file(format!(
                    "header entry {key} (tensor order) is missing"
                )))
            }
        };
        let mut group = Vec::with_capacity(order.len());
        for name in order {
            let full = format!("{prefix}{name}");
            let view = tensors
                .tensor(&full)
                .map_err(|_| CheckpointError::BadTensor {
                    path: path.to_path_buf(),
                    tensor: full.clone(),
                    reason: "listed in the header order but absent".to_string(),
                })?;
            group.push(tensor_from_view(path, &name, &full, &view)?);
        }
        claimed += group.len();
        groups.push(group);
    }
    if claimed != tensors.len() {
        return Err(bad_file(format!(
            "holds {} tensors but its header order lists {claimed}",
            tensors.len()
        )));
    }
    Ok(groups)
}

fn tensor_from_view(
    path: &Path,
    name: &str,
    full_name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<HostTensor, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadTensor {
        path: path.to_path_buf(),
        tensor: full_name.to_string(),
        reason,
    };
    if view.dtype() != Dtype::F32 {
        return Err(bad(format!("dtype {:?}, expected F32", view.dtype())));
    }
    let shape = view.shape().to_vec();
    let declared = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let bytes = view.data();
    if bytes.len() != declared * 4 {
        return Err(bad(format!(
            "{} data bytes for shape {shape:?} ({} expected)",
            bytes.len(),
            declared * 4
        )));
    }
    let data = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(HostTensor {
        name: name.to_string(),
        shape,
        data,
    })
}

/// Finds the generation directory: the one `LATEST` names, else `dir` itself if it holds a
/// manifest.
fn resolve_generation(dir: &Path) -> Result<PathBuf, CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::NotFound {
            path: dir.to_path_buf(),
        });
    }
    let pointer = dir.join(POINTER_FILE);
    match fs::read_to_string(&pointer) {
        Ok(text) => {
            let name = text.trim();
            if parse_generation(name).is_none() {
                return Err(CheckpointError::BadPointer {
                    path: pointer,
                    reason: format!("{name:?} is not a generation name like gen-000001"),
                });
            }
            let gen_dir = dir.join(name);
            if !gen_dir.is_dir() {
                return Err(CheckpointError::BadPointer {
                    path: pointer,
                    reason: format!("it names {name}, which does not exist"),
                });
            }
            Ok(gen_dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.join(MANIFEST_FILE).is_file() {
                Ok(dir.to_path_buf())
            } else {
                Err(CheckpointError::NoCheckpoint {
                    path: dir.to_path_buf(),
                })
            }
        }
        Err(source) => Err(CheckpointError::Io {
            path: pointer,
            source,
        }),
    }
}

fn open_manifest(dir: &Path) -> Result<(PathBuf, Manifest), CheckpointError> {
    let gen_dir = resolve_generation(dir)?;
    let path = gen_dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(open_error(&path))?;
    let manifest: Manifest = parse_json(&path, &bytes)?;
    let bad = |reason: String| CheckpointError::BadManifest {
        path: path.clone(),
        reason,
    };
    if manifest.format != MANIFEST_FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {MANIFEST_FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.version != MANIFEST_VERSION {
        return Err(bad(format!(
            "version {}, this build reads version {MANIFEST_VERSION}",
            manifest.version
        )));
    }
    let known = [CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE];
    let mut seen = HashSet::new();
    for entry in &manifest.files {
        if !known.contains(&entry.name.as_str()) {
            return Err(bad(format!("unknown file name {:?}", entry.name)));
        }
        if !seen.insert(entry.name.as_str()) {
            return Err(bad(format!("{} is listed twice", entry.name)));
        }
    }
    for required in [CONFIG_FILE, MODEL_FILE] {
        if !seen.contains(required) {
            return Err(bad(format!("it does not list {required}")));
        }
    }
    Ok((gen_dir, manifest))
}

fn find_entry<'m>(manifest: &'m Manifest, name: &str) -> Option<&'m ManifestEntry> {
    manifest.files.iter().find(|e| e.name == name)
}

fn manifest_entry<'m>(
    gen_dir: &Path,
    manifest: &'m Manifest,
    name: &str,
) -> Result<&'m ManifestEntry, CheckpointError> {
    find_entry(manifest, name).ok_or_else(|| CheckpointError::BadManifest {
        path: gen_dir.join(MANIFEST_FILE),
        reason: format!("it does not list {name}"),
    })
}

/// Opens a manifest-listed file and checks its size against the manifest.
fn open_sized(gen_dir: &Path, entry: &ManifestEntry) -> Result<(PathBuf, File), CheckpointError> {
    let path = gen_dir.join(&entry.name);
    let file = File::open(&path).map_err(open_error(&path))?;
    let actual = file.metadata().map_err(io_error(&path))?.len();
    if actual < entry.size {
        return Err(CheckpointError::Truncated {
            path,
            actual,
            expected: entry.size,
        });
    }
    if actual > entry.size {
        return Err(CheckpointError::SizeMismatch {
            path,
            actual,
            expected: entry.size,
        });
    }
    Ok((path, file))
}

fn check_crc(path: &Path, bytes: &[u8], entry: &ManifestEntry) -> Result<(), CheckpointError> {
    let actual = crc32fast::hash(bytes);
    if actual != entry.crc32 {
        return Err(CheckpointError::Checksum {
            path: path.to_path_buf(),
            actual,
            expected: entry.crc32,
        });
    }
    Ok(())
}

/// Reads a small file whole and verifies its size and checksum.
fn read_verified(gen_dir: &Path, entry: &ManifestEntry) -> Result<Vec<u8>, CheckpointError> {
    let (path, mut file) = open_sized(gen_dir, entry)?;
    let mut bytes = Vec::with_capacity(entry.size as usize);
    io::Read::read_to_end(&mut file, &mut bytes).map_err(io_error(&path))?;
    check_crc(&path, &bytes, entry)?;
    Ok(bytes)
}

/// Maps a large file and verifies its size and checksum.
fn map_verified(gen_dir: &Path, entry: &ManifestEntry) -> Result<Mmap, CheckpointError> {
    let (path, file) = open_sized(gen_dir, entry)?;
    if entry.size == 0 {
        // A zero-length file cannot hold a safetensors header; let the parser say so.
        return Err(CheckpointError::BadTensorFile {
            path,
            reason: "the file is empty".to_string(),
        });
    }
    // SAFETY: checkpoint files are not modified after their generation is committed.
    let map = unsafe { Mmap::map(&file) }.map_err(io_error(&path))?;
    check_crc(&path, &map, entry)?;
    Ok(map)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
) -> Result<T, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|source| json_error(path.to_path_buf(), source))
}

fn json_error(path: PathBuf, source: serde_json::Error) -> CheckpointError {
    CheckpointError::Json { path, source }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Like [`io_error`] for opening a file the manifest lists: a missing file is
/// [`CheckpointError::MissingFile`].
fn open_error(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            io_error(path)(source)
        }
    }
}

/// Makes renames and creations inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn parse_generation(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GENERATION_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Generation directories in `dir`, complete or not, sorted by number.
fn list_generations(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_generation) {
            if entry.path().is_dir() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The generation `LATEST` names, if it names one.
fn committed_generation(dir: &Path) -> Option<u64> {
    parse_generation(fs::read_to_string(dir.join(POINTER_FILE)).ok()?.trim())
}

/// After a commit: removes every generation except `current` and the newest `keep_previous`
/// complete ones at or below `previous` (the generation committed before this save), plus any
/// stale pointer temp file. Generations never committed (left by a crashed save) always go.
fn remove_old_generations(
    dir: &Path,
    current: u64,
    previous: Option<u64>,
    keep_previous: usize,
    steps: &mut CrashPoint,
) -> Result<(), CheckpointError> {
    let mut kept = 0;
    for (n, path) in list_generations(dir)?.into_iter().rev() {
        if n == current {
            continue;
        }
        let complete = previous.is_some_and(|p| n <= p) && path.join(MANIFEST_FILE).is_file();
        if complete && kept < keep_previous {
            kept += 1;
            continue;
        }
        fs::remove_dir_all(&path).map_err(io_error(&path))?;
        steps.tick()?;
    }
    let stale_pointer = dir.join(format!("{POINTER_FILE}{TEMP_SUFFIX}"));
    if stale_pointer.exists() {
        fs::remove_file(&stale_pointer).map_err(io_error(&stale_pointer))?;
        steps.tick()?;
    }
    Ok(())
}

fn null_as_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(deserializer)?.unwrap_or(f32::NAN))
}
