//! The leader of a KCL 3.x fleet: the worker holding the leader lock assigns every lease.
//!
//! Every worker of a table in KCL 3.x lease management runs this task. Every 2 x failover (the
//! KCL's assignment interval) a worker that does not lead tries to ([`lock`]); the leader runs
//! every failover time and a tenth (see [`LeaderConfig::interval`]): it reads the table (leases and
//! WorkerMetricStats rows), watches the lease counters, and makes the moves the assignment
//! decides ([`crate::assignment::utilisation`] or [`crate::assignment::count`], as configured):
//! free and expired leases assigned at once (and, while some are left without an owner, as at a
//! new fleet's start before any worker has published metrics, the next run comes within
//! seconds, with backoff, instead of after the interval), planned
//! moves made as graceful handoffs. A handoff whose old owner neither transferred the lease nor
//! kept renewing it within the handoff timeout (plus a failover time) is transferred by the
//! leader. A leader whose runs fail three times in a row gives the lock up; so does a worker
//! that shuts down gracefully.

pub(crate) mod lock;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::assignment::taker::Observations;
use crate::assignment::utilisation::WorkerLoad;
use crate::assignment::{AssignmentStrategy, Fleet, Move};
use crate::error::LeaseTableError;
use crate::leases::lease::Lease;
use crate::leases::table::LeaseTable;
use crate::metrics::Metrics;
use lock::LeaderLock;

/// How a leader runs.
#[derive(Clone, Debug)]
pub(crate) struct LeaderConfig {
    pub worker_id: String,
    pub failover: Duration,
    /// The leader lock's duration (KCL: 120 s) and heartbeat (KCL: 30 s).
    pub lock_duration: Duration,
    pub heartbeat: Duration,
    pub handoff_timeout: Duration,
    pub max_per_worker: usize,
    /// A worker is active while its WorkerMetricStats row is at most this old (KCL: 60 s).
    pub worker_fresh: Duration,
    pub strategy: AssignmentStrategy,
    /// Woken when this leader assigned a lease to its own worker, which then looks for its
    /// leases at once instead of at its next discovery round.
    pub assigned_here: Arc<Notify>,
    /// The leases the leader assigns (its application's, not of retired streams).
    pub scope: Arc<crate::leases::scope::LeaseScope>,
}

impl LeaderConfig {
    /// How often the leader reads the table and assigns free and expired leases: a tenth more
    /// than the failover time, so that two runs in a row are more than a failover time apart even
    /// when the first one's Scan took longer than the second's. The KCL's
    /// `leaseAssignmentIntervalMillis` is 2 x failover; a lease is expired once the leader has seen
    /// its counter stand still for more than the failover time, so a dead worker's leases then
    /// wait up to two such runs (4 x failover). Reading every failover time moves them within
    /// failover + one KCL interval, for one more Scan per failover time.
    pub(crate) fn interval(&self) -> Duration {
        self.failover + self.failover / 10
    }

    /// How often a worker that does not lead reads the leader lock to see whether it may take it
    /// (the KCL's assignment interval, 2 x failover): a dead leader is replaced within the lock's
    /// duration and this.
    pub(crate) fn contend_every(&self) -> Duration {
        self.failover * 2
    }

    /// How often the leader balances (KCL: `varianceBalancingFrequency` 3 x
    /// `leaseAssignmentIntervalMillis` 2 x failover = 6 x failover); the first run balances.
    pub(crate) fn balance_every(&self) -> Duration {
        self.failover * 6
    }
}

/// Failed runs in a row after which a leader gives the lock up (KCL: 3).
const FAILURES_TO_STEP_DOWN: u32 = 3;
/// The first wait before a leader runs again when its run left leases without an owner (no
/// active worker yet, as at start-up before the first WorkerMetricStats row, or every worker at
/// its cap); it grows by half each time, up to the assignment interval. The KCL waits the whole
/// interval (2 x failover), so a new fleet processes nothing for that long.
const RERUN: Duration = Duration::from_millis(500);
const RERUN_FACTOR: f32 = 1.5;

