//! The checkpointer a processor gets with each batch: records how far the shard is processed.
//!
//! Every checkpoint is a write fenced on the lease counter and the owner. Once the lease is lost
//! it returns [`CheckpointError::LeaseLost`] and writes nothing, so the new owner's progress is
//! never overwritten. It is a cheap `Clone`: a clone keeps the batch it was made for, so it can
//! be used after the processing call returns (the [`crate::Batches`] stream does). Clones share
//! what was delivered on the lease, so any of them checks a position against all of it.
//!
//! What may be recorded (the KCL's rules, and stricter where the KCL lets a shard wedge):
//! - a position delivered on this hold of the lease, or the checkpoint already stored: a sequence
//!   number of another shard is refused (Kinesis would refuse every GetShardIterator at it);
//! - never a position before the checkpoint already stored;
//! - never anything after SHARD_END: it is final;
//! - once the shard was read to its end, the last record's position *is* the shard's end, and is
//!   recorded as SHARD_END, as the KCL does (so a processor ported from it ends its shard).

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::batches::handed_out::HandedOut;
use crate::error::CheckpointError;
use crate::leases::held::HeldLease;
use crate::leases::lease::{Checkpoint, Position};
use crate::leases::table::{LeaseTable, Outcome};
use crate::metrics::Metrics;
use crate::record::{Record, cmp_positions, cmp_sequence_numbers};

/// The most Kinesis records remembered as delivered since the last checkpoint. A processor that
/// never checkpoints keeps at most this many (a few tens of MB); beyond it, the oldest cannot be
/// checkpointed at any more (the checkpoint is refused, never written wrong).
const MAX_REMEMBERED: usize = 1_000_000;

/// What was delivered on one hold of a lease, shared by a checkpointer and its clones.
#[derive(Debug, Default)]
struct Delivered {
    /// Kinesis records delivered and not yet behind the stored checkpoint, in order: sequence
    /// number and the highest sub-sequence number delivered of it.
    positions: VecDeque<(Arc<str>, u64)>,
    /// The newest position delivered.
    last: Option<(Arc<str>, u64)>,
    /// The shard was read to its end and `last` is its last record.
    ended: bool,
    /// The record the processor reported a failure at, in the current call.
    failed_at: Option<Record>,
}

impl Delivered {
    fn push(&mut self, record: &Record) {
        let position = (record.sequence_number.clone(), record.sub_sequence_number);
        // Delivered again (after a failure reported at an earlier record): already known.
        if self.last.as_ref().is_some_and(|(seq, sub)| cmp_positions((seq, *sub), (&position.0, position.1)).is_ge()) {
            return;
        }
        match self.positions.back_mut() {
            Some((seq, sub)) if *seq == record.sequence_number => *sub = (*sub).max(record.sub_sequence_number),
            _ => {
                if self.positions.len() >= MAX_REMEMBERED {
                    self.positions.pop_front();
                }
                self.positions.push_back(position.clone());
            }
        }
        self.last = Some(position);
    }

    /// Whether (sequence, sub-sequence) was delivered.
    fn contains(&self, sequence: &str, sub: u64) -> bool {
        let at = self.positions.partition_point(|(seq, _)| cmp_sequence_numbers(seq, sequence) == Ordering::Less);
        matches!(self.positions.get(at), Some((seq, highest)) if cmp_sequence_numbers(seq, sequence) == Ordering::Equal && sub <= *highest)
    }

    /// Forgets what is before a written checkpoint.
    fn written(&mut self, sequence: &str) {
        while self.positions.front().is_some_and(|(seq, _)| cmp_sequence_numbers(seq, sequence) == Ordering::Less) {
            self.positions.pop_front();
        }
    }

    /// Whether `position` is the shard's end: it was read to its end and this is its last record.
    fn is_end(&self, sequence: &str, sub: u64) -> bool {
        self.ended
            && self
                .last
                .as_ref()
                .is_some_and(|(seq, last_sub)| cmp_positions((seq, *last_sub), (sequence, sub)).is_eq())
    }
}

/// Records checkpoints for one shard.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    held: Arc<HeldLease>,
    table: LeaseTable,
    metrics: Arc<Metrics>,
    /// What [`Checkpointer::checkpoint`] records: the end of the batch, or SHARD_END.
    end: Option<Checkpoint>,
    delivered: Arc<Mutex<Delivered>>,
    /// The [`crate::Batches`] stream: this clone's batch among the shard's batches handed out.
    batch: Option<(Arc<HandedOut>, u64)>,
}

