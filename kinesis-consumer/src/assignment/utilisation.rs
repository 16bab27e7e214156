//! The KCL 3.x leader's assignment by worker utilisation (the KCL's default,
//! `WORKER_UTILIZATION_AWARE_ASSIGNMENT`): a pure decision, tested as a table.
//!
//! **Load.** Each active worker's load is read on its own scale and compared with the fleet's
//! average on that scale, as a ratio `ρ` (1 = average):
//! - a worker whose WorkerMetricStats row carries CPU figures: its CPU (the EMA, α 0.5, of the
//!   row's `sts.C` list) over the mean CPU of such workers;
//! - a worker without CPU figures (a KCL worker off AWS, or `CpuSource::Off`): the summed
//!   `throughputKBps` of the leases it holds over the mean of such workers.
//!
//! A lease's weight is its `throughputKBps` (one without a figure weighs the mean of those with
//! one). Moving a lease moves `weight / (total throughput / active workers)` of an average worker's
//! load; with no throughput anywhere, `1 / max(leases / workers, 1)`.
//!
//! Each run of the leader:
//! 1. **Expired and unassigned leases first** (as [`super::count`]): each goes to the active
//!    worker with the lowest `ρ` (then the fewest leases, then by id), never back to an owner
//!    whose lease expired, within `max_per_worker`; the receiver's `ρ` grows by the lease's load.
//! 2. **Balancing** (every 6 x failover, the KCL's every third run): on each scale, when a worker is outside the band
//!    `1 ± rebalance_threshold` or above its operating range (`opr.C`), each donor (above the
//!    band or its range; otherwise the most loaded) sheds `its throughput × (ρ − 1)/ρ ×
//!    dampening`: its heaviest leases that fit, or its lightest one when none fits. The scale
//!    with the most to shed is balanced, as the KCL does. Each lease goes to the lowest-`ρ` worker
//!    by a graceful handoff, and a donor stops when the next move would put its receiver above
//!    the average.
//!
//! Where this differs from the KCL 3.5.1, on purpose:
//! - **No churn on idle shards** (the KCL's PR #1814): a lease with no throughput is never moved
//!   to relieve a donor; moving it relieves nothing, and the KCL moves such leases back and forth
//!   run after run while a worker's CPU stays above the band for other reasons.
//! - A worker measured by throughput is a donor only above the band; the KCL also gives it an
//!   operating range of 100 % of the average, which makes every worker above the average a donor.
//! - Choices are deterministic (heaviest first, then by key) instead of shuffled, so a table test
//!   pins them down.

use std::collections::BTreeMap;

use super::{Fleet, Move, Standing};
use crate::leases::lease::Lease;

/// The thresholds of the utilisation-aware assignment (KCL
/// `WorkerUtilizationAwareAssignmentConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct UtilisationConfig {
    /// A worker more than this many percent above or below the fleet's average load triggers a
    /// rebalance (KCL `reBalanceThresholdPercentage`: 10).
    pub rebalance_threshold_percent: u32,
    /// The share, in percent, of a donor's excess load it sheds in one balancing run (KCL
    /// `dampeningPercentage`: 60). Lower moves fewer leases per run and converges more slowly.
    pub dampening_percent: u32,
}

impl Default for UtilisationConfig {
    fn default() -> Self {
        UtilisationConfig { rebalance_threshold_percent: 10, dampening_percent: 60 }
    }
}

/// The load figures an active worker published in its WorkerMetricStats row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct WorkerLoad {
    /// CPU utilisation in percent (the EMA of its `sts.C` figures), if it reports CPU.
    pub cpu: Option<f64>,
    /// Its operating range for CPU (`opr.C[0]`, percent; KCL default 100).
    pub cpu_max: Option<f64>,
}

/// One active worker during a run.
#[derive(Debug)]
struct Worker<'a> {
    id: &'a str,
    /// Whether its load is measured by CPU (else by throughput).
    by_cpu: bool,
    /// Its load over its scale's average.
    ratio: f64,
    /// Its operating range over its scale's average (CPU workers only).
    ratio_max: f64,
    /// Its leases that may move (not being handed off), and how many it holds in all.
    movable: Vec<&'a Lease>,
    held: usize,
    throughput: f64,
}

