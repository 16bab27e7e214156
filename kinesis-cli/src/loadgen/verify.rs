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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kinesis_consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};

/// What was acknowledged and received, by position.
#[derive(Debug, Default)]
pub struct Tally {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    positions: HashMap<u64, Seen>,
    acked: u64,
    /// Acknowledged positions received at least once.
    matched: u64,
    /// Deliveries beyond the first of a position.
    duplicates: u64,
    /// Every delivery.
    deliveries: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    acked: bool,
    received: u32,
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
    /// Records a producer receipt: the record is stored at (sequence number, aggregate index).
    pub fn acked(&self, sequence_number: &str, aggregated_index: Option<u64>) {
        let key = position(sequence_number, aggregated_index.unwrap_or(0));
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seen = inner.positions.entry(key).or_default();
        if seen.acked {
            return;
        }
        seen.acked = true;
        let received = seen.received > 0;
        inner.acked += 1;
        if received {
            inner.matched += 1;
        }
    }

    /// Records a batch the consumer group delivered.
    pub fn received(&self, batch: &Batch) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for record in &batch.records {
            let key = position(&record.sequence_number, record.sub_sequence_number);
            let seen = inner.positions.entry(key).or_default();
            seen.received += 1;
            let (first, acked) = (seen.received == 1, seen.acked);
            inner.deliveries += 1;
            if !first {
                inner.duplicates += 1;
            } else if acked {
                inner.matched += 1;
            }
        }
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
        tally.acked("100", Some(0));
        tally.acked("100", Some(1));
        tally.acked("200", None);
        tally.acked("300", Some(0)); // never received: lost
        // Received before and after its receipt, once twice, and one nobody acknowledged.
        tally.received(&batch(&[("100", 0), ("100", 1), ("400", 0)]));
        tally.received(&batch(&[("100", 1), ("200", 0)]));
        tally.acked("100", Some(0)); // a repeated receipt changes nothing
        let counts = tally.counts();
        assert_eq!(counts, Counts { acked: 4, received: 3, duplicates: 1, deliveries: 5 });
        assert_eq!(counts.lost(), 1);
        assert_eq!(tally.unexpected(), 1);
        // A receipt after the delivery still matches.
        tally.received(&batch(&[("500", 7)]));
        tally.acked("500", Some(7));
        assert_eq!(tally.counts().received, 4);
        assert_eq!(tally.unexpected(), 1);
    }
}
