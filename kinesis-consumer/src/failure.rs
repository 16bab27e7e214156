//! What happens when a processor reports that it failed on a record: the poison-record policy.
//!
//! No KCL has one: a record that fails every time keeps its shard from advancing. AWS Lambda's
//! event source mapping has one, and this follows it. A processor reports a failure with
//! [`crate::Checkpointer::fail_at`] (the record, and every later record of the batch, were not
//! processed; the earlier ones were). Then, by [`FailurePolicy`]:
//!
//! 1. **Retry** from that record, with exponential backoff and jitter: the shard is read again
//!    from the record, and the next batch holds the failed range. By default (`max_retries:
//!    None`) this goes on for ever and nothing is ever skipped: a poison record holds its shard.
//! 2. **Bisect** (`bisect`): once the retries of a range are spent, it is split in two and each
//!    half is retried on its own (Lambda's `BisectBatchOnFunctionError`), down to the record that
//!    fails alone.
//! 3. **On-failure destination**: the records of a range whose retries are spent (with `bisect`,
//!    a single record) are handed to the [`OnFailure`] the user provides: a file
//!    ([`FailedRecordsFile`]), a callback (any `Fn(FailedRecords) -> Future`), or a stream
//!    ([`FailedRecordsStream`]). Handing them over is retried until it succeeds: records are never
//!    skipped without the destination taking them.
//! 4. **Move on**: the shard is checkpointed at the last record handed over, and reading goes on.
//!
//! A processor that does not report failures behaves as before (the policy never applies).

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::ExponentialBackoff;

use crate::record::Record;

/// An error of an on-failure destination.
pub type DestinationError = Box<dyn std::error::Error + Send + Sync>;

/// The records a processor failed on, after the policy's retries.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FailedRecords {
    /// The shard.
    pub shard_id: Arc<str>,
    /// The records, in the shard's order.
    pub records: Vec<Record>,
    /// How many times they were delivered.
    pub attempts: u32,
}

/// Where records go that still fail after the policy's retries.
///
/// Cancel safety: a call may be cancelled (a shutdown, a lost lease); it is then made again,
/// with the same records, by whichever worker reads the shard next. Make it idempotent, or
/// accept duplicates.
pub trait OnFailure: Send + Sync + 'static {
    /// Takes the records. An error is retried with backoff: the shard does not move past them
    /// until this succeeds.
    fn failed(&self, failed: FailedRecords) -> Pin<Box<dyn Future<Output = Result<(), DestinationError>> + Send + '_>>;
}

impl<F, Fut> OnFailure for F
where
    F: Fn(FailedRecords) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), DestinationError>> + Send + 'static,
{
    fn failed(&self, failed: FailedRecords) -> Pin<Box<dyn Future<Output = Result<(), DestinationError>> + Send + '_>> {
        Box::pin(self(failed))
    }
}

/// Appends failed records to a file, one JSON object a line: `shard_id`, `sequence_number`,
/// `sub_sequence_number`, `partition_key`, `data` (base64), `attempts`. Each batch is written
/// with one `write` and synced before the shard moves on.
#[derive(Clone, Debug)]
pub struct FailedRecordsFile {
    path: std::path::PathBuf,
}

impl FailedRecordsFile {
    /// Appends to `path` (created if missing).
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        FailedRecordsFile { path: path.into() }
    }
}

