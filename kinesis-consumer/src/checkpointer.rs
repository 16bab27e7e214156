//! The checkpointer a processor gets with each batch: records how far the shard is processed.
//!
//! Every checkpoint is a write fenced on the lease counter and the owner. Once the lease is lost
//! it returns [`CheckpointError::LeaseLost`] and writes nothing, so the new owner's progress is
//! never overwritten. It is a cheap `Clone`: a clone keeps the batch it was made for, so it can
//! be used after the processing call returns (the [`crate::Batches`] stream does).

use std::cmp::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use crate::error::CheckpointError;
use crate::held::HeldLease;
use crate::lease::{Checkpoint, Position};
use crate::lease_table::{LeaseTable, Outcome};
use crate::metrics::Metrics;
use crate::record::{Record, cmp_positions};

/// Records checkpoints for one shard.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    held: Arc<HeldLease>,
    table: LeaseTable,
    metrics: Arc<Metrics>,
    /// What [`Checkpointer::checkpoint`] records: the end of the batch, or SHARD_END.
    end: Option<Checkpoint>,
    /// The newest (sequence, sub-sequence) delivered to the processor.
    largest: Option<(Arc<str>, u64)>,
}

impl Checkpointer {
    pub(crate) fn new(held: Arc<HeldLease>, table: LeaseTable, metrics: Arc<Metrics>) -> Self {
        Checkpointer { held, table, metrics, end: None, largest: None }
    }

    /// The shard.
    pub fn shard_id(&self) -> &str {
        self.held.key()
    }

    /// Notes the batch about to be handed over.
    pub(crate) fn delivering(&mut self, records: &[Record]) {
        if let Some(last) = records.last() {
            self.largest = Some((last.sequence_number.clone(), last.sub_sequence_number));
            self.end = Some(Checkpoint {
                position: Position::Sequence(last.sequence_number.to_string()),
                sub_sequence: last.sub_sequence_number,
            });
        }
    }

    /// The shard is read to its end: [`Checkpointer::checkpoint`] now records SHARD_END.
    pub(crate) fn at_shard_end(&mut self) {
        self.end = Some(Checkpoint::at(Position::ShardEnd));
    }

    /// Records the end of the batch (in `shard_ended`: SHARD_END). Does nothing before any
    /// record was delivered.
    ///
    /// # Errors
    /// [`CheckpointError::LeaseLost`] when the lease is no longer held (nothing is written);
    /// [`CheckpointError::Table`] when the write failed (try again).
    ///
    /// Not cancel-safe: cancelled while the write is in flight, the checkpoint may be written
    /// while this worker does not learn the new lease counter, and then sees the lease as lost.
    pub async fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        match self.end.clone() {
            Some(end) => self.write(end).await,
            None => Ok(()),
        }
    }

    /// Records a checkpoint after one record: the shard resumes after it.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_record(&mut self, record: &Record) -> Result<(), CheckpointError> {
        self.checkpoint_at(&record.sequence_number, record.sub_sequence_number).await
    }

    /// Records a given position: the shard resumes after (sequence, sub-sequence).
    ///
    /// # Errors
    /// [`CheckpointError::InvalidPosition`] when the position is not a sequence number, is after
    /// the newest record delivered, or before the checkpoint already recorded;
    /// [`CheckpointError::LeaseLost`] and [`CheckpointError::Table`] as for
    /// [`Checkpointer::checkpoint`].
    pub async fn checkpoint_at(
        &mut self,
        sequence_number: &str,
        sub_sequence_number: u64,
    ) -> Result<(), CheckpointError> {
        let invalid = |reason| CheckpointError::InvalidPosition {
            shard_id: self.held.key().to_owned(),
            position: format!("{sequence_number}/{sub_sequence_number}"),
            reason,
        };
        if sequence_number.is_empty() || !sequence_number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("not a sequence number"));
        }
        match &self.largest {
            Some((seq, sub))
                if cmp_positions((sequence_number, sub_sequence_number), (seq, *sub)) != Ordering::Greater => {}
            _ => return Err(invalid("after the newest record delivered")),
        }
        let checkpoint =
            Checkpoint { position: Position::Sequence(sequence_number.to_owned()), sub_sequence: sub_sequence_number };
        self.write(checkpoint).await
    }

    async fn write(&mut self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        let shard_id = self.held.key().to_owned();
        let mut lease = self.held.lock().await;
        if self.held.is_lost() {
            Metrics::add(&self.metrics.checkpoint_failures, 1);
            return Err(CheckpointError::LeaseLost { shard_id });
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
