//! Per-shard rate limiting: two token buckets, Kinesis records and bytes, refilled continuously,
//! at a rate that adapts to throttling.
//!
//! The KPL limits each shard to `RateLimit`% (default 150) of its write limit, so that the service,
//! not the client, has the last word, while a shard is never flooded. Unlike the KPL's, this limiter
//! also applies when aggregation is off, and it slows down when the shard is throttled: a throttle
//! empties the buckets and cuts the shard's rate by a fifth (at most once per
//! [`CUT_INTERVAL`]); the rate then grows back by a tenth of the configured rate per second. At a
//! fixed 150 % a third of what is sent is refused, and retried records are refused again and again
//! (some until their time to live ran out, in a 60 s run); adapting, the shard settles just over
//! its real limit, and only itself slows down. Time is passed in, so the arithmetic is tested
//! without clocks.

use std::time::Duration;

use tokio::time::Instant;

/// One token bucket. Capacity is one second of rate; a cost larger than the capacity is allowed
/// from a full bucket (it goes into debt), so oversized entries are slowed, never stuck.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    rate_per_sec: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub(crate) fn new(rate_per_sec: f64, now: Instant) -> Self {
        Bucket { rate_per_sec, tokens: rate_per_sec, updated: now }
    }

    /// Refills at `scale` times the rate, up to one second of it.
    fn refill(&mut self, now: Instant, scale: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let rate = self.rate_per_sec * scale;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.updated = now;
    }

    /// How long until `cost` can be taken (zero: now).
    fn wait(&mut self, now: Instant, cost: f64, scale: f64) -> Duration {
        self.refill(now, scale);
        let rate = self.rate_per_sec * scale;
        let needed = cost.min(rate);
        if self.tokens >= needed { Duration::ZERO } else { Duration::from_secs_f64((needed - self.tokens) / rate) }
    }

    fn take(&mut self, cost: f64) {
        self.tokens -= cost;
    }

    fn drain(&mut self, now: Instant, scale: f64) {
        self.refill(now, scale);
        self.tokens = self.tokens.min(0.0);
    }
}

/// How much a throttle cuts the rate.
const CUT: f64 = 0.8;
/// At most one cut this often: one PutRecords response often carries many refusals of a shard.
pub(crate) const CUT_INTERVAL: Duration = Duration::from_millis(250);
/// How fast the rate grows back: a tenth of the configured rate per second.
const RECOVERY_PER_SEC: f64 = 0.1;
/// The rate never falls below this share of the configured one.
const MIN_SCALE: f64 = 0.05;

/// The two buckets of one shard.
#[derive(Clone, Debug)]
pub(crate) struct ShardLimiter {
    records: Bucket,
    bytes: Bucket,
    /// The share of the configured rate in force, in [MIN_SCALE, 1].
    scale: f64,
    scaled_at: Instant,
    cut_at: Option<Instant>,
}

impl ShardLimiter {
    /// Limits of `percent`% of `records_per_sec` and `bytes_per_sec`.
    pub(crate) fn new(percent: u32, records_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Self {
        let scale = f64::from(percent) / 100.0;
        ShardLimiter {
            records: Bucket::new(f64::from(records_per_sec) * scale, now),
            bytes: Bucket::new(f64::from(bytes_per_sec) * scale, now),
            scale: 1.0,
            scaled_at: now,
            cut_at: None,
        }
    }

    /// Grows the rate back towards the configured one.
    fn recover(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.scaled_at).as_secs_f64();
        // Refill at the old rate up to now, then change it.
        self.records.refill(now, self.scale);
        self.bytes.refill(now, self.scale);
        self.scale = (self.scale + elapsed * RECOVERY_PER_SEC).min(1.0);
        self.scaled_at = now;
    }

