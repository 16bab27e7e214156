//! What comes back from a PutRecords call: receipts for what was stored, retries with backoff for
//! what may succeed later, and failures (with the record handed back) for the rest.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Engine;
use crate::attempt::Attempt;
use crate::confirm::Parked;
use crate::entry::Entry;
use crate::error::{DeliveryError, ErrorKind};
use crate::pending::Pending;
use crate::sender::{Response, Unresolved};
use crate::transport::{CallError, EntryResult};

impl Engine {
    pub(super) fn on_response(&mut self, response: Response) {
        self.in_flight -= 1;
        let now = Instant::now();
        let Response { shards, delivered, map_out_of_date, unresolved, to_confirm, at, duration } = response;
        self.outstanding -= delivered;
        let after = self.confirmations.next_after();
        for (entry, shard_id, sequence_number) in to_confirm {
            let parked = Parked { entry, shard_id, sequence_number, after, at, duration };
            self.confirmations.park(parked, self.config.ordering);
        }
        for shard in &shards {
            // Ordering mode: a shard whose aggregate waits for its listing stays busy.
            if self.config.ordering && self.confirmations.holds_shard(shard) {
                continue;
            }
            if let Some(state) = self.shards.get_mut(shard) {
                state.busy = false;
            }
        }
        if map_out_of_date {
            self.shard_map.out_of_date(now);
        }
        match unresolved {
            Unresolved::Call(error, entries) => self.on_call_failed(error, entries, at, duration, now),
            Unresolved::Entries(entries) => {
                for (entry, result) in entries {
                    match result {
                        EntryResult::Stored { shard_id, .. } => {
                            // An aggregate on a shard it was not built for (the stream was
                            // resharded): a KCL reader drops it whole when any sub-record is
                            // outside the shard. Send every member again, routed by a fresh map.
                            tracing::debug!(predicted = %entry.shard, actual = %shard_id, "aggregate landed on another shard");
                            self.shard_map.out_of_date(now);
                            self.metrics.error(STALE_SHARD_MAP, entry.members.len() as u64);
                            for mut member in entry.members {
                                member.failed_attempt(Attempt {
                                    at,
                                    duration,
                                    error_code: Some(STALE_SHARD_MAP.into()),
                                });
                                self.retry_or_fail(member, ErrorKind::Transient, now);
                            }
                        }
                        EntryResult::Failed { code } => {
                            let kind = ErrorKind::of_code(&code);
                            self.metrics.error(&code, 1);
                            if kind == ErrorKind::Throttled
                                && let Some(state) = self.shards.get_mut(&entry.shard)
                            {
                                state.limiter.throttled(now);
                            }
                            self.entry_failed(entry, kind, &code, at, duration, now);
                        }
                    }
                }
            }
        }
    }

    /// A whole PutRecords call failed.
    ///
    /// - ResourceNotFound: the stream is gone (deleted, perhaps to be created again under the
    ///   same name, with other shards behind the same ids): the shard map is out of date.
    /// - A call the service refused as invalid (ValidationException, InvalidArgument): one entry
    ///   can make the service refuse every entry of a call (a record over the stream's limit).
    ///   The call is sent again in halves until the entry it refuses is alone; that one fails with
    ///   the service's message, the others are delivered. An aggregate refused alone is sent
    ///   again as its records, each plain.
    fn on_call_failed(
        &mut self,
        error: CallError,
        entries: Vec<Entry>,
        at: SystemTime,
        duration: Duration,
        now: Instant,
    ) {
        let code = error.code.clone().unwrap_or_else(|| format!("{:?}", error.kind));
        self.metrics.error(&code, entries.iter().map(|e| e.members.len() as u64).sum());
        tracing::debug!(kind = ?error.kind, %code, message = %error.message, entries = entries.len(), "PutRecords call failed");
        if error.kind == ErrorKind::NotFound {
            self.shard_map.out_of_date(now);
        }
        if error.kind != ErrorKind::InvalidInput {
            for entry in entries {
                self.entry_failed(entry, error.kind, &code, at, duration, now);
            }
            return;
        }
        let mut entries = entries;
        for entry in &mut entries {
            for member in &mut entry.members {
                member.failed_attempt(Attempt { at, duration, error_code: Some(code.clone()) });
            }
        }
        let parts: Vec<Vec<Entry>> = match entries.len() {
            0 => Vec::new(),
            1 if entries[0].members.len() > 1 => {
                let Some(entry) = entries.pop() else { return };
                let shard = entry.shard.clone();
                vec![entry.members.into_iter().map(|m| Entry::plain(&self.config, shard.clone(), m)).collect()]
            }
            1 => {
                for entry in entries {
                    for member in entry.members {
                        self.fail_with(member, error.kind, Some(code.clone()), Some(error.message.clone()));
                    }
                }
                return;
            }
            n => {
                let second = entries.split_off(n / 2);
                vec![entries, second]
            }
        };
        for part in parts {
            if self.config.ordering {
                for entry in &part {
                    if let Some(state) = self.shards.get_mut(&entry.shard) {
                        state.busy = true;
                    }
                }
            }
            self.splits.push_back(part);
        }
    }

