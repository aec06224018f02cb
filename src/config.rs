//! Model configurations: JSON (serde), named presets, and validation with clear errors.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A configuration problem, reported in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("unknown preset '{name}' for {model}; available: {available}")]
    UnknownPreset {
        model: String,
        name: String,
        available: String,
    },
}

/// Feed-forward variant of a transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedForward {
    /// `relu(x W1 + b1) W2 + b2` (paper default).
    Relu,
    /// GELU (tanh approximation).
    Gelu,
    /// `(silu(x Wa) ⊙ x Wg) W2`, with the gate and value from one `[D, 2F]` matrix.
    Swiglu,
}

/// MEGABYTE hyper-parameters (docs/megabyte-model.md has the equations they parameterise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MegabyteConfig {
    /// Vocabulary: 256 for raw bytes.
    pub vocab_size: usize,
    /// Bytes per patch (P).
    pub patch_size: usize,
    /// Context length in bytes (T), a multiple of `patch_size`.
    pub max_seq_len: usize,
    /// Per-byte width of the global embedding (D_G).
    pub global_byte_dim: usize,
    /// Width of the global transformer (D_gw). Paper-strict when equal to `P·D_G`;
    /// otherwise input/output projections are added (ambiguity A2).
    pub global_dim: usize,
    pub global_layers: usize,
    pub global_heads: usize,
    /// Width of the local transformer (D_L).
    pub local_dim: usize,
    pub local_layers: usize,
    pub local_heads: usize,
    /// Feed-forward hidden width as a multiple of the block width.
    pub ffn_mult: usize,
    /// Feed-forward nonlinearity.
    pub activation: FeedForward,
    /// Std of the truncated-normal initialization (cut at ±2σ).
    pub init_std: f32,
    /// A learned bias on the tied output head (not in the paper). It absorbs the byte
    /// unigram distribution, which otherwise has to be carved into the shared byte table and
    /// stalls small models on a unigram plateau.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub head_bias: bool,
}

/// Every model family behind one JSON shape, selected by its `"model"` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum ModelConfig {
    Megabyte(MegabyteConfig),
}

impl MegabyteConfig {
    /// Number of patches in a full context.
    pub fn patches(&self) -> usize {
        self.max_seq_len / self.patch_size
    }

    /// Width of a concatenated patch embedding, `P·D_G`.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.global_byte_dim
    }

    /// Whether the global model needs input/output projections (A2).
    pub fn has_global_projections(&self) -> bool {
        self.global_dim != self.patch_dim()
    }

    /// Check every invariant the model relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("patch_size", self.patch_size),
            ("max_seq_len", self.max_seq_len),
            ("global_byte_dim", self.global_byte_dim),
            ("global_dim", self.global_dim),
            ("global_layers", self.global_layers),
            ("global_heads", self.global_heads),
            ("local_dim", self.local_dim),
            ("local_layers", self.local_layers),
            ("local_heads", self.local_heads),
            ("ffn_mult", self.ffn_mult),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.vocab_size != 256 {
            return bad(format!(
                "vocab_size must be 256 for a byte-level MEGABYTE (got {})",
                self.vocab_size
            ));
        }
        if self.max_seq_len % self.patch_size != 0 {
            return bad(format!(
                "max_seq_len ({}) must be a multiple of patch_size ({})",
                self.max_seq_len, self.patch_size
            ));
        }
        if self.global_dim % self.global_heads != 0 {
            return bad(format!(
                "global_dim ({}) must be divisible by global_heads ({})",
                self.global_dim, self.global_heads
            ));
        }
        if self.local_dim % self.local_heads != 0 {
            return bad(format!(
                "local_dim ({}) must be divisible by local_heads ({})",
                self.local_dim, self.local_heads
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad(format!(
                "init_std must be positive and finite (got {})",
                self.init_std
            ));
        }
        Ok(())
    }

    /// The named presets: `tiny` (tests), `small` (CPU quickstart), `bench` (the peer
    /// benchmark configuration), and the paper's text models.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let base = |p, t, dg, dgw, lg, hg, dl, ll, hl| MegabyteConfig {
            vocab_size: 256,
            patch_size: p,
            max_seq_len: t,
            global_byte_dim: dg,
            global_dim: dgw,
            global_layers: lg,
            global_heads: hg,
            local_dim: dl,
            local_layers: ll,
            local_heads: hl,
            ffn_mult: 4,
            activation: FeedForward::Relu,
            init_std: 0.006,
            head_bias: false,
        };
        let cfg = match name {
            "tiny" => base(4, 16, 8, 32, 2, 2, 16, 2, 2),
            // ~13M parameters, most of them in the global model that runs once per patch,
            // so that two CPU cores see many bytes per second (the quickstart).
            "small" => MegabyteConfig {
                head_bias: true,
                ..base(8, 512, 64, 512, 4, 8, 128, 2, 2)
            },
            // The configuration of the peer benchmark (tools/bench_megabyte_peers.py).
            "bench" => base(8, 2048, 64, 512, 6, 8, 256, 2, 4),
            // Paper v1 Table 15 text models (arXiv/PG-19): 758M global + 262M local.
            "paper-758m" => base(8, 8192, 256, 2048, 14, 32, 1024, 18, 16),
            // Paper v1 Table 13: 1.3B global + 218M local.
            "paper-1.3b" => base(8, 8192, 256, 2048, 24, 32, 1024, 15, 16),
            _ => {
                return Err(ConfigError::UnknownPreset {
                    model: "megabyte".into(),
                    name: name.into(),
                    available: Self::PRESETS.join(", "),
                })
            }
        };
        Ok(cfg)
    }

    /// Names accepted by [`MegabyteConfig::preset`].
    pub const PRESETS: &'static [&'static str] =
        &["tiny", "small", "bench", "paper-758m", "paper-1.3b"];
}

impl ModelConfig {
    /// Parse and validate a config JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ModelConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read, parse and validate a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Validate whichever model this is.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ModelConfig::Megabyte(c) => c.validate(),
        }
    }

    /// The JSON form written into checkpoints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("configs always serialize")
    }
}
