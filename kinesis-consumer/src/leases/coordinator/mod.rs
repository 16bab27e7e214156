//! The lease coordinator of one worker: the leases it holds, kept by renewing them, and the
//! rounds that take (and steal) more, up to its share.
//!
//! The rounds are explicit calls ([`LeaseCoordinator::renew_round`] every failover/3,
//! [`LeaseCoordinator::take_round`] every 2 x failover, as the KCL does, and
//! [`LeaseCoordinator::expiry_round`] half-way between two take rounds); the scheduler drives them,
//! the renewer on a task of its own so that a slow take round never delays a renewal. The handle
//! is a cheap `Clone`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::assignment::taker::{Observations, plan};
use crate::error::LeaseTableError;
use crate::leases::held::HeldLease;
use crate::leases::lease::Lease;
use crate::leases::scope::LeaseScope;
use crate::leases::table::{LeaseTable, Outcome};
use crate::metrics::Metrics;

/// Settings of a coordinator. Defaults are the KCL's.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// This worker's id, written as `leaseOwner`.
    pub worker_id: String,
    /// A lease whose counter stood still this long is expired (KCL `failoverTimeMillis`, 10 s).
    pub failover: Duration,
    /// The most leases stolen in one take round (KCL: 1).
    pub max_steal_per_round: usize,
    /// How long a graceful handoff waits for the processor's last checkpoint before the lease is
    /// transferred anyway (KCL `gracefulLeaseHandoffTimeoutMillis`: 30 s).
    pub handoff_timeout: Duration,
}

impl CoordinatorConfig {
    /// The KCL's defaults for a worker.
    pub fn new(worker_id: impl Into<String>) -> Self {
        CoordinatorConfig {
            worker_id: worker_id.into(),
            failover: Duration::from_secs(10),
            max_steal_per_round: 1,
            handoff_timeout: Duration::from_secs(30),
        }
    }

    /// The same, with another failover time.
    pub fn with_failover(mut self, failover: Duration) -> Self {
        self.failover = failover;
        self
    }

    /// How often held leases are renewed: a third of the failover time.
    pub fn renew_interval(&self) -> Duration {
        self.failover / 3
    }

    /// How often a take round runs: twice the failover time.
    pub fn take_interval(&self) -> Duration {
        self.failover * 2
    }

    /// How long after its last successful write a held lease may still be processed: two thirds
    /// of the failover time, so that processing stops before other workers may see the lease as
    /// expired.
    pub fn validity(&self) -> Duration {
        self.failover * 2 / 3
    }
}

/// One worker's leases.
#[derive(Clone, Debug)]
pub struct LeaseCoordinator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: LeaseTable,
    config: CoordinatorConfig,
    held: Mutex<BTreeMap<String, Arc<HeldLease>>>,
    observations: Mutex<Observations>,
    metrics: Arc<Metrics>,
    /// The leases this worker takes (the others are not its application's, or are retired).
    scope: Arc<LeaseScope>,
}

impl LeaseCoordinator {
    /// A coordinator holding nothing yet.
    #[cfg(test)]
    pub fn new(table: LeaseTable, config: CoordinatorConfig) -> Self {
        Self::with_metrics(table, config, Arc::default())
    }

    pub(crate) fn with_metrics(table: LeaseTable, config: CoordinatorConfig, metrics: Arc<Metrics>) -> Self {
        LeaseCoordinator {
            inner: Arc::new(Inner {
                table: table.for_new_instance(),
                config,
                held: Mutex::new(BTreeMap::new()),
                observations: Mutex::new(Observations::default()),
                metrics,
                scope: Arc::new(LeaseScope::new(false)),
            }),
        }
    }

    /// The same coordinator taking only the leases `scope` serves (before it holds any).
    pub(crate) fn with_scope(self, scope: Arc<LeaseScope>) -> Self {
        let inner = Arc::try_unwrap(self.inner).expect("with_scope before the coordinator is shared");
        LeaseCoordinator { inner: Arc::new(Inner { scope, ..inner }) }
    }

