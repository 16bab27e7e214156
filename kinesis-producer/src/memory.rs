//! An in-memory [`Transport`]: a stream of N equal shards kept in memory, for benchmarks and for
//! deterministic tests of timing and faults. It routes every entry exactly as Kinesis does (explicit
//! hash key, or MD5 of the partition key) and can be told to refuse writes.

use std::sync::{Arc, Mutex};

use kinesis_aggregation::{HashKey, HashKeyRange};

use crate::error::ErrorKind;
use crate::transport::{BoxFuture, CallError, EntryResult, PutEntry, ShardDescription, StreamLimits, Transport};

/// The per-record error code of a write over a shard's limit.
const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// A record the memory stream stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The shard it is on.
    pub shard_id: String,
    /// Its sequence number (a per-stream counter, as a decimal string).
    pub sequence_number: String,
    /// The entry as sent.
    pub entry: PutEntry,
    /// Which stream of that name stored it: 0 for the first, one more each time it was created
    /// again ([`MemoryTransport::recreate`]).
    pub generation: u32,
}

/// How the memory stream answers writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Faults {
    /// Store everything.
    #[default]
    None,
    /// Refuse every entry with this per-record error code.
    RejectRecords(String),
    /// Fail every call with this error code.
    FailCalls(String),
    /// Refuse every `n`-th entry (counted across calls) with this per-record error code; store
    /// the others.
    RejectEveryNth(u64, String),
    /// Each shard takes at most `bytes` (partition keys + data) and `records` per one-second
    /// window, as Kinesis's write limits; beyond them an entry fails with
    /// ProvisionedThroughputExceededException. A window opens with the first write after the last
    /// one ended (tokio's clock, so paused-time tests see the limits as they are).
    ShardLimits {
        /// Bytes per shard per second.
        bytes: u64,
        /// Records per shard per second.
        records: u64,
    },
}

#[derive(Debug, Default)]
struct State {
    shards: Vec<ShardDescription>,
    stored: Vec<StoredRecord>,
    calls: usize,
    next_sequence: u128,
    entries_seen: u64,
    faults: Faults,
    list_fault: Option<String>,
    /// Per shard: (window start, bytes, records), for `Faults::ShardLimits`.
    windows: std::collections::HashMap<String, (tokio::time::Instant, u64, u64)>,
    keep: bool,
    /// Deleted: every call fails with ResourceNotFoundException.
    deleted: bool,
    generation: u32,
    /// The record limit (partition key + data) and whether DescribeStreamSummary tells it.
    record_limit: Option<(usize, bool)>,
    list_calls: usize,
}

/// The in-memory stream. Clones share it.
#[derive(Clone, Debug)]
pub struct MemoryTransport {
    state: Arc<Mutex<State>>,
}

impl MemoryTransport {
    /// A stream of `shard_count` shards splitting the hash-key space evenly, which keeps what it
    /// stores (see [`MemoryTransport::discarding`]).
    pub fn new(shard_count: u32) -> Self {
        let shards = even_shards(shard_count);
        MemoryTransport { state: Arc::new(Mutex::new(State { shards, keep: true, ..Default::default() })) }
    }

    /// Deletes the stream: every call fails with ResourceNotFoundException until
    /// [`MemoryTransport::recreate`].
    pub fn delete(&self) {
        self.lock().deleted = true;
    }

    /// Creates the stream again under the same name with `shard_count` shards, as DeleteStream
    /// then CreateStream do: the shard ids start at `shardId-000000000000` again, over the hash
    /// ranges of the new count. What is stored after this has the next generation.
    pub fn recreate(&self, shard_count: u32) {
        let mut state = self.lock();
        state.shards = even_shards(shard_count);
        state.deleted = false;
        state.generation += 1;
        state.windows.clear();
    }

    /// The stream's record limit (partition key + data): a call with an entry over it fails
    /// whole with ValidationException, as Kinesis does. With `reported`, DescribeStreamSummary
    /// tells the limit (`MaxRecordSizeInKiB`); without, it says nothing, as the emulators do.
    pub fn set_record_limit(&self, bytes: usize, reported: bool) {
        self.lock().record_limit = Some((bytes, reported));
    }

    /// How many ListShards calls were made.
    pub fn list_calls(&self) -> usize {
        self.lock().list_calls
    }

    /// Splits an open shard at the middle of its range, as SplitShard does: the parent closes and
    /// two children take its writes. Returns the children's ids.
    ///
    /// # Panics
    /// When `shard_id` is not an open shard.
    pub fn split_shard(&self, shard_id: &str) -> (String, String) {
        let mut state = self.lock();
        let index = state.shards.iter().position(|s| s.shard_id == shard_id && s.open).expect("an open shard");
        state.shards[index].open = false;
        let range = state.shards[index].range;
        let middle = range.start + (range.end - range.start) / 2;
        let next = state.shards.len();
        let children =
            [(next, range.start, middle), (next + 1, middle + 1, range.end)].map(|(n, start, end)| ShardDescription {
                shard_id: format!("shardId-{n:012}"),
                range: HashKeyRange::new(start, end).expect("start <= end"),
                open: true,
            });
        let ids = (children[0].shard_id.clone(), children[1].shard_id.clone());
        state.shards.extend(children);
        ids
    }

    /// The shards, open and closed.
    pub fn shards(&self) -> Vec<ShardDescription> {
        self.lock().shards.clone()
    }

    /// The same stream, but it only counts what it stores (for long benchmarks).
    pub fn discarding(self) -> Self {
        self.lock().keep = false;
        self
    }

