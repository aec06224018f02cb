//! Byte corpora for training and evaluation: raw files, memory-mapped, sampled as random windows.
//!
//! A [`ByteCorpus`] is one file, or every regular file under a directory (recursively, sorted by
//! path, concatenated in that order). [`ByteCorpus::split`] turns it into a [`DataSplit`] with a
//! training part and a validation part. Training batches are a pure function of
//! `(seed, step, row)`, so a resumed run sees exactly the batches the uninterrupted run would have,
//! and a data-parallel rank can draw only its own rows of the global batch
//! ([`DataSplit::train_rows`]) and still match a single-process run.

use std::borrow::Cow;
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Errors from opening, splitting or sizing byte corpora. Every message names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The corpus path does not exist.
    #[error("data path {path} does not exist")]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A file or directory could not be read or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The path is neither a regular file nor a directory (a socket, a device, ...).
    #[error("data path {path} is neither a regular file nor a directory")]
    NotAFileOrDirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// The corpus has no bytes at all.
    #[error("corpus {path} contains no data (no non-empty regular files)")]
    Empty {
        /// The corpus path.
        path: PathBuf,
    },
    /// `valid_fraction` outside (0, 1) while no explicit validation corpus was given.
    #[error("valid_fraction must be a number in (0, 1), got {value}")]
    InvalidFraction {
        /// The rejected value.
        value: f64,
    },
    /// Splitting off a validation fraction left one of the two parts empty.
    #[error(
        "corpus {path} ({len} bytes) is too small to split off a validation fraction of {fraction}"
    )]
    TooSmallToSplit {
        /// The corpus path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The requested validation fraction.
        fraction: f64,
    },
    /// A window length of zero bytes.
    #[error("sequence length must be at least 1 byte")]
    ZeroSeqLen,
    /// A part of the split holds fewer bytes than one window.
    #[error("{part} data from {path} has {len} bytes, fewer than one window of {seq_len} bytes")]
    PartTooShort {
        /// "training" or "validation".
        part: &'static str,
        /// The corpus the part comes from.
        path: PathBuf,
        /// Bytes in the part.
        len: usize,
        /// The window length that does not fit.
        seq_len: usize,
    },
}

/// One memory-mapped file and where it starts in the concatenated corpus.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    start: usize,
    map: Mmap,
}

/// A read-only byte corpus: one file or all regular files under a directory, concatenated.
#[derive(Debug)]
pub struct ByteCorpus {
    root: PathBuf,
    files: Vec<MappedFile>,
    len: usize,
}

impl ByteCorpus {
    /// Opens and memory-maps a file, or every regular file under a directory (recursively,
    /// sorted by path; empty files skipped). Symbolic links to files are followed; symbolic links
    /// to directories are not descended into (they could form cycles).
    ///
    /// The files must not be modified while the corpus is open: they are memory-mapped.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let meta = fs::metadata(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                DataError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                DataError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let mut paths = Vec::new();
        if meta.is_file() {
            paths.push(path.to_path_buf());
        } else if meta.is_dir() {
            collect_files(path, &mut paths)?;
            paths.sort();
        } else {
            return Err(DataError::NotAFileOrDirectory {
                path: path.to_path_buf(),
            });
        }

