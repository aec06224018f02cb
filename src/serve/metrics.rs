//! Engine and HTTP metrics as shared atomics, rendered in the Prometheus text exposition
//! format (version 0.0.4). Hand-rolled: a dozen counters, gauges and two histograms do not
//! justify a registry crate.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::infer::generate::FinishReason;

/// Window over which `mega_generated_bytes_per_second` is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A histogram with fixed upper bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the +Inf bucket (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

const TTFB_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const PER_BYTE_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Why the engine refused a submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Queue full (429).
    QueueFull,
    /// Prompt too long (400).
    PromptTooLong,
    /// Bad parameter (400).
    Invalid,
    /// Shutting down (503).
    ShuttingDown,
}

/// How a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished with a finish reason.
    Finished(FinishReason),
    /// Its handle was dropped.
    Cancelled,
    /// Aborted with an error (shutdown).
    Error,
}

/// Every counter and gauge of the engine, plus the HTTP layer's, shared by reference.
#[derive(Debug)]
pub struct Metrics {
    /// Requests waiting for admission.
    pub queue_depth: AtomicU64,
    /// Sequences holding a decode slot.
    pub running: AtomicU64,
    /// Bytes sampled by the model (including stop sequences and withheld bytes).
    pub generated_bytes: AtomicU64,
    /// Cache blocks in use (MEGABYTE: KV pages; MEGALODON: stream slots).
    pub cache_blocks_used: AtomicU64,
    /// Cache blocks in all.
    pub cache_blocks_total: AtomicU64,
    /// Scheduler steps run.
    pub steps: AtomicU64,
    /// Requests accepted into the queue.
    pub submitted: AtomicU64,
    /// Sequences evicted under memory pressure and requeued for recomputation.
    pub preemptions: AtomicU64,
    /// Time from submission to the first released byte.
    pub ttfb: Histogram,
    /// Time between consecutive sampled bytes of a sequence.
    pub per_byte: Histogram,
    rejections: [AtomicU64; 4],
    outcomes: [AtomicU64; 4],
    http_status: [AtomicU64; 5],
    rate_samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self {
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            generated_bytes: AtomicU64::new(0),
            cache_blocks_used: AtomicU64::new(0),
            cache_blocks_total: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            submitted: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            ttfb: Histogram::new(TTFB_BOUNDS),
            per_byte: Histogram::new(PER_BYTE_BOUNDS),
            rejections: Default::default(),
            outcomes: Default::default(),
            http_status: Default::default(),
            rate_samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a refused submission.
    pub fn record_rejection(&self, why: Rejection) {
        self.rejections[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refused submissions of one kind so far.
    pub fn rejections(&self, why: Rejection) -> u64 {
        self.rejections[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a finished, cancelled or aborted sequence.
    pub fn record_outcome(&self, outcome: Outcome) {
        self.outcomes[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    /// Sequences that ended this way so far.
    pub fn outcomes(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome_index(outcome)].load(Ordering::Relaxed)
    }

    /// Counts one HTTP response by status class (1xx..5xx); for the HTTP layer.
    pub fn record_http_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.http_status[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds sampled bytes and a throughput sample.
    pub fn add_generated(&self, bytes: u64) {
        let total = self.generated_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let now = Instant::now();
        let mut s = self.rate_samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((now, total));
        while s.len() > 2 && now.duration_since(s[1].0) > RATE_WINDOW {
            s.pop_front();
        }
    }

    /// Sampled bytes per second over the last ~10 s (0 when idle that long).
    pub fn bytes_per_second(&self) -> f64 {
        let s = self.rate_samples.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(&(t0, b0)), Some(&(t1, b1))) = (s.front(), s.back()) else {
            return 0.0;
        };
        if Instant::now().duration_since(t1) > RATE_WINDOW {
            return 0.0;
        }
        let dt = t1.duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            return 0.0;
        }
        (b1 - b0) as f64 / dt
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut o,
            "mega_queue_depth",
            "Requests waiting for admission.",
            load(&self.queue_depth) as f64,
        );
        gauge(
            &mut o,
            "mega_running_sequences",
            "Sequences in the decode batch.",
            load(&self.running) as f64,
        );
        counter(
            &mut o,
            "mega_generated_bytes_total",
            "Bytes sampled by the model.",
            load(&self.generated_bytes),
        );
        gauge(
            &mut o,
            "mega_generated_bytes_per_second",
            "Sampled bytes per second over the last 10 s.",
            self.bytes_per_second(),
        );
        let used = load(&self.cache_blocks_used);
        let total = load(&self.cache_blocks_total);
        gauge(
            &mut o,
            "mega_cache_blocks_used",
            "Cache blocks in use (KV pages or stream slots).",
            used as f64,
        );
        gauge(
            &mut o,
            "mega_cache_blocks_total",
            "Cache blocks in all.",
            total as f64,
        );
        let util = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        gauge(
            &mut o,
            "mega_cache_utilization",
            "Fraction of cache blocks in use.",
            util,
        );
        counter(
            &mut o,
            "mega_scheduler_steps_total",
            "Scheduler steps run.",
            load(&self.steps),
        );
        counter(
            &mut o,
            "mega_requests_submitted_total",
            "Requests accepted into the queue.",
            load(&self.submitted),
        );
        counter(
            &mut o,
            "mega_preemptions_total",
            "Sequences evicted under cache pressure and requeued.",
            load(&self.preemptions),
        );
        counter(
            &mut o,
            "mega_cancellations_total",
            "Sequences whose client went away.",
            self.outcomes(Outcome::Cancelled),
        );
        let _ = writeln!(
            o,
            "# HELP mega_rejections_total Submissions refused, by reason."
        );
        let _ = writeln!(o, "# TYPE mega_rejections_total counter");
        for (why, name) in [
            (Rejection::QueueFull, "queue_full"),
            (Rejection::PromptTooLong, "prompt_too_long"),
            (Rejection::Invalid, "invalid"),
            (Rejection::ShuttingDown, "shutting_down"),
        ] {
            let _ = writeln!(
                o,
                "mega_rejections_total{{reason=\"{name}\"}} {}",
                self.rejections(why)
            );
        }
        let _ = writeln!(
            o,
            "# HELP mega_requests_finished_total Sequences ended, by finish reason."
        );
        let _ = writeln!(o, "# TYPE mega_requests_finished_total counter");
        for (outcome, name) in [
            (Outcome::Finished(FinishReason::Stop), "stop"),
            (Outcome::Finished(FinishReason::Length), "length"),
            (Outcome::Cancelled, "cancelled"),
            (Outcome::Error, "error"),
        ] {
            let _ = writeln!(
                o,
                "mega_requests_finished_total{{finish_reason=\"{name}\"}} {}",
                self.outcomes(outcome)
            );
        }
        self.ttfb.render(
            &mut o,
            "mega_time_to_first_byte_seconds",
            "Time from submission to the first released byte.",
        );
        self.per_byte.render(
            &mut o,
            "mega_per_byte_latency_seconds",
            "Time between consecutive sampled bytes of a sequence.",
        );
        let _ = writeln!(
            o,
            "# HELP mega_http_requests_total HTTP responses, by status class."
        );
        let _ = writeln!(o, "# TYPE mega_http_requests_total counter");
        for (i, c) in self.http_status.iter().enumerate() {
            let _ = writeln!(
                o,
                "mega_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                load(c)
            );
        }
        o
    }
}

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Finished(FinishReason::Stop) => 0,
        Outcome::Finished(FinishReason::Length) => 1,
        Outcome::Cancelled => 2,
        Outcome::Error => 3,
    }
}

fn gauge(o: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.ttfb.observe(Duration::from_millis(3));
        m.ttfb.observe(Duration::from_millis(30));
        m.ttfb.observe(Duration::from_secs(100));
        let text = m.render();
        assert!(text.contains("mega_time_to_first_byte_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("mega_time_to_first_byte_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("mega_time_to_first_byte_seconds_bucket{le=\"60\"} 2\n"));
        assert!(text.contains("mega_time_to_first_byte_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("mega_time_to_first_byte_seconds_count 3\n"));
    }

    #[test]
    fn http_status_classes_and_outcomes_are_counted() {
        let m = Metrics::new();
        m.record_http_status(200);
        m.record_http_status(204);
        m.record_http_status(429);
        m.record_outcome(Outcome::Finished(FinishReason::Stop));
        m.record_rejection(Rejection::QueueFull);
        let text = m.render();
        assert!(text.contains("mega_http_requests_total{class=\"2xx\"} 2\n"));
        assert!(text.contains("mega_http_requests_total{class=\"4xx\"} 1\n"));
        assert!(text.contains("mega_requests_finished_total{finish_reason=\"stop\"} 1\n"));
        assert!(text.contains("mega_rejections_total{reason=\"queue_full\"} 1\n"));
    }
}
