//! Golden test: our MEGALODON against megalodon-jax 0.2.2 (tools/golden_megalodon.py,
//! docs/megalodon-model.md). The fixtures hold random parameters under the official names,
//! an input batch, megalodon-jax's logits, loss and every parameter gradient, and (stream
//! fixture) the logits of feeding the input in calls of the recorded sizes.

use std::collections::HashMap;

use mega::backend::cpu::Cpu;
use mega::backend::Backend;
use mega::config::{MegalodonConfig, ModelConfig};
use mega::infer::megalodon_stream::{Logits, MegalodonStream};
use mega::model::megalodon::Megalodon;
use mega::train::checkpoint::HostTensor;
use safetensors::{Dtype, SafeTensors};

struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    config: MegalodonConfig,
}

impl Fixture {
    fn get(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"))
            .1
    }

    /// The model parameters (every tensor that is not fixture data), as named host tensors.
    fn parameters(&self) -> Vec<HostTensor> {
        const DATA: [&str; 4] = ["input", "logits", "loss", "call_sizes"];
        self.tensors
            .iter()
            .filter(|(n, _)| !n.starts_with("grad.") && !DATA.contains(&n.as_str()))
            .map(|(n, (shape, data))| HostTensor::new(n.clone(), shape.clone(), data.clone()))
            .collect()
    }

    /// `(b, t, bytes)` of the input batch.
    fn input(&self) -> (usize, usize, Vec<u8>) {
        let (shape, data) = &self.tensors["input"];
        let bytes = data
            .iter()
            .map(|&x| u8::try_from(x as i64).expect("input holds bytes"))
            .collect();
        (shape[0], shape[1], bytes)
    }
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
    let ModelConfig::Megalodon(config) = ModelConfig::from_json(&config_text, &path).unwrap()
    else {
        panic!("{name} is not a MEGALODON fixture");
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = HashMap::new();
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
    Fixture { tensors, config }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// The model and its parameters, loaded by name through the official-layout path.
fn model_and_params(fx: &Fixture, be: &Cpu<f32>) -> (Megalodon, Vec<Vec<f32>>) {
    let model = Megalodon::new(&fx.config);
    let host = model
        .layout
        .host_from_named(&fx.parameters())
        .expect("fixture parameters match the official layout");
    let params = model.layout.upload(be, &host);
    (model, params)
}

#[test]
fn the_fixture_config_is_the_tiny_preset() {
    let fx = load("megalodon_tiny.safetensors");
    assert_eq!(fx.config, MegalodonConfig::preset("tiny").unwrap());
    // docs/megalodon-model.md: the tiny fixture has 35,136 parameters.
    assert_eq!(Megalodon::new(&fx.config).layout.numel(), 35_136);
}

#[test]
fn full_forward_loss_and_gradients_match_megalodon_jax() {
    let fx = load("megalodon_tiny.safetensors");
    let be = Cpu::<f32>::new();
    let (model, params) = model_and_params(&fx, &be);
    let (b, t, input) = fx.input();

    // Logits at every position of the full input.
    let mut ws = model.workspace(&be, b, t, false);
    model.forward_inputs(&be, &params, &mut ws, &input);
    let logits = be.download(&ws.logits);
    let d_logits = max_abs_diff(&logits, fx.get("logits"));
    println!(
        "max |Δlogits| = {d_logits:.3e} (fixture max |logit| = {:.2})",
        { fx.get("logits").iter().fold(0.0f32, |m, x| m.max(x.abs())) }
    );
    assert!(d_logits <= 2e-5, "logits differ by {d_logits}");

    // Loss and gradients: the training path scores the t − 1 next-byte pairs of each row.
    let mut ws = model.workspace(&be, b, t - 1, true);
    let loss = model.forward(&be, &params, &mut ws, &input);
    let ref_loss = fx.get("loss")[0] as f64;
    println!("loss {loss:.7} vs megalodon-jax {ref_loss:.7}");
    assert!((loss - ref_loss).abs() <= 1e-5, "loss {loss} vs {ref_loss}");
    let mut grads = model.layout.zeros(&be);
    model.backward(&be, &params, &mut grads, &mut ws);
    let mut worst = (0.0f64, String::new());
    let mut worst_abs = 0.0f32;
    for (i, s) in model.layout.specs.iter().enumerate() {
        let g = be.download(&grads[i]);
        let want = fx.get(&format!("grad.{}", s.name));
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        let abs = max_abs_diff(&g, want);
        worst_abs = worst_abs.max(abs);
        let rel = abs as f64 / scale;
        if rel > worst.0 {
            worst = (rel, s.name.clone());
        }
        assert!(
            rel <= 1e-4,
            "gradient of {} differs by {rel:.2e} of its largest element",
            s.name
        );
    }
    println!(
        "worst gradient max |Δ| / max |grad| = {:.3e} ({}); worst absolute {worst_abs:.3e}",
        worst.0, worst.1
    );
}

#[test]
fn streaming_with_the_fixture_call_sizes_matches_megalodon_jax() {
    let fx = load("megalodon_tiny_stream.safetensors");
    let be = Cpu::<f32>::new();
    let (model, params) = model_and_params(&fx, &be);
    let (b, t, input) = fx.input();
    let sizes: Vec<usize> = fx.get("call_sizes").iter().map(|&x| x as usize).collect();
    assert_eq!(sizes.iter().sum::<usize>(), t);

    let mut stream = MegalodonStream::new(&model, &be, &params, b);
    let mut got = vec![Vec::new(); b];
    let mut at = 0;
    for &len in &sizes {
        let calls: Vec<&[u8]> = (0..b)
            .map(|r| &input[r * t + at..r * t + at + len])
            .collect();
        for (r, l) in stream.feed(&calls, Logits::All).into_iter().enumerate() {
            got[r].extend(l);
        }
        at += len;
    }
    let got: Vec<f32> = got.concat();
    let d = max_abs_diff(&got, fx.get("logits"));
    println!("streamed (calls {sizes:?}): max |Δlogits| vs megalodon-jax = {d:.3e}");
    assert!(d <= 2e-5, "streamed logits differ by {d}");
}