    /// Changes how writes are answered from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Makes ListShards fail with this error code from now on (`None`: answer again).
    pub fn set_list_shards_fault(&self, code: Option<String>) {
        self.lock().list_fault = code;
    }

    /// What was stored, in order.
    pub fn stored(&self) -> Vec<StoredRecord> {
        self.lock().stored.clone()
    }

    /// How many PutRecords calls were made.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    /// How many records were stored.
    pub fn stored_count(&self) -> u128 {
        self.lock().next_sequence
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Transport for MemoryTransport {
    fn stream_name(&self) -> &str {
        "memory"
    }

    fn put_records(&self, entries: Vec<PutEntry>) -> BoxFuture<Result<Vec<EntryResult>, CallError>> {
        let mut state = self.lock();
        state.calls += 1;
        if state.deleted {
            return Box::pin(std::future::ready(Err(not_found())));
        }
        if let Some((limit, _)) = state.record_limit
            && let Some(index) = entries.iter().position(|e| e.partition_key.len() + e.data.len() > limit)
        {
            let message = format!(
                "1 validation error detected: Value at 'records.{}.member.data' failed to satisfy constraint: \
                 Member must have length less than or equal to {limit}",
                index + 1
            );
            let error = CallError { kind: ErrorKind::InvalidInput, code: Some("ValidationException".into()), message };
            return Box::pin(std::future::ready(Err(error)));
        }
        let generation = state.generation;
        let result = match state.faults.clone() {
            Faults::FailCalls(code) => Err(CallError {
                kind: ErrorKind::of_code(&code),
                code: Some(code.clone()),
                message: format!("memory stream: {code}"),
            }),
            Faults::RejectRecords(code) => {
                Ok(entries.iter().map(|_| EntryResult::Failed { code: code.clone() }).collect())
            }
            faults @ (Faults::None | Faults::RejectEveryNth(..) | Faults::ShardLimits { .. }) => {
                let now = tokio::time::Instant::now();
                let mut results = Vec::with_capacity(entries.len());
                for entry in entries {
                    state.entries_seen += 1;
                    if let Faults::RejectEveryNth(n, code) = &faults
                        && state.entries_seen.is_multiple_of((*n).max(1))
                    {
                        results.push(EntryResult::Failed { code: code.clone() });
                        continue;
                    }
                    let key =
                        entry.explicit_hash_key.unwrap_or_else(|| HashKey::of_partition_key(&entry.partition_key));
                    let shard = state
                        .shards
                        .iter()
                        .find(|s| s.open && s.range.contains(key.0))
                        .expect("open shards cover the space")
                        .clone();
                    if let Faults::ShardLimits { bytes, records } = faults {
                        let size = (entry.partition_key.len() + entry.data.len()) as u64;
                        let window = state.windows.entry(shard.shard_id.clone()).or_insert((now, 0, 0));
                        if now.duration_since(window.0) >= std::time::Duration::from_secs(1) {
                            *window = (now, 0, 0);
                        }
                        if window.1 + size > bytes || window.2 + 1 > records {
                            results.push(EntryResult::Failed { code: THROTTLED.into() });
                            continue;
                        }
                        window.1 += size;
                        window.2 += 1;
                    }
                    state.next_sequence += 1;
                    let sequence_number = format!("{:056}", state.next_sequence);
                    results.push(EntryResult::Stored {
                        shard_id: shard.shard_id.clone(),
                        sequence_number: sequence_number.clone(),
                    });
                    if state.keep {
                        state.stored.push(StoredRecord {
                            shard_id: shard.shard_id.clone(),
                            sequence_number,
                            entry,
                            generation,
                        });
                    }
                }
                Ok(results)
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn list_shards(&self) -> BoxFuture<Result<Vec<ShardDescription>, CallError>> {
        let mut state = self.lock();
        state.list_calls += 1;
        if state.deleted {
            return Box::pin(std::future::ready(Err(not_found())));
        }
        let result = match &state.list_fault {
            Some(code) => Err(CallError {
                kind: ErrorKind::of_code(code),
                code: Some(code.clone()),
                message: format!("memory stream: {code}"),
            }),
            None => Ok(state.shards.clone()),
        };
        Box::pin(std::future::ready(result))
    }

    fn stream_limits(&self) -> BoxFuture<Result<StreamLimits, CallError>> {
        Box::pin(std::future::ready(self.limits()))
    }
}

impl MemoryTransport {
    fn limits(&self) -> Result<StreamLimits, CallError> {
        let state = self.lock();
        if state.deleted {
            return Err(not_found());
        }
        Ok(StreamLimits::with_max_record_bytes(state.record_limit.filter(|(_, reported)| *reported).map(|(b, _)| b)))
    }
}

/// `shard_count` shards splitting the hash-key space evenly, as CreateStream makes them.
fn even_shards(shard_count: u32) -> Vec<ShardDescription> {
    let count = u128::from(shard_count.max(1));
    let width = u128::MAX / count;
    (0..count)
        .map(|i| {
            let start = i * width;
            let end = if i + 1 == count { u128::MAX } else { (i + 1) * width - 1 };
            ShardDescription {
                shard_id: format!("shardId-{i:012}"),
                range: HashKeyRange::new(start, end).expect("start <= end"),
                open: true,
            }
        })
        .collect()
}

fn not_found() -> CallError {
    CallError {
        kind: ErrorKind::NotFound,
        code: Some("ResourceNotFoundException".into()),
        message: "memory stream: the stream does not exist".into(),
    }
}
