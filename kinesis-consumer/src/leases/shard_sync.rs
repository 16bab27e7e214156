//! Shard sync: every shard of the stream gets a lease, closed shards and their parents included,
//! so that a parent is always processed before its children.
//!
//! Where a new lease starts ([`new_leases`], a pure decision):
//! - A shard whose parent (or adjacent parent) already has a lease was born of a reshard this
//!   application saw: it starts at `TRIM_HORIZON`, so that nothing written to it is missed,
//!   whatever the initial position.
//! - Otherwise the initial position applies. With `LATEST`, a closed shard starts at `SHARD_END`
//!   (nothing in it is newer than now), an open one at `LATEST`. With `TRIM_HORIZON` or
//!   `AT_TIMESTAMP`, every shard starts there, and children wait for their parents.
//!
//! Leases are written with a conditional create, so workers syncing at the same time write each
//! lease once. Parents are written before their children. A shard with a leased descendant gets
//! no lease: it was processed and its lease cleaned up (as the KCL's shard syncer skips it).
//!
//! **Cleanup** ([`finished_leases`], the KCL's `LeaseCleanupManager`): a lease at SHARD_END is
//! deleted once every child shard has a lease that checkpointed past its start and none of its
//! own parents has a lease any more (so a lineage is removed from the oldest down, and a child
//! never waits on a parent that is gone for the wrong reason). A lease at SHARD_END whose shard
//! the stream no longer lists and which has no children is garbage, and deleted too. Deletes are
//! conditional on the counter seen.
//!
//! A shard id is not an identity across a stream's lifetime: a stream deleted and created again
//! under the same name numbers its shards from 0 again, over other hash ranges. A lease whose
//! shard the listing gives another hash range, or a lease at SHARD_END whose shard is open,
//! belongs to the older stream ([`stale_leases`]): it is deleted (conditionally, so a worker still
//! holding it loses it at its next write) and created again at TRIM_HORIZON, so that the new
//! stream is read from its start, and counted in `stale_leases_replaced`.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use crate::error::{KinesisError, LeaseTableError};
use crate::leases::lease::{Lease, Position, lease_key};
use crate::leases::table::LeaseTable;
use crate::retrieval::kinesis::{KinesisApi, Shard};

/// Where an application starts reading a shard it has never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitialPosition {
    /// The newest records: only what is written after the consumer starts (the KCL's default).
    Latest,
    /// The oldest records still in the stream.
    TrimHorizon,
    /// The first record written at or after a time.
    AtTimestamp(SystemTime),
}

/// The leases to create for the shards that have none, parents first.
pub fn new_leases(shards: &[Shard], existing: &[Lease], initial: InitialPosition) -> Vec<Lease> {
    let leased: HashSet<&str> = existing.iter().map(|l| l.key.as_str()).collect();
    // The ancestors of every leased shard: processed, and perhaps cleaned up.
    let by_id: HashMap<&str, &Shard> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let mut ancestors: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&str> = leased.iter().copied().collect();
    while let Some(id) = stack.pop() {
        for parent in by_id.get(id).into_iter().flat_map(|s| s.parents()) {
            if ancestors.insert(parent) {
                stack.push(parent);
            }
        }
    }
    let children: HashMap<&str, Vec<&str>> = shards.iter().fold(HashMap::new(), |mut map, shard| {
        for parent in shard.parents() {
            map.entry(parent).or_default().push(shard.shard_id.as_str());
        }
        map
    });
    let mut leases = Vec::new();
    for shard in parents_first(shards) {
        if leased.contains(shard.shard_id.as_str()) || ancestors.contains(shard.shard_id.as_str()) {
            continue;
        }
        let position = if shard.parents().any(|p| leased.contains(p)) {
            Position::TrimHorizon
        } else {
            match initial {
                InitialPosition::Latest if shard.open => Position::Latest,
                InitialPosition::Latest => Position::ShardEnd,
                InitialPosition::TrimHorizon => Position::TrimHorizon,
                InitialPosition::AtTimestamp(_) => Position::AtTimestamp,
            }
        };
        let mut lease = Lease::new(shard.shard_id.clone(), position);
        lease.parent_shard_ids = shard.parents().map(str::to_owned).collect();
        lease.hash_range = Some(shard.hash_range);
        if !shard.open {
            lease.child_shard_ids =
                children.get(shard.shard_id.as_str()).into_iter().flatten().map(|c| (*c).to_owned()).collect();
        }
        leases.push(lease);
    }
    leases
}

