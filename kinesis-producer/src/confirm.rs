//! Confirming stored aggregates against a shard listing made after they were stored.
//!
//! **Why.** A shard id is not an identity across a stream's lifetime: a stream deleted and created
//! again under the same name numbers its shards from 0 again, over other hash ranges. PutRecords
//! answers only with a shard id and a sequence number, so an aggregate built for
//! `shardId-000000000000` of the old stream and stored on `shardId-000000000000` of the new one
//! looks delivered, while a KCL reader drops it whole (a sub-record outside the shard's range).
//! Nothing in the answer can tell the two streams apart, and the stream can be re-created between
//! any listing and any put.
//!
//! **What.** An aggregate whose members do not all share one hash key is *parked* when it is
//! stored on its predicted shard: its receipts wait for a ListShards that started after the
//! answer arrived. If that listing has the shard and the shard's range holds every member's hash
//! key, a reader keeps the aggregate: the receipts resolve. Otherwise the aggregate is unreadable:
//! its members are sent again, routed by that listing. A listing that says the stream is gone
//! fails the parked records (`NotFound`, handed back): what they were stored in is deleted.
//!
//! Plain records and aggregates of one hash key are readable on whatever shard takes them, and
//! are never parked.
//!
//! **Cost.** At most one listing is in flight, and parked aggregates wait for one at most every
//! `ProducerConfig::shard_map_confirm_interval` (50 ms) plus its round trip: a few ListShards
//! calls a second per producer (the service allows 1,000 a second per stream). In ordering mode
//! the shard of a parked aggregate stays busy until it is judged, and its listing does not wait
//! for the interval.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::entry::Entry;
use crate::transport::ShardDescription;

/// An aggregate stored on its predicted shard, waiting for a listing.
pub(crate) struct Parked {
    pub(crate) entry: Entry,
    /// Where PutRecords stored it.
    pub(crate) shard_id: Arc<str>,
    pub(crate) sequence_number: Arc<str>,
    /// The listing that may judge it: the first one started after this number.
    pub(crate) after: u64,
    /// When its PutRecords call started, and how long it took (for the receipts' attempt).
    pub(crate) at: SystemTime,
    pub(crate) duration: Duration,
}

/// Whether a reader keeps a stored aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The shard that stored it holds every member's hash key.
    Readable,
    /// The shard is not listed, or its range leaves out a member: a KCL reader drops it whole.
    Unreadable,
}

/// Judges an aggregate with members' hash keys from `span.0` to `span.1` stored on `shard_id`,
/// by a listing of the stream. Ranges are contiguous, so the two ends decide.
pub(crate) fn judge(span: (u128, u128), shard_id: &str, listing: &[ShardDescription]) -> Verdict {
    match listing.iter().find(|s| s.shard_id == shard_id) {
        Some(shard) if shard.range.contains(span.0) && shard.range.contains(span.1) => Verdict::Readable,
        _ => Verdict::Unreadable,
    }
}

/// The parked aggregates, and the listings that judge them.
#[derive(Default)]
pub(crate) struct Confirmations {
    /// In the order they were parked, so with `after` never falling: the last one waits the
    /// longest (judging and expiring keep the order).
    parked: Vec<Parked>,
    /// Listings started so far (each gets the next number).
    started: u64,
    last_start: Option<Instant>,
    /// A parked aggregate of a shard in ordering mode: its listing goes without waiting.
    urgent: bool,
}

impl Confirmations {
    /// Parks a stored aggregate until a listing that starts from now on.
    pub(crate) fn park(&mut self, parked: Parked, urgent: bool) {
        self.urgent |= urgent;
        self.parked.push(parked);
    }

    /// The number the next listing should carry, noting that it starts now.
    pub(crate) fn listing_started(&mut self, now: Instant) -> u64 {
        self.started += 1;
        self.last_start = Some(now);
        self.urgent = false;
        self.started
    }

    /// The number of the listing parked entries would wait for, for a new one.
    pub(crate) fn next_after(&self) -> u64 {
        self.started
    }

    /// When a listing is due for the parked aggregates: `None` when none waits for a new one.
    pub(crate) fn listing_due(&self, interval: Duration, now: Instant) -> Option<Instant> {
        if self.parked.last().is_none_or(|p| p.after < self.started) {
            return None;
        }
        match (self.last_start, self.urgent) {
            (Some(last), false) => Some(last + interval),
            _ => Some(now),
        }
    }