        let mut files = Vec::with_capacity(paths.len());
        let mut len = 0usize;
        for file_path in paths {
            let io_err = |source| DataError::Io {
                path: file_path.clone(),
                source,
            };
            let file = File::open(&file_path).map_err(io_err)?;
            let size = file.metadata().map_err(io_err)?.len();
            if size == 0 {
                continue;
            }
            // SAFETY: the mapping is read-only; the documented contract is that corpus files are
            // not modified while open (the usual caveat of every memory-mapped reader).
            let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
            files.push(MappedFile {
                path: file_path,
                start: len,
                map,
            });
            len += size as usize;
        }
        if len == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            root: path.to_path_buf(),
            files,
            len,
        })
    }

    /// The path the corpus was opened from.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Total bytes over all files.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: opening an empty corpus is an error. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The non-empty files of the corpus in concatenation order, with their byte ranges.
    pub fn files(&self) -> impl Iterator<Item = (&Path, Range<usize>)> {
        self.files
            .iter()
            .map(|f| (f.path.as_path(), f.start..f.start + f.map.len()))
    }

    /// The bytes in `range` (absolute corpus offsets), borrowed when they lie in one file and
    /// copied when they cross a file boundary.
    ///
    /// Panics if `range` is not within `0..len()` (a caller bug, not bad input).
    pub fn slice(&self, range: Range<usize>) -> Cow<'_, [u8]> {
        self.check_range(&range);
        if range.is_empty() {
            return Cow::Borrowed(&[]);
        }
        let index = self.file_index(range.start);
        let file = &self.files[index];
        let local = range.start - file.start;
        if range.end <= file.start + file.map.len() {
            Cow::Borrowed(&file.map[local..local + range.len()])
        } else {
            let mut out = vec![0u8; range.len()];
            self.copy_into(range.start, &mut out);
            Cow::Owned(out)
        }
    }

    /// A copy of the bytes in `range` (absolute corpus offsets), across file boundaries.
    ///
    /// Panics if `range` is not within `0..len()`.
    pub fn bytes(&self, range: Range<usize>) -> Vec<u8> {
        self.slice(range).into_owned()
    }

    /// Fills `out` with the bytes starting at absolute offset `start`.
    ///
    /// Panics if `start + out.len() > len()`.
    pub fn copy_into(&self, start: usize, out: &mut [u8]) {
        self.check_range(&(start..start + out.len()));
        if out.is_empty() {
            return;
        }
        let mut index = self.file_index(start);
        let mut pos = start;
        let mut written = 0;
        while written < out.len() {
            let file = &self.files[index];
            let local = pos - file.start;
            let take = (file.map.len() - local).min(out.len() - written);
            out[written..written + take].copy_from_slice(&file.map[local..local + take]);
            written += take;
            pos += take;
            index += 1;
        }
    }

    /// Entropy of the byte histogram in bits per byte: the loss, in bpb, of the best model that
    /// ignores context. A trained model should beat it.
    pub fn unigram_entropy_bits(&self) -> f64 {
        entropy_bits(&self.byte_counts())
    }

    /// How often each byte value occurs in the corpus.
    pub fn byte_counts(&self) -> [u64; 256] {
        self.files
            .iter()
            .flat_map(|f| f.map.chunks(1 << 20))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(byte_histogram)
            .reduce(|| [0u64; 256], add_histograms)
    }

    /// Splits into training and validation data. With an explicit `valid` corpus, all of `self`
    /// is training data and all of `valid` is validation data (`valid_fraction` is ignored).
    /// Otherwise the last `valid_fraction` of the bytes (rounded, at least one byte) is the
    /// validation part and the rest the training part.
    ///
    /// Whether each part holds at least one window is checked by [`DataSplit::check_window`],
    /// since the window length is not known here.
    pub fn split(
        self,
        valid: Option<ByteCorpus>,
        valid_fraction: f64,
    ) -> Result<DataSplit, DataError> {
        if let Some(valid) = valid {
            let train_len = self.len;
            let valid_len = valid.len;
            return Ok(DataSplit {
                train: CorpusPart::new(Arc::new(self), 0..train_len),
                valid: CorpusPart::new(Arc::new(valid), 0..valid_len),
            });
        }
        if !(valid_fraction > 0.0 && valid_fraction < 1.0) {
            return Err(DataError::InvalidFraction {
                value: valid_fraction,
            });
        }
        let len = self.len;
        let valid_len = ((len as f64) * valid_fraction).round().max(1.0) as usize;
        if valid_len >= len {
            return Err(DataError::TooSmallToSplit {
                path: self.root.clone(),
                len,
                fraction: valid_fraction,
            });
        }
        let boundary = len - valid_len;
        let corpus = Arc::new(self);
        Ok(DataSplit {
            train: CorpusPart::new(Arc::clone(&corpus), 0..boundary),
            valid: CorpusPart::new(corpus, boundary..len),
        })
    }

    fn check_range(&self, range: &Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "byte range {range:?} outside corpus {} of {} bytes",
            self.root.display(),
            self.len
        );
    }

    /// Index of the file holding absolute offset `pos` (`pos < len`).
    fn file_index(&self, pos: usize) -> usize {
        self.files.partition_point(|f| f.start + f.map.len() <= pos)
    }
}

/// A contiguous byte range of a shared corpus.
#[derive(Debug, Clone)]
pub struct CorpusPart {
    corpus: Arc<ByteCorpus>,
    range: Range<usize>,
}

impl CorpusPart {
    fn new(corpus: Arc<ByteCorpus>, range: Range<usize>) -> Self {
        Self { corpus, range }
    }

    /// Bytes in this part.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// True when the part holds no bytes (never the case for parts made by `split`).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The corpus this part belongs to.
    pub fn corpus(&self) -> &ByteCorpus {
        &self.corpus
    }

    /// This part's absolute byte range in its corpus.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The bytes in `range`, relative to the start of this part.
    ///
    /// Panics if `range` is not within `0..len()`.
    pub fn slice(&self, range: Range<usize>) -> Cow<'_, [u8]> {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "byte range {range:?} outside a part of {} bytes",
            self.len()
        );
        self.corpus
            .slice(self.range.start + range.start..self.range.start + range.end)
    }

    /// Fills `out` with the bytes starting at `start`, relative to the start of this part.
    ///
    /// Panics if `start + out.len() > len()`.
    pub fn copy_into(&self, start: usize, out: &mut [u8]) {
        assert!(
            start + out.len() <= self.len(),
            "copy of {} bytes at {start} outside a part of {} bytes",
            out.len(),
            self.len()
        );
        self.corpus.copy_into(self.range.start + start, out);
    }
}