/// The leases at SHARD_END that are done with (see the module docs): every child has a lease
/// checkpointed past its start and no parent has a lease; or the shard is no longer listed and
/// has no children.
pub fn finished_leases<'a>(shards: &[Shard], existing: &'a [Lease]) -> Vec<&'a Lease> {
    let by_key: HashMap<&str, &Lease> = existing.iter().map(|l| (l.key.as_str(), l)).collect();
    let listed: HashSet<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
    existing
        .iter()
        .filter(|lease| lease.checkpoint.position == Position::ShardEnd)
        .filter(|lease| lease.parent_shard_ids.iter().all(|p| !by_key.contains_key(p.as_str())))
        .filter(|lease| {
            let mut children: HashSet<&str> = lease.child_shard_ids.iter().map(String::as_str).collect();
            children.extend(shards.iter().filter(|s| s.parents().any(|p| p == lease.key)).map(|s| s.shard_id.as_str()));
            if children.is_empty() {
                return !listed.contains(lease.key.as_str());
            }
            children.iter().all(|child| {
                by_key
                    .get(child)
                    .is_some_and(|c| matches!(c.checkpoint.position, Position::Sequence(_) | Position::ShardEnd))
            })
        })
        .collect()
}

/// The leases that belong to an older stream of the same name: their shard is listed with another
/// hash range, or they are at SHARD_END while their shard is open.
pub fn stale_leases<'a>(shards: &[Shard], existing: &'a [Lease]) -> Vec<&'a Lease> {
    let by_id: HashMap<&str, &Shard> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    existing
        .iter()
        .filter(|lease| match by_id.get(lease.key.as_str()) {
            None => false,
            Some(shard) => {
                lease.hash_range.is_some_and(|range| range != shard.hash_range)
                    || (shard.open && lease.checkpoint.position == Position::ShardEnd)
            }
        })
        .collect()
}

/// The shards ordered so that each comes after its parents that are listed.
fn parents_first(shards: &[Shard]) -> Vec<&Shard> {
    let by_id: HashMap<&str, &Shard> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let mut placed: HashSet<&str> = HashSet::new();
    let mut ordered = Vec::with_capacity(shards.len());
    fn place<'a>(
        shard: &'a Shard,
        by_id: &HashMap<&str, &'a Shard>,
        placed: &mut HashSet<&'a str>,
        ordered: &mut Vec<&'a Shard>,
        depth: usize,
    ) {
        if placed.contains(shard.shard_id.as_str()) || depth > by_id.len() {
            return;
        }
        for parent in shard.parents() {
            if let Some(parent) = by_id.get(parent) {
                place(parent, by_id, placed, ordered, depth + 1);
            }
        }
        if placed.insert(shard.shard_id.as_str()) {
            ordered.push(shard);
        }
    }
    for shard in shards {
        place(shard, &by_id, &mut placed, &mut ordered, 0);
    }
    ordered
}