    /// A parked aggregate that no listing confirmed before a member's deadline: the expired
    /// members fail, the others are sent again (they may then be stored twice: at least once).
    pub(super) fn unpark_unconfirmed(&mut self, parked: Parked, now: Instant) {
        let Parked { entry, at, duration, .. } = parked;
        self.unbusy_if_unparked(&entry.shard);
        for mut member in entry.members {
            member.failed_attempt(Attempt { at, duration, error_code: Some(UNCONFIRMED.into()) });
            self.retry_or_fail(member, ErrorKind::Transient, now);
        }
    }

    /// Ordering mode: a shard whose last parked aggregate was judged may send again.
    pub(super) fn unbusy_if_unparked(&mut self, shard: &Arc<str>) {
        if self.config.ordering
            && !self.confirmations.holds_shard(shard)
            && let Some(state) = self.shards.get_mut(shard)
        {
            state.busy = false;
        }
    }

    /// An entry was refused: its records are retried (or fail). In ordering mode the entry keeps
    /// its place at the head of its shard, which waits for the backoff.
    pub(super) fn entry_failed(
        &mut self,
        mut entry: Entry,
        kind: ErrorKind,
        code: &str,
        at: SystemTime,
        duration: Duration,
        now: Instant,
    ) {
        for member in &mut entry.members {
            member.failed_attempt(Attempt { at, duration, error_code: Some(code.to_owned()) });
        }
        if self.config.ordering && kind.is_retryable() {
            let delay = entry
                .members
                .first_mut()
                .and_then(|m| m.next_backoff(&self.backoff))
                .unwrap_or(self.config.backoff_max);
            let delay = retry_delay(kind, delay);
            let shard = entry.shard.clone();
            if let Some(state) = self.shards.get_mut(&shard) {
                state.blocked_until = Some(now + delay);
            }
            self.metrics.retries.fetch_add(entry.members.len() as u64, Relaxed);
            // Expired members are failed when the entry next comes up for sending.
            return self.push_ready_front(&shard, vec![entry]);
        }
        for member in entry.members {
            self.retry_or_fail(member, kind, now);
        }
    }

    pub(super) fn retry_or_fail(&mut self, mut member: Pending, kind: ErrorKind, now: Instant) {
        if !kind.is_retryable() {
            let code = member.last_code();
            return self.fail(member, kind, code);
        }
        let delay = member.next_backoff(&self.backoff).unwrap_or(self.config.backoff_max);
        // A backoff that runs past the deadline still leaves one last try just before it.
        let last_chance = member.deadline.checked_sub(LAST_TRY_MARGIN).unwrap_or(now);
        let not_before = (now + retry_delay(kind, delay)).min(last_chance);
        if not_before <= now {
            let code = member.last_code();
            return self.fail(member, ErrorKind::Expired, code);
        }
        self.metrics.retries.fetch_add(1, Relaxed);
        self.waiting.push(member, not_before);
    }