/// Training and validation data. Both parts may share one memory-mapped corpus.
#[derive(Debug, Clone)]
pub struct DataSplit {
    /// Bytes that training windows are drawn from.
    pub train: CorpusPart,
    /// Bytes that validation windows are cut from.
    pub valid: CorpusPart,
}

/// The usual name in prose; the same type as [`DataSplit`].
pub type Split = DataSplit;

/// Marks the key of the training-window RNG so other streams derived from the same seed differ.
const TRAIN_WINDOW_STREAM: u64 = 0x6d65_6761_7472_6e31;

impl DataSplit {
    /// Checks that both parts hold at least one window of `seq_len` bytes. The trainer calls this
    /// once before sampling; [`Self::train_batch`] panics on a window that does not fit.
    pub fn check_window(&self, seq_len: usize) -> Result<(), DataError> {
        if seq_len == 0 {
            return Err(DataError::ZeroSeqLen);
        }
        for (part, data) in [("training", &self.train), ("validation", &self.valid)] {
            if data.len() < seq_len {
                return Err(DataError::PartTooShort {
                    part,
                    path: data.corpus.root.clone(),
                    len: data.len(),
                    seq_len,
                });
            }
        }
        Ok(())
    }

    /// `batch` windows of `seq_len` bytes drawn uniformly from the training part, row-major
    /// `[batch, seq_len]`. Row `r` depends only on `(seed, step, r)`.
    ///
    /// Panics if `seq_len` is zero or larger than the training part (see [`Self::check_window`]).
    pub fn train_batch(&self, seed: u64, step: u64, batch: usize, seq_len: usize) -> Vec<u8> {
        self.train_rows(seed, step, 0..batch, seq_len)
    }

    /// Rows `rows` of the global batch that [`Self::train_batch`] would return for
    /// `(seed, step)`: a data-parallel rank draws only its own rows.
    pub fn train_rows(&self, seed: u64, step: u64, rows: Range<usize>, seq_len: usize) -> Vec<u8> {
        assert!(
            seq_len >= 1 && seq_len <= self.train.len(),
            "window of {seq_len} bytes does not fit the {} training bytes (call check_window first)",
            self.train.len()
        );
        let mut out = vec![0u8; rows.len() * seq_len];
        for (row, window) in rows.zip(out.chunks_exact_mut(seq_len)) {
            let start = self.train_window_start(seed, step, row as u64, seq_len);
            self.train.copy_into(start, window);
        }
        out
    }

    /// Offset, in the training part, of row `row` of the batch for `(seed, step)`.
    pub fn train_window_start(&self, seed: u64, step: u64, row: u64, seq_len: usize) -> usize {
        let max_start = self.train.len() - seq_len;
        window_rng(seed, step, row).random_range(0..=max_start)
    }

    /// Consecutive non-overlapping windows of `seq_len` bytes from the start of the validation
    /// part. When more than `max_windows` fit, `max_windows` of them are kept, spread evenly over
    /// the part (window `floor(i * n / max_windows)` for `i < max_windows`). Deterministic.
    pub fn valid_windows(&self, seq_len: usize, max_windows: usize) -> Vec<Vec<u8>> {
        if seq_len == 0 {
            return Vec::new();
        }
        let available = self.valid.len() / seq_len;
        let count = available.min(max_windows);
        (0..count)
            .map(|i| {
                let index = if available > max_windows {
                    ((i as u128 * available as u128) / max_windows as u128) as usize
                } else {
                    i
                };
                self.valid
                    .slice(index * seq_len..(index + 1) * seq_len)
                    .into_owned()
            })
            .collect()
    }
}

/// An RNG keyed directly by `(seed, step, row)`: distinct keys give independent ChaCha streams,
/// without the collisions a hash of the three could have.
fn window_rng(seed: u64, step: u64, row: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&row.to_le_bytes());
    key[24..32].copy_from_slice(&TRAIN_WINDOW_STREAM.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io_err = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        if file_type.is_dir() {
            collect_files(&path, out)?;
        } else if file_type.is_file() {
            out.push(path);
        } else if file_type.is_symlink() {
            // A dangling link is skipped like any other non-file entry.
            if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                out.push(path);
            }
        }
    }
    Ok(())
}

fn byte_histogram(bytes: &[u8]) -> [u64; 256] {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    counts
}

fn add_histograms(mut a: [u64; 256], b: [u64; 256]) -> [u64; 256] {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

fn entropy_bits(counts: &[u64; 256]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let total = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum()
}