/// Why a shard sync failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error(transparent)]
    Kinesis(#[from] KinesisError),
    #[error(transparent)]
    Table(#[from] LeaseTableError),
}

/// The leases of one stream, as the pure functions above see them: keyed by shard id (a
/// multi-stream lease's key is `stream:shardId`), parents and children being shard ids in both.
fn by_shard(leases: &[Lease], stream: Option<&str>) -> Vec<Lease> {
    leases
        .iter()
        .filter(|l| l.stream_identifier.as_deref() == stream)
        .map(|l| Lease { key: l.shard().to_owned(), ..l.clone() })
        .collect()
}

/// Lists the shards of one stream (`stream`: its identifier in a multi-stream table, `None` in a
/// single-stream one) and makes its leases agree: stale ones replaced, finished ones deleted,
/// missing ones created. `leases` is the whole table, read once for every stream of a sync.
/// Returns how many leases this call created.
pub(crate) async fn sync_stream(
    api: &KinesisApi,
    table: &LeaseTable,
    stream: Option<&str>,
    initial: InitialPosition,
    leases: &[Lease],
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<usize, SyncError> {
    let shards = api.list_shards().await?;
    // The writes take the row as read (its real key).
    let as_read = |lease: &Lease| Lease { key: lease_key(stream, &lease.key), ..lease.clone() };
    let mut existing = by_shard(leases, stream);
    let stale: Vec<Lease> = stale_leases(&shards, &existing).into_iter().cloned().collect();
    let replaced: HashSet<String> = stale.iter().map(|l| l.key.clone()).collect();
    if !stale.is_empty() {
        for lease in &stale {
            tracing::error!(stream = api.stream(), shard_id = %lease.key, checkpoint = lease.checkpoint.position.as_str(),
                "the lease belongs to an older stream of this name (its shard now has another hash range, or is open at \
                 SHARD_END); replacing it with a lease at TRIM_HORIZON");
            if table.delete(&as_read(lease)).await?
                && let Some(metrics) = metrics
            {
                crate::metrics::Metrics::add(&metrics.stale_leases_replaced, 1);
            }
        }
        existing = by_shard(&table.list().await?, stream);
    }
    for lease in finished_leases(&shards, &existing) {
        if table.delete(&as_read(lease)).await? {
            tracing::info!(stream = api.stream(), shard_id = %lease.key, "finished lease cleaned up");
            if let Some(metrics) = metrics {
                crate::metrics::Metrics::add(&metrics.leases_cleaned_up, 1);
            }
        }
    }
    let mut created = 0;
    for mut lease in new_leases(&shards, &existing, initial) {
        if replaced.contains(&lease.key) {
            lease.checkpoint = crate::leases::lease::Checkpoint::at(Position::TrimHorizon);
        }
        if let Some(stream) = stream {
            lease = lease.into_stream(stream);
        }
        if table.create(&lease).await? {
            tracing::debug!(stream = api.stream(), lease = %lease.key, checkpoint = lease.checkpoint.position.as_str(), "lease created");
            created += 1;
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use kinesis_aggregation::HashKeyRange;

    use super::*;

    fn shard(id: &str, parents: &[&str], open: bool) -> Shard {
        Shard {
            shard_id: id.into(),
            parent_shard_id: parents.first().map(|p| (*p).to_owned()),
            adjacent_parent_shard_id: parents.get(1).map(|p| (*p).to_owned()),
            hash_range: HashKeyRange::ALL,
            open,
        }
    }

    fn positions(leases: &[Lease]) -> Vec<(&str, &str)> {
        leases.iter().map(|l| (l.key.as_str(), l.checkpoint.position.as_str())).collect()
    }

    /// p0 split into c1, c2; c2 merged with p3 into m4. Listed children first, to check the order.
    fn resharded() -> Vec<Shard> {
        vec![
            shard("m4", &["c2", "p3"], true),
            shard("c1", &["p0"], true),
            shard("c2", &["p0"], false),
            shard("p0", &[], false),
            shard("p3", &[], false),
        ]
    }

    #[test]
    fn trim_horizon_leases_every_shard_parents_first() {
        let leases = new_leases(&resharded(), &[], InitialPosition::TrimHorizon);
        let order: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
        for (parent, child) in [("c2", "m4"), ("p3", "m4"), ("p0", "c1"), ("p0", "c2")] {
            let at = |k| order.iter().position(|o| *o == k).unwrap();
            assert!(at(parent) < at(child), "{parent} before {child} in {order:?}");
        }
        assert!(leases.iter().all(|l| l.checkpoint.position == Position::TrimHorizon));
        let m4 = leases.iter().find(|l| l.key == "m4").unwrap();
        assert_eq!(m4.parent_shard_ids, ["c2", "p3"]);
        let p0 = leases.iter().find(|l| l.key == "p0").unwrap();
        assert_eq!(p0.child_shard_ids, ["c1", "c2"]);
        assert!(m4.child_shard_ids.is_empty(), "an open shard has no children yet");
    }

    #[test]
    fn latest_ends_closed_shards_and_starts_open_ones_at_the_tip() {
        let leases = new_leases(&resharded(), &[], InitialPosition::Latest);
        let mut got = positions(&leases);
        got.sort();
        assert_eq!(
            got,
            [("c1", "LATEST"), ("c2", "SHARD_END"), ("m4", "LATEST"), ("p0", "SHARD_END"), ("p3", "SHARD_END")]
        );
    }

    #[test]
    fn children_of_leased_shards_start_at_trim_horizon_whatever_the_initial_position() {
        let existing = [Lease::new("p0", Position::Latest), Lease::new("p3", Position::Latest)];
        let shards = resharded();
        for initial in [InitialPosition::Latest, InitialPosition::AtTimestamp(SystemTime::UNIX_EPOCH)] {
            let leases = new_leases(&shards, &existing, initial);
            let mut got = positions(&leases);
            got.sort();
            // m4's parents c2 and p3: p3 is leased, so m4 starts at the horizon too.
            assert_eq!(got, [("c1", "TRIM_HORIZON"), ("c2", "TRIM_HORIZON"), ("m4", "TRIM_HORIZON")]);
        }
    }

    #[test]
    fn leases_of_an_older_stream_of_the_same_name_are_stale() {
        let half = u128::MAX / 2;
        let mut shards = vec![shard("s0", &[], true), shard("s1", &[], true)];
        shards[0].hash_range = HashKeyRange::new(0, half).unwrap();
        shards[1].hash_range = HashKeyRange::new(half + 1, u128::MAX).unwrap();
        let lease = |key: &str, range: Option<HashKeyRange>, position: Position| {
            let mut lease = Lease::new(key, position);
            lease.hash_range = range;
            lease
        };
        let existing = [
            // Same id, same range: the same shard.
            lease("s0", Some(shards[0].hash_range), Position::Sequence("5".into())),
            // Same id, another range: the old stream's shard 1 (of three, say).
            lease("s1", Some(HashKeyRange::new(u128::MAX / 3, u128::MAX / 3 * 2).unwrap()), Position::TrimHorizon),
            // No range recorded (a KCL 1.x row): only SHARD_END on an open shard tells.
            lease("s0-old", None, Position::ShardEnd),
            // A shard not listed (expired): not this sync's business.
            lease("gone", Some(HashKeyRange::ALL), Position::ShardEnd),
        ];
        let stale: Vec<&str> = stale_leases(&shards, &existing).iter().map(|l| l.key.as_str()).collect();
        assert_eq!(stale, ["s1"]);
        let ended = [lease("s0", Some(shards[0].hash_range), Position::ShardEnd)];
        assert_eq!(stale_leases(&shards, &ended).len(), 1, "an open shard at SHARD_END");
        let mut closed = shards.clone();
        closed[0].open = false;
        assert!(stale_leases(&closed, &ended).is_empty(), "a closed shard at SHARD_END is simply done");
    }

    fn at(key: &str, position: Position, parents: &[&str], children: &[&str]) -> Lease {
        let mut lease = Lease::new(key, position);
        lease.parent_shard_ids = parents.iter().map(|p| (*p).to_owned()).collect();
        lease.child_shard_ids = children.iter().map(|c| (*c).to_owned()).collect();
        lease
    }

    #[test]
    fn a_finished_lease_goes_once_its_children_checkpointed_and_its_parents_are_gone() {
        let seq = || Position::Sequence("1".into());
        let keys = |leases: Vec<&Lease>| leases.into_iter().map(|l| l.key.clone()).collect::<Vec<_>>();
        let shards = resharded();
        // p0 ended; c1 checkpointed, c2 not yet: p0 stays.
        let leases = vec![
            at("p0", Position::ShardEnd, &[], &["c1", "c2"]),
            at("c1", seq(), &["p0"], &[]),
            at("c2", Position::TrimHorizon, &["p0"], &[]),
        ];
        assert!(finished_leases(&shards, &leases).is_empty());
        // Both children moved: p0 goes. c2 ended too, but its parent p0 still has a lease.
        let leases = vec![
            at("p0", Position::ShardEnd, &[], &["c1", "c2"]),
            at("c1", seq(), &["p0"], &[]),
            at("c2", Position::ShardEnd, &["p0"], &["m4"]),
            at("p3", Position::ShardEnd, &[], &["m4"]),
            at("m4", seq(), &["c2", "p3"], &[]),
        ];
        assert_eq!(keys(finished_leases(&shards, &leases)), ["p0", "p3"]);
        // Next round, p0 gone: c2 goes (its child m4 checkpointed).
        let leases: Vec<Lease> = leases.into_iter().filter(|l| l.key != "p0" && l.key != "p3").collect();
        assert_eq!(keys(finished_leases(&shards, &leases)), ["c2"]);
        // A shard that aged out of the stream with no children: garbage.
        let leases = vec![at("gone", Position::ShardEnd, &[], &[])];
        assert_eq!(keys(finished_leases(&shards, &leases)), ["gone"]);
        let leases = vec![at("c1", Position::ShardEnd, &[], &[])];
        assert!(finished_leases(&shards, &leases).is_empty(), "listed and childless: kept");
    }

    #[test]
    fn a_cleaned_up_lineage_is_not_leased_again() {
        // p0 and c2 (and p3) cleaned up; c1 and m4 leased.
        let leases = vec![
            at("c1", Position::Sequence("1".into()), &["p0"], &[]),
            at("m4", Position::TrimHorizon, &["c2", "p3"], &[]),
        ];
        assert!(new_leases(&resharded(), &leases, InitialPosition::TrimHorizon).is_empty());
    }

    #[test]
    fn a_stream_sees_its_own_leases_keyed_by_shard() {
        let mut a0 = Lease::new_in_stream("1:a:1", "p0", Position::ShardEnd);
        a0.child_shard_ids = vec!["c1".into()];
        let leases = [a0, Lease::new_in_stream("1:b:1", "p0", Position::Latest), Lease::new("p0", Position::Latest)];
        let a = by_shard(&leases, Some("1:a:1"));
        assert_eq!(positions(&a), [("p0", "SHARD_END")]);
        assert_eq!(a[0].child_shard_ids, ["c1"], "parents and children are shard ids already");
        assert_eq!(positions(&by_shard(&leases, None)), [("p0", "LATEST")], "single-stream leases only");
        // The pure rules then work per stream: stream a's p0 is leased, its children are not.
        let shards = vec![shard("p0", &[], false), shard("c1", &["p0"], true)];
        let new = new_leases(&shards, &a, InitialPosition::Latest);
        assert_eq!(positions(&new), [("c1", "TRIM_HORIZON")], "a child of a leased shard starts at its horizon");
    }

    #[test]
    fn nothing_new_when_every_shard_is_leased() {
        let shards = resharded();
        let existing: Vec<Lease> = shards.iter().map(|s| Lease::new(s.shard_id.clone(), Position::Latest)).collect();
        assert!(new_leases(&shards, &existing, InitialPosition::TrimHorizon).is_empty());
    }

    #[test]
    fn a_parent_that_aged_out_of_the_stream_does_not_block_the_order() {
        let shards = vec![shard("c1", &["gone"], true)];
        let leases = new_leases(&shards, &[], InitialPosition::TrimHorizon);
        assert_eq!(positions(&leases), [("c1", "TRIM_HORIZON")]);
        assert_eq!(leases[0].parent_shard_ids, ["gone"]);
    }
}
