//! `mega convert`: turn a safetensors file of weights in a model's own naming (for MEGALODON,
//! the official state-dict names and shapes) plus its hyper-parameters into a mega checkpoint,
//! checking every tensor against the config.

use crate::config::ModelConfig;
use crate::model::ModelShape;
use crate::train::checkpoint::{self, Checkpoint, HostTensor};
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Buffers official MEGALODON checkpoints carry that are not parameters: recomputed or unused.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("rope.freqs") || name.contains(".prior_")
}

/// Read every tensor of a safetensors file as f32 (f32, bf16 and f16 are accepted).
pub fn read_safetensors(path: &Path) -> Result<Vec<HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 if name.contains(".prior_count") => {
                if raw
                    .chunks_exact(8)
                    .any(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) != 0)
                {
                    bail!(
                        "{}: tensor '{name}' is non-zero; prior counts are not supported",
                        path.display()
                    );
                }
                continue;
            }
            other => bail!(
                "{}: tensor '{name}' has dtype {other:?}; expected f32, bf16 or f16",
                path.display()
            ),
        };
        out.push(HostTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Convert `weights` (+ `config`) into a checkpoint directory `out`. Returns the number of
/// tensors written.
pub fn convert(weights: &Path, config: &Path, out: &Path) -> Result<usize> {
    let cfg = ModelConfig::from_file(config)?;
    let tensors: Vec<HostTensor> = read_safetensors(weights)?
        .into_iter()
        .filter(|t| !is_ignored_buffer(&t.name))
        .collect();
    let checked = crate::with_model!(&cfg, |m| {
        let layout = m.layout();
        let host = layout
            .host_from_named(&tensors)
            .map_err(|e| anyhow::anyhow!("{}: {e}", weights.display()))?;
        layout
            .specs
            .iter()
            .zip(host)
            .map(|(s, data)| HostTensor {
                name: s.name.clone(),
                shape: s.shape.clone(),
                data,
            })
            .collect::<Vec<_>>()
    });
    let n = checked.len();
    let ck = Checkpoint {
        config: cfg.to_json(),
        model: checked,
        optimizer: None,
        trainer: None,
    };
    checkpoint::save(out, &ck).with_context(|| format!("writing {}", out.display()))?;
    Ok(n)
}