impl Checkpointer {
    pub(crate) fn new(held: Arc<HeldLease>, table: LeaseTable, metrics: Arc<Metrics>) -> Self {
        Checkpointer { held, table, metrics, end: None, delivered: Arc::default(), batch: None }
    }

    /// A clone for one batch handed out by the [`crate::Batches`] stream.
    pub(crate) fn for_batch(&self, handed: Arc<HandedOut>, id: u64) -> Checkpointer {
        Checkpointer { batch: Some((handed, id)), ..self.clone() }
    }

    /// The end of the batch this checkpointer was made for.
    pub(crate) fn batch_end(&self) -> Option<Checkpoint> {
        self.end.clone()
    }

    /// Ends this hold of the lease: the consumer stops and releases it, and the shard is read
    /// again from its last checkpoint (here or by another worker).
    pub(crate) fn restart(&self) {
        self.held.request_restart();
    }

    /// The shard.
    pub fn shard_id(&self) -> &str {
        self.held.shard_id()
    }

    fn delivered(&self) -> std::sync::MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the batch about to be handed over.
    pub(crate) fn delivering(&mut self, records: &[Record]) {
        if let Some(last) = records.last() {
            let mut delivered = self.delivered();
            for record in records {
                delivered.push(record);
            }
            drop(delivered);
            self.end = Some(Checkpoint {
                position: Position::Sequence(last.sequence_number.to_string()),
                sub_sequence: last.sub_sequence_number,
            });
        }
    }

    /// The shard is read to its end: [`Checkpointer::checkpoint`] now records SHARD_END, and so
    /// does a checkpoint at the last record (from any clone).
    pub(crate) fn at_shard_end(&mut self) {
        self.delivered().ended = true;
        self.end = Some(Checkpoint::at(Position::ShardEnd));
    }

