//! Which leases a worker takes or steals: pure decisions, no I/O, tested as tables.
//!
//! Expiry is judged the KCL way, by watching: a lease whose counter this worker has seen unchanged
//! for longer than the failover time has an owner that stopped renewing. Clocks of different
//! workers are never compared ([`Observations`] uses this worker's monotonic clock only).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::leases::lease::{Lease, Position};

/// What this worker has seen of each lease: its counter, and when that counter last changed.
#[derive(Debug, Default)]
pub struct Observations {
    seen: HashMap<String, (u64, Instant)>,
}

impl Observations {
    /// Notes a listing of the table made at `now`. Leases that are gone are forgotten.
    pub fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut seen = HashMap::with_capacity(leases.len());
        for lease in leases {
            let since = match self.seen.get(&lease.key) {
                Some(&(counter, since)) if counter == lease.counter => since,
                _ => now,
            };
            seen.insert(lease.key.clone(), (lease.counter, since));
        }
        self.seen = seen;
    }

    /// Whether an owned lease's counter has stood still, as seen here, for longer than
    /// `failover`. A free lease is not expired (it is free); a lease never observed is not either.
    pub fn is_expired(&self, lease: &Lease, now: Instant, failover: Duration) -> bool {
        lease.owner.is_some()
            && self.seen.get(&lease.key).is_some_and(|&(counter, since)| {
                counter == lease.counter && now.saturating_duration_since(since) > failover
            })
    }
}

/// What to do this round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Leases to take, expired ones first, then free ones, by key.
    pub take: Vec<String>,
    /// Leases to steal from the most loaded worker.
    pub steal: Vec<String>,
    /// The number of leases each worker should hold.
    pub target: usize,
}

