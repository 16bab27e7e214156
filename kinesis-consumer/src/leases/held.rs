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
    /// The shard id (the key, in a single-stream table).
    shard_id: String,
    /// The stream identifier of a multi-stream lease.
    stream_identifier: Option<String>,
    lease: tokio::sync::Mutex<Lease>,
    written_at: Mutex<Instant>,
    validity: Duration,
    lost: CancellationToken,
    not_before: Instant,
    /// The processor asked to stop and read the shard again from its checkpoint.
    restart: std::sync::atomic::AtomicBool,
    /// A KCL 3.x leader asked for a graceful handoff: the consumer stops, the processor's
    /// `shutdown_requested` checkpoints, the lease passes to the new owner.
    handoff: CancellationToken,
    /// When the transfer is forced if the processor has not finished.
    handoff_deadline: Mutex<Option<Instant>>,
    /// Data bytes delivered to the processor since the last renewal.
    delivered: std::sync::atomic::AtomicU64,
    /// The smoothed throughput (KiB/s) written with the renewals, and when it was last updated.
    throughput: Mutex<(Option<f64>, Option<Instant>)>,
}

impl HeldLease {
    /// A lease just taken. `written_at` is when the take was sent; processing waits until
    /// `not_before` (after a steal, until the old owner has surely stopped).
    pub(crate) fn new(lease: Lease, written_at: Instant, validity: Duration, not_before: Instant) -> Self {
        let throughput = lease.throughput_kbps;
        HeldLease {
            key: lease.key.clone(),
            shard_id: lease.shard().to_owned(),
            stream_identifier: lease.stream_identifier.clone(),
            lease: tokio::sync::Mutex::new(lease),
            written_at: Mutex::new(written_at),
            validity,
            lost: CancellationToken::new(),
            not_before,
            restart: std::sync::atomic::AtomicBool::new(false),
            handoff: CancellationToken::new(),
            handoff_deadline: Mutex::new(None),
            delivered: std::sync::atomic::AtomicU64::new(0),
            throughput: Mutex::new((throughput, None)),
        }
    }

    /// Asks the shard's consumer for a graceful handoff; the transfer is forced at `deadline`.
    /// Only the first call counts.
    pub(crate) fn request_handoff(&self, deadline: Instant) {
        let mut current = self.handoff_deadline.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none() {
            *current = Some(deadline);
            self.handoff.cancel();
        }
    }

    /// Resolves when a handoff is requested.
    pub(crate) async fn handoff_requested(&self) {
        self.handoff.cancelled().await;
    }

    /// Whether a handoff is requested.
    pub(crate) fn is_handing_off(&self) -> bool {
        self.handoff.is_cancelled()
    }

    /// When a requested handoff is forced.
    pub(crate) fn handoff_deadline(&self) -> Option<Instant> {
        *self.handoff_deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts data bytes delivered to the processor.
    pub(crate) fn delivered(&self, bytes: u64) {
        self.delivered.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The throughput to write with a renewal at `now`, in KiB/s: the bytes delivered since the
    /// last call over the time since then, smoothed as the KCL's `LeaseStatsRecorder` does (an
    /// exponential moving average, alpha 0.5). `None` on the first call (nothing measured yet)
    /// unless the lease came with a throughput.
    pub(crate) fn throughput_kbps(&self, now: Instant) -> Option<f64> {
        let bytes = self.delivered.swap(0, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.throughput.lock().unwrap_or_else(|e| e.into_inner());
        let (smoothed, since) = *state;
        let Some(since) = since else {
            *state = (smoothed, Some(now));
            return smoothed;
        };
        let seconds = now.saturating_duration_since(since).as_secs_f64();
        if seconds <= 0.0 {
            return smoothed;
        }
        let kbps = bytes as f64 / 1024.0 / seconds;
        let next = smoothed.map_or(kbps, |previous| 0.5 * kbps + 0.5 * previous);
        *state = (Some(next), Some(now));
        Some(next)
    }

    /// The lease key (the shard id; in a multi-stream table `account:stream:creationEpoch:shardId`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The shard id.
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The stream identifier of a lease of a multi-stream table.
    pub fn stream_identifier(&self) -> Option<&str> {
        self.stream_identifier.as_deref()
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

#[cfg(test)]
mod throughput_tests {
    use super::*;
    use crate::leases::lease::Position;

    #[tokio::test(start_paused = true)]
    async fn throughput_is_the_smoothed_rate_of_the_data_delivered() {
        let now = Instant::now();
        let held = HeldLease::new(Lease::new("s", Position::TrimHorizon), now, Duration::from_secs(6), now);
        assert_eq!(held.throughput_kbps(now), None, "nothing measured yet");
        held.delivered(10 * 1024);
        assert_eq!(held.throughput_kbps(now + Duration::from_secs(2)), Some(5.0), "10 KiB in 2 s");
        held.delivered(30 * 1024);
        // 15 KiB/s now, smoothed with the 5 before: 10.
        assert_eq!(held.throughput_kbps(now + Duration::from_secs(4)), Some(10.0));
        assert_eq!(held.throughput_kbps(now + Duration::from_secs(6)), Some(5.0), "idle halves it");
        let mut carried = Lease::new("t", Position::TrimHorizon);
        carried.throughput_kbps = Some(7.0);
        let moved = HeldLease::new(carried, now, Duration::from_secs(6), now);
        assert_eq!(moved.throughput_kbps(now), Some(7.0), "a moved lease keeps its figure until measured");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_handoff_request_sets_the_deadline() {
        let now = Instant::now();
        let held = HeldLease::new(Lease::new("s", Position::TrimHorizon), now, Duration::from_secs(6), now);
        assert!(!held.is_handing_off());
        held.request_handoff(now + Duration::from_secs(30));
        held.request_handoff(now + Duration::from_secs(90));
        assert!(held.is_handing_off());
        assert_eq!(held.handoff_deadline(), Some(now + Duration::from_secs(30)));
        held.handoff_requested().await;
    }
}