impl OnFailure for FailedRecordsFile {
    fn failed(&self, failed: FailedRecords) -> Pin<Box<dyn Future<Output = Result<(), DestinationError>> + Send + '_>> {
        Box::pin(async move {
            use base64::Engine;
            let mut lines = String::new();
            for r in &failed.records {
                let line = serde_json::json!({
                    "shard_id": &*failed.shard_id,
                    "sequence_number": &*r.sequence_number,
                    "sub_sequence_number": r.sub_sequence_number,
                    "partition_key": &r.partition_key,
                    "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
                    "attempts": failed.attempts,
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || -> Result<(), DestinationError> {
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                file.write_all(lines.as_bytes())?;
                file.sync_data()?;
                Ok(())
            })
            .await?
        })
    }
}

/// Puts failed records to another Kinesis stream (a dead-letter stream), each with its partition
/// key and data. A call with any record refused fails (and is made again, whole: the records that
/// were stored may then be stored twice).
#[derive(Clone, Debug)]
pub struct FailedRecordsStream {
    client: aws_sdk_kinesis::Client,
    stream: kinesis_core::StreamAddress,
}

impl FailedRecordsStream {
    /// Puts to `stream` (its name, or its ARN: then every call carries `StreamARN`) through
    /// `client`.
    ///
    /// # Errors
    /// [`kinesis_core::InvalidStream`] when `stream` is neither a stream name nor a stream ARN.
    pub fn new(
        client: aws_sdk_kinesis::Client,
        stream: impl Into<String>,
    ) -> Result<Self, kinesis_core::InvalidStream> {
        Ok(FailedRecordsStream { client, stream: kinesis_core::StreamAddress::parse(&stream.into())? })
    }
}

impl OnFailure for FailedRecordsStream {
    fn failed(&self, failed: FailedRecords) -> Pin<Box<dyn Future<Output = Result<(), DestinationError>> + Send + '_>> {
        Box::pin(async move {
            // PutRecords takes at most 500 records a call. One record the stream refuses as
            // invalid (over its record limit) makes it refuse the whole call: such a call is put
            // again in halves, so that the others are stored and the error names the one.
            let mut parts: Vec<&[Record]> = failed.records.chunks(500).rev().collect();
            while let Some(part) = parts.pop() {
                let (name, arn) = self.stream.request_fields();
                let mut request = self.client.put_records().set_stream_name(name).set_stream_arn(arn);
                for r in part {
                    request = request.records(
                        aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                            .partition_key(&r.partition_key)
                            .data(aws_sdk_kinesis::primitives::Blob::new(r.data.to_vec()))
                            .build()?,
                    );
                }
                match request.send().await {
                    Ok(out) if out.failed_record_count().unwrap_or(0) > 0 => {
                        let refused = out.failed_record_count().unwrap_or(0);
                        return Err(format!("{refused} of {} records refused by {}", part.len(), self.stream).into());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let e = crate::retrieval::kinesis::error("PutRecords", e);
                        if e.kind == crate::ErrorKind::Invalid && part.len() > 1 {
                            let (first, second) = part.split_at(part.len() / 2);
                            parts.push(second);
                            parts.push(first);
                            continue;
                        }
                        return Err(e.into());
                    }
                }
            }
            Ok(())
        })
    }
}

/// What a worker does when a processor reports a failure ([`crate::Checkpointer::fail_at`]).
/// The default retries for ever and never skips.
#[derive(Clone)]
#[non_exhaustive]
pub struct FailurePolicy {
    /// Deliveries again of a failed range before it is bisected or handed to the destination;
    /// `None`: for ever (the default: nothing is skipped). At least 1 with a destination (the
    /// destination gets the records of a retried delivery).
    pub max_retries: Option<u32>,
    /// First and largest wait before a retry (jittered, doubling). Default 100 ms and 30 s.
    pub backoff: (Duration, Duration),
    /// Split a range whose retries are spent in two, and retry each half on its own, down to
    /// single records. Default off.
    pub bisect: bool,
    /// Where records go whose retries are spent. Required with `max_retries`.
    pub destination: Option<Arc<dyn OnFailure>>,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            max_retries: None,
            backoff: (Duration::from_millis(100), Duration::from_secs(30)),
            bisect: false,
            destination: None,
        }
    }
}

impl FailurePolicy {
    /// Retry a failed range `max_retries` times, then (with `bisect`, halves down to single
    /// records) hand it to `destination` and move on.
    pub fn skip_to(max_retries: u32, bisect: bool, destination: impl OnFailure) -> Self {
        FailurePolicy {
            max_retries: Some(max_retries.max(1)),
            bisect,
            destination: Some(Arc::new(destination)),
            ..Default::default()
        }
    }

