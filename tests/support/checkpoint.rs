//! Inference-only checkpoints with seeded random weights, for tests that start the engine or
//! the binary without training first.

use std::path::Path;

use mega::config::ModelConfig;
use mega::model::ModelShape;
use mega::train::checkpoint::{save, Checkpoint, HostTensor};

/// Writes a checkpoint of `model` (described by `cfg`) with `init_host(seed)` weights.
pub fn write_checkpoint<M: ModelShape>(dir: &Path, cfg: &ModelConfig, model: &M, seed: u64) {
    let host = model.layout().init_host(seed);
    let tensors = model
        .layout()
        .specs
        .iter()
        .zip(host)
        .map(|(s, data)| HostTensor::new(s.name.clone(), s.shape.clone(), data))
        .collect();
    let ckpt = Checkpoint {
        config: serde_json::to_value(cfg).expect("configs serialize"),
        model: tensors,
        optimizer: None,
        trainer: None,
    };
    save(dir, &ckpt).expect("checkpoint saved");
}