    /// Records the end of the batch (in `shard_ended`: SHARD_END). Does nothing before any
    /// record was delivered. Once the shard was read to its end, the end of its last batch is
    /// SHARD_END.
    ///
    /// # Errors
    /// [`CheckpointError::LeaseLost`] when another worker holds the lease (this checkpoint is not
    /// written); [`CheckpointError::Table`] when the write failed (try again: it may or may not
    /// have been applied, and writing the same checkpoint again is harmless);
    /// [`CheckpointError::InvalidPosition`] after SHARD_END.
    ///
    /// Not cancel-safe: cancelled while the write is in flight, the checkpoint may or may not be
    /// written; the next write finds out and goes on (see [`LeaseTable::renew`]).
    pub async fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        let target = match &self.batch {
            // A batch of the stream adapter: finished now; the checkpoint goes as far as every
            // batch before it is finished too (perhaps not at all yet).
            Some((handed, id)) => handed.finish(*id),
            None => self.end.clone(),
        };
        match target {
            Some(checkpoint) => self.write(self.at_end_or(checkpoint)).await,
            None => Ok(()),
        }
    }

    /// SHARD_END for the last record of a shard read to its end (as the KCL records it);
    /// `checkpoint` otherwise.
    fn at_end_or(&self, checkpoint: Checkpoint) -> Checkpoint {
        match &checkpoint.position {
            Position::Sequence(seq) if self.delivered().is_end(seq, checkpoint.sub_sequence) => {
                Checkpoint::at(Position::ShardEnd)
            }
            _ => checkpoint,
        }
    }

    /// Reports that processing failed at `record` (of the batch being processed): it and every
    /// later record of the batch were not processed, the earlier ones were. Call it in
    /// `process_records`, before returning. The worker's [`crate::FailurePolicy`] decides what
    /// follows: by default the shard is read again from `record` and the batch delivered again,
    /// with backoff, for as long as it fails; nothing is skipped. A later call in the same batch
    /// replaces an earlier one.
    pub fn fail_at(&mut self, record: &Record) {
        self.delivered().failed_at = Some(record.clone());
    }

    /// The failure reported in the last call, if any (taken).
    pub(crate) fn take_failure(&mut self) -> Option<Record> {
        self.delivered().failed_at.take()
    }

    /// Records where a lease at LATEST starts, before anything is delivered (see `latest.rs`).
    pub(crate) async fn anchor(&mut self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        self.write(checkpoint).await
    }

    /// Records a checkpoint after one record: the shard resumes after it.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_record(&mut self, record: &Record) -> Result<(), CheckpointError> {
        self.checkpoint_at(&record.sequence_number, record.sub_sequence_number).await
    }

    /// Records a given position: the shard resumes after (sequence, sub-sequence). At the last
    /// record of a shard read to its end, records SHARD_END (as the KCL does).
    ///
    /// # Errors
    /// [`CheckpointError::InvalidPosition`] when the position is not a sequence number, was not
    /// delivered on this lease (a sequence number of another shard, or after the newest record
    /// delivered) and is not the checkpoint already stored, is before the checkpoint already
    /// stored, or comes after SHARD_END; [`CheckpointError::LeaseLost`] and
    /// [`CheckpointError::Table`] as for [`Checkpointer::checkpoint`].
    pub async fn checkpoint_at(
        &mut self,
        sequence_number: &str,
        sub_sequence_number: u64,
    ) -> Result<(), CheckpointError> {
        let checkpoint = self.checked(sequence_number, sub_sequence_number).await?;
        self.write(self.at_end_or(checkpoint)).await
    }

    /// The position, if this processor may record it.
    async fn checked(&self, sequence_number: &str, sub_sequence_number: u64) -> Result<Checkpoint, CheckpointError> {
        let invalid = |reason| CheckpointError::InvalidPosition {
            shard_id: self.held.key().to_owned(),
            position: format!("{sequence_number}/{sub_sequence_number}"),
            reason,
        };
        if sequence_number.is_empty() || !sequence_number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("not a sequence number"));
        }
        if let Some((handed, id)) = &self.batch
            && !handed.earlier_finished(*id)
        {
            return Err(invalid(
                "an earlier batch of this shard is not finished (the checkpoint would pass its records)",
            ));
        }
        let position = (sequence_number, sub_sequence_number);
        let (delivered, after_last) = {
            let delivered = self.delivered();
            let after_last =
                delivered.last.as_ref().is_none_or(|(seq, sub)| cmp_positions(position, (seq, *sub)).is_gt());
            (delivered.contains(sequence_number, sub_sequence_number), after_last)
        };
        let stored = !delivered && {
            let lease = self.held.lease().await;
            matches!(&lease.checkpoint.position, Position::Sequence(seq)
                if cmp_positions((seq, lease.checkpoint.sub_sequence), position).is_eq())
        };
        if !delivered && !stored {
            return Err(invalid(if after_last {
                "after the newest record delivered"
            } else {
                "not a record delivered on this lease (a sequence number of another shard?)"
            }));
        }
        Ok(Checkpoint { position: Position::Sequence(sequence_number.to_owned()), sub_sequence: sub_sequence_number })
    }

    /// The first phase of a two-phase checkpoint (the KCL's `prepareCheckpoint`), at the end of
    /// the batch: the position is recorded as the lease's *pending* checkpoint, and becomes its
    /// checkpoint when [`PreparedCheckpoint::commit`] is called. Use it when a side effect must be
    /// made durable between the two (a transaction committed elsewhere): a worker that takes the
    /// lease over in between reads the shard from the last *committed* checkpoint, and finds the
    /// pending one in [`crate::Initialization::pending_checkpoint`], so that it can finish or
    /// undo what was prepared.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint`]; [`CheckpointError::InvalidPosition`] when nothing was
    /// delivered yet.
    pub async fn prepare_checkpoint(&mut self) -> Result<PreparedCheckpoint, CheckpointError> {
        let end = match &self.batch {
            Some((handed, id)) => handed.finish(*id),
            None => self.end.clone(),
        };
        let Some(end) = end else {
            return Err(CheckpointError::InvalidPosition {
                shard_id: self.held.key().to_owned(),
                position: String::new(),
                reason: "nothing was delivered to prepare a checkpoint at",
            });
        };
        self.prepare_at(self.at_end_or(end)).await
    }

    /// [`Checkpointer::prepare_checkpoint`] at a given position, checked as
    /// [`Checkpointer::checkpoint_at`] checks it.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn prepare_checkpoint_at(
        &mut self,
        sequence_number: &str,
        sub_sequence_number: u64,
    ) -> Result<PreparedCheckpoint, CheckpointError> {
        let checkpoint = self.checked(sequence_number, sub_sequence_number).await?;
        self.prepare_at(self.at_end_or(checkpoint)).await
    }

    async fn prepare_at(&mut self, pending: Checkpoint) -> Result<PreparedCheckpoint, CheckpointError> {
        let shard_id = self.held.key().to_owned();
        let mut lease = self.held.lock().await;
        if self.held.is_lost() {
            return Err(CheckpointError::LeaseLost { shard_id });
        }
        let sent = Instant::now();
        match self.table.prepare(&lease, &pending).await {
            Ok(Outcome::Done(written)) => {
                *lease = *written;
                self.held.written(sent);
                drop(lease);
                Ok(PreparedCheckpoint { checkpointer: self.clone(), pending })
            }
            Ok(Outcome::Lost) => {
                self.held.mark_lost();
                Err(CheckpointError::LeaseLost { shard_id })
            }
            Err(source) => Err(CheckpointError::Table { shard_id, source }),
        }
    }

    async fn write(&mut self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        let shard_id = self.held.key().to_owned();
        let mut lease = self.held.lock().await;
        if self.held.is_lost() {
            Metrics::add(&self.metrics.checkpoint_failures, 1);
            return Err(CheckpointError::LeaseLost { shard_id });
        }
        if lease.checkpoint.position == Position::ShardEnd {
            return match checkpoint.position {
                Position::ShardEnd => Ok(()),
                _ => Err(CheckpointError::InvalidPosition {
                    shard_id,
                    position: format!("{}/{}", checkpoint.position.as_str(), checkpoint.sub_sequence),
                    reason: "the shard is checkpointed at SHARD_END, which is final",
                }),
            };
        }
        if let (Position::Sequence(current), Position::Sequence(new)) =
            (&lease.checkpoint.position, &checkpoint.position)
            && cmp_positions((new, checkpoint.sub_sequence), (current, lease.checkpoint.sub_sequence)) == Ordering::Less
        {
            return Err(CheckpointError::InvalidPosition {
                shard_id,
                position: format!("{new}/{}", checkpoint.sub_sequence),
                reason: "before the checkpoint already recorded",
            });
        }
        let sent = Instant::now();
        match self.table.checkpoint(&lease, &checkpoint).await {
            Ok(Outcome::Done(written)) => {
                *lease = *written;
                self.held.written(sent);
                if let Position::Sequence(seq) = &checkpoint.position {
                    self.delivered().written(seq);
                }
                Metrics::add(&self.metrics.checkpoints, 1);
                tracing::debug!(shard_id = %shard_id, checkpoint = checkpoint.position.as_str(), sub = checkpoint.sub_sequence, "checkpoint");
                Ok(())
            }
            Ok(Outcome::Lost) => {
                self.held.mark_lost();
                Metrics::add(&self.metrics.checkpoint_failures, 1);
                Err(CheckpointError::LeaseLost { shard_id })
            }
            Err(source) => {
                Metrics::add(&self.metrics.checkpoint_failures, 1);
                Err(CheckpointError::Table { shard_id, source })
            }
        }
    }
}

