//! Latencies of a load run (put -> acknowledged, put -> processed) in an HDR histogram, and their
//! summary: min, mean, p50, p90, p99, max.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The longest latency told apart: 1 hour, in microseconds.
const MAX_MICROS: u64 = 3_600_000_000;

/// Latencies in microseconds, 1 µs to 1 hour (longer ones count as 1 hour), to 3 significant
/// digits.
#[derive(Clone, Debug)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // Valid by the crate's rules: low >= 1, high >= 2 x low, 0 to 5 significant digits.
        Latencies(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid bounds"))
    }
}

impl Latencies {
    /// Adds one latency.
    pub fn record(&mut self, latency: Duration) {
        self.0.saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds one latency known to the millisecond.
    pub fn record_ms(&mut self, ms: u32) {
        self.0.saturating_record(u64::from(ms) * 1_000);
    }

    /// How many latencies.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The summary, in milliseconds; `None` when empty.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1_000.0;
        Some(LatencySummary {
            count: self.0.len(),
            min: ms(self.0.min()),
            mean: self.0.mean() / 1_000.0,
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            max: ms(self.0.max()),
        })
    }
}

/// Latency figures, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencySummary {
    /// How many records.
    pub count: u64,
    /// The least.
    pub min: f64,
    /// The mean.
    pub mean: f64,
    /// The median.
    pub p50: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The most.
    pub max: f64,
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "min {:.1} / mean {:.1} / p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms ({} records)",
            self.min, self.mean, self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_spread() {
        let mut latencies = Latencies::default();
        assert!(latencies.summary().is_none());
        for ms in 1..=1_000u64 {
            latencies.record(Duration::from_millis(ms));
        }
        latencies.record_ms(2_000);
        let s = latencies.summary().unwrap();
        assert_eq!(s.count, 1_001);
        assert!((s.min - 1.0).abs() < 0.01 && (s.max - 2_000.0).abs() < 2.0, "{s}");
        for (got, want) in [(s.p50, 501.0), (s.p90, 901.0), (s.p99, 991.0)] {
            assert!((got - want).abs() <= want * 0.002, "{got} vs {want}: {s}");
        }
        assert!((s.mean - 501.5).abs() < 1.0, "{s}");
        assert!(s.to_string().starts_with("min 1.0 / mean"), "{s}");
    }
}
