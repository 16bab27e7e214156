//! Many streams, one application (the KCL's multi-stream mode) on the emulators: streams of 4, 2
//! and 1 shards read by two workers through one lease table in the KCL's multi-stream format; a
//! fourth stream added to the tracker while they run; a stream removed, its leases deleted after
//! the wait and never while a worker still processes them. Every record once, each with its
//! stream's name. In both lease-management modes, and with fan-out.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kinesis_consumer::{
    Batch, Checkpointer, FanOutConfig, FormerStreams, InitialPosition, LeaseManagement, Processor, ProcessorFactory,
    Retrieval, Scheduler, SchedulerConfig, ShardInfo, StreamConfig, StreamIdentifier, StreamTracker, TrackerError,
};
use kinesis_testkit::{TestBed, unique_name};
use tokio::time::Instant;

/// A record read: (stream the factory was told, stream of the batch, stream of the record,
/// shard, data).
type Read = (String, String, String, String, String);
/// A `shutdown_requested` or `lease_lost`: (stream, shard, which, when, the processor's number).
type Event = (String, String, &'static str, Instant, usize);

/// A processor made: (stream, shard, worker, when); its number is its place in `Seen::made`.
type Made = (String, String, String, Instant);

/// What the processors of a test saw.
#[derive(Clone, Default)]
struct Seen {
    records: Arc<Mutex<Vec<Read>>>,
    events: Arc<Mutex<Vec<Event>>>,
    made: Arc<Mutex<Vec<Made>>>,
    /// The processors whose `initialize` was called (the lifecycle's last call comes only then).
    initialized: Arc<Mutex<BTreeSet<usize>>>,
}

struct Recorder {
    shard: ShardInfo,
    seen: Seen,
    number: usize,
}

impl Processor for Recorder {
    async fn initialize(&mut self, _: &kinesis_consumer::Initialization) {
        self.seen.initialized.lock().unwrap().insert(self.number);
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        {
            let mut records = self.seen.records.lock().unwrap();
            for record in &batch.records {
                records.push((
                    self.shard.stream.clone(),
                    batch.stream.to_string(),
                    record.stream.to_string(),
                    batch.shard_id.to_string(),
                    String::from_utf8_lossy(&record.data).into_owned(),
                ));
            }
        }
        // Refused when the lease was lost meanwhile (a steal in KCL 2.x lease management).
        let _ = checkpointer.checkpoint().await;
    }

    async fn lease_lost(&mut self) {
        self.event("lease_lost");
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        self.event("shutdown_requested");
        let _ = checkpointer.checkpoint().await;
    }
}

impl Recorder {
    fn event(&self, what: &'static str) {
        let event = (self.shard.stream.clone(), self.shard.shard_id.clone(), what, Instant::now(), self.number);
        self.seen.events.lock().unwrap().push(event);
    }
}

/// Makes the processors of one worker (named).
struct Factory(Seen, String);

impl ProcessorFactory for Factory {
    type Processor = Recorder;

    fn create(&self, _shard_id: &str) -> Recorder {
        unreachable!("a multi-stream worker makes its processors with create_for")
    }

    fn create_for(&self, shard: &ShardInfo) -> Recorder {
        let number = {
            let mut made = self.0.made.lock().unwrap();
            made.push((shard.stream.clone(), shard.shard_id.clone(), self.1.clone(), Instant::now()));
            made.len() - 1
        };
        Recorder { shard: shard.clone(), seen: self.0.clone(), number }
    }
}

/// The tracker the test changes while the workers run.
#[derive(Clone, Default)]
struct Listed(Arc<Mutex<Vec<String>>>);

impl Listed {
    fn tracker(&self) -> StreamTracker {
        let listed = self.0.clone();
        StreamTracker::polled(move || {
            let streams: Vec<StreamConfig> = listed
                .lock()
                .unwrap()
                .iter()
                .map(|s| StreamConfig::new(s.clone(), InitialPosition::TrimHorizon))
                .collect();
            async move { Ok::<_, TrackerError>(streams) }
        })
    }

    fn set(&self, streams: &[&String]) {
        *self.0.lock().unwrap() = streams.iter().map(|s| (*s).clone()).collect();
    }
}

const POLL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(4);

fn multi_config(tracker: StreamTracker, table: &str, worker: &str, mode: LeaseManagement) -> SchedulerConfig {
    let single = config("unused", table, worker);
    let mut config = SchedulerConfig::new_multi_stream(tracker, table);
    config.worker_id = worker.to_owned();
    config.failover = single.failover;
    config.shard_sync_interval = Duration::from_secs(5);
    config.parent_poll_interval = single.parent_poll_interval;
    config.polling = single.polling;
    config.table_create_timeout = single.table_create_timeout;
    config.stream_poll_interval = POLL;
    config.former_streams = FormerStreams::DeleteAfter(WAIT);
    config.lease_management = mode;
    if mode == LeaseManagement::Kcl3 {
        config.leader_lock_duration = Some(Duration::from_secs(6));
        config.leader_heartbeat = Some(Duration::from_millis(1500));
        config.assignment_strategy = kinesis_consumer::AssignmentStrategy::LeaseCount;
        config.worker_metrics_interval = Duration::from_secs(2);
    }
    config
}

/// The lease rows of a table by stream identifier: (key, shardId attribute) of each.
async fn leases_by_stream(bed: &TestBed, table: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let rows = bed.dynamodb.client().scan().table_name(table).send().await.expect("scan the lease table");
    let mut by_stream: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for item in rows.items() {
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
        if text("entityType").is_some_and(|t| t != "LEASE") || text("leaseKey").is_none_or(|k| !k.contains(':')) {
            continue;
        }
        let stream = text("streamName").expect("a multi-stream lease has streamName");
        let shard = text("shardId").expect("a multi-stream lease has shardId");
        by_stream.entry(stream).or_default().push((text("leaseKey").unwrap(), shard));
    }
    by_stream
}

fn identifier_of<'a>(by_stream: &'a BTreeMap<String, Vec<(String, String)>>, stream: &str) -> Option<&'a String> {
    by_stream.keys().find(|id| StreamIdentifier::parse(id).is_ok_and(|id| id.stream_name() == stream))
}