    pub(super) fn fail(&mut self, member: Pending, kind: ErrorKind, code: Option<String>) {
        self.fail_with(member, kind, code, None);
    }

    /// Fails a record with the service's (or the producer's) message.
    pub(super) fn fail_with(
        &mut self,
        member: Pending,
        kind: ErrorKind,
        code: Option<String>,
        message: Option<String>,
    ) {
        if kind == ErrorKind::Expired {
            self.metrics.user_records_expired.fetch_add(1, Relaxed);
        } else {
            self.metrics.user_records_failed.fetch_add(1, Relaxed);
        }
        let mut member = member;
        let attempts = member.take_attempts();
        let Pending { record, reply, _permits, .. } = member;
        let error = DeliveryError::new(kind, code, record, attempts).with_message(message);
        self.outstanding -= 1;
        let _ = reply.send(Err(error));
        drop(_permits);
    }

    /// Fails the waiting records whose deadline has passed.
    pub(super) fn expire_waiting(&mut self, now: Instant) {
        for member in self.waiting.expired(now) {
            let code = member.last_code();
            self.fail(member, ErrorKind::Expired, code);
        }
    }

    /// ListShards failed for good (the stream does not exist, access is denied): the records
    /// waiting for a shard map fail with its error.
    pub(super) fn fail_waiting(&mut self, error: &CallError) {
        let code = error.code.clone().unwrap_or_else(|| format!("{:?}", error.kind));
        for mut member in self.waiting.take_all() {
            member.failed_attempt(Attempt {
                at: SystemTime::now(),
                duration: Duration::ZERO,
                error_code: Some(code.clone()),
            });
            self.fail(member, error.kind, Some(code.clone()));
        }
    }
}

/// The longest wait before a throttled record is tried again. The shard's token buckets, which a
/// throttle empties, already pace what is sent to it; a per-record backoff growing to
/// `backoff_max` only left a slow tail of records waiting long after the shard had room.
const THROTTLED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long before its deadline a record gets its last try.
const LAST_TRY_MARGIN: Duration = Duration::from_millis(10);

/// The wait before a retry: the exponential backoff; for throttling, capped and then jittered
/// over its upper half.
///
/// The jitter after the cap matters. A shard's limit is counted per one-second window, and a
/// record refused late in a window and tried again exactly one second later is late in the next
/// window too: with a fixed one-second wait, some records were refused 20 times in a row and
/// expired. Spread over [cap/2, cap], each try lands at a new point of the window.
fn retry_delay(kind: ErrorKind, backoff: Duration) -> Duration {
    match kind {
        ErrorKind::Throttled => backoff.min(THROTTLED_BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() / 2.0),
        _ => backoff,
    }
}

/// The attempt code of an aggregate that landed on a shard it was not built for, or on a shard
/// whose id names another range than the one it was built for.
pub(crate) const STALE_SHARD_MAP: &str = "StaleShardMap";

/// The attempt code of an aggregate stored, but not confirmed by a listing before its deadline.
pub(crate) const UNCONFIRMED: &str = "ShardMapUnconfirmed";

/// The code of a record over the stream's record limit, found before it was sent.
pub(crate) const RECORD_TOO_LARGE: &str = "RecordTooLarge";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_retries_are_capped_and_spread_over_the_upper_half() {
        let delays: Vec<Duration> =
            (0..1_000).map(|_| retry_delay(ErrorKind::Throttled, Duration::from_secs(5))).collect();
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*min >= Duration::from_millis(500) && *max <= THROTTLED_BACKOFF_MAX, "{min:?}..{max:?}");
        assert!(*max - *min > Duration::from_millis(300), "spread: {min:?}..{max:?}");
        // Other errors keep the backoff as it is.
        assert_eq!(retry_delay(ErrorKind::Transient, Duration::from_secs(3)), Duration::from_secs(3));
    }
}
