//! The shards records were routed to: each one's aggregate being filled, its sealed entries
//! waiting to be sent, its rate limiter; and, over all shards, the round-robin order the collector
//! visits them in and the count and bytes of every ready entry.
//!
//! Every ready entry goes in and out through [`Shards`], which keeps the totals and the round
//! robin in step with the shards' queues (one place, instead of at each caller).

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;
use kinesis_aggregation::{Aggregator, AggregatorConfig, HashKeyRange};
use tokio::time::Instant;

use super::queue::ReadyQueue;
use super::shard_map::ShardMap;
use crate::config::ProducerConfig;
use crate::entry::Entry;
use crate::pending::Pending;
use crate::rate_limit::ShardLimiter;

/// One shard's part of the pipeline.
pub(super) struct ShardState {
    /// The hash-key range the shard had in the map its records were routed by. A listing that
    /// gives the shard id another range (the stream was re-created) dissolves the state.
    range: HashKeyRange,
    pub(super) aggregator: Aggregator,
    pub(super) members: Vec<Pending>,
    /// When the aggregate started filling: it is sealed `record_max_buffered_time` later. (Not the
    /// members' put time: retried records would then seal every aggregate at once, one or two
    /// records each.)
    pub(super) aggregate_started: Option<Instant>,
    /// Sealed entries, oldest first, waiting for the rate limiter and a batch.
    ready: ReadyQueue<Entry>,
    /// Whether the shard is in the round robin.
    in_turn: bool,
    pub(super) limiter: ShardLimiter,
    /// Ordering mode: a call carrying this shard's record is in flight.
    pub(super) busy: bool,
    /// Ordering mode: the shard's first record failed and waits for its backoff until then.
    pub(super) blocked_until: Option<Instant>,
}

impl ShardState {
    fn new(config: &ProducerConfig, now: Instant, range: HashKeyRange) -> Self {
        ShardState {
            range,
            aggregator: Aggregator::with_config(AggregatorConfig::with_max_bytes(config.aggregation_max_bytes)),
            members: Vec::new(),
            aggregate_started: None,
            ready: ReadyQueue::new(!config.ordering),
            in_turn: false,
            limiter: ShardLimiter::new(
                config.rate_limit_percent,
                config.shard_records_per_second,
                config.shard_bytes_per_second,
                now,
            ),
            busy: false,
            blocked_until: None,
        }
    }

    /// The entry this shard sends next.
    pub(super) fn front(&self) -> Option<&Entry> {
        self.ready.front()
    }
}

#[derive(Default)]
pub(super) struct Shards {
    states: HashMap<Arc<str>, ShardState>,
    /// Shards with ready entries, in the order the collector visits them.
    turns: VecDeque<Arc<str>>,
    /// Ready entries over all shards, and their bytes.
    count: usize,
    bytes: usize,
}

impl Shards {
    pub(super) fn get_mut(&mut self, shard: &Arc<str>) -> Option<&mut ShardState> {
        self.states.get_mut(shard)
    }

    /// The shard's state, made for `range` if it has none.
    pub(super) fn get_or_insert(
        &mut self,
        shard: &Arc<str>,
        config: &ProducerConfig,
        now: Instant,
        range: HashKeyRange,
    ) -> &mut ShardState {
        // Looked up first: the usual case, a shard seen before, then costs no clone of its id.
        if !self.states.contains_key(shard) {
            self.states.insert(shard.clone(), ShardState::new(config, now, range));
        }
        self.states.get_mut(shard).expect("inserted above")
    }

    /// Queues an entry behind its shard's others; hands it back when its shard has no state.
    #[must_use = "an entry handed back must be routed again"]
    pub(super) fn push_back(&mut self, entry: Entry) -> Option<Entry> {
        let Some(state) = self.states.get_mut(&entry.shard) else { return Some(entry) };
        self.count += 1;
        self.bytes += entry.size;
        if !state.in_turn {
            state.in_turn = true;
            self.turns.push_back(entry.shard.clone());
        }
        state.ready.push_back(entry);
        None
    }

    /// Puts entries back at the head of their shard's queue, in the given order; hands them back
    /// when the shard has no state.
    pub(super) fn push_front(&mut self, shard: &Arc<str>, entries: Vec<Entry>) -> Result<(), Vec<Entry>> {
        let Some(state) = self.states.get_mut(shard) else { return Err(entries) };
        for entry in entries.into_iter().rev() {
            self.count += 1;
            self.bytes += entry.size;
            state.ready.push_front(entry);
        }
        if !state.in_turn && !state.ready.is_empty() {
            state.in_turn = true;
            self.turns.push_back(shard.clone());
        }
        Ok(())
    }

    /// Takes the shard's next entry out.
    pub(super) fn pop_front(&mut self, shard: &Arc<str>) -> Option<Entry> {
        let entry = self.states.get_mut(shard)?.ready.pop_front()?;
        self.count -= 1;
        self.bytes -= entry.size;
        Some(entry)
    }

    /// The next shard in turn, taken out of the round robin until [`Shards::end_turn`].
    pub(super) fn next_turn(&mut self) -> Option<Arc<str>> {
        self.turns.pop_front()
    }

    /// Ends a shard's turn: it goes to the back of the round robin if it has ready entries left.
    pub(super) fn end_turn(&mut self, shard: Arc<str>) {
        if let Some(state) = self.states.get_mut(&shard) {
            if state.ready.is_empty() {
                state.in_turn = false;
            } else {
                self.turns.push_back(shard);
            }
        }
    }

    /// How many shards have ready entries.
    pub(super) fn turns(&self) -> usize {
        self.turns.len()
    }