/// The moves of one run.
pub(crate) fn plan(fleet: &Fleet<'_>, loads: &BTreeMap<String, WorkerLoad>, config: &UtilisationConfig) -> Vec<Move> {
    let live: Vec<&Lease> = fleet.live().collect();
    let active: Vec<&str> = fleet.active.iter().map(String::as_str).collect();
    if active.is_empty() {
        return Vec::new();
    }
    let known: Vec<f64> =
        live.iter().filter_map(|l| l.throughput_kbps).filter(|t| t.is_finite() && *t >= 0.0).collect();
    let mean_weight = if known.is_empty() { 0.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
    let weight = |l: &Lease| l.throughput_kbps.filter(|t| t.is_finite() && *t >= 0.0).unwrap_or(mean_weight);
    let total: f64 = live.iter().map(|l| weight(l)).sum();
    let per_worker = total / active.len() as f64;
    let leases_per_worker = (live.len() / active.len()).max(1) as f64;
    // The share of an average worker's load a lease carries.
    let share = |l: &Lease| if per_worker > 0.0 { weight(l) / per_worker } else { 1.0 / leases_per_worker };

    let mut workers: BTreeMap<&str, Worker<'_>> = active
        .iter()
        .map(|&id| {
            let load = loads.get(id).copied().unwrap_or_default();
            let worker = Worker {
                id,
                by_cpu: load.cpu.is_some(),
                ratio: 0.0,
                ratio_max: f64::INFINITY,
                movable: Vec::new(),
                held: 0,
                throughput: 0.0,
            };
            (id, worker)
        })
        .collect();
    let (mut free, mut expired) = (Vec::new(), Vec::new());
    for lease in &live {
        match fleet.standing(lease) {
            Standing::Free => free.push(*lease),
            Standing::Expired => expired.push(*lease),
            Standing::Held(owner) => {
                if let Some(w) = workers.get_mut(owner) {
                    w.held += 1;
                    w.throughput += weight(lease);
                    if lease.checkpoint_owner.is_none() {
                        w.movable.push(lease);
                    }
                }
            }
            Standing::Unowned => {}
        }
    }
    // Each scale's ratios.
    let mean = |by_cpu: bool, workers: &BTreeMap<&str, Worker<'_>>| {
        let values: Vec<f64> = workers
            .values()
            .filter(|w| w.by_cpu == by_cpu)
            .map(|w| if by_cpu { loads[w.id].cpu.unwrap_or(0.0) } else { w.throughput })
            .collect();
        if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 }
    };
    let (cpu_mean, throughput_mean) = (mean(true, &workers), mean(false, &workers));
    for w in workers.values_mut() {
        let (value, average) =
            if w.by_cpu { (loads[w.id].cpu.unwrap_or(0.0), cpu_mean) } else { (w.throughput, throughput_mean) };
        if average > 0.0 {
            w.ratio = value / average;
            if w.by_cpu {
                w.ratio_max = loads[w.id].cpu_max.filter(|m| *m > 0.0).unwrap_or(100.0) / average;
            }
        }
    }

    free.sort_by(|a, b| a.key.cmp(&b.key));
    expired.sort_by(|a, b| a.key.cmp(&b.key));
    let mut moves = Vec::new();
    for lease in free.into_iter().chain(expired) {
        let previous = lease.actual_owner();
        let Some(to) = lightest(&workers, fleet.max_per_worker, |w| Some(w) != previous) else { break };
        let receiver = workers.get_mut(to).expect("an active worker");
        receiver.ratio += share(lease);
        receiver.held += 1;
        receiver.throughput += weight(lease);
        moves.push(Move::Assign { key: lease.key.clone(), to: to.to_owned() });
    }
    if !fleet.balance {
        return moves;
    }

    // Balancing: the scale with the most to shed.
    let band = f64::from(config.rebalance_threshold_percent) / 100.0;
    let dampening = f64::from(config.dampening_percent.min(100)) / 100.0;
    let mut best: Option<(f64, Vec<(&str, f64)>)> = None;
    for by_cpu in [true, false] {
        let scale: Vec<&Worker<'_>> = workers.values().filter(|w| w.by_cpu == by_cpu && w.ratio > 0.0).collect();
        let over = |w: &Worker<'_>| w.ratio > 1.0 + band || w.ratio > w.ratio_max;
        let triggered = scale.iter().any(|w| over(w) || w.ratio < 1.0 - band)
            && workers.values().filter(|w| w.by_cpu == by_cpu).count() > 1;
        if !triggered {
            continue;
        }
        let mut donors: Vec<&Worker<'_>> = scale.iter().copied().filter(|w| over(w)).collect();
        if donors.is_empty() {
            donors.extend(scale.iter().copied().filter(|w| w.ratio > 1.0).max_by(|a, b| a.ratio.total_cmp(&b.ratio)));
        }
        let sheds: Vec<(&str, f64)> = donors
            .iter()
            .map(|w| (w.id, w.throughput * (w.ratio - 1.0).max(0.0) / w.ratio * dampening))
            .filter(|(_, shed)| *shed > 0.0)
            .collect();
        let sum: f64 = sheds.iter().map(|(_, s)| s).sum();
        if sum > 0.0 && best.as_ref().is_none_or(|(b, _)| sum > *b) {
            best = Some((sum, sheds));
        }
    }
    let Some((_, mut sheds)) = best else { return moves };
    sheds.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    for (donor, shed) in sheds {
        // Only leases that carry load relieve the donor (no churn of idle leases).
        let mut candidates: Vec<&Lease> = workers[donor].movable.iter().copied().filter(|l| weight(l) > 0.0).collect();
        candidates.sort_by(|a, b| weight(b).total_cmp(&weight(a)).then(a.key.cmp(&b.key)));
        let mut remaining = shed;
        let mut taken: Vec<&Lease> = Vec::new();
        for lease in &candidates {
            if remaining - weight(lease) > 0.0 {
                remaining -= weight(lease);
                taken.push(lease);
            }
        }
        if taken.is_empty()
            && let Some(lightest_lease) = candidates.last()
        {
            taken.push(lightest_lease);
        }
        for lease in taken {
            let Some(to) = lightest(&workers, fleet.max_per_worker, |w| w != donor) else { break };
            if workers[to].ratio + share(lease) > 1.0 {
                break;
            }
            let receiver = workers.get_mut(to).expect("an active worker");
            receiver.ratio += share(lease);
            receiver.held += 1;
            receiver.throughput += weight(lease);
            let giver = workers.get_mut(donor).expect("the donor");
            giver.ratio -= share(lease);
            giver.held -= 1;
            giver.throughput -= weight(lease);
            giver.movable.retain(|l| l.key != lease.key);
            moves.push(Move::HandOff { key: lease.key.clone(), from: donor.to_owned(), to: to.to_owned() });
        }
    }
    moves
}

