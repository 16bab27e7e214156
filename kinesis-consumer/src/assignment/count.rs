//! The KCL 3.x leader's assignment by lease count: a pure decision, tested as a table.
//!
//! Each run of the leader (every failover time and a tenth; the KCL's every 2 x failover):
//! 1. **Expired and unassigned leases first**: a lease with no owner, or whose counter the leader
//!    saw standing still for longer than the failover time, goes to the active worker holding the
//!    fewest leases (ties by worker id); never back to an owner whose lease expired. Unassigned
//!    leases before expired ones, each kind by key.
//! 2. **Balancing** (every 6 x failover, as the KCL's third run of 2 x failover,
//!    `varianceBalancingFrequency`): while the most
//!    loaded active worker holds two or more leases more than the least loaded, one lease moves
//!    from the first to the second by a **graceful handoff**. So a fleet ends with holdings within
//!    one of each other, and a fleet within one never moves a lease (no churn). The KCL's
//!    `LEASE_COUNT_BASED` stops at a target of ceil(leases / workers), which leaves a worker that
//!    joins a fleet whose holdings are at that target with nothing; this does not.
//!
//! Active workers are those with a fresh WorkerMetricStats row. Leases at SHARD_END are done and
//! count for nobody. A lease being handed off (its `checkpointOwner` set) is neither moved nor
//! counted as free; it counts for its new owner.

use std::collections::BTreeMap;

use super::{Fleet, Move, Standing};
use crate::leases::lease::Lease;

