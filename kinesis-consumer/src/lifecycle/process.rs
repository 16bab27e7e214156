//! Processing: batches of at most `max_batch_records`, gathered for at most `max_batch_wait`
//! (Lambda-style); a batch is handed over only while the lease is usable. A failure the processor
//! reports goes to the poison-record policy: the range is read and delivered again, or handed to
//! the on-failure destination.

use std::ops::ControlFlow;

use tokio::time::Instant;

use super::{Exit, Interrupt, ShardConsumer, ShardConsumerState, Step, interrupted, take_fetch};
use crate::failure::{FailedRecords, Next, Retrying};
use crate::metrics::Metrics;
use crate::processor::Processor;
use crate::record::{Batch, Record, Unpacker};
use crate::retrieval::kinesis::StartAt;

impl<P: Processor> ShardConsumer<P> {
    pub(super) async fn processing(&mut self) -> Step {
        if self.fetched.is_none() {
            return ControlFlow::Break(Exit::Failed);
        }
        if self.pending.is_empty() && !self.read_to_end {
            match self.gather().await {
                Ok(Ok(())) => {}
                Ok(Err(i)) => return ControlFlow::Continue(interrupted(i)),
                Err(exit) => return ControlFlow::Break(exit),
            }
        }
        if self.pending.is_empty() {
            return ControlFlow::Continue(if self.read_to_end {
                ShardConsumerState::ShardEnded
            } else {
                ShardConsumerState::Processing
            });
        }
        if let Err(i) = self.ctx.until_usable().await {
            return ControlFlow::Continue(interrupted(i));
        }
        self.deliver().await
    }

    /// Awaits the first page, then adds more until the batch is full or the gathering time is
    /// up. `Err`: reading the shard failed.
    async fn gather(&mut self) -> Result<Result<(), Interrupt>, Exit> {
        let ctx = &self.ctx;
        let Some((rx, _)) = self.fetched.as_mut() else { return Err(Exit::Failed) };
        let first = tokio::select! {
            biased;
            interrupt = ctx.interrupted() => return Ok(Err(interrupt)),
            fetch = rx.recv() => fetch,
        };
        if let Some(failed) = take_fetch(first, &mut self.pending, &mut self.read_to_end, &mut self.behind) {
            tracing::error!(shard_id = %self.shard_id, error = %failed, "reading the shard failed");
            return Err(Exit::Failed);
        }
        let deadline = Instant::now() + ctx.max_batch_wait;
        while !ctx.max_batch_wait.is_zero() && self.pending.len() < ctx.max_batch_records && !self.read_to_end {
            let fetch = tokio::select! {
                biased;
                _ = ctx.interrupted() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                fetch = rx.recv() => fetch,
            };
            if let Some(failed) = take_fetch(fetch, &mut self.pending, &mut self.read_to_end, &mut self.behind) {
                tracing::error!(shard_id = %self.shard_id, error = %failed, "reading the shard failed");
                return Err(Exit::Failed);
            }
        }
        Ok(Ok(()))
    }

    /// Hands the next batch to the processor, then follows what it reported.
    async fn deliver(&mut self) -> Step {
        let ctx = &self.ctx;
        let limit = self.retrying.as_ref().map_or(usize::MAX, |r| r.limit);
        let n = self.pending.len().min(ctx.max_batch_records).min(limit);
        let records: Vec<Record> = self.pending.drain(..n).collect();
        self.positions.clear();
        self.positions.extend(records.iter().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)));
        // A retried delivery is kept: its records may go to the destination.
        let kept = self.retrying.as_ref().map(|_| records.clone());
        let batch = Batch {
            stream: ctx.stream.clone(),
            stream_identifier: ctx.stream_identifier.clone(),
            shard_id: self.shard_id.clone(),
            records,
            millis_behind_latest: self.behind,
        };
        let (count, bytes) = (batch.records.len() as u64, batch.data_bytes() as u64);
        self.checkpointer.delivering(&batch.records);
        self.processor.process_records(batch, &mut self.checkpointer).await;
        Metrics::add(&ctx.metrics.process_calls, 1);
        Metrics::add(&ctx.metrics.records_processed, count);
        Metrics::add(&ctx.metrics.bytes_processed, bytes);
        ctx.held.delivered(bytes);
        if ctx.held.restart_requested() {
            return ControlFlow::Break(Exit::Restart);
        }
        match self.checkpointer.take_failure() {
            None => {
                self.retrying = None;
                ControlFlow::Continue(ShardConsumerState::Processing)
            }
            Some(failed) => {
                Metrics::add(&ctx.metrics.processing_failures, 1);
                let from = (failed.sequence_number.clone(), failed.sub_sequence_number);
                self.failed_at(from, kept).await
            }
        }
    }

    /// The processor failed at `from` (and every later record of the batch): retry the range,
    /// or hand it to the destination once the policy's retries are spent.
    async fn failed_at(&mut self, from: (std::sync::Arc<str>, u64), kept: Option<Vec<Record>>) -> Step {
        let shard_id = self.shard_id.clone();
        let at = self.positions.iter().position(|p| *p == from).unwrap_or(0);
        let range = self.positions.len() - at;
        let policy = &self.ctx.failure_policy;
        let current = self.retrying.get_or_insert_with(|| Retrying::new(policy, from.clone(), range));
        match current.failed(policy, from.clone(), range) {
            Next::Retry { wait, .. } => {
                tracing::warn!(shard_id = %shard_id, sequence_number = %from.0, sub = from.1,
                    attempts = current.attempts, ?wait, "the processor failed at a record; delivering it again");
                // Read again from the failed record.
                drop(self.fetched.take());
                self.pending.clear();
                self.read_to_end = false;
                if let Err(i) = self.ctx.pause(wait).await {
                    return ControlFlow::Continue(interrupted(i));
                }
                let hash_range = self.ctx.held.lease().await.hash_range;
                let unpacker = Unpacker::starting_at(shard_id.clone(), hash_range, (from.0.to_string(), from.1))
                    .in_stream(self.ctx.stream.clone());
                let start = StartAt::AtSequence(from.0.to_string());
                self.fetched = Some(self.ctx.spawn_fetcher(&shard_id, start, unpacker));
                ControlFlow::Continue(ShardConsumerState::Processing)
            }
            Next::Divert => {
                let attempts = current.attempts;
                self.retrying = None;
                let records: Vec<Record> = kept.unwrap_or_default().split_off(at);
                let last = records.last().map(|r| (r.sequence_number.clone(), r.sub_sequence_number));
                let n = records.len() as u64;
                tracing::warn!(shard_id = %shard_id, records = n, attempts,
                    "records still fail after the policy's retries: handing them to the on-failure destination and moving on");
                let failed = FailedRecords { shard_id: shard_id.clone(), records, attempts };
                if let Err(i) = self.ctx.divert(failed).await {
                    return ControlFlow::Continue(interrupted(i));
                }
                Metrics::add(&self.ctx.metrics.records_diverted, n);
                if let Some((seq, sub)) = last
                    && let Err(error) = self.checkpointer.checkpoint_at(&seq, sub).await
                {
                    tracing::warn!(shard_id = %shard_id, %error, "checkpointing after the diverted records failed");
                }
                ControlFlow::Continue(ShardConsumerState::Processing)
            }
        }
    }
}
