//! Learning-rate schedule: linear warmup, then cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// Errors from an inconsistent schedule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A learning rate that is negative or not finite.
    #[error("{field} must be a finite number >= 0, got {value}")]
    InvalidRate {
        /// "max_lr" or "min_lr".
        field: &'static str,
        /// The rejected value.
        value: f32,
    },
    /// The floor lies above the peak.
    #[error("min_lr ({min_lr}) must not exceed max_lr ({max_lr})")]
    FloorAbovePeak {
        /// The floor.
        min_lr: f32,
        /// The peak.
        max_lr: f32,
    },
}

/// Linear warmup from `max_lr / warmup_steps` to `max_lr` over the first `warmup_steps` steps,
/// then cosine decay from `max_lr` to `min_lr`, reached at `total_steps`; `min_lr` afterwards.
///
/// Steps are 0-based: step `s < warmup_steps` gets `max_lr * (s + 1) / warmup_steps`, and step
/// `s` in `[warmup_steps, total_steps)` gets
/// `min_lr + (max_lr - min_lr) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warmup.
    pub max_lr: f32,
    /// Floor reached at `total_steps`.
    pub min_lr: f32,
    /// Steps of linear warmup (0: start at the peak).
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr`.
    pub total_steps: u64,
}

impl LrSchedule {
    /// Checks that both rates are finite, non-negative and `min_lr <= max_lr`.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        for (field, value) in [("max_lr", self.max_lr), ("min_lr", self.min_lr)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ScheduleError::InvalidRate { field, value });
            }
        }
        if self.min_lr > self.max_lr {
            return Err(ScheduleError::FloorAbovePeak {
                min_lr: self.min_lr,
                max_lr: self.max_lr,
            });
        }
        Ok(())
    }

    /// The learning rate for 0-based optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        let max_lr = f64::from(self.max_lr);
        let min_lr = f64::from(self.min_lr);
        if step < self.warmup_steps {
            return (max_lr * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        // Here warmup_steps <= step < total_steps, so the decay span is at least one step.
        let progress =
            (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (min_lr + (max_lr - min_lr) * cosine) as f32
    }
}
