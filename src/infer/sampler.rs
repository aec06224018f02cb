//! Next-byte sampling: greedy, temperature, top-k and nucleus (top-p), reproducible per seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Rejected sampling parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature negative or not finite.
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {value}")]
    Temperature {
        /// The rejected value.
        value: f32,
    },
    /// top_p outside (0, 1].
    #[error("top_p must be in (0, 1] (1 = off), got {value}")]
    TopP {
        /// The rejected value.
        value: f32,
    },
}

/// How to turn logits into a byte.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely byte (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely bytes; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely bytes whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges: temperature finite and >= 0, top_p in (0, 1].
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature {
                value: self.temperature,
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP { value: self.top_p });
        }
        Ok(())
    }

    /// True when sampling is deterministic argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Draws tokens from logits with fixed parameters and a seeded ChaCha stream: the same seed and
/// the same logits give the same sequence of draws. Each non-greedy draw consumes exactly one
/// random number, greedy draws none.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `params` (validated), with its random stream seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        })
    }

    /// The parameters this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token index from `logits` (one per vocabulary entry; NaN counts as -inf).
    ///
    /// Temperature 0 returns the argmax (lowest index on ties). Otherwise the draw is from
    /// `softmax(logits / T)` restricted by top-k and then top-p and renormalized (see
    /// [`Self::probabilities`]). Logits that are all -inf/NaN give index 0.
    ///
    /// Panics on empty `logits` (a caller bug).
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        assert!(!logits.is_empty(), "sampling from an empty logit vector");
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let kept = self.kept_weights(logits);
        let Some(last) = kept.last() else {
            return argmax(logits);
        };
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        let target = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0;
        for &(index, weight) in &kept {
            cumulative += weight;
            if target < cumulative {
                return index;
            }
        }
        // Only reachable through rounding in the running sum.
        last.0
    }

    /// The distribution [`Self::sample`] draws from, one probability per logit (zero for
    /// filtered-out entries). Greedy parameters give a one-hot vector at the argmax.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        let mut probs = vec![0.0f32; logits.len()];
        if logits.is_empty() {
            return probs;
        }
        let kept = if self.params.is_greedy() {
            Vec::new()
        } else {
            self.kept_weights(logits)
        };
        if kept.is_empty() {
            probs[argmax(logits)] = 1.0;
            return probs;
        }
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        for (index, weight) in kept {
            probs[index] = (weight / total) as f32;
        }
        probs
    }

    /// The (index, unnormalized weight) pairs that survive temperature, top-k and top-p, most
    /// likely first when a filter is active. Empty when no logit is usable.
    fn kept_weights(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        let max = logits
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Vec::new();
        }
        if max == f32::INFINITY {
            // An infinite logit takes all the mass; ties go to the lowest index.
            return vec![(argmax(logits), 1.0)];
        }
        let inv_t = 1.0 / f64::from(self.params.temperature);
        let mut weights: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_nan())
            .map(|(i, &x)| (i, ((f64::from(x) - f64::from(max)) * inv_t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        let top_k_active = self.params.top_k > 0 && self.params.top_k < weights.len();
        let top_p_active = self.params.top_p < 1.0;
        if !(top_k_active || top_p_active) {
            return weights;
        }
        // Stable sort: equal weights stay in index order, so ties keep the lower index.
        weights.sort_by(|a, b| b.1.total_cmp(&a.1));
        if top_k_active {
            weights.truncate(self.params.top_k);
        }
        if top_p_active {
            let total: f64 = weights.iter().map(|&(_, w)| w).sum();
            let threshold = f64::from(self.params.top_p) * total;
            let mut cumulative = 0.0;
            let mut keep = weights.len();
            for (n, &(_, w)) in weights.iter().enumerate() {
                cumulative += w;
                if cumulative >= threshold {
                    keep = n + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        weights
    }
}

/// Index of the largest logit, the lowest index on ties; NaN never wins (all NaN gives 0).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_value {
            best = i;
            best_value = x;
        }
    }
    best
}

/// Log-softmax of `logits`, computed stably in f64: `logits[i] - log(sum_j exp(logits[j]))`.
/// Entries of -inf get -inf. When the largest logit is not finite (all -inf, or a +inf present)
/// there is no meaningful normalizer and the result is all -inf.
pub fn log_probs(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let log_normalizer = max + sum.ln();
    logits
        .iter()
        .map(|&x| (f64::from(x) - log_normalizer) as f32)
        .collect()
}
