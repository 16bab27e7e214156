//! Pieces the consumer examples share (`mod support;` in each; not an example of its own).

use std::time::Duration;

use kinesis::consumer::Scheduler;
use tokio::time::Instant;

/// The `--idle-exit` rule: once the worker has held a lease, and every shard it holds has been
/// read, no record for the given time.
pub struct Idle {
    limit: Option<Duration>,
    held_once: bool,
    records: u64,
    quiet_since: Instant,
}

impl Idle {
    /// Never idle when `limit` is `None`.
    pub fn new(limit: Option<Duration>) -> Self {
        Idle { limit, held_once: false, records: 0, quiet_since: Instant::now() }
    }

    /// Whether it is time to stop.
    pub fn poll(&mut self, scheduler: &Scheduler) -> bool {
        let Some(limit) = self.limit else { return false };
        let held = scheduler.held_leases();
        let metrics = scheduler.metrics();
        self.held_once |= !held.is_empty();
        let read = held.iter().all(|shard| metrics.millis_behind_latest.contains_key(shard));
        if !self.held_once || !read || metrics.records_processed != self.records {
            self.records = metrics.records_processed;
            self.quiet_since = Instant::now();
        }
        self.quiet_since.elapsed() >= limit
    }
}