    /// The settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// The lease table.
    pub fn table(&self) -> &LeaseTable {
        &self.inner.table
    }

    fn held_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<HeldLease>>> {
        self.inner.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The leases held.
    pub fn held(&self) -> Vec<Arc<HeldLease>> {
        self.held_map().values().cloned().collect()
    }

    /// The keys of the leases held.
    pub fn held_keys(&self) -> Vec<String> {
        self.held_map().keys().cloned().collect()
    }

    /// Forgets a lease (its processing stopped) without writing anything.
    pub fn forget(&self, key: &str) -> Option<Arc<HeldLease>> {
        let forgotten = self.held_map().remove(key);
        self.count_held();
        forgotten
    }

    /// Forgets `held` if it is still the hold of its lease (not a later one).
    pub(crate) fn forget_held(&self, held: &Arc<HeldLease>) -> bool {
        let forgotten = {
            let mut map = self.held_map();
            match map.get(held.key()) {
                Some(current) if Arc::ptr_eq(current, held) => map.remove(held.key()).is_some(),
                _ => false,
            }
        };
        self.count_held();
        forgotten
    }

    /// Gives `held` up, if it is still the hold of its lease, and forgets it.
    pub(crate) async fn release_held(&self, held: &Arc<HeldLease>) -> Result<(), LeaseTableError> {
        if !self.forget_held(held) {
            return Ok(());
        }
        let lease = held.lock().await;
        held.mark_lost();
        if lease.checkpoint_owner.is_some() {
            // Handing off: the leader chose the next owner; give it the lease.
            if let Outcome::Done(_) = self.inner.table.transfer(&lease).await? {
                Metrics::add(&self.inner.metrics.handoffs_completed, 1);
            }
        } else if let Outcome::Done(_) = self.inner.table.release(&lease).await? {
            Metrics::add(&self.inner.metrics.leases_released, 1);
        }
        Ok(())
    }

    fn count_held(&self) {
        let n = self.held_map().len() as u64;
        self.inner.metrics.held.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Renews every held lease, concurrently. Returns the keys of the leases lost: another worker
    /// took them, or they could not be renewed for longer than their validity. They are marked
    /// lost (their consumers stop) and forgotten. A lease whose renew failed otherwise is kept:
    /// the next round tries again.
    ///
    /// # Errors
    /// The first error other than a lost lease, after every lease was tried.
    pub async fn renew_round(&self) -> Result<Vec<String>, LeaseTableError> {
        let held = self.held();
        let results = futures_util::future::join_all(held.iter().map(|h| self.renew(h))).await;
        let mut lost = Vec::new();
        let mut first_error = None;
        for (h, result) in held.iter().zip(results) {
            match result {
                Ok(true) => {}
                Ok(false) => lost.push(h.key().to_owned()),
                Err(error) => {
                    tracing::warn!(lease = h.key(), %error, "renewing a lease failed");
                    if Instant::now() >= h.written_at() + self.inner.config.validity() {
                        tracing::warn!(lease = h.key(), "lease not renewed in time: processing it stops");
                        h.mark_lost();
                        lost.push(h.key().to_owned());
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        for key in &lost {
            self.forget(key);
        }
        Metrics::add(&self.inner.metrics.leases_lost, lost.len() as u64);
        match first_error {
            Some(error) if lost.is_empty() => Err(error),
            _ => Ok(lost),
        }
    }

    /// Renews one lease; `Ok(false)` when it is lost (or, at the end of a handoff whose
    /// processor did not finish in time, transferred).
    async fn renew(&self, held: &Arc<HeldLease>) -> Result<bool, LeaseTableError> {
        if let Some(deadline) = held.handoff_deadline()
            && Instant::now() >= deadline
        {
            tracing::warn!(
                lease = held.key(),
                "the processor did not finish a graceful handoff in time; transferring the lease"
            );
            let transferred = self.transfer_held(held).await;
            // Counted once the transfer was tried, so that a reader of the metric finds the table
            // already written.
            Metrics::add(&self.inner.metrics.handoffs_timed_out, 1);
            transferred?;
            return Ok(false);
        }
        let mut lease = held.lock().await;
        if held.is_lost() {
            return Ok(false);
        }
        let sent = Instant::now();
        let throughput = held.throughput_kbps(sent);
        match self.inner.table.renew(&lease, throughput).await? {
            Outcome::Done(renewed) => {
                *lease = *renewed;
                held.written(sent);
                if lease.checkpoint_owner.is_some() && !held.is_handing_off() {
                    Metrics::add(&self.inner.metrics.handoffs_started, 1);
                    held.request_handoff(sent + self.inner.config.handoff_timeout);
                }
                Ok(true)
            }
            Outcome::Lost => {
                held.mark_lost();
                Ok(false)
            }
        }
    }

    /// Ends a graceful handoff of `held` (if it is still the hold of its lease): the lease passes
    /// to the owner the leader chose, and is forgotten here.
    ///
    /// # Errors
    /// When the write fails for another reason than its condition.
    pub(crate) async fn transfer_held(&self, held: &Arc<HeldLease>) -> Result<(), LeaseTableError> {
        if !self.forget_held(held) {
            return Ok(());
        }
        let lease = held.lock().await;
        held.mark_lost();
        match self.inner.table.transfer(&lease).await? {
            Outcome::Done(now) => {
                Metrics::add(&self.inner.metrics.handoffs_completed, 1);
                tracing::info!(lease = held.key(), to = ?now.owner, "lease handed off");
            }
            Outcome::Lost => tracing::warn!(lease = held.key(), "the handoff was taken back or forced by the leader"),
        }
        Ok(())
    }

    /// Lists the table, watches the counters, and takes (or steals) leases up to this worker's
    /// share. Returns the leases gained.
    ///
    /// # Errors
    /// When listing the table fails, or a take fails with an error other than a lost race.
    pub async fn take_round(&self, now: Instant) -> Result<Vec<Arc<HeldLease>>, LeaseTableError> {
        self.round(now, false).await
    }

    /// Half-way between two take rounds: lists the table and watches the counters, and takes
    /// only leases that expired (nothing free, nothing stolen). Without it, a lease whose owner
    /// died just after a take round saw it renewed would be judged expired only two rounds
    /// later; with it, a dead worker's leases move within the failover time and one take
    /// interval.
    ///
    /// # Errors
    /// As [`LeaseCoordinator::take_round`].
    pub async fn expiry_round(&self, now: Instant) -> Result<Vec<Arc<HeldLease>>, LeaseTableError> {
        self.round(now, true).await
    }

    async fn round(&self, now: Instant, only_expired: bool) -> Result<Vec<Arc<HeldLease>>, LeaseTableError> {
        let mut leases = self.inner.table.list().await?;
        leases.retain(|l| self.inner.scope.serves(l));
        let me = self.inner.config.worker_id.as_str();
        let failover = self.inner.config.failover;
        let round = {
            let mut observations = self.inner.observations.lock().unwrap_or_else(|e| e.into_inner());
            observations.observe(&leases, now);
            let mut round = plan(
                &leases,
                me,
                |l: &Lease| observations.is_expired(l, now, failover),
                self.inner.config.max_steal_per_round,
            );
            if only_expired {
                round.steal.clear();
                round.take.retain(|key| {
                    leases
                        .iter()
                        .any(|l| &l.key == key && l.owner.is_some() && observations.is_expired(l, now, failover))
                });
            }
            round
        };
        // A lease the table says is ours but this coordinator does not hold (the worker restarted
        // under the same id) is taken back first: nobody else would, as it looks held.
        let held_keys = self.held_keys();
        let orphans: Vec<&String> = leases
            .iter()
            .filter(|_| !only_expired)
            .filter(|l| {
                l.owner.as_deref() == Some(me)
                    && !held_keys.contains(&l.key)
                    && l.checkpoint.position != crate::Position::ShardEnd
            })
            .map(|l| &l.key)
            .collect();
        let stolen: Vec<&String> = round.steal.iter().collect();
        let mut gained = Vec::new();
        for key in orphans.into_iter().chain(&round.take).chain(stolen.iter().copied()) {
            let Some(lease) = leases.iter().find(|l| &l.key == key) else { continue };
            let steal = stolen.contains(&key);
            let sent = Instant::now();
            let mut outcome = self.inner.table.take(lease, me).await?;
            if steal && outcome == Outcome::Lost {
                // The victim renewed between the listing and the take (its renewals and these
                // rounds can fall into step): steal at the counter it has now, if it still holds
                // the lease. The decision to steal does not depend on the counter.
                if let Some(fresh) = self.inner.table.get(key).await?
                    && fresh.owner == lease.owner
                {
                    outcome = self.inner.table.take(&fresh, me).await?;
                }
            }
            match outcome {
                Outcome::Done(taken) => {
                    // After a steal, the old owner may go on processing until its own validity
                    // ends; processing here starts one failover time later.
                    let not_before = if steal { sent + failover } else { sent };
                    let held = Arc::new(HeldLease::new(*taken, sent, self.inner.config.validity(), not_before));
                    self.held_map().insert(key.clone(), held.clone());
                    Metrics::add(&self.inner.metrics.leases_taken, 1);
                    if steal {
                        Metrics::add(&self.inner.metrics.leases_stolen, 1);
                    }
                    tracing::info!(lease = %key, worker = me, stolen = steal, "lease taken");
                    gained.push(held);
                }
                // Another worker was faster; the next round sees it.
                Outcome::Lost => {}
            }
        }
        self.count_held();
        Ok(gained)
    }

    /// KCL 3.x: finds the leases a leader assigned to this worker (through the
    /// `LeaseOwnerToLeaseKeyIndex`) and starts holding them; the next renewal fences them. A lease
    /// still being handed to this worker (its `checkpointOwner` set) waits until the old owner
    /// transferred it; a lease held here already is left alone. Returns the leases gained.
    ///
    /// # Errors
    /// When the Query fails, or a GetItem fails.
    pub(crate) async fn discovery_round(&self) -> Result<Vec<Arc<HeldLease>>, LeaseTableError> {
        let me = self.inner.config.worker_id.as_str();
        let keys = self.inner.table.lease_keys_of(me).await?;
        let mut gained = Vec::new();
        for key in keys {
            if self.held_map().contains_key(&key) {
                continue;
            }
            let sent = Instant::now();
            let Some(lease) = self.inner.table.get(&key).await? else { continue };
            if lease.owner.as_deref() != Some(me) || lease.checkpoint_owner.is_some() {
                continue;
            }
            if !self.inner.scope.serves(&lease) {
                // A leader whose streams differ from this worker's (or a stream retired here
                // first): left unrenewed, it expires and the leader gives it to another worker.
                tracing::debug!(lease = %key, worker = me, "assigned a lease of a stream this worker does not read");
                continue;
            }
            let held = Arc::new(HeldLease::new(lease, sent, self.inner.config.validity(), sent));
            self.held_map().insert(key.clone(), held.clone());
            Metrics::add(&self.inner.metrics.leases_discovered, 1);
            tracing::info!(lease = %key, worker = me, "lease assigned by the leader");
            gained.push(held);
        }
        self.count_held();
        Ok(gained)
    }

    /// Gives one held lease up (its shard is done, or its processing stopped) and forgets it.
    ///
    /// # Errors
    /// When the write fails for another reason than a lost lease.
    pub async fn release(&self, key: &str) -> Result<(), LeaseTableError> {
        let Some(held) = self.held_map().get(key).cloned() else { return Ok(()) };
        self.release_held(&held).await
    }

    /// Gives every held lease up (graceful shutdown), so that other workers take them at once.
    ///
    /// # Errors
    /// The first error other than a lost lease, after every lease was tried.
    pub async fn release_all(&self) -> Result<(), LeaseTableError> {
        let mut first_error = None;
        for key in self.held_keys() {
            if let Err(error) = self.release(&key).await {
                tracing::warn!(lease = %key, %error, "releasing a lease failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
