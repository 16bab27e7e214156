//! A user record from `put` until it is resolved: what the pipeline carries for each.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kinesis_aggregation::UserRecord;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;

use crate::attempt::{Attempt, Attempts};
use crate::error::DeliveryError;
use crate::receipt::Receipt;

/// A buffered user record and everything needed to resolve it.
pub(crate) struct Pending {
    pub(crate) record: UserRecord,
    /// The hash key Kinesis routes it by (worked out by `put`, on the caller's task).
    pub(crate) hash_key: u128,
    /// Partition key + data, in bytes.
    pub(crate) size: usize,
    pub(crate) reply: oneshot::Sender<Result<Receipt, DeliveryError>>,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Instant,
    /// Failed attempts and the backoff, from the first failure on (most records never need it;
    /// boxed, it keeps the record small to move).
    pub(crate) retry: Option<Box<Retry>>,
    /// Buffer space, given back when the record is resolved (dropped).
    pub(crate) _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A record's history of failures.
#[derive(Default)]
pub(crate) struct Retry {
    attempts: Vec<Attempt>,
    backoff: Option<ExponentialBackoff>,
}

impl Pending {
    /// Notes a failed attempt.
    pub(crate) fn failed_attempt(&mut self, attempt: Attempt) {
        self.retry.get_or_insert_default().attempts.push(attempt);
    }

    /// The wait before the next try, from the record's own backoff.
    pub(crate) fn next_backoff(&mut self, backoff: &ExponentialBuilder) -> Option<Duration> {
        self.retry.get_or_insert_default().backoff.get_or_insert_with(|| backoff.build()).next()
    }

    /// The error code of the last failed attempt.
    pub(crate) fn last_code(&self) -> Option<String> {
        self.retry.as_ref()?.attempts.last()?.error_code.clone()
    }

    /// The attempts so far.
    pub(crate) fn take_attempts(&mut self) -> Attempts {
        Attempts::from_vec(self.retry.take().map(|r| r.attempts).unwrap_or_default())
    }
}

/// What a user record counts against the stream's record limit: partition key + data, in bytes.
pub(crate) fn record_size(record: &UserRecord) -> usize {
    record.partition_key.len() + record.data.len()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use tokio::sync::Semaphore;

    use super::*;

    /// A buffered record for unit tests (its receipt is dropped), due in 30 s.
    pub(crate) fn pending(key: &str) -> Pending {
        let record = UserRecord::new(key.to_owned(), "data");
        let permits = Arc::new(Semaphore::new(2));
        let (reply, _) = oneshot::channel();
        Pending {
            hash_key: record.hash_key().0,
            size: record_size(&record),
            record,
            reply,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(30),
            retry: None,
            _permits: (permits.clone().try_acquire_owned().unwrap(), permits.try_acquire_owned().unwrap()),
        }
    }

    #[test]
    fn a_record_keeps_its_failed_attempts_and_its_own_backoff() {
        let mut member = pending("k");
        assert_eq!(member.last_code(), None);
        assert!(member.retry.is_none(), "nothing allocated before the first failure");
        let failed = |code: &str| Attempt {
            at: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            error_code: Some(code.into()),
        };
        member.failed_attempt(failed("A"));
        member.failed_attempt(failed("B"));
        assert_eq!(member.last_code().as_deref(), Some("B"));
        let builder = ExponentialBuilder::new().with_min_delay(Duration::from_millis(100)).with_factor(2.0);
        let waits: Vec<u128> = (0..3).filter_map(|_| member.next_backoff(&builder)).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [100, 200, 400], "the backoff goes on from try to try");
        let attempts = member.take_attempts();
        assert_eq!(attempts.iter().map(|a| a.error_code.as_deref().unwrap()).collect::<Vec<_>>(), ["A", "B"]);
        assert!(member.take_attempts().is_empty());
    }
}
