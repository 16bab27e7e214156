//! Routing and aggregation: a record goes to the aggregator of the shard its hash key falls in
//! (by the shard map), or waits; a full or lingering aggregate is sealed into a ready entry.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use super::{Engine, RECORD_TOO_LARGE, ordering};
use crate::entry::Entry;
use crate::error::ErrorKind;
use crate::pending::Pending;

impl Engine {
    /// Puts a record in its shard's aggregator, or in `waiting` while there is no usable map.
    pub(super) fn route(&mut self, member: Pending, now: Instant) {
        if now >= member.deadline {
            let code = member.last_code();
            return self.fail(member, ErrorKind::Expired, code);
        }
        let limit = self.stream_limit.load(Relaxed);
        if limit > 0 && member.size > limit {
            let message = format!(
                "the record has {} bytes (partition key + data), over the stream's record limit of {limit} (MaxRecordSizeInKiB)",
                member.size
            );
            return self.fail_with(member, ErrorKind::InvalidInput, Some(RECORD_TOO_LARGE.into()), Some(message));
        }
        let Some((range, shard)) = self.shard_map.lookup(member.hash_key) else {
            // No map yet, an out-of-date one, or a gap in it (mid-reshard): wait, in put order, for
            // the next listing; `step` routes waiting records only once there is a good map.
            if self.shard_map.exists() {
                self.shard_map.out_of_date(now);
            }
            return self.waiting.push(member, now);
        };
        let config = &self.config;
        let state = self.shards.get_or_insert(&shard, config, now, range);
        if !config.aggregation {
            let entry = Entry::plain(config, shard, member);
            return self.push_ready(entry);
        }
        match state.aggregator.try_push_ref(&member.record) {
            Ok(true) => {
                state.aggregate_started.get_or_insert(now);
                state.members.push(member);
            }
            Ok(false) => {
                self.seal(&shard);
                let Some(state) = self.shards.get_mut(&shard) else { return };
                if matches!(state.aggregator.try_push_ref(&member.record), Ok(true)) {
                    state.aggregate_started = Some(now);
                    state.members.push(member);
                } else {
                    // Checked at put: a record within the record limit fits an empty aggregate,
                    // or is sent plain.
                    let entry = Entry::plain(&self.config, shard, member);
                    self.push_ready(entry);
                }
            }
            Err(_) => {
                let entry = Entry::plain(config, shard, member);
                self.push_ready(entry);
            }
        }
    }

    /// Turns a shard's aggregator into a ready entry.
    pub(super) fn seal(&mut self, shard: &Arc<str>) {
        let Some(state) = self.shards.get_mut(shard) else { return };
        if state.members.is_empty() {
            return;
        }
        // The next aggregate will likely hold as many records as this one.
        let capacity = state.members.len();
        let members = std::mem::replace(&mut state.members, Vec::with_capacity(capacity));
        let started = state.aggregate_started.take().unwrap_or_else(Instant::now);
        if let Some(entry) = Entry::pack(&self.config, shard, &mut state.aggregator, members, started) {
            self.push_ready(entry);
        }
    }

    /// Queues an entry behind its shard's others.
    pub(super) fn push_ready(&mut self, entry: Entry) {
        if let Some(entry) = self.shards.push_back(entry) {
            // Every routed shard has a state; an entry without one is routed again.
            self.dissolve(entry, Instant::now());
        }
    }

    /// Puts entries back at the head of their shard's queue (ordering mode), in the given order.
    pub(super) fn push_ready_front(&mut self, shard: &Arc<str>, entries: Vec<Entry>) {
        if let Err(entries) = self.shards.push_front(shard, entries) {
            let now = Instant::now();
            entries.into_iter().for_each(|entry| self.dissolve(entry, now));
        }
    }

    /// Flush or shutdown: what is buffered now goes without waiting for the linger time. Records
    /// that come back later for a retry aggregate as usual, so a flush under throttling does not
    /// turn every retry into a one-record aggregate.
    pub(super) fn send_buffered_now(&mut self, now: Instant) {
        for shard in self.shards.filling() {
            self.seal(&shard);
        }
        self.shards.expedite(now);
    }

    /// Fails the members whose deadline has passed, and returns the others in order.
    pub(super) fn fail_expired(&mut self, members: Vec<Pending>, now: Instant) -> Vec<Pending> {
        let (expired, survivors) = ordering::split_expired(members, now);
        for member in expired {
            let code = member.last_code();
            self.fail(member, ErrorKind::Expired, code);
        }
        survivors
    }

    /// Takes an entry apart: expired members fail, the others are routed again.
    pub(super) fn dissolve(&mut self, entry: Entry, now: Instant) {
        for member in self.fail_expired(entry.members, now) {
            self.route(member, now);
        }
    }

    /// Ordering mode: fails an entry's expired members and packs the others, in order, into new
    /// entries for the same shard (which the caller puts back where the old one was).
    pub(super) fn rebuild(&mut self, entry: Entry, now: Instant) -> Vec<Entry> {
        let survivors = self.fail_expired(entry.members, now);
        ordering::repack(&self.config, &entry.shard, survivors, now)
    }
}
