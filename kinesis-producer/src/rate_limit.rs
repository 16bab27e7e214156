//! Per-shard rate limiting: two token buckets, Kinesis records and bytes, refilled continuously.
//!
//! The KPL limits each shard to `RateLimit`% (default 150) of its write limit, so that the service,
//! not the client, has the last word, while a shard is never flooded. Unlike the KPL's, this limiter
//! also applies when aggregation is off. A throttled shard empties its own buckets, slowing only
//! itself. Time is passed in, so the arithmetic is tested without clocks.

use std::time::Duration;

use tokio::time::Instant;

/// One token bucket. Capacity is one second of rate; a cost larger than the capacity is allowed
/// from a full bucket (it goes into debt), so oversized entries are slowed, never stuck.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    rate_per_sec: f64,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub(crate) fn new(rate_per_sec: f64, now: Instant) -> Self {
        Bucket { rate_per_sec, capacity: rate_per_sec, tokens: rate_per_sec, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.capacity);
        self.updated = now;
    }

    /// How long until `cost` can be taken (zero: now).
    fn wait(&mut self, now: Instant, cost: f64) -> Duration {
        self.refill(now);
        let needed = cost.min(self.capacity);
        if self.tokens >= needed {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((needed - self.tokens) / self.rate_per_sec)
        }
    }

    fn take(&mut self, cost: f64) {
        self.tokens -= cost;
    }

    fn drain(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }
}

/// The two buckets of one shard.
#[derive(Clone, Debug)]
pub(crate) struct ShardLimiter {
    records: Bucket,
    bytes: Bucket,
}

impl ShardLimiter {
    /// Limits of `percent`% of `records_per_sec` and `bytes_per_sec`.
    pub(crate) fn new(percent: u32, records_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Self {
        let scale = f64::from(percent) / 100.0;
        ShardLimiter {
            records: Bucket::new(f64::from(records_per_sec) * scale, now),
            bytes: Bucket::new(f64::from(bytes_per_sec) * scale, now),
        }
    }

    /// Takes one record of `bytes` if both buckets allow it now; otherwise says how long to wait.
    pub(crate) fn try_take(&mut self, now: Instant, bytes: usize) -> Result<(), Duration> {
        let wait = self.records.wait(now, 1.0).max(self.bytes.wait(now, bytes as f64));
        if wait.is_zero() {
            self.records.take(1.0);
            self.bytes.take(bytes as f64);
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// The service throttled this shard: empty both buckets so it waits before sending more.
    pub(crate) fn throttled(&mut self, now: Instant) {
        self.records.drain(now);
        self.bytes.drain(now);
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
}
