//! `--verify`: a consumer group beside the producers, and the tally that matches what it received
//! against what Kinesis acknowledged.
//!
//! A record is known by its position, (sequence number, sub-sequence number): the producer's
//! receipt names it (the sub-sequence number is the record's index in its aggregate, 0 for a
//! record sent plain), and the consumer sees the same pair. So verification works for any
//! template, and it tells a duplicate (the same position twice) from a resend. Positions are kept
//! as 64-bit hashes: 16 bytes of memory per record, and a collision among two million records has
//! odds of about 1 in 10^7.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::latency::Latencies;

use kinesis_consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};

/// What was acknowledged and received, by position.
#[derive(Debug)]
pub struct Tally {
    inner: Mutex<Inner>,
    /// What the put and receive times are counted from.
    start: Instant,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { inner: Mutex::default(), start: Instant::now() }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Put -> first delivery to a processor, in microseconds (millisecond resolution).
    processed_latency: Latencies,
    positions: HashMap<u64, Seen>,
    acked: u64,
    /// Acknowledged positions received at least once.
    matched: u64,
    /// Deliveries beyond the first of a position.
    duplicates: u64,
    /// Every delivery.
    deliveries: u64,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    acked: bool,
    received: u32,
    /// Milliseconds from the tally's start to the put and to the first delivery; `u32::MAX`:
    /// not known (yet).
    put_ms: u32,
    received_ms: u32,
}

impl Default for Seen {
    fn default() -> Self {
        Seen { acked: false, received: 0, put_ms: u32::MAX, received_ms: u32::MAX }
    }
}

/// The tally at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Positions Kinesis acknowledged.
    pub acked: u64,
    /// Acknowledged positions received at least once.
    pub received: u64,
    /// Deliveries of a position beyond its first.
    pub duplicates: u64,
    /// Every delivery (received + duplicates + unexpected deliveries).
    pub deliveries: u64,
}

impl Counts {
    /// Acknowledged positions never received.
    pub fn lost(&self) -> u64 {
        self.acked - self.received
    }
}

fn position(sequence_number: &str, sub_sequence_number: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    sequence_number.hash(&mut hasher);
    sub_sequence_number.hash(&mut hasher);
    hasher.finish()
}

impl Tally {
    fn ms_since_start(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(u32::MAX - 1)
    }

    /// Records a producer receipt: the record, put at `put_at`, is stored at (sequence number,
    /// aggregate index).
    pub fn acked(&self, sequence_number: &str, aggregated_index: Option<u64>, put_at: Instant) {
        let key = position(sequence_number, aggregated_index.unwrap_or(0));
        let put_ms = self.ms_since_start(put_at);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seen = inner.positions.entry(key).or_default();
        if seen.acked {
            return;
        }
        seen.acked = true;
        seen.put_ms = put_ms;
        let (received, received_ms) = (seen.received > 0, seen.received_ms);
        inner.acked += 1;
        if received {
            inner.matched += 1;
            inner.processed_latency.record_ms(received_ms.saturating_sub(put_ms));
        }
    }

    /// Records a batch the consumer group delivered.
    pub fn received(&self, batch: &Batch) {
        let now_ms = self.ms_since_start(Instant::now());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for record in &batch.records {
            let key = position(&record.sequence_number, record.sub_sequence_number);
            let seen = inner.positions.entry(key).or_default();
            seen.received += 1;
            let (first, acked, put_ms) = (seen.received == 1, seen.acked, seen.put_ms);
            if first {
                seen.received_ms = now_ms;
            }
            inner.deliveries += 1;
            if !first {
                inner.duplicates += 1;
            } else if acked {
                inner.matched += 1;
                inner.processed_latency.record_ms(now_ms.saturating_sub(put_ms));
            }
        }
    }

    /// Put -> first delivery to a processor, of every acknowledged record received.
    pub fn processed_latency(&self) -> Latencies {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).processed_latency.clone()
    }

    /// The counts now.
    pub fn counts(&self) -> Counts {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Counts {
            acked: inner.acked,
            received: inner.matched,
            duplicates: inner.duplicates,
            deliveries: inner.deliveries,
        }
    }

    /// Positions received that no receipt of this run named: records of an earlier run, or
    /// records whose put failed on the client side after Kinesis stored them.
    pub fn unexpected(&self) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.positions.values().filter(|s| s.received > 0 && !s.acked).count() as u64
    }
}

/// Counts every batch into the tally; checkpoints each one.
struct Count {
    tally: Arc<Tally>,
}