    /// Takes the parked aggregates that the listing numbered `listing` may judge.
    pub(crate) fn judged_by(&mut self, listing: u64) -> Vec<Parked> {
        let (judged, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|p| p.after < listing);
        self.parked = waiting;
        judged
    }

    /// Takes every parked aggregate (the stream is gone).
    pub(crate) fn take_all(&mut self) -> Vec<Parked> {
        std::mem::take(&mut self.parked)
    }

    /// Takes the parked aggregates with a member whose deadline has passed.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<Parked> {
        // Called at every step of the pipeline: nothing is moved unless one has expired.
        if self.earliest_deadline().is_none_or(|deadline| deadline > now) {
            return Vec::new();
        }
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|p| p.entry.deadline <= now);
        self.parked = kept;
        gone
    }

    /// The earliest deadline of a parked member.
    pub(crate) fn earliest_deadline(&self) -> Option<Instant> {
        self.parked.iter().map(|p| p.entry.deadline).min()
    }

    /// Whether nothing is parked.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    /// Whether an aggregate of `shard` is parked.
    pub(crate) fn holds_shard(&self, shard: &str) -> bool {
        self.parked.iter().any(|p| &*p.entry.shard == shard)
    }
}

#[cfg(test)]
mod tests {
    use kinesis_aggregation::HashKeyRange;

    use super::*;

    fn shard(id: &str, start: u128, end: u128) -> ShardDescription {
        ShardDescription { shard_id: id.into(), range: HashKeyRange::new(start, end).unwrap(), open: true }
    }

    #[test]
    fn an_aggregate_is_readable_only_where_the_shards_range_holds_both_ends() {
        let third = u128::MAX / 3;
        // The stream re-created with 3 shards: shard 0 is now the first third.
        let listing = [
            shard("shardId-0", 0, third),
            shard("shardId-1", third + 1, 2 * third),
            shard("shardId-2", 2 * third + 1, u128::MAX),
        ];
        assert_eq!(judge((10, third), "shardId-0", &listing), Verdict::Readable);
        // Built for the old shard 0 (the first half): a member past the new first third.
        assert_eq!(judge((10, third + 1), "shardId-0", &listing), Verdict::Unreadable);
        assert_eq!(judge((third + 5, third + 9), "shardId-0", &listing), Verdict::Unreadable);
        // A shard the listing does not have.
        assert_eq!(judge((10, 20), "shardId-7", &listing), Verdict::Unreadable);
        // A closed shard still listed keeps its range: an aggregate stored before a split is read.
        let closed = [ShardDescription { open: false, ..shard("shardId-0", 0, u128::MAX) }];
        assert_eq!(judge((0, u128::MAX), "shardId-0", &closed), Verdict::Readable);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_judges_only_what_was_parked_before_it_started() {
        let mut confirmations = Confirmations::default();
        let interval = Duration::from_millis(50);
        assert_eq!(confirmations.listing_due(interval, Instant::now()), None, "nothing parked");
        let entry = || crate::entry::tests::entry(3);
        let parked = |after| Parked {
            entry: entry(),
            shard_id: "shardId-0".into(),
            sequence_number: "1".into(),
            after,
            at: SystemTime::now(),
            duration: Duration::ZERO,
        };
        confirmations.park(parked(confirmations.next_after()), false);
        let now = Instant::now();
        assert_eq!(confirmations.listing_due(interval, Instant::now()), Some(now), "the first listing goes at once");
        let first = confirmations.listing_started(now);
        // Parked while the first listing is in flight: it waits for the next, after the interval.
        confirmations.park(parked(confirmations.next_after()), false);
        assert_eq!(confirmations.listing_due(interval, Instant::now()), Some(now + interval));
        assert_eq!(confirmations.judged_by(first).len(), 1);
        assert!(!confirmations.is_empty());
        // Ordering mode: no wait.
        confirmations.park(parked(confirmations.next_after()), true);
        assert_eq!(confirmations.listing_due(interval, Instant::now()), Some(Instant::now()));
        let second = confirmations.listing_started(Instant::now());
        assert_eq!(confirmations.judged_by(second).len(), 2);
        assert!(confirmations.is_empty());
        assert_eq!(confirmations.listing_due(interval, Instant::now()), None);
    }
}
