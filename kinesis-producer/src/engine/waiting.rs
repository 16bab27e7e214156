//! Records waiting to be routed: for their retry backoff, or for a usable shard map.
//!
//! A record waits for two things at once: its own time (the backoff after a failed attempt) and a
//! shard map it can be routed by (none yet, or one found out of date). Kept ordered by (not
//! before, arrival), the records whose time has come leave in that order once there is a map, and
//! records put while there is none leave in put order. `tokio_util::time::DelayQueue` was
//! weighed: it yields each record at its time whether or not there is a map (the records of a
//! stream without one would need a second queue), and it is polled as a stream of its own, where
//! the engine works out one wake-up time from all its stages; here the first key is that time.
//!
//! While there is no usable map, records still expire at their deadline: [`Waiting::expired`]
//! hands them back to be failed.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::pending::Pending;

#[derive(Default)]
pub(super) struct Waiting {
    /// Keyed by (not before, arrival number).
    queue: BTreeMap<(Instant, u64), Pending>,
    arrivals: u64,
    /// No later than the earliest deadline in the queue (exact after [`Waiting::expired`]).
    deadline: Option<Instant>,
}

impl Waiting {
    /// Queues a record until `not_before` (and a usable shard map).
    pub(super) fn push(&mut self, member: Pending, not_before: Instant) {
        self.arrivals += 1;
        self.deadline = Some(self.deadline.map_or(member.deadline, |d| d.min(member.deadline)));
        self.queue.insert((not_before, self.arrivals), member);
    }

    /// The next record whose time has come at `now`, if any.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<Pending> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    /// Whether a record in the queue may have reached its deadline by `now`.
    pub(super) fn deadline_passed(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| deadline <= now)
    }

    /// Takes out the records whose deadline has passed, in queue order.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Pending> {
        let keys: Vec<(Instant, u64)> =
            self.queue.iter().filter(|(_, m)| m.deadline <= now).map(|(key, _)| *key).collect();
        let expired = keys.into_iter().filter_map(|key| self.queue.remove(&key)).collect();
        self.deadline = self.queue.values().map(|m| m.deadline).min();
        expired
    }

    /// Takes out every record, in queue order.
    pub(super) fn take_all(&mut self) -> Vec<Pending> {
        self.deadline = None;
        std::mem::take(&mut self.queue).into_values().collect()
    }

    /// When the first record's time comes.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|((at, _), _)| *at)
    }

    /// No later than the earliest deadline of a queued record.
    pub(super) fn earliest_deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pending::tests::pending;

    fn keyed(key: &str, deadline: Instant) -> Pending {
        let mut member = pending(key);
        member.deadline = deadline;
        member
    }

    fn keys(members: Vec<Pending>) -> Vec<String> {
        members.into_iter().map(|m| m.record.partition_key).collect()
    }

    #[test]
    fn records_leave_by_their_time_then_in_arrival_order() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let mut waiting = Waiting::default();
        waiting.push(keyed("retry at 2", later), t0 + Duration::from_secs(2));
        waiting.push(keyed("no map 1", later), t0);
        waiting.push(keyed("no map 2", later), t0);
        assert_eq!(waiting.next_due(), Some(t0));
        let due: Vec<Pending> = std::iter::from_fn(|| waiting.pop_due(t0 + Duration::from_secs(1))).collect();
        assert_eq!(keys(due), ["no map 1", "no map 2"]);
        assert_eq!(waiting.len(), 1);
        assert!(waiting.pop_due(t0 + Duration::from_secs(1)).is_none(), "its backoff has not passed");
        assert_eq!(keys(waiting.pop_due(t0 + Duration::from_secs(2)).into_iter().collect()), ["retry at 2"]);
    }

    #[test]
    fn without_a_map_records_still_expire_at_their_deadline() {
        let t0 = Instant::now();
        let mut waiting = Waiting::default();
        waiting.push(keyed("soon", t0 + Duration::from_secs(1)), t0);
        waiting.push(keyed("late", t0 + Duration::from_secs(9)), t0);
        assert!(!waiting.deadline_passed(t0));
        assert!(waiting.deadline_passed(t0 + Duration::from_secs(1)));
        assert_eq!(keys(waiting.expired(t0 + Duration::from_secs(1))), ["soon"]);
        assert_eq!(waiting.earliest_deadline(), Some(t0 + Duration::from_secs(9)), "exact after a scan");
        assert!(!waiting.deadline_passed(t0 + Duration::from_secs(2)));
        assert_eq!(keys(waiting.take_all()), ["late"]);
        assert_eq!((waiting.len(), waiting.earliest_deadline()), (0, None));
    }
}
