//! The worker's shard syncs and, in multi-stream mode, its streams: the tracker polled, new
//! streams leased, former streams retired and their leases deleted.

use tokio::time::Instant;

use super::worker::{Running, Worker};
use crate::leases::shard_sync::{SyncError, sync_stream};
use crate::metrics::Metrics;
use crate::processor::ProcessorFactory;
use crate::streams::tracked::Tracked;

impl<F: ProcessorFactory> Worker<F> {
    /// Lists the table once and syncs the shards of every stream. In multi-stream mode a stream
    /// that fails (deleted, say) is logged and the others synced; the first error is returned
    /// after every stream was tried.
    pub(super) async fn sync(&self, tracked: &mut Tracked) -> Result<(), SyncError> {
        let table = self.coordinator.table();
        let leases = table.list().await?;
        let mut first_error = None;
        for stream in tracked.to_sync() {
            let identifier = stream.identifier.as_deref();
            let initial = stream.initial;
            match sync_stream(&stream.api, table, identifier, initial, &leases, Some(&self.metrics)).await {
                Ok(created) if created > 0 => {
                    tracing::info!(stream = %stream.name, created, "shard sync created leases")
                }
                Ok(_) => {}
                Err(error) => {
                    if self.stream.is_none() {
                        tracing::warn!(stream = %stream.name, %error, "shard sync of a tracked stream failed");
                        if let (SyncError::Kinesis(e), Some(id)) = (&error, identifier)
                            && e.kind == crate::ErrorKind::NotFound
                        {
                            tracked.forget(id, Instant::now());
                        }
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        Metrics::add(&self.metrics.shard_syncs, 1);
        match first_error {
            // Multi-stream: a stream that fails does not stop the worker (it may have been
            // deleted before the tracker says so); table errors do.
            Some(SyncError::Kinesis(error)) if self.stream.is_none() && !error.kind.is_retryable() => Ok(()),
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Multi-stream: asks the tracker for the streams (at most for one poll interval) and takes
    /// its list. Whether a stream was added.
    pub(super) async fn poll_streams(&self, tracked: &mut Tracked) -> bool {
        let Some(tracker) = &self.config.streams else { return false };
        let configs = match tokio::time::timeout(self.config.stream_poll_interval, tracker.streams()).await {
            Ok(Ok(configs)) => configs,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the stream tracker failed; the streams stay as they were");
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    "the stream tracker did not answer within the poll interval; the streams stay as they were"
                );
                return false;
            }
        };
        let added = tracked.take_list(configs, Instant::now()).await;
        !added.is_empty()
    }

    /// Multi-stream with [`crate::FormerStreams::DeleteAfter`]: retires the streams former for
    /// longer than the wait, stops this worker's consumers of them (gracefully: their leases are
    /// released when they end), and deletes their leases that no worker processes.
    pub(super) async fn retire_streams(&self, tracked: &mut Tracked, running: &Running) {
        if self.config.former_streams == crate::FormerStreams::Keep {
            return;
        }
        let table = self.coordinator.table();
        let leases = match table.list().await {
            Ok(leases) => leases,
            Err(error) => {
                tracing::warn!(%error, "listing the lease table for former streams failed");
                return;
            }
        };
        tracked.retire(&leases, Instant::now());
        for (held, stop) in running.values() {
            if self.scope.is_retired(held.stream_identifier()) && !stop.is_cancelled() {
                tracing::info!(
                    lease = held.key(),
                    "its stream is retired: the processor stops and the lease is released"
                );
                stop.cancel();
            }
        }
        match tracked.delete_retired(table, &leases, self.config.failover, Instant::now()).await {
            Ok(0) => {}
            Ok(deleted) => {
                Metrics::add(&self.metrics.leases_cleaned_up, deleted as u64);
                tracing::info!(deleted, "leases of retired streams deleted");
            }
            Err(error) => tracing::warn!(%error, "deleting the leases of retired streams failed"),
        }
    }

    /// Runs a shard sync; whether it succeeded.
    pub(super) async fn sync_logged(&self, tracked: &mut Tracked) -> bool {
        match self.sync(tracked).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "shard sync failed");
                false
            }
        }
    }
}
