//! The collector: batches of up to 500 entries / 5 MiB (PutRecords' limits), the shards visited in
//! turn, each giving what its rate limiter (and, in ordering mode, its one call in flight) allows.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{Engine, ordering};
use crate::batch::Batch;
use crate::entry::Entry;
use crate::sender;

impl Engine {
    /// Sends batches while there is room in flight and something worth sending: a full batch's
    /// worth, or an entry that has waited its linger time.
    pub(super) fn dispatch(&mut self, now: Instant) {
        self.limiter_wake = None;
        self.collect_batches(now);
        // A slot taken when one came free and not used here goes back to the other streams.
        self.spare_slot = None;
    }

    fn collect_batches(&mut self, now: Instant) {
        // Parts of a call the service refused as invalid go first, each as a call of its own.
        while !self.splits.is_empty() {
            let Some(slot) = self.take_slot() else { return };
            let Some(part) = self.splits.pop_front() else { return };
            self.send(part, slot);
        }
        while self.shards.count() > 0 {
            let worth_it = self.shards.count() >= self.config.collection_max_count
                || self.shards.bytes() >= self.config.collection_max_bytes
                || self.shards.earliest_due().is_some_and(|due| due <= now);
            if !worth_it {
                return;
            }
            let Some(slot) = self.take_slot() else { return };
            let mut batch = Batch::new(self.config.collection_max_count, self.config.collection_max_bytes);
            // Visit every shard with ready entries once, starting where the last batch stopped.
            for _ in 0..self.shards.turns() {
                if batch.is_full() {
                    break;
                }
                let Some(shard) = self.shards.next_turn() else { break };
                self.collect(&shard, &mut batch, now);
                self.shards.end_turn(shard);
            }
            if batch.is_empty() {
                return;
            }
            self.send(batch.into_entries(), slot);
        }
    }

    /// A place for one more call in flight, if the producer has one (its calls in flight are
    /// shared by every stream): the one taken when a slot came free, else a free one.
    fn take_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        self.spare_slot.take().or_else(|| self.slots.clone().try_acquire_owned().ok())
    }

    /// Whether a call could start now.
    pub(super) fn has_slot(&self) -> bool {
        self.spare_slot.is_some() || self.slots.available_permits() > 0
    }

    /// Starts a PutRecords call on a sender task.
    fn send(&mut self, entries: Vec<Entry>, slot: OwnedSemaphorePermit) {
        self.in_flight += 1;
        let call = sender::Call {
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            stream: self.stream.clone(),
            ordering: self.config.ordering,
            responses: self.responses.0.clone(),
            slot,
        };
        sender::spawn(call, entries);
    }

    /// When something held back may go.
    fn wake_at(&mut self, at: Instant) {
        self.limiter_wake = Some(self.limiter_wake.map_or(at, |w| w.min(at)));
    }

    /// Moves a shard's ready entries into the batch while its rate limiter, the batch and (in
    /// ordering mode) its one call in flight allow.
    fn collect(&mut self, shard: &Arc<str>, batch: &mut Batch<Entry>, now: Instant) {
        let ordering = self.config.ordering;
        loop {
            let Some(state) = self.shards.get_mut(shard) else { return };
            let Some(front) = state.front() else { return };
            if !batch.fits(front.size) {
                return;
            }
            if front.deadline <= now {
                let Some(entry) = self.shards.pop_front(shard) else { return };
                if ordering {
                    // The survivors keep their place ahead of the shard's later records.
                    let rebuilt = self.rebuild(entry, now);
                    self.push_ready_front(shard, rebuilt);
                } else {
                    self.dissolve(entry, now);
                }
                continue;
            }
            let size = front.size;
            if ordering && let Err(until) = ordering::may_send(state, now) {
                if let Some(at) = until {
                    self.wake_at(at);
                }
                return;
            }
            if let Err(wait) = state.limiter.try_take(now, size) {
                self.wake_at(now + wait);
                return;
            }
            if ordering {
                // One Kinesis record per shard per call, one call per shard in flight.
                state.busy = true;
                state.blocked_until = None;
            }
            let Some(entry) = self.shards.pop_front(shard) else { return };
            if batch.try_push(entry, size).is_err() {
                unreachable!("checked with `fits` above");
            }
            if ordering {
                return;
            }
        }
    }
}
