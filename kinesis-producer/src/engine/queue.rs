//! A shard's sealed entries, in the order they are sent.
//!
//! Normally the entry holding the oldest user record goes first. A retried record has its
//! original put time, so the aggregate it rides in goes ahead of aggregates of newer records:
//! under sustained throttling a record that was refused once is not refused again and again behind
//! newer traffic until its time to live runs out (first in, first out over records, not entries).
//! In ordering mode the queue is strictly first in, first out, and a refused entry goes back to
//! the front.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::entry::Entry;

/// What the queue needs to know of an entry.
pub(super) trait Aged {
    /// When the oldest user record in it was put.
    fn oldest(&self) -> Instant;
}

impl Aged for Entry {
    fn oldest(&self) -> Instant {
        self.oldest
    }
}

/// A shard's ready entries.
pub(super) struct ReadyQueue<E> {
    /// Keyed by (age, when ordering by age; position).
    entries: BTreeMap<(Option<Instant>, i64), E>,
    /// The next position at the front and at the back.
    front: i64,
    back: i64,
    by_age: bool,
}

impl<E: Aged> ReadyQueue<E> {
    /// A queue ordered by age, or (`by_age` false) first in, first out.
    pub(super) fn new(by_age: bool) -> Self {
        ReadyQueue { entries: BTreeMap::new(), front: -1, back: 0, by_age }
    }

    fn age(&self, entry: &E) -> Option<Instant> {
        self.by_age.then(|| entry.oldest())
    }

    pub(super) fn push_back(&mut self, entry: E) {
        self.back += 1;
        self.entries.insert((self.age(&entry), self.back), entry);
    }

    /// Puts an entry ahead of every other of its age (in a first-in-first-out queue: of all).
    pub(super) fn push_front(&mut self, entry: E) {
        self.front -= 1;
        self.entries.insert((self.age(&entry), self.front), entry);
    }

    pub(super) fn front(&self) -> Option<&E> {
        self.entries.first_key_value().map(|(_, entry)| entry)
    }

    pub(super) fn pop_front(&mut self) -> Option<E> {
        self.entries.pop_first().map(|(_, entry)| entry)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut E> {
        self.entries.values_mut()
    }

    /// The entries, in sending order.
    pub(super) fn into_entries(self) -> impl Iterator<Item = E> {
        self.entries.into_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct E(Instant, &'static str);

    impl Aged for E {
        fn oldest(&self) -> Instant {
            self.0
        }
    }

    fn names(queue: ReadyQueue<E>) -> Vec<&'static str> {
        queue.into_entries().map(|e| e.1).collect()
    }

    #[test]
    fn by_age_the_entry_with_the_oldest_record_goes_first() {
        let t0 = Instant::now();
        let mut queue = ReadyQueue::new(true);
        queue.push_back(E(t0 + Duration::from_secs(2), "new"));
        queue.push_back(E(t0, "retried"));
        queue.push_back(E(t0 + Duration::from_secs(2), "newer, same age"));
        assert_eq!(queue.front().map(|e| e.1), Some("retried"));
        assert_eq!(names(queue), ["retried", "new", "newer, same age"]);
    }

    #[test]
    fn first_in_first_out_and_the_front_when_not_by_age() {
        let t0 = Instant::now();
        let mut queue = ReadyQueue::new(false);
        queue.push_back(E(t0 + Duration::from_secs(2), "a"));
        queue.push_back(E(t0, "b"));
        queue.push_front(E(t0 + Duration::from_secs(5), "refused, back in front"));
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.pop_front().map(|e| e.1), Some("refused, back in front"));
        assert_eq!(names(queue), ["a", "b"]);
    }
}
