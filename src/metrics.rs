//! Counters and histograms, cheap to update from any thread, rendered in the Prometheus
//! text format.
//!
//! Each layer keeps its own metrics (the log its fsync latencies and group-commit sizes,
//! the store its appends and plugin timings); [`Store::metrics_text`] gathers them.
//!
//! [`Store::metrics_text`]: crate::store::Store::metrics_text

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed bucket bounds (cumulative on rendering, as Prometheus wants).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

/// Bucket bounds for latencies in microseconds: 10 us to 10 s.
pub const LATENCY_US_BOUNDS: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 10_000_000,
];
/// Bucket bounds for sizes (records per group commit, events per append).
pub const SIZE_BOUNDS: &[u64] = &[
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 4_096, 16_384, 65_536,
];

impl Histogram {
    /// An empty histogram with these upper bounds (increasing).
    pub fn new(bounds: &'static [u64]) -> Self {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "bounds must increase"
        );
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// Renders `name` with its `_bucket`, `_sum` and `_count` series.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum());
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }
}

/// Renders one counter or gauge line with its HELP and TYPE.
pub fn render_value(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Escapes a label value for the Prometheus text format.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 5, 50, 500] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x_us", "help", "");
        assert!(out.contains("x_us_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_us_bucket{le=\"10\"} 3\n"));
        assert!(out.contains("x_us_bucket{le=\"100\"} 4\n"));
        assert!(out.contains("x_us_bucket{le=\"+Inf\"} 5\n"));
        assert!(out.contains("x_us_sum 556\n"));
        assert!(out.contains("x_us_count 5\n"));
        let mut out = String::new();
        h.render(&mut out, "y", "help", "plugin=\"a\"");
        assert!(out.contains("y_bucket{plugin=\"a\",le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("y_count{plugin=\"a\"} 5\n"));
    }
}
