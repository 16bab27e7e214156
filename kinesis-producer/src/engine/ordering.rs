//! Ordering mode (`ProducerConfig::ordering`): per shard, one Kinesis record per call and one call
//! in flight, and a refused record keeps its place at the head of its shard, which waits for the
//! record's backoff. These are the pure parts: whether a shard may send now, and how an entry
//! whose oldest members expired is packed again without them, in order.

use std::sync::Arc;

use kinesis_aggregation::{Aggregator, AggregatorConfig};
use tokio::time::Instant;

use super::ready::ShardState;
use crate::config::ProducerConfig;
use crate::entry::Entry;
use crate::pending::Pending;

/// Whether a shard may send in ordering mode at `now`: not while a call with its record is in
/// flight, nor while its head waits for a backoff (`Err` with when it ends).
pub(super) fn may_send(state: &ShardState, now: Instant) -> Result<(), Option<Instant>> {
    if state.busy {
        return Err(None);
    }
    match state.blocked_until.filter(|t| *t > now) {
        Some(at) => Err(Some(at)),
        None => Ok(()),
    }
}

/// Splits members into those whose deadline has passed at `now` and the others, each in order.
pub(super) fn split_expired(members: Vec<Pending>, now: Instant) -> (Vec<Pending>, Vec<Pending>) {
    members.into_iter().partition(|member| member.deadline <= now)
}

/// Packs members, in order, into entries for `shard`: aggregates as full as they go (when
/// aggregation is on), a member that fits no aggregate alone and plain. Each entry is due a
/// linger time after its oldest member was put.
pub(super) fn repack(config: &ProducerConfig, shard: &Arc<str>, members: Vec<Pending>, now: Instant) -> Vec<Entry> {
    let oldest = |members: &[Pending]| members.iter().map(|m| m.enqueued).min().unwrap_or(now);
    let mut entries = Vec::new();
    let mut aggregator = Aggregator::with_config(AggregatorConfig::with_max_bytes(config.aggregation_max_bytes));
    let mut filling: Vec<Pending> = Vec::new();
    for member in members {
        if config.aggregation {
            if matches!(aggregator.try_push_ref(&member.record), Ok(true)) {
                filling.push(member);
                continue;
            }
            // Full: close this aggregate and start the next with the member.
            let full = std::mem::take(&mut filling);
            let started = oldest(&full);
            entries.extend(Entry::pack(config, shard, &mut aggregator, full, started));
            if matches!(aggregator.try_push_ref(&member.record), Ok(true)) {
                filling.push(member);
                continue;
            }
        }
        entries.push(Entry::plain(config, shard.clone(), member));
    }
    let started = oldest(&filling);
    entries.extend(Entry::pack(config, shard, &mut aggregator, filling, started));
    entries
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kinesis_aggregation::HashKeyRange;

    use super::*;
    use crate::pending::tests::pending;

    fn keys(entries: &[Entry]) -> Vec<Vec<String>> {
        entries.iter().map(|e| e.members.iter().map(|m| m.record.partition_key.clone()).collect()).collect()
    }

    #[test]
    fn expired_members_leave_and_the_rest_keep_their_order() {
        let now = Instant::now();
        let members: Vec<Pending> = (0..5)
            .map(|i| {
                let mut member = pending(&format!("k{i}"));
                if i % 2 == 0 {
                    member.deadline = now;
                }
                member
            })
            .collect();
        let (expired, survivors) = split_expired(members, now);
        let names = |m: &[Pending]| m.iter().map(|m| m.record.partition_key.clone()).collect::<Vec<_>>();
        assert_eq!(names(&expired), ["k0", "k2", "k4"]);
        assert_eq!(names(&survivors), ["k1", "k3"]);
    }

    #[test]
    fn survivors_are_packed_in_order_into_as_few_aggregates_as_fit() {
        let shard: Arc<str> = Arc::from("shard-a");
        let members = || (0..6).map(|i| pending(&format!("k{i}"))).collect::<Vec<_>>();
        let mut config = ProducerConfig::default();
        let one = repack(&config, &shard, members(), Instant::now());
        assert_eq!(keys(&one), [["k0", "k1", "k2", "k3", "k4", "k5"]]);
        assert!(one[0].aggregated && one[0].shard == shard);
        // Aggregates of about two records: still in order, split where one fills up.
        config.aggregation_max_bytes = 2 * one[0].size / 6 + 40;
        let small = repack(&config, &shard, members(), Instant::now());
        assert!(small.len() > 1, "{:?}", keys(&small));
        assert!(small.iter().any(|e| e.aggregated && e.members.len() > 1), "still aggregates: {:?}", keys(&small));
        assert_eq!(keys(&small).concat(), ["k0", "k1", "k2", "k3", "k4", "k5"]);
        config.aggregation = false;
        let plain = repack(&config, &shard, members(), Instant::now());
        assert_eq!(plain.len(), 6);
        assert!(plain.iter().all(|e| !e.aggregated));
    }

    #[test]
    fn a_busy_or_blocked_shard_waits() {
        let now = Instant::now();
        let config = ProducerConfig::default();
        let mut shards = super::super::ready::Shards::default();
        let id: Arc<str> = Arc::from("a");
        let state = shards.get_or_insert(&id, &config, now, HashKeyRange::ALL);
        assert_eq!(may_send(state, now), Ok(()));
        state.busy = true;
        assert_eq!(may_send(state, now), Err(None));
        state.busy = false;
        state.blocked_until = Some(now + Duration::from_secs(1));
        assert_eq!(may_send(state, now), Err(Some(now + Duration::from_secs(1))));
        assert_eq!(may_send(state, now + Duration::from_secs(1)), Ok(()), "the backoff ended");
    }
}
