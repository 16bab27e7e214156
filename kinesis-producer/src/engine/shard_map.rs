//! The shard map records are routed by, and when to list the shards again.
//!
//! The map is the stream's open shards by hash-key range (ListShards). It is listed at start, when
//! a record lands on another shard than predicted (the map is then *stale*: routing waits for the
//! next listing), when the confirmations of stored aggregates ask for one (`confirm.rs`), and, after
//! a failed listing or one whose open shards leave a gap (mid-reshard), again after a backoff.
//! [`ShardMap`] holds that state; the engine's `on_shard_list` applies a listing to the records.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kinesis_aggregation::{HashKeyRange, ShardRanges};
use tokio::time::Instant;

use super::Engine;
use crate::confirm::{Parked, Verdict, judge};
use crate::error::ErrorKind;
use crate::pending::Pending;
use crate::sender;
use crate::transport::{CallError, ShardDescription};

pub(super) struct ShardMap {
    map: Option<ShardRanges<Arc<str>>>,
    /// A record landed on another shard than predicted: routing waits for the next listing.
    stale: bool,
    /// A ListShards call is under way.
    listing: bool,
    /// When the next listing is due, if one is.
    due: Option<Instant>,
    /// After a failed listing, a listing for confirmations waits until then too.
    retry_at: Option<Instant>,
    backoff: ExponentialBackoff,
}

impl ShardMap {
    /// No map yet; the first listing is due at once.
    pub(super) fn new(backoff: &ExponentialBuilder, now: Instant) -> Self {
        ShardMap { map: None, stale: false, listing: false, due: Some(now), retry_at: None, backoff: backoff.build() }
    }

    /// The open shard holding `hash_key` and its range, when the map is usable (present and not
    /// stale) and has no gap there.
    pub(super) fn lookup(&self, hash_key: u128) -> Option<(HashKeyRange, Arc<str>)> {
        match &self.map {
            Some(map) if !self.stale => map.lookup(hash_key).map(|(range, id)| (*range, id.clone())),
            _ => None,
        }
    }

    /// Whether there is a map at all (stale or not).
    pub(super) fn exists(&self) -> bool {
        self.map.is_some()
    }

    /// Whether records can be routed now.
    pub(super) fn usable(&self) -> bool {
        self.map.is_some() && !self.stale
    }

    /// Whether `range` is still the range of the open shard `shard` in the map.
    pub(super) fn holds(&self, shard: &Arc<str>, range: HashKeyRange) -> bool {
        self.map.as_ref().is_some_and(|map| map.iter().any(|(r, id)| id == shard && *r == range))
    }

    /// The map is out of date: routing waits, and a listing is due now unless one is under way or
    /// already due.
    pub(super) fn out_of_date(&mut self, now: Instant) {
        self.stale = true;
        if !self.listing && self.due.is_none() {
            self.due = Some(now);
        }
    }

