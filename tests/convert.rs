//! `mega convert`: official-layout MEGALODON weights (the megalodon-jax golden fixture's
//! parameters, plus the buffers official checkpoints carry) become a checkpoint whose logits
//! are the reference's; a mis-shaped tensor is rejected naming it and both shapes.

use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use mega::model::megalodon::Megalodon;
use mega::model::{LanguageModel, ModelShape};
use safetensors::tensor::{serialize, Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::process::Command;

fn fixture() -> (Vec<u8>, String) {
    let path = format!(
        "{}/tests/fixtures/megalodon_tiny.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().unwrap()["config"].clone();
    (bytes, config)
}

/// Write the fixture's parameters (optionally with one tensor's shape altered) as an
/// official-style weights file, with the non-parameter buffers official checkpoints carry.
fn write_weights(dir: &std::path::Path, break_shape_of: Option<&str>) -> std::path::PathBuf {
    let (bytes, _) = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if name == "input" || name == "logits" || name == "loss" || name.starts_with("grad.") {
            continue;
        }
        let mut shape = view.shape().to_vec();
        if Some(name.as_str()) == break_shape_of {
            shape = vec![shape.iter().product()];
        }
        owned.insert(name, (view.dtype(), shape, view.data().to_vec()));
    }
    let freqs: Vec<u8> = [1.0f32, 0.1].iter().flat_map(|x| x.to_le_bytes()).collect();
    owned.insert("rope.freqs".into(), (Dtype::F32, vec![2], freqs));
    owned.insert(
        "layers.0.mega.timenorm.prior_count".into(),
        (Dtype::I64, vec![], 0i64.to_le_bytes().to_vec()),
    );
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = serialize(views, None).unwrap();
    let path = dir.join("weights.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}

fn mega(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mega"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn official_layout_weights_convert_and_reproduce_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_weights(dir.path(), None);
    let (bytes, config) = fixture();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, &config).unwrap();
    let out = dir.path().join("ck");
    let o = mega(&[
        "convert",
        "--weights",
        weights.to_str().unwrap(),
        "--config",
        cfg_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (cfg, tensors) = mega::train::trainer::load_checkpoint(&out).unwrap();
    let mega::config::ModelConfig::Megalodon(mc) = cfg else {
        panic!("not megalodon")
    };
    let model = Megalodon::new(&mc);
    let be = Cpu::<f32>::new();
    let params = model
        .layout()
        .upload(&be, &model.layout().host_from_named(&tensors).unwrap());
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input").unwrap();
    let ids: Vec<u8> = input
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u8)
        .collect();
    let (b, l) = (input.shape()[0], input.shape()[1]);
    let reference: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // The training forward reads t + 1 bytes and scores t: its logits are the reference's
    // first t positions.
    let t = l - 1;
    let mut ws = LanguageModel::<Cpu>::workspace(&model, &be, b, t, false);
    model.forward(&be, &params, &mut ws, &ids);
    let logits = be.download(model.logits(&ws));
    let mut worst = 0.0f32;
    for r in 0..b {
        for i in 0..t {
            for v in 0..256 {
                let d = (logits[(r * t + i) * 256 + v] - reference[(r * l + i) * 256 + v]).abs();
                worst = worst.max(d);
            }
        }
    }
    assert!(
        worst <= 1e-4,
        "converted checkpoint's logits differ from megalodon-jax by {worst}"
    );
}

#[test]
fn a_mis_shaped_tensor_is_rejected_naming_it_and_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_weights(dir.path(), Some("layers.1.mega.cema.alpha"));
    let (_, config) = fixture();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, &config).unwrap();
    let out = dir.path().join("ck");
    let o = mega(&[
        "convert",
        "--weights",
        weights.to_str().unwrap(),
        "--config",
        cfg_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("layers.1.mega.cema.alpha")
            && err.contains("[128]")
            && err.contains("[32, 4, 1]"),
        "{err}"
    );
}