/// A checkpoint prepared with [`Checkpointer::prepare_checkpoint`]: recorded as the lease's
/// pending checkpoint, not yet its checkpoint.
#[derive(Debug)]
#[must_use = "a prepared checkpoint is not the checkpoint until it is committed"]
pub struct PreparedCheckpoint {
    checkpointer: Checkpointer,
    pending: Checkpoint,
}

impl PreparedCheckpoint {
    /// The position prepared.
    pub fn pending(&self) -> &Checkpoint {
        &self.pending
    }

    /// The second phase: the prepared position becomes the checkpoint (and the pending one is
    /// cleared).
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint`].
    pub async fn commit(mut self) -> Result<(), CheckpointError> {
        let pending = self.pending.clone();
        self.checkpointer.write(pending).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: &str, sub: u64) -> Record {
        Record::new(seq, sub, "k", "d")
    }

    #[test]
    fn only_delivered_positions_are_known_and_the_end_is_the_last_one() {
        let mut delivered = Delivered::default();
        for r in [record("100", 0), record("200", 0), record("200", 1), record("200", 2), record("350", 0)] {
            delivered.push(&r);
        }
        assert!(delivered.contains("100", 0) && delivered.contains("200", 2) && delivered.contains("350", 0));
        assert!(!delivered.contains("200", 3), "past the aggregate's last sub-record");
        assert!(!delivered.contains("300", 0), "between two delivered records: another shard's number");
        assert!(!delivered.contains("99", 0) && !delivered.contains("351", 0));
        assert!(!delivered.is_end("350", 0), "not read to the end yet");
        delivered.ended = true;
        assert!(delivered.is_end("350", 0) && !delivered.is_end("200", 2));
        delivered.written("200");
        assert!(!delivered.contains("100", 0), "forgotten once a later checkpoint is written");
        assert!(delivered.contains("200", 1), "the checkpoint's own record stays (a later sub-record may follow)");
    }
}
