//! Named parameter tensors: declaration, deterministic initialization, host transfer.

use crate::backend::Backend;
use crate::train::checkpoint::HostTensor;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Truncated normal(0, std), cut at ±2σ (MEGABYTE paper appendix A.1).
    TruncNormal(f32),
    Zeros,
    Ones,
    /// Normal(0, std) (MEGALODON's linear layers: std = 1/√(3·fan_in)).
    Normal(f32),
    /// Normal(0, std) redrawn outside ±`cut`·std (MEGALODON's embedding: cut 3; CEMA
    /// `omega`: std 0.25 clipped to ±1, cut 4).
    TruncNormalCut {
        std: f32,
        cut: f32,
    },
    /// `(re, im)` pairs with re ~ Normal(0, std) and im = 0 (CEMA `gamma`).
    RealPartNormal(f32),
    /// CEMA `theta` of one layer (spec §4.1): `logit(f)` for a random permutation of
    /// `f_i = exp(−i·ln(D)/D)`, i = 1..D, D = the tensor's size.
    CemaTheta,
}

/// Name, shape and initialization of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Collects parameter declarations in a fixed order; each gets an index into the buffers.
#[derive(Default, Debug, Clone)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
}

impl ParamLayout {
    /// Declare a parameter and return its index.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> usize {
        self.specs.push(ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        });
        self.specs.len() - 1
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Index of a parameter by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// Host values from each spec's initializer, deterministic in `seed`.
    pub fn init_host(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        self.specs
            .iter()
            .map(|s| match s.init {
                Init::Zeros => vec![0.0; s.numel()],
                Init::Ones => vec![1.0; s.numel()],
                Init::TruncNormal(std) => truncated_normal(&mut rng, s.numel(), std, 2.0),
                Init::TruncNormalCut { std, cut } => {
                    truncated_normal(&mut rng, s.numel(), std, cut)
                }
                Init::Normal(std) => {
                    let normal = Normal::new(0.0f32, std).expect("finite std");
                    (0..s.numel()).map(|_| normal.sample(&mut rng)).collect()
                }
                Init::RealPartNormal(std) => {
                    let normal = Normal::new(0.0f32, std).expect("finite std");
                    (0..s.numel())
                        .map(|i| {
                            if i % 2 == 0 {
                                normal.sample(&mut rng)
                            } else {
                                0.0
                            }
                        })
                        .collect()
                }
                Init::CemaTheta => cema_theta(&mut rng, s.numel()),
            })
            .collect()
    }

    /// Zero buffers, one per parameter (gradients, optimizer moments), allocated together
    /// ([`Backend::zeros_many`]: one arena on a device).
    pub fn zeros<B: Backend>(&self, be: &B) -> Vec<B::Buf> {
        let lens: Vec<usize> = self.specs.iter().map(ParamSpec::numel).collect();
        be.zeros_many(&lens)
    }

    /// Upload host values after checking their count against the layout, allocated together
    /// ([`Backend::upload_many`]: one arena on a device).
    pub fn upload<B: Backend>(&self, be: &B, host: &[Vec<f32>]) -> Vec<B::Buf> {
        assert_eq!(host.len(), self.specs.len());
        for (s, h) in self.specs.iter().zip(host) {
            assert_eq!(h.len(), s.numel(), "{}", s.name);
        }
        let slices: Vec<&[f32]> = host.iter().map(Vec::as_slice).collect();
        be.upload_many(&slices)
    }

    /// Download buffers as named host tensors (for checkpoints).
    pub fn download<B: Backend>(&self, be: &B, bufs: &[B::Buf]) -> Vec<HostTensor> {
        self.specs
            .iter()
            .zip(bufs)
            .map(|(s, b)| HostTensor {
                name: s.name.clone(),
                shape: s.shape.clone(),
                data: be.download(b),
            })
            .collect()
    }

    /// Match named host tensors to this layout by name, checking every shape; the error
    /// names the first missing, unexpected or mis-shaped tensor.
    pub fn host_from_named(&self, tensors: &[HostTensor]) -> Result<Vec<Vec<f32>>, String> {
        let mut out = Vec::with_capacity(self.specs.len());
        for s in &self.specs {
            let t = tensors
                .iter()
                .find(|t| t.name == s.name)
                .ok_or_else(|| format!("tensor '{}' is missing", s.name))?;
            if t.shape != s.shape {
                return Err(format!(
                    "tensor '{}' has shape {:?}, the config expects {:?}",
                    s.name, t.shape, s.shape
                ));
            }
            out.push(t.data.clone());
        }
        if let Some(extra) = tensors.iter().find(|t| self.index(&t.name).is_none()) {
            return Err(format!(
                "unexpected tensor '{}' for this config",
                extra.name
            ));
        }
        Ok(out)
    }
}

/// `n` draws of Normal(0, std), each redrawn until it lies within ±`cut`·std.
fn truncated_normal(rng: &mut impl rand::Rng, n: usize, std: f32, cut: f32) -> Vec<f32> {
    let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
    (0..n)
        .map(|_| loop {
            let z = normal.sample(rng);
            if z.abs() <= cut {
                break z * std;
            }
        })
        .collect()
}

/// CEMA base-angle logits: the frequencies `exp(−i·ln(d)/d)`, i = 1..d, which run from
/// about 1 down to 1/d, shuffled across channels and stored as logits so σ(theta) = f.
fn cema_theta(rng: &mut impl rand::Rng, d: usize) -> Vec<f32> {
    use rand::seq::SliceRandom;
    let ln_d = (d as f64).ln();
    let mut f: Vec<f64> = (1..=d)
        .map(|i| (-(i as f64) * ln_d / d as f64).exp())
        .collect();
    f.shuffle(rng);
    // A one-channel layer would get f = 1 exactly; keep its logit finite.
    f.iter()
        .map(|&f| {
            let f = f.min(1.0 - 1e-7);
            (f / (1.0 - f)).ln() as f32
        })
        .collect()
}

/// Distinct mutable elements of a slice (e.g. a norm's weight and bias gradients).
pub fn many_mut<T, const N: usize>(v: &mut [T], idx: [usize; N]) -> [&mut T; N] {
    v.get_disjoint_mut(idx).expect("distinct parameter indices")
}
