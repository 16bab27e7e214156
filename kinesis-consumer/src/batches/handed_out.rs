//! The batches of one shard that the [`crate::Batches`] stream handed out, in order, until each is
//! finished or abandoned: what a checkpoint may pass.
//!
//! An application reading a stream of batches may hold several at once and finish them in any
//! order. A checkpoint (SHARD_END included) must never pass a record it has not finished, so
//! progress is the end of the longest run of finished batches from the oldest: a batch finished
//! after a later one lets the checkpoint move over both. A batch dropped without being finished
//! is *abandoned*: nothing may pass it, and the shard is read again from its last checkpoint.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::leases::lease::Checkpoint;

#[derive(Debug)]
struct Slot {
    id: u64,
    /// The batch's last record.
    end: Checkpoint,
    finished: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Handed out and not yet behind the progress, oldest first.
    slots: VecDeque<Slot>,
    next: u64,
    abandoned: usize,
}

/// One shard's batches handed out.
#[derive(Debug, Default)]
pub(crate) struct HandedOut {
    state: Mutex<State>,
    changed: Notify,
}

impl HandedOut {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a batch handed out, ending at `end`; returns its id.
    pub(crate) fn hand_out(&self, end: Checkpoint) -> u64 {
        let mut state = self.state();
        state.next += 1;
        let id = state.next;
        state.slots.push_back(Slot { id, end, finished: false });
        id
    }

    /// Marks a batch finished. Returns the end of the longest run of finished batches from the
    /// oldest, if that run is not empty (the run is then forgotten: it is the new progress).
    pub(crate) fn finish(&self, id: u64) -> Option<Checkpoint> {
        let progress = {
            let mut state = self.state();
            if let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) {
                slot.finished = true;
            }
            let mut progress = None;
            while state.slots.front().is_some_and(|s| s.finished) {
                progress = state.slots.pop_front().map(|s| s.end);
            }
            progress
        };
        self.changed.notify_waiters();
        progress
    }

    /// Whether every batch handed out before `id` is finished.
    pub(crate) fn earlier_finished(&self, id: u64) -> bool {
        self.state().slots.iter().take_while(|s| s.id < id).all(|s| s.finished)
    }

    /// A batch was dropped: abandoned unless it was finished.
    pub(crate) fn dropped(&self, id: u64) {
        {
            let mut state = self.state();
            if let Some(at) = state.slots.iter().position(|s| s.id == id && !s.finished) {
                state.slots.remove(at);
                state.abandoned += 1;
            }
        }
        self.changed.notify_waiters();
    }

    /// How many batches were abandoned.
    pub(crate) fn abandoned(&self) -> usize {
        self.state().abandoned
    }

    /// Waits until no batch is outstanding (each finished or abandoned). Returns whether every
    /// one was finished (nothing abandoned).
    pub(crate) async fn settled(&self) -> bool {
        loop {
            let changed = self.changed.notified();
            {
                let state = self.state();
                if state.slots.iter().all(|s| s.finished) {
                    return state.abandoned == 0;
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::lease::Position;

    fn at(seq: &str) -> Checkpoint {
        Checkpoint { position: Position::Sequence(seq.into()), sub_sequence: 0 }
    }

    #[tokio::test]
    async fn progress_is_the_end_of_the_finished_run_from_the_oldest_batch() {
        let handed = HandedOut::default();
        let (a, b, c) = (handed.hand_out(at("10")), handed.hand_out(at("20")), handed.hand_out(at("30")));
        assert_eq!(handed.finish(b), None, "batch a is not finished: nothing may pass it");
        assert!(!handed.earlier_finished(c));
        assert_eq!(handed.finish(a), Some(at("20")), "a and b are finished: the progress moves over both");
        assert!(handed.earlier_finished(c));
        handed.dropped(b);
        assert_eq!(handed.abandoned(), 0, "dropping a finished batch abandons nothing");
        handed.dropped(c);
        assert_eq!(handed.abandoned(), 1);
        assert!(!handed.settled().await, "c was abandoned");
    }

    #[tokio::test]
    async fn settled_waits_for_every_batch() {
        let handed = std::sync::Arc::new(HandedOut::default());
        let a = handed.hand_out(at("1"));
        let waiting = tokio::spawn({
            let handed = handed.clone();
            async move { handed.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        handed.finish(a);
        assert!(waiting.await.unwrap(), "every batch finished");
    }
}
