//! Golden test: our MEGABYTE against an independent PyTorch implementation of the paper's
//! equations (tools/golden_megabyte.py). Each fixture holds random parameters under our
//! names, an input batch, and the reference's logits, loss and every parameter gradient.

use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use mega::config::ModelConfig;
use mega::model::megabyte::Megabyte;
use safetensors::{Dtype, SafeTensors};

struct Fixture {
    bytes: Vec<u8>,
    tensors: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    config: ModelConfig,
}

fn load(name: &str) -> Fixture {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let config_text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("config"))
        .expect("config metadata")
        .clone();
    let config = ModelConfig::from_json(&config_text, &path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => view
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("unexpected dtype {other:?}"),
        };
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Fixture {
        bytes,
        tensors,
        config,
    }
}

fn check(name: &str) {
    let fx = load(name);
    let _ = &fx.bytes;
    let ModelConfig::Megabyte(cfg) = &fx.config else {
        panic!("{name} is not a MEGABYTE fixture");
    };
    let model = Megabyte::new(cfg);
    let (input_shape, input) = &fx.tensors["input"];
    let (b, t) = (input_shape[0], input_shape[1]);
    let bytes: Vec<u8> = input.iter().map(|&x| x as u8).collect();
    let host: Vec<Vec<f32>> = model
        .layout
        .specs
        .iter()
        .map(|s| {
            let (shape, data) = fx
                .tensors
                .get(&s.name)
                .unwrap_or_else(|| panic!("fixture lacks {}", s.name));
            assert_eq!(shape, &s.shape, "{}", s.name);
            data.clone()
        })
        .collect();
    let be = Cpu::<f32>::new();
    let params = model.layout.upload(&be, &host);
    let mut grads = model.layout.zeros(&be);
    let mut ws = model.workspace(&be, b, t, true);
    let loss = model.forward(&be, &params, &mut ws, &bytes);
    model.backward(&be, &params, &mut grads, &mut ws);

    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let logits = be.download(&ws.logits);
    let d_logits = max_diff(&logits, &fx.tensors["logits"].1);
    let ref_loss = fx.tensors["loss"].1[0] as f64;
    println!("{name}: max |Δlogits| = {d_logits:e}, loss {loss} vs {ref_loss}");
    assert!(d_logits <= 1e-4, "{name}: logits differ by {d_logits}");
    assert!(
        (loss - ref_loss).abs() <= 1e-5,
        "{name}: loss {loss} vs {ref_loss}"
    );
    let mut worst = (0.0f32, String::new());
    for (i, s) in model.layout.specs.iter().enumerate() {
        let g = be.download(&grads[i]);
        let d = max_diff(&g, &fx.tensors[&format!("grad.{}", s.name)].1);
        if d > worst.0 {
            worst = (d, s.name.clone());
        }
        assert!(d <= 1e-4, "{name}: gradient of {} differs by {d}", s.name);
    }
    println!(
        "{name}: worst gradient max |Δ| = {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn paper_strict_tiny_matches_the_independent_reference() {
    check("megabyte_tiny.safetensors");
}

#[test]
fn projected_gelu_tiny_matches_the_independent_reference() {
    check("megabyte_tiny_proj.safetensors");
}

#[test]
fn swiglu_tiny_matches_the_independent_reference() {
    check("megabyte_tiny_swiglu.safetensors");
}