    /// Takes one record of `bytes` if both buckets allow it now; otherwise says how long to wait.
    pub(crate) fn try_take(&mut self, now: Instant, bytes: usize) -> Result<(), Duration> {
        self.recover(now);
        let wait = self.records.wait(now, 1.0, self.scale).max(self.bytes.wait(now, bytes as f64, self.scale));
        if wait.is_zero() {
            self.records.take(1.0);
            self.bytes.take(bytes as f64);
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// The service throttled this shard: empty both buckets, and cut the rate.
    pub(crate) fn throttled(&mut self, now: Instant) {
        self.recover(now);
        self.records.drain(now, self.scale);
        self.bytes.drain(now, self.scale);
        if self.cut_at.is_none_or(|at| now.saturating_duration_since(at) >= CUT_INTERVAL) {
            self.scale = (self.scale * CUT).max(MIN_SCALE);
            self.cut_at = Some(now);
        }
    }

    /// The share of the configured rate in force.
    #[cfg(test)]
    pub(crate) fn scale(&self) -> f64 {
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_second_of_tokens_then_the_rate() {
        let t0 = Instant::now();
        // 150 % of 1,000 records/s: 1,500 at once, then one every 1/1500 s.
        let mut limiter = ShardLimiter::new(150, 1_000, 1 << 20, t0);
        for _ in 0..1_500 {
            assert!(limiter.try_take(t0, 10).is_ok());
        }
        let wait = limiter.try_take(t0, 10).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0 / 1_500.0).abs() < 1e-6, "{wait:?}");
        assert!(limiter.try_take(t0 + Duration::from_millis(1), 10).is_ok());
    }

    #[test]
    fn bytes_limit_separately() {
        let t0 = Instant::now();
        let mut limiter = ShardLimiter::new(100, 1_000, 1_000_000, t0);
        assert!(limiter.try_take(t0, 600_000).is_ok());
        let wait = limiter.try_take(t0, 600_000).unwrap_err();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        assert!(limiter.try_take(t0 + Duration::from_millis(200), 600_000).is_ok());
    }

    #[test]
    fn an_entry_larger_than_the_capacity_goes_from_a_full_bucket() {
        let t0 = Instant::now();
        let mut limiter = ShardLimiter::new(100, 1_000, 1_000_000, t0);
        assert!(limiter.try_take(t0, 3_000_000).is_ok());
        // 2 MB of debt plus a full second for the next one.
        let wait = limiter.try_take(t0, 1).unwrap_err();
        assert!((wait.as_secs_f64() - 2.000001).abs() < 1e-3, "{wait:?}");
    }

    #[test]
    fn throttling_empties_the_buckets() {
        let t0 = Instant::now();
        let mut limiter = ShardLimiter::new(150, 1_000, 1 << 20, t0);
        limiter.throttled(t0);
        assert!(limiter.try_take(t0, 1).is_err());
        assert!(limiter.try_take(t0 + Duration::from_millis(10), 1).is_ok());
    }

    #[test]
    fn throttling_cuts_the_rate_once_per_interval_and_it_grows_back() {
        let t0 = Instant::now();
        let mut limiter = ShardLimiter::new(100, 1_000, 1 << 20, t0);
        // A response refusing many entries cuts once.
        for _ in 0..10 {
            limiter.throttled(t0);
        }
        assert!((limiter.scale() - 0.8).abs() < 1e-9, "{}", limiter.scale());
        // 1,000 records/s cut to 800: after the drain, 100 ms gives 80 records, not 100.
        let t1 = t0 + Duration::from_millis(100);
        let taken = (0..200).take_while(|_| limiter.try_take(t1, 1).is_ok()).count();
        assert!((79..=82).contains(&taken), "{taken}");
        // Another throttle later cuts again (after 250 ms of recovery: 0.825 x 0.8); then the
        // rate recovers at 10 % a second.
        limiter.throttled(t0 + CUT_INTERVAL);
        assert!((limiter.scale() - 0.66).abs() < 1e-6, "{}", limiter.scale());
        let _ = limiter.try_take(t0 + CUT_INTERVAL + Duration::from_secs(2), 1);
        assert!((limiter.scale() - 0.86).abs() < 1e-6, "{}", limiter.scale());
        let _ = limiter.try_take(t0 + Duration::from_secs(30), 1);
        assert_eq!(limiter.scale(), 1.0, "back to the configured rate, no higher");
    }
}
