//! Pieces the consumer examples share (`mod support;` in each; not an example of its own).

use std::process::ExitCode;
use std::time::Duration;

use kinesis::consumer::{InitialPosition, Scheduler};
use tokio::time::Instant;

/// `--from`: where shards never read before start.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StartFrom {
    /// The oldest record in the shard.
    TrimHorizon,
    /// Only records written from now on.
    Latest,
}

impl StartFrom {
    /// The consumer's initial position.
    pub fn position(self) -> InitialPosition {
        match self {
            StartFrom::TrimHorizon => InitialPosition::TrimHorizon,
            StartFrom::Latest => InitialPosition::Latest,
        }
    }
}

/// `--idle-exit SECS` as a duration; the message names the bad value.
pub fn idle_limit(secs: Option<f64>) -> Result<Option<Duration>, String> {
    secs.map(|secs| {
        Duration::try_from_secs_f64(secs).map_err(|_| format!("--idle-exit {secs}: not a number of seconds"))
    })
    .transpose()
}

/// The exit code of an example's run; an error is printed as `name: error: cause: ...`.
pub fn exit_code<E: std::error::Error>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            eprintln!("{name}: {message}");
            ExitCode::FAILURE
        }
    }
}

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