/// Puts `count` records named `{stream}-{round}-{i}`.
async fn put(bed: &TestBed, stream: &str, round: &str, count: usize) -> Vec<String> {
    put_plain(&bed.kinesis.client(), stream, &format!("{stream}-{round}"), count).await
}

fn start(bed: &TestBed, config: SchedulerConfig, seen: &Seen) -> Scheduler {
    let worker = config.worker_id.clone();
    Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, Factory(seen.clone(), worker))
        .expect("valid config")
}

async fn streams_come_and_go(mode: LeaseManagement, fan_out: bool) {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let mut streams = Vec::new();
    for shards in [4, 2, 1] {
        streams.push(bed.kinesis.create_stream(shards).await.expect("create a stream"));
    }
    let (a, b, c) = (&streams[0], &streams[1], &streams[2]);
    let table = unique_name("multi");
    let listed = Listed::default();
    listed.set(&[a, b, c]);
    let seen = Seen::default();
    let workers: Vec<Scheduler> = ["w1", "w2"]
        .iter()
        .map(|w| {
            let mut config = multi_config(listed.tracker(), &table, w, mode);
            if fan_out {
                let mut efo = FanOutConfig::new("multi-efo");
                efo.end_check_after = Duration::from_secs(2);
                config.retrieval = Retrieval::FanOut(efo);
            }
            start(&bed, config, &seen)
        })
        .collect();

    // Records on all three streams, each read once, each named by its stream.
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stream in [a, b, c] {
        sent.insert(stream.clone(), put(&bed, stream, "first", 300).await);
    }
    let received = |seen: &Seen| -> BTreeMap<String, BTreeMap<String, usize>> {
        let mut by_stream: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for (told, batch, record, _, data) in seen.records.lock().unwrap().iter() {
            assert_eq!((told, batch), (record, record), "factory, batch and record name one stream for {data}");
            *by_stream.entry(record.clone()).or_default().entry(data.clone()).or_default() += 1;
        }
        by_stream
    };
    let all_in = |seen: &Seen, sent: &BTreeMap<String, Vec<String>>| {
        let got = received(seen);
        sent.iter().all(|(stream, data)| data.iter().all(|d| got.get(stream).is_some_and(|g| g.contains_key(d))))
    };
    assert!(
        eventually(Duration::from_secs(60), || all_in(&seen, &sent)).await,
        "every record of the three streams read, each under its own stream's name"
    );

    // One table, the KCL's multi-stream rows: 4 + 2 + 1 leases keyed `account:stream:epoch:shard`.
    let by_stream = leases_by_stream(&bed, &table).await;
    for (stream, shards) in [(a, 4), (b, 2), (c, 1)] {
        let id = identifier_of(&by_stream, stream).unwrap_or_else(|| panic!("leases of {stream} in {by_stream:?}"));
        let leases = &by_stream[id];
        assert_eq!(leases.len(), shards, "{stream}: {leases:?}");
        for (key, shard) in leases {
            assert_eq!(key, &format!("{id}:{shard}"), "the KCL's multi-stream lease key");
        }
    }
    let held: usize = workers.iter().map(|w| w.held_leases().len()).sum();
    assert_eq!(held, 7, "the two workers share the seven leases");

    // A fourth stream, added to the tracker while the workers run: leased within one poll.
    let d = bed.kinesis.create_stream(1).await.expect("create a stream");
    sent.insert(d.clone(), put(&bed, &d, "first", 200).await);
    let added = Instant::now();
    listed.set(&[a, b, c, &d]);
    let mut leased_after = None;
    while added.elapsed() < Duration::from_secs(30) {
        if identifier_of(&leases_by_stream(&bed, &table).await, &d).is_some() {
            leased_after = Some(added.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leased_after = leased_after.expect("the added stream gets leases");
    println!("the added stream was leased {leased_after:?} after the tracker listed it (poll: {POLL:?})");
    // One poll, plus the DescribeStreamSummary, ListShards and writes of that round.
    assert!(leased_after <= POLL + Duration::from_secs(2), "leased within one tracker poll: {leased_after:?}");
    assert!(eventually(Duration::from_secs(60), || all_in(&seen, &sent)).await, "the added stream is read");

    // Stream b leaves the list: read on through the wait, then its processors stop gracefully,
    // and its leases are deleted, never one a worker still holds.
    let b_id = identifier_of(&leases_by_stream(&bed, &table).await, b).unwrap().clone();
    let removed = Instant::now();
    listed.set(&[a, c, &d]);
    let mut more = put(&bed, b, "late", 100).await;
    let mut gone_after = None;
    while removed.elapsed() < Duration::from_secs(60) {
        if !leases_by_stream(&bed, &table).await.contains_key(&b_id) {
            gone_after = Some(removed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone_after = gone_after.expect("the removed stream's leases are deleted");
    println!("the removed stream's leases were deleted {gone_after:?} after it left the list (wait: {WAIT:?})");
    assert!(gone_after >= WAIT, "deleted after the wait, not before: {gone_after:?}");
    assert!(gone_after <= WAIT + POLL * 3 + FAILOVER * 2, "deleted soon after the wait: {gone_after:?}");
    sent.get_mut(b).unwrap().append(&mut more);
    // What was written to b before it left the list was still read (during the wait).
    assert!(all_in(&seen, &sent), "the removed stream's records were read during the wait");
    let events = seen.events.lock().unwrap().clone();
    // After the wait (in KCL 2.x lease management a lease may be stolen before it, to balance
    // the workers once the fourth stream came: that is not the removal's doing).
    let retired = removed + WAIT;
    let of_b: Vec<_> = events.iter().filter(|(s, _, _, at, _)| s == b && *at >= retired).collect();
    assert!(
        of_b.iter().all(|(_, _, what, ..)| *what == "shutdown_requested"),
        "the removed stream's processors were stopped gracefully, none lost its lease: {of_b:?}"
    );
    assert!(!of_b.is_empty(), "the removed stream's processors had their shutdown_requested");
    // None of its processors was left running: each one initialized had its last call.
    let made = seen.made.lock().unwrap().clone();
    let initialized = seen.initialized.lock().unwrap().clone();
    let ended: BTreeSet<usize> = events.iter().map(|e| e.4).collect();
    let running: Vec<&usize> = initialized.iter().filter(|n| made[**n].0 == *b && !ended.contains(n)).collect();
    let story = || {
        let made: Vec<_> = made
            .iter()
            .enumerate()
            .filter(|(_, m)| m.0 == *b)
            .map(|(n, m)| (n, m.1.clone(), m.2.clone(), m.3.checked_duration_since(removed)))
            .collect();
        let events: Vec<_> =
            events.iter().filter(|e| e.0 == *b).map(|e| (e.4, e.2, e.3.checked_duration_since(removed))).collect();
        format!("made (number, shard, worker, since removal): {made:?}; events: {events:?}")
    };
    assert!(running.is_empty(), "processors of the removed stream still running: {running:?}; {}", story());
    assert!(
        workers.iter().all(|w| w.held_leases().iter().all(|k| !k.starts_with(&format!("{b_id}:")))),
        "no worker holds a lease of the removed stream"
    );

    // Every record once. In KCL 2.x lease management a lease stolen to balance the workers is
    // read again from its checkpoint (a record may come twice, on a shard whose lease was lost);
    // in KCL 3.x a move is a graceful handoff and nothing comes twice.
    let lost: BTreeSet<(&String, &String)> =
        events.iter().filter(|(_, _, what, ..)| *what == "lease_lost").map(|(s, shard, ..)| (s, shard)).collect();
    let mut counts: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for (_, _, stream, shard, data) in seen.records.lock().unwrap().iter() {
        *counts.entry((stream.clone(), shard.clone(), data.clone())).or_default() += 1;
    }
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    if mode == LeaseManagement::Kcl3 {
        assert!(lost.is_empty(), "no lease was lost: {lost:?}");
        assert!(duplicates.is_empty(), "records read twice: {:?}", &duplicates[..duplicates.len().min(10)]);
    } else {
        let unexplained: Vec<_> = duplicates.iter().filter(|(s, shard, _)| !lost.contains(&(s, shard))).collect();
        assert!(unexplained.is_empty(), "read twice on a shard whose lease was never lost: {unexplained:?}");
    }
    let metrics: Vec<_> = workers.iter().map(|w| w.metrics()).collect();
    assert!(metrics.iter().map(|m| m.leases_cleaned_up).sum::<u64>() >= 2, "{metrics:?}");
    for worker in workers {
        worker.shutdown().await.expect("graceful shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_and_go_kcl2_lease_management() {
    streams_come_and_go(LeaseManagement::Kcl2Compatible, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_and_go_kcl3_lease_management() {
    streams_come_and_go(LeaseManagement::Kcl3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_and_go_with_fan_out() {
    streams_come_and_go(LeaseManagement::Kcl3, true).await;
}

/// A listed stream that does not exist yet is picked up once it is created; a tracked stream
/// deleted while read stops neither the worker nor the other streams, and (with
/// `FormerStreams::DeleteAfter`) its leases are deleted after the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_missing_or_deleted_leaves_the_others_alone() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let kinesis = bed.kinesis.client();
    let kept = bed.kinesis.create_stream(1).await.unwrap();
    let doomed = bed.kinesis.create_stream(1).await.unwrap();
    let later = unique_name("later");
    let table = unique_name("multi-missing");
    let listed = Listed::default();
    listed.set(&[&kept, &doomed, &later]);
    let seen = Seen::default();
    let worker = start(&bed, multi_config(listed.tracker(), &table, "w1", LeaseManagement::Kcl2Compatible), &seen);
    let read = |seen: &Seen, data: &[String]| {
        let got: BTreeSet<String> = seen.records.lock().unwrap().iter().map(|r| r.4.clone()).collect();
        data.iter().all(|d| got.contains(d))
    };
    let mut sent = put(&bed, &kept, "first", 100).await;
    sent.extend(put(&bed, &doomed, "first", 100).await);
    assert!(eventually(Duration::from_secs(30), || read(&seen, &sent)).await, "both existing streams read");
    let doomed_id =
        identifier_of(&leases_by_stream(&bed, &table).await, &doomed).expect("leases of the doomed").clone();

    kinesis.delete_stream().stream_name(&doomed).send().await.expect("DeleteStream");
    let deleted = Instant::now();
    sent.extend(put(&bed, &kept, "second", 100).await);
    kinesis.create_stream().stream_name(&later).shard_count(1).send().await.expect("CreateStream");
    kinesis_testkit::wait_until_stream_active(&kinesis, &later).await.unwrap();
    sent.extend(put(&bed, &later, "first", 100).await);
    assert!(
        eventually(Duration::from_secs(30), || read(&seen, &sent)).await,
        "the kept stream read on, the stream created later read"
    );
    assert!(!worker.is_finished(), "a deleted stream does not stop the worker");
    let mut gone = false;
    while deleted.elapsed() < Duration::from_secs(40) && !gone {
        gone = !leases_by_stream(&bed, &table).await.contains_key(&doomed_id);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the deleted stream's leases are deleted after the wait");
    println!("the deleted stream's leases went {:?} after DeleteStream (wait: {WAIT:?})", deleted.elapsed());
    worker.shutdown().await.expect("graceful shutdown");
}
