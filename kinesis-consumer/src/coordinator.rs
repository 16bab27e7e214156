//! The lease coordinator of one worker: the leases it holds, kept by renewing them, and the
//! rounds that take (and steal) more, up to its share.
//!
//! The rounds are explicit calls ([`LeaseCoordinator::renew_round`] every failover/3,
//! [`LeaseCoordinator::take_round`] every 2 x failover, as the KCL does); the scheduler drives them.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::LeaseTableError;
use crate::lease::Lease;
use crate::lease_table::{LeaseTable, Outcome};
use crate::planner::{Observations, plan};

/// Settings of a coordinator. Defaults are the KCL's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// This worker's id, written as `leaseOwner`.
    pub worker_id: String,
    /// A lease whose counter stood still this long is expired (KCL `failoverTimeMillis`, 10 s).
    pub failover: Duration,
    /// The most leases stolen in one take round (KCL: 1).
    pub max_steal_per_round: usize,
}

impl CoordinatorConfig {
    /// The KCL's defaults for a worker.
    pub fn new(worker_id: impl Into<String>) -> Self {
        CoordinatorConfig { worker_id: worker_id.into(), failover: Duration::from_secs(10), max_steal_per_round: 1 }
    }

    /// How often held leases are renewed: a third of the failover time.
    pub fn renew_interval(&self) -> Duration {
        self.failover / 3
    }

    /// How often a take round runs: twice the failover time.
    pub fn take_interval(&self) -> Duration {
        self.failover * 2
    }
}

/// One worker's leases.
#[derive(Debug)]
pub struct LeaseCoordinator {
    table: LeaseTable,
    config: CoordinatorConfig,
    held: BTreeMap<String, Lease>,
    observations: Observations,
}

impl LeaseCoordinator {
    /// A coordinator holding nothing yet.
    pub fn new(table: LeaseTable, config: CoordinatorConfig) -> Self {
        LeaseCoordinator { table, config, held: BTreeMap::new(), observations: Observations::default() }
    }

    /// The settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The leases held, as last written by this worker.
    pub fn held(&self) -> impl Iterator<Item = &Lease> {
        self.held.values()
    }

    /// Replaces a held lease by its newer state (after a checkpoint moved its counter). A lease
    /// not held is ignored.
    pub fn update(&mut self, lease: Lease) {
        if let Some(held) = self.held.get_mut(&lease.key) {
            *held = lease;
        }
    }

    /// Forgets a lease (its shard ended, or its processing stopped) without writing anything.
    pub fn forget(&mut self, key: &str) -> Option<Lease> {
        self.held.remove(key)
    }

    /// Renews every held lease. Returns the keys of the leases lost (another worker took them);
    /// they are no longer held. A lease whose renew failed otherwise is kept: the next round tries
    /// again, and if it keeps failing other workers see the lease expire.
    ///
    /// # Errors
    /// The first error other than a lost lease, after every lease was tried.
    pub async fn renew_round(&mut self) -> Result<Vec<String>, LeaseTableError> {
        let mut lost = Vec::new();
        let mut first_error = None;
        let keys: Vec<String> = self.held.keys().cloned().collect();
        for key in keys {
            let Some(lease) = self.held.get(&key) else { continue };
            match self.table.renew(lease).await {
                Ok(Outcome::Done(renewed)) => {
                    self.held.insert(key, *renewed);
                }
                Ok(Outcome::Lost) => {
                    self.held.remove(&key);
                    lost.push(key);
                }
                Err(error) => {
                    tracing::warn!(lease = %key, %error, "renewing a lease failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if lost.is_empty() => Err(error),
            _ => Ok(lost),
        }
    }

    /// Lists the table, watches the counters, and takes (or steals) leases up to this worker's
    /// share. Returns the keys of the leases gained.
    ///
    /// # Errors
    /// When listing the table fails, or a take fails with an error other than a lost race.
    pub async fn take_round(&mut self, now: Instant) -> Result<Vec<String>, LeaseTableError> {
        let leases = self.table.list().await?;
        self.observations.observe(&leases, now);
        let me = self.config.worker_id.as_str();
        let failover = self.config.failover;
        let expired = |lease: &Lease| self.observations.is_expired(lease, now, failover);
        let round = plan(&leases, me, expired, self.config.max_steal_per_round);
        // A lease the table says is ours but this coordinator does not hold (the worker restarted
        // under the same id) is taken back first: nobody else would, as it looks held.
        let orphans: Vec<String> = leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(me) && !self.held.contains_key(&l.key))
            .map(|l| l.key.clone())
            .collect();
        let mut gained = Vec::new();
        for key in orphans.iter().chain(&round.take).chain(&round.steal) {
            let Some(lease) = leases.iter().find(|l| &l.key == key) else { continue };
            match self.table.take(lease, me).await? {
                Outcome::Done(taken) => {
                    self.held.insert(key.clone(), *taken);
                    gained.push(key.clone());
                }
                // Another worker was faster; the next round sees it.
                Outcome::Lost => {}
            }
        }
        Ok(gained)
    }

    /// Gives every held lease up (graceful shutdown), so that other workers take them at once.
    ///
    /// # Errors
    /// The first error other than a lost lease, after every lease was tried.
    pub async fn release_all(&mut self) -> Result<(), LeaseTableError> {
        let mut first_error = None;
        for (key, lease) in std::mem::take(&mut self.held) {
            if let Err(error) = self.table.release(&lease).await {
                tracing::warn!(lease = %key, %error, "releasing a lease failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