    /// Ready entries over all shards.
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Bytes of the ready entries over all shards.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The earliest `due` of the shards' next entries.
    pub(super) fn earliest_due(&self) -> Option<Instant> {
        self.turns.iter().filter_map(|id| self.states.get(id)?.ready.front().map(|e| e.due)).min()
    }

    /// Shards with an aggregate being filled.
    pub(super) fn filling(&self) -> Vec<Arc<str>> {
        self.states.iter().filter(|(_, s)| !s.members.is_empty()).map(|(id, _)| id.clone()).collect()
    }

    /// Shards whose aggregate started filling at least `linger` before `now`.
    pub(super) fn lingering(&self, now: Instant, linger: std::time::Duration) -> Vec<Arc<str>> {
        self.states
            .iter()
            .filter(|(_, s)| s.aggregate_started.is_some_and(|t| t + linger <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the first aggregate being filled has lingered `linger`.
    pub(super) fn next_linger(&self, linger: std::time::Duration) -> Option<Instant> {
        self.states.values().filter_map(|s| s.aggregate_started).min().map(|started| started + linger)
    }

    /// Makes every ready entry due by `now` (flush, shutdown).
    pub(super) fn expedite(&mut self, now: Instant) {
        for state in self.states.values_mut() {
            for entry in state.ready.iter_mut() {
                entry.due = entry.due.min(now);
            }
        }
    }

    /// Shards that are not open under the same range in `map` (closed, or re-created).
    pub(super) fn ids_not_in(&self, map: &ShardMap) -> Vec<Arc<str>> {
        self.states.iter().filter(|(id, state)| !map.holds(id, state.range)).map(|(id, _)| id.clone()).collect()
    }

    /// Removes a shard: its ready entries in sending order, and the aggregate being filled.
    pub(super) fn remove(&mut self, shard: &Arc<str>) -> Option<(Vec<Entry>, Vec<Pending>)> {
        let state = self.states.remove(shard)?;
        if let Some(at) = self.turns.iter().position(|id| id == shard) {
            self.turns.remove(at);
        }
        let ready: Vec<Entry> = state.ready.into_entries().collect();
        self.count -= ready.len();
        self.bytes -= ready.iter().map(|e| e.size).sum::<usize>();
        Some((ready, state.members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::tests::entry;

    fn on(shard: &str, n: usize) -> Entry {
        let mut entry = entry(n);
        entry.shard = Arc::from(shard);
        entry
    }

    /// Shards in ordering mode (first in, first out; a refused entry back in front).
    fn shards(ids: &[&str]) -> Shards {
        let config = ProducerConfig { ordering: true, ..Default::default() };
        let mut shards = Shards::default();
        for id in ids {
            shards.get_or_insert(&Arc::from(*id), &config, Instant::now(), HashKeyRange::ALL);
        }
        shards
    }

    /// The totals, recounted from the queues, and as kept.
    fn recount(shards: &mut Shards) -> ((usize, usize), (usize, usize)) {
        let (mut count, mut bytes) = (0, 0);
        for state in shards.states.values_mut() {
            for entry in state.ready.iter_mut() {
                count += 1;
                bytes += entry.size;
            }
        }
        ((count, bytes), (shards.count(), shards.bytes()))
    }

    #[test]
    fn totals_follow_every_entry_in_and_out() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut shards = shards(&["a", "b"]);
        let (one, three) = (on("a", 1), on("b", 3));
        let sizes = one.size + three.size;
        assert!(shards.push_back(one).is_none());
        assert!(shards.push_back(three).is_none());
        assert!(shards.push_front(&a, vec![on("a", 2)]).is_ok());
        let (kept, counted) = recount(&mut shards);
        assert_eq!((kept, counted.0), (counted, 3));
        let front = shards.pop_front(&a).unwrap();
        assert_eq!(front.members.len(), 2, "pushed to the front, first out");
        assert_eq!((shards.count(), shards.bytes()), (2, sizes));
        let (ready, members) = shards.remove(&b).unwrap();
        assert_eq!((ready.len(), members.len()), (1, 0));
        let (kept, counted) = recount(&mut shards);
        assert_eq!((kept, counted.0), (counted, 1));
        assert_eq!(shards.turns(), 1, "a removed shard leaves the round robin");
        assert!(shards.pop_front(&a).is_some());
        assert_eq!((shards.count(), shards.bytes()), (0, 0));
        assert!(shards.push_back(on("gone", 1)).is_some(), "no state: handed back");
        assert_eq!(recount(&mut shards), ((0, 0), (0, 0)));
    }

    #[test]
    fn shards_take_turns_and_leave_the_round_robin_when_empty() {
        let (a, b) = (Arc::<str>::from("a"), Arc::<str>::from("b"));
        let mut shards = shards(&["a", "b"]);
        for entry in [on("a", 1), on("b", 1), on("a", 1)] {
            assert!(shards.push_back(entry).is_none());
        }
        assert_eq!(shards.turns(), 2, "a shard is in the round robin once");
        let mut visits = Vec::new();
        while let Some(shard) = shards.next_turn() {
            visits.push(shard.to_string());
            shards.pop_front(&shard);
            shards.end_turn(shard);
        }
        assert_eq!(visits, ["a", "b", "a"]);
        assert_eq!(shards.count(), 0);
        assert!(shards.push_back(on("b", 1)).is_none());
        assert_eq!(shards.next_turn().as_deref(), Some(&*b), "back in turn when it has entries again");
        assert!(shards.remove(&a).is_some());
    }
}