    /// Whether a listing for confirmations may start at `now` (not while a failed one backs off).
    pub(super) fn may_confirm(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| at <= now)
    }

    /// Starts a listing when one is due (or `confirm` asks for one) and none is under way.
    pub(super) fn start_listing(&mut self, now: Instant, confirm: bool) -> bool {
        if self.listing || !(self.due.is_some_and(|due| due <= now) || confirm) {
            return false;
        }
        self.due = None;
        self.listing = true;
        true
    }

    /// The listing ended (either way).
    pub(super) fn listing_ended(&mut self) {
        self.listing = false;
    }

    /// The listing failed: the next one after the backoff.
    pub(super) fn failed(&mut self, now: Instant, fallback: Duration) {
        let delay = self.backoff.next().unwrap_or(fallback);
        self.due = Some(now + delay);
        self.retry_at = Some(now + delay);
    }

    /// The listing succeeded but its open shards leave a gap (mid-reshard): list again shortly.
    pub(super) fn incomplete(&mut self, now: Instant, fallback: Duration) {
        self.retry_at = None;
        let delay = self.backoff.next().unwrap_or(fallback);
        self.due = Some(now + delay);
    }

    /// A listing gave a map that covers every hash key: it replaces the old one.
    pub(super) fn replace(&mut self, map: ShardRanges<Arc<str>>, backoff: &ExponentialBuilder) {
        self.retry_at = None;
        self.backoff = backoff.build();
        self.stale = false;
        self.map = Some(map);
    }

    /// When the engine must wake for the map: a listing due, or one the confirmations ask for at
    /// `confirm_due` (held back by a failed listing's backoff).
    pub(super) fn next_wake(&self, confirm_due: Option<Instant>) -> Option<Instant> {
        let confirm = confirm_due.filter(|_| !self.listing).map(|due| self.retry_at.map_or(due, |at| at.max(due)));
        match (self.due, confirm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Engine {
    /// Applies a ListShards answer: judges the stored aggregates waiting for it, installs the new
    /// map, and routes again what was buffered for shards that closed or changed range.
    pub(super) fn on_shard_list(&mut self, number: u64, list: Result<Vec<ShardDescription>, CallError>) {
        self.shard_map.listing_ended();
        let now = Instant::now();
        let shards = match list {
            Ok(shards) => shards,
            Err(error) => return self.on_list_failed(&error, now),
        };
        // Records to route again by this listing, oldest first: the members of aggregates that no
        // reader keeps, then what was buffered for shards whose id now names another range.
        let mut reroute: Vec<Pending> = Vec::new();
        for parked in self.confirmations.judged_by(number) {
            let Parked { entry, shard_id, sequence_number, at, duration, .. } = parked;
            self.unbusy_if_unparked(&entry.shard);
            match judge(entry.key_span, &shard_id, &shards) {
                Verdict::Readable => {
                    self.outstanding -= sender::deliver(
                        &self.metrics,
                        &self.stream,
                        entry,
                        (shard_id, sequence_number),
                        at,
                        duration,
                        now,
                    );
                }
                Verdict::Unreadable => {
                    // The shard id names another range than the one the aggregate was built
                    // for (the stream was deleted and created again): a reader drops it whole.
                    tracing::warn!(shard_id = %shard_id, records = entry.members.len(),
                        "an aggregate was stored on a shard whose range no longer holds its records (was the stream re-created?); sending them again");
                    self.metrics.error(super::STALE_SHARD_MAP, entry.members.len() as u64);
                    for mut member in entry.members {
                        member.failed_attempt(crate::attempt::Attempt {
                            at,
                            duration,
                            error_code: Some(super::STALE_SHARD_MAP.into()),
                        });
                        reroute.push(member);
                    }
                }
            }
        }
        let open: Vec<_> =
            shards.into_iter().filter(|s| s.open).map(|s| (s.range, Arc::<str>::from(s.shard_id.as_str()))).collect();
        match ShardRanges::new(open) {
            Ok(map) if map.covers_all() => {
                self.shard_map.replace(map, &self.backoff);
                // Shards closed since, or whose id now names another range: what was buffered
                // for them goes back through routing, oldest first (the sealed entries, then the
                // aggregate being filled).
                for shard in self.shards.ids_not_in(&self.shard_map) {
                    let Some((ready, members)) = self.shards.remove(&shard) else { continue };
                    for entry in ready {
                        reroute.extend(self.fail_expired(entry.members, now));
                    }
                    reroute.extend(members);
                }
                for member in reroute {
                    self.route(member, now);
                }
            }
            _ => {
                // Mid-reshard the open shards may not cover the space yet: list again shortly.
                for member in reroute {
                    self.retry_or_fail(member, ErrorKind::Transient, now);
                }
                self.shard_map.incomplete(now, self.config.backoff_max);
            }
        }
    }

    fn on_list_failed(&mut self, error: &CallError, now: Instant) {
        tracing::warn!(%error, "ListShards failed; retrying with backoff");
        if error.kind == ErrorKind::NotFound {
            // Stored, but the stream they were stored in is gone: no reader will see them.
            for parked in self.confirmations.take_all() {
                let Parked { entry, at, duration, .. } = parked;
                self.unbusy_if_unparked(&entry.shard);
                let message = format!(
                    "stored on {}, but the stream was deleted before its shard map could be confirmed: {}",
                    entry.shard, error.message
                );
                for mut member in entry.members {
                    member.failed_attempt(crate::attempt::Attempt { at, duration, error_code: error.code.clone() });
                    self.fail_with(member, ErrorKind::NotFound, error.code.clone(), Some(message.clone()));
                }
            }
        }
        if !error.kind.is_retryable() {
            self.metrics.error(error.code.as_deref().unwrap_or("ListShards"), self.waiting.len() as u64);
            self.fail_waiting(error);
        }
        self.shard_map.failed(now, self.config.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> ExponentialBuilder {
        ExponentialBuilder::new().with_min_delay(Duration::from_millis(100)).with_factor(2.0).without_max_times()
    }

    fn whole(id: &str) -> ShardRanges<Arc<str>> {
        ShardRanges::new(vec![(HashKeyRange::ALL, Arc::from(id))]).unwrap()
    }

    #[test]
    fn the_first_listing_is_due_at_once_and_never_two_run_together() {
        let t0 = Instant::now();
        let mut map = ShardMap::new(&builder(), t0);
        assert!(!map.usable() && map.lookup(7).is_none());
        assert!(map.start_listing(t0, false));
        assert!(!map.start_listing(t0, true), "one listing at a time");
        map.listing_ended();
        map.replace(whole("shard-a"), &builder());
        assert_eq!(map.lookup(7).map(|(_, id)| id), Some(Arc::from("shard-a")));
        assert!(!map.start_listing(t0, false), "nothing due once a map is in");
        assert!(map.start_listing(t0, true), "confirmations may ask for one");
    }

    #[test]
    fn a_stale_map_routes_nothing_and_asks_for_a_listing_now() {
        let t0 = Instant::now();
        let mut map = ShardMap::new(&builder(), t0);
        assert!(map.start_listing(t0, false));
        map.listing_ended();
        map.replace(whole("shard-a"), &builder());
        let t1 = t0 + Duration::from_secs(5);
        map.out_of_date(t1);
        assert!(map.exists() && !map.usable() && map.lookup(7).is_none());
        assert_eq!(map.next_wake(None), Some(t1));
        assert!(map.start_listing(t1, false));
        map.listing_ended();
        map.replace(whole("shard-b"), &builder());
        assert!(map.usable());
        assert!(map.holds(&Arc::from("shard-b"), HashKeyRange::ALL));
        assert!(!map.holds(&Arc::from("shard-a"), HashKeyRange::ALL));
    }

    #[test]
    fn failed_listings_back_off_and_hold_back_confirmations_too() {
        let t0 = Instant::now();
        let mut map = ShardMap::new(&builder(), t0);
        assert!(map.start_listing(t0, false));
        map.listing_ended();
        map.failed(t0, Duration::from_secs(5));
        assert_eq!(map.next_wake(None), Some(t0 + Duration::from_millis(100)));
        assert!(!map.may_confirm(t0));
        assert!(!map.start_listing(t0 + Duration::from_millis(50), false));
        let t1 = t0 + Duration::from_millis(100);
        assert!(map.may_confirm(t1) && map.start_listing(t1, false));
        map.listing_ended();
        map.failed(t1, Duration::from_secs(5));
        let after = |at: Option<Instant>| at.map(|at| at.duration_since(t1).as_millis());
        assert_eq!(after(map.next_wake(None)), Some(200), "the backoff grows");
        // A confirmation listing due earlier waits for the backoff.
        assert_eq!(after(map.next_wake(Some(t1))), Some(200));
        map.incomplete(t1, Duration::from_secs(5));
        assert!(map.may_confirm(t1), "a listing that answered lifts the hold");
    }
}