    /// The same policy with other backoff bounds.
    pub fn with_backoff(mut self, first: Duration, largest: Duration) -> Self {
        self.backoff = (first, largest);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        match (self.max_retries, &self.destination) {
            (Some(0), _) => Err("max_retries must be at least 1"),
            (Some(_), None) => Err("max_retries needs a destination for the records it gives up on"),
            _ if self.backoff.0.is_zero() || self.backoff.1 < self.backoff.0 => {
                Err("backoff must be positive and growing")
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailurePolicy")
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("bisect", &self.bisect)
            .field("destination", &self.destination.as_ref().map(|_| "…"))
            .finish()
    }
}

impl PartialEq for FailurePolicy {
    fn eq(&self, other: &Self) -> bool {
        self.max_retries == other.max_retries
            && self.backoff == other.backoff
            && self.bisect == other.bisect
            && match (&self.destination, &other.destination) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for FailurePolicy {}

/// A failed range being retried: where it starts, how many records it holds, and how often it
/// was delivered again. Once a delivery of it (or of a half of it) goes through, or it is handed
/// to the destination, batching goes on as usual from the next record; a failure further on
/// starts a new range.
#[derive(Debug)]
pub(crate) struct Retrying {
    /// The first record of the range (sequence, sub-sequence).
    pub from: (Arc<str>, u64),
    /// Records in the range: the next delivery holds at most these.
    pub limit: usize,
    pub attempts: u32,
    backoff: ExponentialBackoff,
}

/// What to do after a delivery in which the processor reported a failure.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read again from the range's first record and deliver at most `limit` records, after `wait`.
    Retry { limit: usize, wait: Duration },
    /// Hand the failed range (the delivered records from the failed one on) to the destination,
    /// then move on.
    Divert,
}

impl Retrying {
    /// A failure reported at `from`, in a delivery whose records from there number `range`.
    pub(crate) fn new(policy: &FailurePolicy, from: (Arc<str>, u64), range: usize) -> Self {
        Retrying { from, limit: range.max(1), attempts: 0, backoff: crate::retrieval::polling::backoff(policy.backoff) }
    }

    /// Decides after a failed delivery of the range. `failed_from` is the record reported and
    /// `range` how many delivered records start there; a failure further into the range moves
    /// its start (what came before succeeded).
    pub(crate) fn failed(&mut self, policy: &FailurePolicy, failed_from: (Arc<str>, u64), range: usize) -> Next {
        if failed_from != self.from {
            // Part of the range succeeded: the failure is further on; the range shrinks.
            self.from = failed_from;
            self.limit = range.max(1);
            self.attempts = 0;
        }
        self.attempts += 1;
        let wait = self.backoff.next().unwrap_or(policy.backoff.1);
        match policy.max_retries {
            Some(max) if self.attempts > max => {
                if policy.bisect && self.limit > 1 {
                    let half = self.limit / 2;
                    self.limit = half;
                    self.attempts = 0;
                    self.backoff = crate::retrieval::polling::backoff(policy.backoff);
                    Next::Retry { limit: half, wait }
                } else {
                    Next::Divert
                }
            }
            _ => Next::Retry { limit: self.limit, wait },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: &str) -> (Arc<str>, u64) {
        (seq.into(), 0)
    }

    #[test]
    fn the_default_retries_for_ever() {
        let policy = FailurePolicy::default();
        let mut retrying = Retrying::new(&policy, at("5"), 100);
        for _ in 0..1_000 {
            assert!(matches!(retrying.failed(&policy, at("5"), 100), Next::Retry { limit: 100, .. }));
        }
    }

    #[test]
    fn bisection_halves_the_range_down_to_the_record_then_diverts() {
        let destination = |_f: FailedRecords| async { Ok::<(), DestinationError>(()) };
        let policy = FailurePolicy::skip_to(2, true, destination);
        let mut retrying = Retrying::new(&policy, at("5"), 8);
        // Two retries of the 8.
        assert!(matches!(retrying.failed(&policy, at("5"), 8), Next::Retry { limit: 8, .. }));
        assert!(matches!(retrying.failed(&policy, at("5"), 8), Next::Retry { limit: 8, .. }));
        // Spent: the first half, 4, on its own; then 2; then 1.
        assert!(matches!(retrying.failed(&policy, at("5"), 8), Next::Retry { limit: 4, .. }));
        retrying.failed(&policy, at("5"), 4);
        retrying.failed(&policy, at("5"), 4);
        assert!(matches!(retrying.failed(&policy, at("5"), 4), Next::Retry { limit: 2, .. }));
        retrying.failed(&policy, at("5"), 2);
        retrying.failed(&policy, at("5"), 2);
        assert!(matches!(retrying.failed(&policy, at("5"), 2), Next::Retry { limit: 1, .. }));
        retrying.failed(&policy, at("5"), 1);
        retrying.failed(&policy, at("5"), 1);
        assert_eq!(retrying.failed(&policy, at("5"), 1), Next::Divert);
    }

    #[test]
    fn a_failure_further_into_the_range_moves_its_start_and_without_bisect_the_range_is_diverted() {
        let destination = |_f: FailedRecords| async { Ok::<(), DestinationError>(()) };
        let policy = FailurePolicy::skip_to(1, false, destination);
        let mut retrying = Retrying::new(&policy, at("5"), 10);
        assert!(matches!(retrying.failed(&policy, at("5"), 10), Next::Retry { limit: 10, .. }));
        // Retried: 5 and 6 went through, 7 failed.
        assert!(matches!(retrying.failed(&policy, at("7"), 8), Next::Retry { limit: 8, .. }));
        assert_eq!(retrying.failed(&policy, at("7"), 8), Next::Divert);
    }

    #[test]
    fn a_policy_that_gives_up_needs_a_destination() {
        let no_destination = FailurePolicy { max_retries: Some(3), ..Default::default() };
        assert!(no_destination.validate().is_err());
        assert!(FailurePolicy::default().validate().is_ok());
    }
}
