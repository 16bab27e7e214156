//! A lease this worker holds, shared by the renewer, the shard's consumer and its checkpointer.
//!
//! Writes to a held lease (renew, checkpoint, release) are serialized by one async lock, as each
//! is conditional on the counter the previous one left. The lease is *usable* for processing
//! while it is not lost and was written successfully within the last two thirds of the failover
//! time: a worker that cannot renew stops processing before any other worker may see its lease as
//! expired (after a full failover time without a change of counter).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::leases::lease::Lease;

/// A lease held by this worker.
#[derive(Debug)]
pub struct HeldLease {
    key: String,
    lease: tokio::sync::Mutex<Lease>,
    written_at: Mutex<Instant>,
    validity: Duration,
    lost: CancellationToken,
    not_before: Instant,
    /// The processor asked to stop and read the shard again from its checkpoint.
    restart: std::sync::atomic::AtomicBool,
}

impl HeldLease {
    /// A lease just taken. `written_at` is when the take was sent; processing waits until
    /// `not_before` (after a steal, until the old owner has surely stopped).
    pub(crate) fn new(lease: Lease, written_at: Instant, validity: Duration, not_before: Instant) -> Self {
        HeldLease {
            key: lease.key.clone(),
            lease: tokio::sync::Mutex::new(lease),
            written_at: Mutex::new(written_at),
            validity,
            lost: CancellationToken::new(),
            not_before,
            restart: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The lease key (the shard id).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease as this worker last wrote it.
    pub async fn lease(&self) -> Lease {
        self.lease.lock().await.clone()
    }

    /// Whether the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lease is lost.
    pub(crate) async fn lost(&self) {
        self.lost.cancelled().await;
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.cancel();
    }

    /// The lock that serializes writes to the lease.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Lease> {
        self.lease.lock().await
    }

    /// Notes a successful write sent at `at`.
    pub(crate) fn written(&self, at: Instant) {
        let mut written = self.written_at.lock().unwrap_or_else(|e| e.into_inner());
        *written = (*written).max(at);
    }

    /// When the last successful write was sent.
    pub(crate) fn written_at(&self) -> Instant {
        *self.written_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether records may be processed under this lease at `now`.
    pub(crate) fn usable(&self, now: Instant) -> bool {
        !self.is_lost() && now >= self.not_before && now < self.written_at() + self.validity
    }

    /// Asks the shard's consumer to stop and release the lease, so that the shard is read again
    /// from its checkpoint.
    pub(crate) fn request_restart(&self) {
        self.restart.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a restart was asked for.
    pub(crate) fn restart_requested(&self) -> bool {
        self.restart.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When processing may start.
    pub(crate) fn not_before(&self) -> Instant {
        self.not_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::lease::Position;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_usable_from_its_start_until_its_validity_after_the_last_write() {
        let now = Instant::now();
        let failover = Duration::from_secs(9);
        let validity = failover * 2 / 3;
        // Stolen: processing waits one failover time.
        let held = HeldLease::new(Lease::new("s", Position::TrimHorizon), now, validity, now + failover);
        assert!(!held.usable(now));
        tokio::time::advance(failover).await;
        // The take was written 9 s ago: past its validity, so not usable until renewed.
        assert!(!held.usable(Instant::now()));
        held.written(Instant::now());
        assert!(held.usable(Instant::now()));
        tokio::time::advance(validity - Duration::from_millis(1)).await;
        assert!(held.usable(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!held.usable(Instant::now()), "not renewed for 2/3 of the failover time");
        held.written(Instant::now() - Duration::from_secs(100));
        assert!(!held.usable(Instant::now()), "an older write does not move the time back");
        held.written(Instant::now());
        held.mark_lost();
        assert!(!held.usable(Instant::now()) && held.is_lost());
    }
}