/// Plans a round for worker `me`.
///
/// - Leases at SHARD_END are done; they count for nobody.
/// - The workers are the owners of the leases that are not expired, and `me`.
/// - The target is ceil(leases / workers).
/// - Below it, `me` takes expired leases first, then free ones, up to the target.
/// - If there are none, it steals from the most loaded worker: as many as it has over the target
///   (at most `max_steal` a round), or one when that worker is at the target and `me` is two or
///   more below it (so that holdings end within one of each other).
pub fn plan(leases: &[Lease], me: &str, expired: impl Fn(&Lease) -> bool, max_steal: usize) -> Plan {
    let active: Vec<&Lease> = leases.iter().filter(|l| l.checkpoint.position != Position::ShardEnd).collect();
    // Live holdings per worker (sorted, so that ties between workers are broken the same way).
    let mut held: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    held.entry(me).or_default();
    for lease in &active {
        if let Some(owner) = lease.owner.as_deref()
            && (owner == me || !expired(lease))
        {
            held.entry(owner).or_default().push(lease);
        }
    }
    let target = active.len().div_ceil(held.len());
    let mine = held.get(me).map_or(0, Vec::len);
    let mut plan = Plan { target, ..Plan::default() };
    if mine >= target {
        return plan;
    }
    let needed = target - mine;

    let mut expired_leases: Vec<&Lease> =
        active.iter().copied().filter(|l| l.owner.as_deref().is_some_and(|o| o != me) && expired(l)).collect();
    let mut free: Vec<&Lease> = active.iter().copied().filter(|l| l.owner.is_none()).collect();
    expired_leases.sort_by(|a, b| a.key.cmp(&b.key));
    free.sort_by(|a, b| a.key.cmp(&b.key));
    plan.take = expired_leases.into_iter().chain(free).take(needed).map(|l| l.key.clone()).collect();
    if !plan.take.is_empty() {
        return plan;
    }

    // Nothing free: steal from the most loaded worker (the first of equals, by name).
    let Some((_, victim)) = held
        .iter()
        .filter(|(owner, _)| **owner != me)
        .max_by(|(a_owner, a), (b_owner, b)| a.len().cmp(&b.len()).then_with(|| b_owner.cmp(a_owner)))
    else {
        return plan;
    };
    let count = if victim.len() > target {
        (victim.len() - target).min(needed)
    } else if victim.len() == target && mine + 1 < target {
        1
    } else {
        0
    };
    let mut candidates: Vec<&Lease> = victim.clone();
    candidates.sort_by(|a, b| a.key.cmp(&b.key));
    plan.steal = candidates.into_iter().take(count.min(max_steal)).map(|l| l.key.clone()).collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leases named by index, owned as given ("" = free), counters all 1.
    fn leases(owners: &[&str]) -> Vec<Lease> {
        owners
            .iter()
            .enumerate()
            .map(|(i, owner)| Lease {
                owner: (!owner.is_empty()).then(|| owner.to_string()),
                counter: 1,
                ..Lease::new(format!("shard-{i:02}"), Position::TrimHorizon)
            })
            .collect()
    }

    fn none_expired(_: &Lease) -> bool {
        false
    }

    #[test]
    fn planning_table() {
        // (case, owners by lease index ("" = free), expired leases, max steal, take, steal, target)
        type Case =
            (&'static str, &'static [&'static str], &'static [usize], usize, &'static [usize], &'static [usize], usize);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("alone: take everything free", &["", "", "", ""], &[], 1, &[0, 1, 2, 3], &[], 4),
            ("two workers: take up to the target", &["b", "", "", ""], &[], 1, &[1, 2], &[], 2),
            ("at the target: nothing", &["me", "me", "b", "b"], &[], 1, &[], &[], 2),
            ("expired before free", &["", "dead", "", "dead"], &[1, 3], 1, &[1, 3, 0, 2], &[], 4),
            ("a dead worker is not counted", &["dead", "dead", "b", "b"], &[0, 1], 1, &[0, 1], &[], 2),
            ("a new worker steals one a round", &["b", "b", "b", "b", "c", "c", "c", "c"], &[], 1, &[], &[0], 3),
            ("more per round when allowed", &["b", "b", "b", "b", "b", "b"], &[], 5, &[], &[0, 1, 2], 3),
            ("the most loaded over the target gives its excess", &["b", "b", "b", "c", "c", "me"], &[], 3, &[], &[0], 2),
            ("within one of each other: no steal", &["b", "b", "c", "c", "me"], &[], 1, &[], &[], 2),
            ("steal from the most loaded", &["b", "c", "c", "c", "c", "b"], &[], 1, &[], &[1], 2),
            ("very old leases: every owner long gone", &["g1", "g2", "g1", "g3"], &[0, 1, 2, 3], 1, &[0, 1, 2, 3], &[], 4),
            ("very old leases beside a live worker: up to half", &["g1", "g1", "g2", "g2", "b", "b"], &[0, 1, 2, 3], 1, &[0, 1, 2], &[], 3),
            ("mine, even if it looks old, stays mine", &["me", "me", "", ""], &[0, 1], 1, &[2, 3], &[], 4),
        ];
        let keys = |v: &[usize]| v.iter().map(|i| format!("shard-{i:02}")).collect::<Vec<_>>();
        for &(name, owners, expired, max_steal, take, steal, target) in cases {
            let all = leases(owners);
            let is_expired = |l: &Lease| expired.iter().any(|&i| l.key == format!("shard-{i:02}"));
            let got = plan(&all, "me", is_expired, max_steal);
            assert_eq!(got.take, keys(take), "{name}: take");
            assert_eq!(got.steal, keys(steal), "{name}: steal");
            assert_eq!(got.target, target, "{name}: target");
        }
    }

    #[test]
    fn a_victim_at_the_target_loses_one_to_a_worker_two_below() {
        // 7 leases, 3 workers: target 3. b holds 3, c holds 3, me holds 1.
        let all = leases(&["b", "b", "b", "c", "c", "c", "me"]);
        let got = plan(&all, "me", none_expired, 1);
        assert_eq!(got.target, 3);
        assert_eq!(got.steal, vec!["shard-00".to_string()]);
    }

    #[test]
    fn finished_leases_count_for_nobody() {
        let mut all = leases(&["", "", "b", "b"]);
        for lease in &mut all[..2] {
            lease.checkpoint.position = Position::ShardEnd;
        }
        let got = plan(&all, "me", none_expired, 1);
        assert_eq!(got.target, 1, "two active leases, two workers");
        assert!(got.take.is_empty(), "finished leases are not taken");
        assert_eq!(got.steal, vec!["shard-02".to_string()]);
    }

    #[test]
    fn expiry_is_a_counter_standing_still_longer_than_the_failover() {
        let t0 = Instant::now();
        let failover = Duration::from_secs(10);
        let mut seen = Observations::default();
        let mut all = leases(&["a", "", "b"]);
        seen.observe(&all, t0);
        let later = t0 + Duration::from_secs(11);
        // "b" renews (its counter moves); "a" does not.
        all[2].counter = 2;
        seen.observe(&all, later);
        assert!(seen.is_expired(&all[0], later, failover), "a's counter stood still for 11 s");
        assert!(!seen.is_expired(&all[1], later, failover), "a free lease is free, not expired");
        assert!(!seen.is_expired(&all[2], later, failover), "b renewed");
        assert!(!seen.is_expired(&all[2], later + Duration::from_secs(5), failover));
        assert!(seen.is_expired(&all[2], later + Duration::from_secs(11), failover));
        // A lease first seen long after it last changed is not expired until watched for long enough.
        let mut fresh = Observations::default();
        fresh.observe(&all, later);
        assert!(!fresh.is_expired(&all[0], later + Duration::from_secs(5), failover));
    }
}