/// When the leader runs next: soon (with backoff) while leases are left without an owner, else
/// after the assignment interval.
fn rerun_backoff(interval: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(RERUN.min(interval))
        .with_factor(RERUN_FACTOR)
        .with_max_delay(interval)
        .without_max_times()
        .build()
}

/// Contends for leadership and leads until `stop`; then gives the lock up.
pub(crate) async fn run(table: LeaseTable, config: LeaderConfig, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut lock = LeaderLock::new(table.client().clone(), table.name(), &config.worker_id, config.lock_duration);
    let mut state = LeaderState::default();
    // The first run at once; later ones after the interval, or sooner while leases wait.
    let assign = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(assign);
    let mut rerun = rerun_backoff(config.interval());
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => {
                if lock.holds(Instant::now()) {
                    match lock.heartbeat().await {
                        Ok(true) => {}
                        Ok(false) => state = LeaderState::default(),
                        Err(error) => tracing::warn!(%error, "leader lock heartbeat failed"),
                    }
                }
            }
            _ = &mut assign => {
                assign.as_mut().reset(Instant::now() + config.interval());
                let leading = match lock.try_lead().await {
                    Ok(leading) => leading,
                    Err(error) => {
                        tracing::warn!(%error, "reading the leader lock failed");
                        false
                    }
                };
                if !leading {
                    state = LeaderState::default();
                    assign.as_mut().reset(Instant::now() + config.contend_every());
                    continue;
                }
                if state.runs == 0 {
                    Metrics::add(&metrics.leader_elections, 1);
                }
                match state.run_once(&table, &config, &metrics).await {
                    Ok(outcome) => {
                        failures = 0;
                        if outcome.assigned_here {
                            config.assigned_here.notify_one();
                        }
                        if outcome.unplaced > 0 {
                            let wait = rerun.next().unwrap_or(config.interval());
                            tracing::debug!(unplaced = outcome.unplaced, ?wait, "leases left without an owner; running again soon");
                            assign.as_mut().reset(Instant::now() + wait);
                        } else {
                            rerun = rerun_backoff(config.interval());
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%error, failures, "the leader's assignment run failed");
                        if failures >= FAILURES_TO_STEP_DOWN {
                            tracing::warn!("giving the leader lock up after {failures} failed runs");
                            let _ = lock.release().await;
                            state = LeaderState::default();
                            failures = 0;
                        }
                    }
                }
            }
        }
    }
    if let Err(error) = lock.release().await {
        tracing::warn!(%error, "releasing the leader lock failed; it expires");
    }
}

/// What one run of the leader did, for when it runs next.
#[derive(Debug, Default, PartialEq, Eq)]
struct RunOutcome {
    /// Live leases free or expired that this run gave nobody.
    unplaced: usize,
    /// Whether it assigned a lease to its own worker.
    assigned_here: bool,
}

/// What a leader keeps between its runs (forgotten when it stops leading, as the KCL's).
#[derive(Debug, Default)]
struct LeaderState {
    runs: u64,
    /// When it balances next; `None` before its first run.
    next_balance: Option<Instant>,
    observations: Observations,
    /// Leases being handed off, and when the leader transfers them if the old owner has not.
    handoffs: HashMap<String, Instant>,
}