impl Processor for Count {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.tally.received(&batch);
        // A failed checkpoint costs a re-read after a lease moves, never a record.
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// A consumer group of `workers` workers sharing one lease table.
pub struct Group {
    workers: Vec<Scheduler>,
}

impl Group {
    /// Starts `workers` workers on `stream`, with the lease table `table`, in lease management
    /// `mode`, reading from `start`.
    ///
    /// # Errors
    /// When the consumer configuration is refused.
    pub fn start(
        kinesis: &aws_sdk_kinesis::Client,
        dynamodb: &aws_sdk_dynamodb::Client,
        stream: &str,
        table: &str,
        (workers, mode, start): (usize, super::LeaseMode, InitialPosition),
        tally: &Arc<Tally>,
    ) -> Result<Self, kinesis_consumer::ConfigError> {
        let mut started = Vec::with_capacity(workers);
        for i in 0..workers {
            let mut config = SchedulerConfig::new(stream, table);
            config.worker_id = format!("loadgen-worker-{}", i + 1);
            config.initial_position = start;
            // Short failover and idle times: the group shares the shards within seconds, and the
            // last records of a run are read soon after they are written.
            config.failover = Duration::from_secs(4);
            config.polling.idle_time_between_reads = Duration::from_millis(250);
            config.lease_management = match mode {
                super::LeaseMode::Kcl2 => kinesis_consumer::LeaseManagement::Kcl2Compatible,
                super::LeaseMode::Kcl3 => kinesis_consumer::LeaseManagement::Kcl3,
            };
            // The group's workers share one process, so their CPU figures are the same: the
            // leader balances them by count.
            config.assignment_strategy = kinesis_consumer::AssignmentStrategy::LeaseCount;
            let tally = tally.clone();
            started.push(Scheduler::start(kinesis.clone(), dynamodb.clone(), config, move |_shard: &str| Count {
                tally: tally.clone(),
            })?);
        }
        Ok(Self { workers: started })
    }

    /// The leases each worker holds.
    pub fn holdings(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.held_leases().len()).collect()
    }

    /// Shuts every worker down gracefully (checkpoints, releases its leases).
    pub async fn shutdown(self) {
        let stops = self.workers.into_iter().map(|w| tokio::spawn(w.shutdown()));
        for stop in stops {
            let _ = stop.await;
        }
    }
}

/// Where the group starts reading: a stream created by this run from its oldest record, an
/// existing one from a little before the run.
pub fn start_position(created: bool, run_started: SystemTime) -> InitialPosition {
    if created {
        InitialPosition::TrimHorizon
    } else {
        InitialPosition::AtTimestamp(run_started - Duration::from_secs(5))
    }
}

/// Waits until every acknowledged record arrived, or nothing new arrived for `timeout`.
pub(super) async fn wait_for_arrivals(tally: &Tally, timeout: Duration, stop: &AtomicBool) -> Counts {
    let mut last = tally.counts();
    let mut since = Instant::now();
    loop {
        let counts = tally.counts();
        if counts.lost() == 0 || stop.load(Ordering::Relaxed) {
            return counts;
        }
        if counts.deliveries != last.deliveries {
            (last, since) = (counts, Instant::now());
        } else if since.elapsed() >= timeout {
            eprintln!("verify: nothing arrived for {:.0} s; {} records missing", timeout.as_secs_f64(), counts.lost());
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kinesis_consumer::Record;

    fn batch(positions: &[(&str, u64)]) -> Batch {
        let records = positions
            .iter()
            .map(|(seq, sub)| {
                let mut record = Record::new(Arc::from(*seq), *sub, "k", Bytes::from_static(b"x"));
                record.aggregated = true;
                record
            })
            .collect();
        Batch::new(Arc::from("shardId-000000000000"), records)
    }

    #[test]
    fn the_tally_tells_lost_duplicate_and_unexpected_records_apart_in_any_order() {
        let tally = Tally::default();
        let put = Instant::now();
        tally.acked("100", Some(0), put);
        tally.acked("100", Some(1), put);
        tally.acked("200", None, put);
        tally.acked("300", Some(0), put); // never received: lost
        // Received before and after its receipt, once twice, and one nobody acknowledged.
        tally.received(&batch(&[("100", 0), ("100", 1), ("400", 0)]));
        tally.received(&batch(&[("100", 1), ("200", 0)]));
        tally.acked("100", Some(0), put); // a repeated receipt changes nothing
        let counts = tally.counts();
        assert_eq!(counts, Counts { acked: 4, received: 3, duplicates: 1, deliveries: 5 });
        assert_eq!(counts.lost(), 1);
        assert_eq!(tally.unexpected(), 1);
        assert_eq!(tally.processed_latency().len(), 3, "one put -> processed latency per record matched");
        // A receipt after the delivery still matches, and its latency runs from its put.
        std::thread::sleep(Duration::from_millis(30));
        tally.received(&batch(&[("500", 7)]));
        tally.acked("500", Some(7), put);
        assert_eq!(tally.counts().received, 4);
        assert_eq!(tally.unexpected(), 1);
        let latency = tally.processed_latency().summary().unwrap();
        assert_eq!(latency.count, 4);
        assert!(latency.max >= 30.0, "received 30 ms after its put: {latency}");
    }
}
