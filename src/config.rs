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

/// MEGALODON hyper-parameters (docs/megalodon-model.md; field names as the official code's
/// `ModelConf`). Dropouts are always 0 and `rescale_nffn` is off, as in every official preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MegalodonConfig {
    /// Vocabulary V: 256 for raw bytes.
    pub vocab_size: usize,
    /// Model width D.
    pub model_dim: usize,
    pub num_layers: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// Shared query/key width z (per head `z/H`, even for RoPE).
    pub z_dim: usize,
    /// Value width v (per head `v/H`).
    pub value_dim: usize,
    /// CEMA expansion N (the paper's h).
    pub cema_ndim: usize,
    /// TimestepNorm groups G (D divisible by G).
    pub norm_num_groups: usize,
    /// Attention chunk size C.
    pub chunk_size: usize,
    /// FFN hidden width F.
    pub ffn_hidden_dim: usize,
    /// SwiGLU FFN (`W2·(SiLU(W1 u) ⊙ W3 u)`) instead of `W2·SiLU(W1 u)`.
    pub swiglu: bool,
    /// RoPE base (1e4 in the official presets, 1e5 in the paper's 7B).
    pub rope_base: f64,
    /// Epsilon of every norm.
    pub norm_eps: f64,
    /// Tie the output head to the embedding.
    pub share_emb: bool,
    /// Multiply the embedding by √D.
    pub scale_emb: bool,
}

/// Every model family behind one JSON shape, selected by its `"model"` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum ModelConfig {
    Megabyte(MegabyteConfig),
    Megalodon(MegalodonConfig),
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

impl MegalodonConfig {
    /// Query/key width per head, `z/H`.
    pub fn head_z(&self) -> usize {
        self.z_dim / self.num_heads
    }

    /// Value width per head, `v/H`.
    pub fn head_v(&self) -> usize {
        self.value_dim / self.num_heads
    }

    /// Check every invariant the model relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("model_dim", self.model_dim),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("z_dim", self.z_dim),
            ("value_dim", self.value_dim),
            ("cema_ndim", self.cema_ndim),
            ("norm_num_groups", self.norm_num_groups),
            ("chunk_size", self.chunk_size),
            ("ffn_hidden_dim", self.ffn_hidden_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.vocab_size != 256 {
            return bad(format!(
                "vocab_size must be 256 for a byte-level MEGALODON (got {})",
                self.vocab_size
            ));
        }
        if self.model_dim % self.norm_num_groups != 0 {
            return bad(format!(
                "model_dim ({}) must be divisible by norm_num_groups ({})",
                self.model_dim, self.norm_num_groups
            ));
        }
        if self.z_dim % self.num_heads != 0 || self.head_z() % 2 != 0 {
            return bad(format!(
                "z_dim ({}) must split into num_heads ({}) heads of even width (RoPE rotates pairs)",
                self.z_dim, self.num_heads
            ));
        }
        if self.value_dim % self.num_heads != 0 {
            return bad(format!(
                "value_dim ({}) must be divisible by num_heads ({})",
                self.value_dim, self.num_heads
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(format!(
                "rope_base must be finite and above 1 (got {})",
                self.rope_base
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!(
                "norm_eps must be positive and finite (got {})",
                self.norm_eps
            ));
        }
        Ok(())
    }

    /// The named presets: `tiny` (the golden fixtures' model), `small` (CPU quickstart),
    /// `bench` (the peer benchmark's configuration), the official code's presets (spec
    /// §11, with the byte vocabulary) and `paper-7b` (`mega7.3B` with the paper's chunk
    /// size 4096 and RoPE base 1e5).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        #[allow(clippy::too_many_arguments)]
        let base = |layers, d, h, z, v, f, swiglu, c, g| MegalodonConfig {
            vocab_size: 256,
            model_dim: d,
            num_layers: layers,
            num_heads: h,
            z_dim: z,
            value_dim: v,
            cema_ndim: 16,
            norm_num_groups: g,
            chunk_size: c,
            ffn_hidden_dim: f,
            swiglu,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
            share_emb: false,
            scale_emb: false,
        };
        let cfg = match name {
            "tiny" => MegalodonConfig {
                cema_ndim: 4,
                ..base(2, 32, 2, 16, 24, 48, true, 8, 4)
            },
            // ~14M parameters: a few thousand bytes per second of training on two cores.
            "small" => base(6, 384, 2, 128, 768, 1024, true, 256, 32),
            // The configuration of the peer benchmark (tools/bench_megalodon_peers.py).
            "bench" => base(6, 512, 2, 128, 1024, 1024, true, 256, 32),
            "mega200M" => base(12, 1024, 1, 256, 2048, 2560, false, 2048, 32),
            "mega1.3B" => base(24, 2048, 2, 512, 4096, 4864, false, 2048, 64),
            "mega1.3B_pg19" => MegalodonConfig {
                share_emb: true,
                scale_emb: true,
                ..base(24, 2048, 2, 512, 4096, 3584, true, 2048, 64)
            },
            "mega7.1B" => base(32, 4096, 4, 1024, 8192, 11264, false, 2048, 64),
            "mega7.3B" => base(32, 4096, 4, 1024, 8192, 8192, true, 2048, 64),
            "paper-7b" => MegalodonConfig {
                rope_base: 100_000.0,
                ..base(32, 4096, 4, 1024, 8192, 8192, true, 4096, 64)
            },
            _ => {
                return Err(ConfigError::UnknownPreset {
                    model: "megalodon".into(),
                    name: name.into(),
                    available: Self::PRESETS.join(", "),
                })
            }
        };
        Ok(cfg)
    }

    /// Names accepted by [`MegalodonConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "tiny",
        "small",
        "bench",
        "mega200M",
        "mega1.3B",
        "mega1.3B_pg19",
        "mega7.1B",
        "mega7.3B",
        "paper-7b",
    ];
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
            ModelConfig::Megalodon(c) => c.validate(),
        }
    }

    /// The JSON form written into checkpoints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("configs always serialize")
    }
}