impl LeaderState {
    async fn run_once(
        &mut self,
        table: &LeaseTable,
        config: &LeaderConfig,
        metrics: &Metrics,
    ) -> Result<RunOutcome, LeaseTableError> {
        let (mut leases, workers) = table.scan_fleet().await?;
        leases.retain(|l| config.scope.serves(l));
        let mut outcome = RunOutcome::default();
        let now = Instant::now();
        let epoch = crate::worker_metrics::epoch_seconds(SystemTime::now());
        // Active: a fresh row (KCL: at most 60 s old) whose CPU metric is not failing.
        let loads: BTreeMap<String, WorkerLoad> = workers
            .iter()
            .filter(|w| w.is_fresh(config.worker_fresh, epoch) && !w.failing)
            .map(|w| (w.worker_id.clone(), WorkerLoad { cpu: w.cpu, cpu_max: w.cpu_max }))
            .collect();
        let active: BTreeSet<String> = loads.keys().cloned().collect();
        self.observations.observe(&leases, now);
        self.runs += 1;
        let balance = self.next_balance.is_none_or(|at| now >= at);
        if balance {
            self.next_balance = Some(now + config.balance_every());
        }

        // Handoffs the old owner did not finish: transferred by the leader after the timeout.
        self.handoffs.retain(|key, _| leases.iter().any(|l| &l.key == key && l.checkpoint_owner.is_some()));
        for lease in leases.iter().filter(|l| l.checkpoint_owner.is_some()) {
            let deadline =
                *self.handoffs.entry(lease.key.clone()).or_insert(now + config.handoff_timeout + config.failover);
            if now >= deadline
                && let Some(to) = lease.owner.as_deref()
                && table.assign(lease, to, false).await?
            {
                tracing::warn!(lease = %lease.key, to, "a handoff was not finished in time; the leader transferred it");
                Metrics::add(&metrics.leases_assigned, 1);
                outcome.assigned_here |= to == config.worker_id;
                self.handoffs.remove(&lease.key);
            }
        }

        // The fleet (and its `expired`, not `Send`) lives in this block only, not across the
        // writes below.
        let (moves, wanting) = {
            let failover = config.failover;
            let observations = &self.observations;
            let expired = |l: &Lease| observations.is_expired(l, now, failover);
            let fleet = Fleet {
                leases: &leases,
                active: &active,
                expired: &expired,
                max_per_worker: config.max_per_worker,
                balance,
            };
            let moves = match config.strategy {
                AssignmentStrategy::WorkerUtilisation(thresholds) => {
                    crate::assignment::utilisation::plan(&fleet, &loads, &thresholds)
                }
                AssignmentStrategy::LeaseCount => crate::assignment::count::plan(&fleet),
            };
            (moves, fleet.wanting_owner())
        };
        let assigning = moves.iter().filter(|m| matches!(m, Move::Assign { .. })).count();
        outcome.unplaced = wanting.saturating_sub(assigning);
        for step in moves {
            match step {
                Move::Assign { key, to } => {
                    let Some(lease) = leases.iter().find(|l| l.key == key) else { continue };
                    if table.assign(lease, &to, true).await? {
                        tracing::info!(lease = %key, to = %to, from = ?lease.actual_owner(), "lease assigned");
                        Metrics::add(&metrics.leases_assigned, 1);
                        outcome.assigned_here |= to == config.worker_id;
                    }
                }
                Move::HandOff { key, from, to } => {
                    if table.hand_off(&key, &from, &to).await? {
                        tracing::info!(lease = %key, %from, %to, "graceful handoff started");
                        Metrics::add(&metrics.handoffs_initiated, 1);
                        self.handoffs.insert(key, now + config.handoff_timeout + config.failover);
                    }
                }
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_that_left_leases_runs_again_soon_then_less_often_up_to_its_interval() {
        let waits: Vec<Duration> = rerun_backoff(Duration::from_secs(20)).take(9).collect();
        let ms: Vec<u128> = waits.iter().map(|w| w.as_millis()).collect();
        assert_eq!(ms, [500, 750, 1125, 1687, 2531, 3796, 5695, 8542, 12814]);
        let capped: Vec<Duration> = rerun_backoff(Duration::from_secs(20)).skip(10).take(3).collect();
        assert_eq!(capped, [Duration::from_secs(20); 3], "never longer than the interval");
        let short: Vec<Duration> = rerun_backoff(Duration::from_millis(300)).take(2).collect();
        assert_eq!(short, [Duration::from_millis(300); 2], "never longer than a short interval either");
    }
}
