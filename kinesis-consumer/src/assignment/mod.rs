//! Who processes which lease: pure decisions, no I/O, tested as tables.
//!
//! - [`taker`]: the KCL 2.x way, each worker for itself: take free and expired leases up to an
//!   even share, steal from the busiest worker.
//! - [`count`]: the KCL 3.x way, one leader for all: assign free and expired leases, balance by
//!   lease count with graceful handoffs.
//! - [`utilisation`]: the KCL 3.x default: assign and balance by worker utilisation (CPU, or the
//!   throughput of a worker's leases), with graceful handoffs.

pub(crate) mod count;
pub(crate) mod taker;
pub(crate) mod utilisation;

use std::collections::BTreeSet;

use crate::leases::lease::{Lease, Position};
pub use utilisation::UtilisationConfig;

/// How a KCL 3.x leader shares the leases among the workers (KCL `leaseAssignmentStrategy`).
/// Either way, free and expired leases are assigned at once and planned moves are graceful
/// handoffs, made every 6 x failover (the KCL's every third assignment run of 2 x failover,
/// `varianceBalancingFrequency`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AssignmentStrategy {
    /// By worker utilisation (the KCL's default, `WORKER_UTILIZATION_AWARE_ASSIGNMENT`): a worker
    /// whose CPU (or, without CPU figures, the throughput of its leases) is more than the
    /// threshold above the fleet's average hands leases carrying load to the least loaded.
    WorkerUtilisation(UtilisationConfig),
    /// By lease count (KCL `LEASE_COUNT_BASED_ASSIGNMENT`): holdings end within one lease of each
    /// other.
    LeaseCount,
}

impl Default for AssignmentStrategy {
    fn default() -> Self {
        AssignmentStrategy::WorkerUtilisation(UtilisationConfig::default())
    }
}

/// One write the leader makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Move {
    /// `assignLease`: the lease goes to `to` at once (it is free, or its owner stopped renewing).
    Assign { key: String, to: String },
    /// `initiateGracefulLeaseHandoff`: the owner `from` finishes, checkpoints and transfers.
    HandOff { key: String, from: String, to: String },
}

/// What the leader knows at one run.
pub(crate) struct Fleet<'a> {
    pub leases: &'a [Lease],
    /// Workers with a fresh WorkerMetricStats row.
    pub active: &'a BTreeSet<String>,
    /// Whether the leader saw the lease's counter stand still for longer than the failover time.
    pub expired: &'a dyn Fn(&Lease) -> bool,
    /// The most leases a worker is given (KCL `maxLeasesForWorker`).
    pub max_per_worker: usize,
    /// Whether this run balances.
    pub balance: bool,
}

/// Where a lease stands at a run of the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Standing<'l> {
    /// No owner and not mid-handoff: assigned first.
    Free,
    /// Its counter stood still for longer than the failover time: assigned to another worker.
    Expired,
    /// Held by (or being handed to) this owner.
    Held(&'l str),
    /// No owner but a `checkpointOwner`, not expired: left as it is.
    Unowned,
}

impl<'a> Fleet<'a> {
    /// The leases not at SHARD_END: a finished lease counts for nobody.
    pub(crate) fn live(&self) -> impl Iterator<Item = &'a Lease> + use<'a> {
        self.leases.iter().filter(|l| l.checkpoint.position != Position::ShardEnd)
    }

    /// Where `lease` stands: the one classification both strategies assign by.
    pub(crate) fn standing<'l>(&self, lease: &'l Lease) -> Standing<'l> {
        match lease.owner.as_deref() {
            None if lease.checkpoint_owner.is_none() => Standing::Free,
            _ if (self.expired)(lease) => Standing::Expired,
            Some(owner) => Standing::Held(owner),
            None => Standing::Unowned,
        }
    }

    /// How many live leases want an owner (free or expired): what a run that assigns them all
    /// leaves none of.
    pub(crate) fn wanting_owner(&self) -> usize {
        self.live().filter(|l| matches!(self.standing(l), Standing::Free | Standing::Expired)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_wanting_an_owner_are_the_free_and_the_expired_not_the_finished() {
        // (case, owners as in table_test::leases, expired, shard-ended, wanting)
        type Case = (&'static str, &'static [&'static str], &'static [usize], &'static [usize], usize);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("a new table: every lease", &["", "", ""], &[], &[], 3),
            ("held and renewed: none", &["a", "b"], &[], &[], 0),
            ("an expired owner", &["a", "b"], &[1], &[], 1),
            ("mid-handoff is not free", &["a>b", ""], &[], &[], 1),
            ("a stalled handoff that expired", &["a>b"], &[0], &[], 1),
            ("finished leases want nobody", &["", "", "a"], &[2], &[0, 2], 1),
        ];
        for &(name, owners, expired, ended, want) in cases {
            let owners: Vec<(&str, Option<f64>)> = owners.iter().map(|o| (*o, None)).collect();
            let mut leases = table_test::leases(&owners);
            for &i in ended {
                leases[i].checkpoint.position = Position::ShardEnd;
            }
            let is_expired = |l: &Lease| expired.iter().any(|&i| l.key == format!("shard-{i:02}"));
            let active = BTreeSet::new();
            let fleet =
                Fleet { leases: &leases, active: &active, expired: &is_expired, max_per_worker: 99, balance: false };
            assert_eq!(fleet.wanting_owner(), want, "{name}");
        }
    }
}

/// Helpers of the strategies' table tests.
#[cfg(test)]
pub(crate) mod table_test {
    use super::Move;
    use crate::leases::lease::{Lease, Position};

    /// Leases `shard-00`, `shard-01`, ... by owner: "" free, "w" owned by w, "w>v" being handed
    /// off from w to v; each with the given throughput (KiB/s), if any.
    pub(crate) fn leases(owners: &[(&str, Option<f64>)]) -> Vec<Lease> {
        owners
            .iter()
            .enumerate()
            .map(|(i, (owner, kbps))| {
                let mut lease = Lease::new(format!("shard-{i:02}"), Position::TrimHorizon);
                lease.throughput_kbps = *kbps;
                match owner.split_once('>') {
                    Some((from, to)) => {
                        lease.owner = Some(to.to_owned());
                        lease.checkpoint_owner = Some(from.to_owned());
                    }
                    None if owner.is_empty() => {}
                    None => lease.owner = Some((*owner).to_owned()),
                }
                lease
            })
            .collect()
    }

    /// Moves as "00->b" (assigned) and "00:a~>b" (handed off).
    pub(crate) fn moves_of(got: &[Move]) -> Vec<String> {
        got.iter()
            .map(|m| match m {
                Move::Assign { key, to } => format!("{}->{to}", &key[6..]),
                Move::HandOff { key, from, to } => format!("{}:{from}~>{to}", &key[6..]),
            })
            .collect()
    }
}
