//! The sender: one task per PutRecords call. It encodes the call's aggregates, sends the call,
//! resolves the receipts of every record stored where it was predicted, and hands the rest back to
//! the pipeline task (retries, an aggregate on another shard), which counts what was resolved.
//!
//! Doing the encoding (MD5 included) and the receipts here keeps that work off the pipeline task,
//! which sees every record, and spreads it over the runtime's threads.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use crate::attempt::Attempt;
use crate::entry::Entry;
use crate::error::ErrorKind;
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::receipt::Receipt;
use crate::transport::{CallError, EntryResult, PutEntry, Transport};

/// What a call's task reports to the pipeline task.
pub(crate) struct Response {
    /// The shards of the call's entries (ordering mode: each had this one call in flight).
    pub(crate) shards: Vec<Arc<str>>,
    /// User records whose receipts the sender resolved.
    pub(crate) delivered: u64,
    /// A plain record landed on another shard than predicted: the shard map is out of date.
    pub(crate) map_out_of_date: bool,
    /// What the sender could not resolve.
    pub(crate) unresolved: Unresolved,
    /// Aggregates stored on their predicted shard whose receipts wait for a listing that confirms
    /// the shard's range (see `confirm.rs`), with where they were stored.
    pub(crate) to_confirm: Vec<(Entry, Arc<str>, Arc<str>)>,
    /// When the call started.
    pub(crate) at: SystemTime,
    /// How long it took.
    pub(crate) duration: Duration,
}

/// The entries a call's task hands back.
pub(crate) enum Unresolved {
    /// The whole call failed.
    Call(CallError, Vec<Entry>),
    /// Entries refused, or aggregates stored on another shard than predicted.
    Entries(Vec<(Entry, EntryResult)>),
}

/// What a call's task needs besides its entries.
pub(crate) struct Call {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) metrics: Arc<Metrics>,
    /// The stream's name, for the receipts.
    pub(crate) stream: Arc<str>,
    pub(crate) ordering: bool,
    pub(crate) responses: mpsc::Sender<Response>,
    /// The call's place among the producer's calls in flight (shared by every stream), given
    /// back when the call is answered.
    pub(crate) slot: OwnedSemaphorePermit,
}

/// Sends one PutRecords call on its own task; its [`Response`] goes to `responses`.
pub(crate) fn spawn(call: Call, mut entries: Vec<Entry>) {
    let Call { transport, metrics, stream, ordering, responses, slot } = call;
    tokio::spawn(async move {
        let puts: Vec<PutEntry> = entries.iter_mut().map(Entry::put_entry).collect();
        tracing::trace!(entries = puts.len(), "PutRecords");
        let count = puts.len();
        let at = SystemTime::now();
        let started = Instant::now();
        let result = transport.put_records(puts).await.and_then(|results| {
            if results.len() == count {
                Ok(results)
            } else {
                Err(CallError {
                    kind: ErrorKind::Transient,
                    code: None,
                    message: format!("PutRecords answered {} results for {count} entries", results.len()),
                })
            }
        });
        let duration = started.elapsed();
        drop(slot);
        metrics.put_records_requests.fetch_add(1, Relaxed);
        metrics.request_time_micros.fetch_add(duration.as_micros() as u64, Relaxed);

        let shards = if ordering { entries.iter().map(|e| e.shard.clone()).collect() } else { Vec::new() };
        let mut response = Response {
            shards,
            delivered: 0,
            map_out_of_date: false,
            unresolved: Unresolved::Entries(Vec::new()),
            to_confirm: Vec::new(),
            at,
            duration,
        };
        match result {
            Err(error) => response.unresolved = Unresolved::Call(error, entries),
            Ok(results) => {
                if results.iter().any(|r| matches!(r, EntryResult::Stored { .. })) {
                    metrics.put_records_succeeded.fetch_add(1, Relaxed);
                }
                let now = Instant::now();
                let mut unresolved = Vec::new();
                for (entry, result) in entries.into_iter().zip(results) {
                    match result {
                        // A plain record (or an aggregate of one hash key) is readable wherever
                        // it lands.
                        EntryResult::Stored { shard_id, sequence_number } if entry.readable_anywhere() => {
                            response.map_out_of_date |= *shard_id != *entry.shard;
                            let place = (Arc::from(shard_id), Arc::from(sequence_number));
                            response.delivered += deliver(&metrics, &stream, entry, place, at, duration, now);
                        }
                        // An aggregate on the shard it was built for: readable if that shard id
                        // still names the range it was built for, which a listing confirms.
                        EntryResult::Stored { shard_id, sequence_number } if *shard_id == *entry.shard => {
                            response.to_confirm.push((entry, Arc::from(shard_id), Arc::from(sequence_number)));
                        }
                        // An aggregate elsewhere (a KCL reader drops it whole), or refused.
                        other => unresolved.push((entry, other)),
                    }
                }
                response.unresolved = Unresolved::Entries(unresolved);
            }
        }
        // The pipeline task outlives every call's task.
        let _ = responses.send(response).await;
    });
}

/// Resolves the receipts of a stored entry's records; returns how many.
pub(crate) fn deliver(
    metrics: &Metrics,
    stream: &Arc<str>,
    entry: Entry,
    (shard_id, sequence_number): (Arc<str>, Arc<str>),
    at: SystemTime,
    duration: Duration,
    now: Instant,
) -> u64 {
    // Counted before any receipt resolves: whoever holds a receipt sees its record in the metrics.
    let count = entry.members.len() as u64;
    let data: u64 = entry.members.iter().map(|m| m.size as u64).sum();
    let buffering: u64 =
        entry.members.iter().map(|m| now.saturating_duration_since(m.enqueued).as_micros() as u64).sum();
    metrics.kinesis_records_put.fetch_add(1, Relaxed);
    metrics.kinesis_records_data_put.fetch_add(entry.size as u64, Relaxed);
    metrics.user_records_put.fetch_add(count, Relaxed);
    metrics.user_records_data_put.fetch_add(data, Relaxed);
    metrics.buffering_time_micros.fetch_add(buffering, Relaxed);
    // The buffer space of every member goes back at once, at the end: two semaphore releases for
    // the entry, not two a record.
    let mut space: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> = None;
    for (index, mut member) in entry.members.into_iter().enumerate() {
        let mut attempts = member.take_attempts();
        attempts.push(Attempt { at, duration, error_code: None });
        let receipt = Receipt {
            stream: stream.clone(),
            shard_id: shard_id.clone(),
            sequence_number: sequence_number.clone(),
            aggregated_index: entry.aggregated.then_some(index as u64),
            attempts,
        };
        let Pending { reply, _permits: (records, bytes), .. } = member;
        match &mut space {
            None => space = Some((records, bytes)),
            Some((all_records, all_bytes)) => {
                all_records.merge(records);
                all_bytes.merge(bytes);
            }
        }
        // A dropped ReceiptFuture does not want it; the record is delivered all the same.
        let _ = reply.send(Ok(receipt));
    }
    drop(space);
    count
}