/// The moves of one run.
pub(crate) fn plan(fleet: &Fleet<'_>) -> Vec<Move> {
    let live: Vec<&Lease> = fleet.live().collect();
    if fleet.active.is_empty() {
        return Vec::new();
    }
    // Holdings of the active workers (a lease mid-handoff counts for its new owner).
    let mut load: BTreeMap<&str, usize> = fleet.active.iter().map(|w| (w.as_str(), 0)).collect();
    let mut held_by: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    let mut free: Vec<&Lease> = Vec::new();
    let mut expired: Vec<&Lease> = Vec::new();
    for lease in &live {
        match fleet.standing(lease) {
            Standing::Free => free.push(lease),
            Standing::Expired => expired.push(lease),
            Standing::Held(owner) => {
                if let Some(n) = load.get_mut(owner) {
                    *n += 1;
                    held_by.entry(owner).or_default().push(lease);
                }
            }
            Standing::Unowned => {}
        }
    }
    free.sort_by(|a, b| a.key.cmp(&b.key));
    expired.sort_by(|a, b| a.key.cmp(&b.key));
    let mut moves = Vec::new();
    for lease in free.into_iter().chain(expired) {
        let previous = lease.actual_owner();
        let to = load
            .iter()
            .filter(|(w, n)| Some(**w) != previous && **n < fleet.max_per_worker)
            .min_by(|(wa, a), (wb, b)| a.cmp(b).then(wa.cmp(wb)))
            .map(|(w, _)| *w);
        let Some(to) = to else { break };
        *load.get_mut(to).expect("an active worker") += 1;
        moves.push(Move::Assign { key: lease.key.clone(), to: to.to_owned() });
    }
    if !fleet.balance {
        return moves;
    }
    while let Some((&donor, &most)) = load.iter().max_by(|(wa, a), (wb, b)| a.cmp(b).then(wb.cmp(wa))) {
        let Some((&receiver, &least)) = load.iter().min_by(|(wa, a), (wb, b)| a.cmp(b).then(wa.cmp(wb))) else { break };
        if most < least + 2 || least >= fleet.max_per_worker {
            break;
        }
        // The donor's lease with the least throughput (the cheapest to move), by key among equals,
        // not one being handed off already.
        let candidates = held_by.entry(donor).or_default();
        let pick = candidates
            .iter()
            .enumerate()
            .filter(|(_, l)| l.checkpoint_owner.is_none())
            .min_by(|(_, a), (_, b)| {
                let (ta, tb) = (a.throughput_kbps.unwrap_or(0.0), b.throughput_kbps.unwrap_or(0.0));
                ta.total_cmp(&tb).then(a.key.cmp(&b.key))
            })
            .map(|(i, _)| i);
        let Some(i) = pick else {
            // Nothing movable there now: leave this donor out for the rest of the run.
            load.remove(donor);
            continue;
        };
        let lease = candidates.remove(i);
        *load.get_mut(donor).expect("donor") -= 1;
        *load.get_mut(receiver).expect("receiver") += 1;
        moves.push(Move::HandOff { key: lease.key.clone(), from: donor.to_owned(), to: receiver.to_owned() });
    }
    moves
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use crate::assignment::table_test::moves_of;

    fn leases(owners: &[&str]) -> Vec<Lease> {
        let owners: Vec<(&str, Option<f64>)> = owners.iter().map(|o| (*o, None)).collect();
        crate::assignment::table_test::leases(&owners)
    }

    #[test]
    fn assignment_table() {
        // (case, owners, expired leases, active workers, balance, max per worker, moves)
        type Case = (
            &'static str,
            &'static [&'static str],
            &'static [usize],
            &'static [&'static str],
            bool,
            usize,
            &'static [&'static str],
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("free leases go to the least loaded", &["", "", "", "a"], &[], &["a", "b"], false, 99, &["00->b", "01->a", "02->b"]),
            ("nobody active: nothing", &["", ""], &[], &[], true, 99, &[]),
            ("an expired lease never goes back to its owner", &["a", "a", "b"], &[0], &["a", "b"], false, 99, &["00->b"]),
            ("a dead worker's leases spread", &["d", "d", "d", "d"], &[0, 1, 2, 3], &["a", "b"], false, 99, &["00->a", "01->b", "02->a", "03->b"]),
            ("a new worker gets a share by handoff", &["a", "a", "a", "a", "b", "b", "b", "b"], &[], &["a", "b", "c"], true, 99, &["00:a~>c", "04:b~>c"]),
            ("within one of each other: no move", &["a", "a", "a", "b", "b", "c", "c"], &[], &["a", "b", "c"], true, 99, &[]),
            ("balancing waits for its run", &["a", "a", "a", "a"], &[], &["a", "b"], false, 99, &[]),
            ("one alone keeps everything", &["a", "a", "a"], &[], &["a"], true, 99, &[]),
            ("a lease mid-handoff stays and counts for its new owner", &["a>b", "a", "a", "a"], &[], &["a", "b"], true, 99, &["01:a~>b"]),
            ("the cap holds", &["", "", "", ""], &[], &["a", "b"], false, 1, &["00->a", "01->b"]),
            ("a worker without metrics keeps what it renews", &["x", "x", "x", ""], &[], &["a"], true, 99, &["03->a"]),
        ];
        for &(name, owners, expired, active, balance, max, want) in cases {
            let all = leases(owners);
            let active: BTreeSet<String> = active.iter().map(|w| w.to_string()).collect();
            let is_expired = |l: &Lease| expired.iter().any(|&i| l.key == format!("shard-{i:02}"));
            let fleet = Fleet { leases: &all, active: &active, expired: &is_expired, max_per_worker: max, balance };
            assert_eq!(moves_of(&plan(&fleet)), want, "{name}");
        }
    }

    #[test]
    fn a_balanced_fleet_never_churns_and_an_unbalanced_one_settles_in_one_run() {
        let active: BTreeSet<String> = ["a", "b", "c", "d", "e"].iter().map(|w| w.to_string()).collect();
        let never = |_: &Lease| false;
        // 12 leases on one worker, four join: one balancing run leaves holdings within one.
        let mut all = leases(&["a"; 12]);
        let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
        for m in plan(&fleet) {
            if let Move::HandOff { key, to, .. } = m {
                let lease = all.iter_mut().find(|l| l.key == key).unwrap();
                lease.owner = Some(to);
            }
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for lease in &all {
            *counts.entry(lease.owner.clone().unwrap()).or_default() += 1;
        }
        let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
        let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
        assert!(plan(&fleet).is_empty(), "a balanced fleet moves nothing");
    }

    #[test]
    fn finished_leases_count_for_nobody() {
        let mut all = leases(&["", "", "a"]);
        all[0].checkpoint.position = crate::leases::lease::Position::ShardEnd;
        let active: BTreeSet<String> = ["a", "b"].iter().map(|w| w.to_string()).collect();
        let never = |_: &Lease| false;
        let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
        assert_eq!(moves_of(&plan(&fleet)), ["01->b"]);
    }
}