/// The eligible worker with the lowest load ratio, then the fewest leases, then by id.
fn lightest<'a>(
    workers: &BTreeMap<&'a str, Worker<'_>>,
    max_per_worker: usize,
    eligible: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    workers
        .iter()
        .filter(|(id, w)| eligible(id) && w.held < max_per_worker)
        .min_by(|(ia, a), (ib, b)| a.ratio.total_cmp(&b.ratio).then(a.held.cmp(&b.held)).then(ia.cmp(ib)))
        .map(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use crate::assignment::table_test::moves_of;

    fn leases(owners: &[(&str, f64)]) -> Vec<Lease> {
        let owners: Vec<(&str, Option<f64>)> = owners.iter().map(|(o, t)| (*o, Some(*t))).collect();
        crate::assignment::table_test::leases(&owners)
    }

    /// Workers as "id" (by throughput) or "id=cpu" (by CPU, operating range 100).
    fn loads(workers: &[&str]) -> BTreeMap<String, WorkerLoad> {
        workers
            .iter()
            .map(|w| match w.split_once('=') {
                Some((id, cpu)) => {
                    (id.to_owned(), WorkerLoad { cpu: Some(cpu.parse().unwrap()), cpu_max: Some(100.0) })
                }
                None => ((*w).to_owned(), WorkerLoad::default()),
            })
            .collect()
    }

    fn run(owners: &[(&str, f64)], expired: &[usize], workers: &[&str], balance: bool, max: usize) -> Vec<String> {
        let all = leases(owners);
        let loads = loads(workers);
        let active: BTreeSet<String> = loads.keys().cloned().collect();
        let is_expired = |l: &Lease| expired.iter().any(|&i| l.key == format!("shard-{i:02}"));
        let fleet = Fleet { leases: &all, active: &active, expired: &is_expired, max_per_worker: max, balance };
        moves_of(&plan(&fleet, &loads, &UtilisationConfig::default()))
    }

    #[test]
    fn assignment_table() {
        // (case, leases (owner, KiB/s), expired, workers, balance, max per worker, moves)
        type Case = (
            &'static str,
            &'static [(&'static str, f64)],
            &'static [usize],
            &'static [&'static str],
            bool,
            usize,
            &'static [&'static str],
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("nobody active: nothing", &[("", 1.0)], &[], &[], true, 99, &[]),
            ("free leases go to the least loaded by CPU", &[("", 1.0), ("", 1.0), ("a", 1.0), ("b", 1.0)], &[], &["a=80", "b=20"], false, 99, &["00->b", "01->b"]),
            ("free leases go to the least throughput", &[("", 1.0), ("a", 5.0), ("b", 1.0)], &[], &["a", "b"], false, 99, &["00->b"]),
            ("an idle fleet spreads free leases by count", &[("", 0.0), ("", 0.0), ("", 0.0), ("", 0.0)], &[], &["a", "b"], true, 99, &["00->a", "01->b", "02->a", "03->b"]),
            ("an expired lease never goes back to its owner", &[("a", 1.0), ("b", 1.0)], &[0], &["a", "b"], false, 99, &["00->b"]),
            ("the cap holds", &[("", 1.0), ("", 1.0), ("", 1.0)], &[], &["a", "b"], false, 1, &["00->a", "01->b"]),
            ("a busy CPU sheds what fits in its excess, to the idlest", &[("a", 4.0), ("a", 2.0), ("a", 1.0), ("b", 1.0), ("c", 1.0)], &[], &["a=90", "b=30", "c=30"], true, 99, &["02:a~>b"]),
            ("within the band: no move", &[("a", 1.0), ("a", 1.0), ("b", 1.0), ("b", 1.0)], &[], &["a=52", "b=48"], true, 99, &[]),
            ("balancing waits for its run", &[("a", 4.0), ("a", 2.0), ("b", 1.0)], &[], &["a=90", "b=10"], false, 99, &[]),
            ("no churn of idle leases: a busy worker keeps leases with no throughput", &[("a", 0.0), ("a", 0.0), ("b", 0.0)], &[], &["a=90", "b=10"], true, 99, &[]),
            ("by throughput: the heaviest holder sheds, its lightest lease when none fits", &[("a", 3.0), ("a", 3.0), ("a", 3.0), ("b", 1.0)], &[], &["a", "b"], true, 99, &["02:a~>b"]),
            ("a move that would put the receiver above average is not made", &[("a", 10.0), ("b", 7.0)], &[], &["a", "b"], true, 99, &[]),
            ("a lease mid-handoff stays", &[("a>b", 5.0), ("a", 5.0), ("a", 5.0)], &[], &["a=90", "b=10"], true, 99, &["02:a~>b"]),
            ("one alone keeps everything", &[("a", 5.0), ("a", 5.0)], &[], &["a=99"], true, 99, &[]),
            ("a worker without a row keeps what it renews", &[("x", 5.0), ("x", 5.0), ("", 1.0)], &[], &["a"], true, 99, &["02->a"]),
        ];
        for &(name, owners, expired, workers, balance, max, want) in cases {
            assert_eq!(run(owners, expired, workers, balance, max), want, "{name}");
        }
    }

    #[test]
    fn finished_leases_count_for_nobody() {
        let owners = [("", 1.0), ("", 1.0), ("a", 1.0)];
        let mut all = leases(&owners);
        all[0].checkpoint.position = crate::leases::lease::Position::ShardEnd;
        let loads = loads(&["a", "b"]);
        let active: BTreeSet<String> = loads.keys().cloned().collect();
        let never = |_: &Lease| false;
        let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
        assert_eq!(moves_of(&plan(&fleet, &loads, &UtilisationConfig::default())), ["01->b"]);
    }

    /// A fleet balanced by throughput run after run (each run's moves applied) settles, and then
    /// never moves a lease again.
    #[test]
    fn throughput_balancing_settles_and_then_stops() {
        let mut all = leases(&[("a", 1.0); 12]);
        let loads = loads(&["a", "b", "c"]);
        let active: BTreeSet<String> = loads.keys().cloned().collect();
        let never = |_: &Lease| false;
        let mut quiet_runs = 0;
        for _ in 0..40 {
            let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
            let moves = plan(&fleet, &loads, &UtilisationConfig::default());
            if moves.is_empty() {
                quiet_runs += 1;
            }
            for m in moves {
                if let Move::HandOff { key, to, .. } = m {
                    all.iter_mut().find(|l| l.key == key).unwrap().owner = Some(to);
                }
            }
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for lease in &all {
            *counts.entry(lease.owner.clone().unwrap()).or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [4, 4, 4], "{counts:?}");
        let fleet = Fleet { leases: &all, active: &active, expired: &never, max_per_worker: 99, balance: true };
        assert!(plan(&fleet, &loads, &UtilisationConfig::default()).is_empty(), "settled");
        assert!(quiet_runs > 20, "it settled in a few runs, then stayed put ({quiet_runs} quiet runs of 40)");
    }
}
