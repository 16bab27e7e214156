//! The polling fetcher: reads one shard with GetRecords on a task of its own, a few pages ahead of
//! the processor, and hands over user records (deaggregated, filtered, resumed).
//!
//! - At most `max_records` Kinesis records a call; a full page is followed by the next call after
//!   200 ms (a shard serves 5 GetRecords calls a second), an empty one after the idle time.
//! - Read throttling and transient errors: retried with exponential backoff and jitter.
//! - An expired iterator: a new one after the last sequence number read (or at the start).
//! - The end of a closed shard: [`Fetch::End`]. So is a shard the stream no longer lists
//!   (ResourceNotFound from GetShardIterator or GetRecords, and ListShards confirms it: a shard
//!   closed longer ago than the retention period has expired, and with it every record), as the
//!   KCL does, so that its children start. A stream that is gone is a failure.
//! - A checkpoint the service refuses as a starting point (InvalidArgument at AT_SEQUENCE_NUMBER:
//!   a sequence number of another shard or of an older stream of the same name): counted in
//!   `unusable_checkpoints`, logged as an error, and the shard is read from TRIM_HORIZON with
//!   every record at or before the checkpoint's number left out (sequence numbers grow within a
//!   shard), so it neither wedges nor skips.
//!
//! The channel to the consumer is bounded: a slow processor stops the reads.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::mpsc;

use crate::error::{ErrorKind, KinesisError};
use crate::metrics::Metrics;
use crate::record::{Record, Unpacker};
use crate::retrieval::kinesis::{Fetched, KinesisApi, StartAt};

/// Settings of the polling fetcher. Defaults are the KCL's.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollingConfig {
    /// `Limit` of each GetRecords call (KCL `maxRecords`: 10,000, the service's maximum).
    pub max_records: i32,
    /// The pause after a call that returned nothing (KCL `idleTimeBetweenReadsInMillis`: 1.5 s).
    pub idle_time_between_reads: Duration,
    /// The pause after a call that returned records: 200 ms, so at most 5 calls a second.
    pub min_time_between_reads: Duration,
    /// Pages read ahead of the processor.
    pub prefetch_pages: usize,
    /// First and largest wait after a throttled or failed call.
    pub backoff: (Duration, Duration),
}

impl Default for PollingConfig {
    fn default() -> Self {
        PollingConfig {
            max_records: 10_000,
            idle_time_between_reads: Duration::from_millis(1500),
            min_time_between_reads: Duration::from_millis(200),
            prefetch_pages: 3,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

/// What the fetcher hands over.
#[derive(Debug)]
pub(crate) enum Fetch {
    /// User records of one GetRecords page (never empty).
    Records { records: Vec<Record>, millis_behind_latest: Option<i64> },
    /// The shard is closed and every record of it was handed over.
    End,
    /// A call failed in a way retrying does not help (the stream is gone, access denied).
    Failed(KinesisError),
}

/// The two reads a fetcher makes: the seam between it and Kinesis (an in-memory reader in the
/// unit tests below injects throttling and expiry).
pub(crate) trait Reader: Send + Sync + 'static {
    fn shard_iterator(
        &self,
        shard_id: &str,
        at: &StartAt,
    ) -> impl Future<Output = Result<Option<String>, KinesisError>> + Send;

    fn get_records(&self, iterator: &str, limit: i32) -> impl Future<Output = Result<Fetched, KinesisError>> + Send;

    /// Whether the stream still lists the shard (`NotFound`: the stream is gone).
    fn shard_listed(&self, shard_id: &str) -> impl Future<Output = Result<bool, KinesisError>> + Send;
}

impl Reader for KinesisApi {
    fn shard_iterator(
        &self,
        shard_id: &str,
        at: &StartAt,
    ) -> impl Future<Output = Result<Option<String>, KinesisError>> + Send {
        KinesisApi::shard_iterator(self, shard_id, at)
    }

    fn get_records(&self, iterator: &str, limit: i32) -> impl Future<Output = Result<Fetched, KinesisError>> + Send {
        KinesisApi::get_records(self, iterator, limit)
    }

    fn shard_listed(&self, shard_id: &str) -> impl Future<Output = Result<bool, KinesisError>> + Send {
        KinesisApi::shard_listed(self, shard_id)
    }
}

/// What ResourceNotFound from a read of one shard means.
pub(crate) async fn gone_or_failed<R: Reader>(reader: &R, shard_id: &str, error: KinesisError) -> Fetch {
    match reader.shard_listed(shard_id).await {
        Ok(false) => {
            tracing::warn!(shard_id, %error, "the stream no longer lists the shard (expired after its retention period): it is ended");
            Fetch::End
        }
        // Listed (an inconsistency that passes) or the listing failed: hand the error over; the
        // lease is released and read again.
        Ok(true) | Err(_) => Fetch::Failed(error),
    }
}

/// Whether a refused starting point was a checkpoint, so that the shard is read from its
/// oldest record instead (the records up to the checkpoint's number left out by the unpacker).
pub(crate) fn refused_checkpoint(at: &StartAt, error: &KinesisError, shard_id: &str, metrics: &Metrics) -> bool {
    if error.kind != ErrorKind::Invalid || !matches!(at, StartAt::AtSequence(_) | StartAt::AfterSequence(_)) {
        return false;
    }
    Metrics::add(&metrics.unusable_checkpoints, 1);
    tracing::error!(shard_id, ?at, %error,
        "Kinesis refuses the checkpoint as a position in this shard (a sequence number of another shard, or of an \
         older stream of this name); reading the shard from TRIM_HORIZON, leaving out every record up to the \
         checkpoint's sequence number");
    true
}

pub(crate) struct Fetcher<R = KinesisApi> {
    pub api: R,
    pub shard_id: Arc<str>,
    /// The lease's key, which names the shard in the metrics (unique across the streams of a
    /// multi-stream application).
    pub lease_key: Arc<str>,
    pub config: PollingConfig,
    pub metrics: Arc<Metrics>,
    pub unpacker: Unpacker,
}

/// Exponential waits with jitter from `range.0` up to `range.1`, without end (the reads go on while
/// the lease is held).
pub(crate) fn backoff(range: (Duration, Duration)) -> ExponentialBackoff {
    ExponentialBuilder::new().with_min_delay(range.0).with_max_delay(range.1).with_jitter().without_max_times().build()
}

impl<R: Reader> Fetcher<R> {
    fn backoff(&self) -> ExponentialBackoff {
        backoff(self.config.backoff)
    }

    /// Reads the shard from `start` until its end, a fatal error, or the receiver is dropped.
    pub(crate) async fn run(mut self, start: StartAt, tx: mpsc::Sender<Fetch>) {
        let mut last_read: Option<String> = None;
        let mut backoff = self.backoff();
        let Some(mut iterator) = self.iterator_or_hand_over(&start, &mut backoff, &tx).await else { return };
        loop {
            Metrics::add(&self.metrics.get_records_calls, 1);
            match self.api.get_records(&iterator, self.config.max_records).await {
                Ok(page) => {
                    backoff = self.backoff();
                    let pause = if page.records.is_empty() {
                        self.config.idle_time_between_reads
                    } else {
                        self.config.min_time_between_reads
                    };
                    if let Some(last) = page.records.last() {
                        last_read = Some(last.sequence_number.clone());
                    }
                    self.metrics.behind(&self.lease_key, page.millis_behind_latest);
                    let mut records = Vec::with_capacity(page.records.len());
                    self.metrics.unpacked(self.unpacker.unpack(page.records, &mut records));
                    if !records.is_empty() {
                        let fetch = Fetch::Records { records, millis_behind_latest: page.millis_behind_latest };
                        if tx.send(fetch).await.is_err() {
                            return;
                        }
                    }
                    match page.next_iterator {
                        Some(next) => iterator = next,
                        None => {
                            let _ = tx.send(Fetch::End).await;
                            return;
                        }
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(e) if e.kind == ErrorKind::Expired => {
                    Metrics::add(&self.metrics.expired_iterators, 1);
                    let at = last_read.clone().map_or_else(|| start.clone(), StartAt::AfterSequence);
                    match self.iterator_or_hand_over(&at, &mut backoff, &tx).await {
                        Some(it) => iterator = it,
                        None => return,
                    }
                }
                Err(e) if e.kind == ErrorKind::NotFound => {
                    let _ = tx.send(gone_or_failed(&self.api, &self.shard_id, e).await).await;
                    return;
                }
                Err(e) if e.kind.is_retryable() => {
                    if e.kind == ErrorKind::Throttled {
                        Metrics::add(&self.metrics.read_throttles, 1);
                    }
                    let wait = backoff.next().unwrap_or(self.config.backoff.1);
                    tracing::debug!(shard_id = %self.shard_id, error = %e, ?wait, "GetRecords failed; retrying");
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let _ = tx.send(Fetch::Failed(e)).await;
                    return;
                }
            }
        }
    }

    /// A shard iterator; without one, the shard's end or the failure is handed over and `None`
    /// returned.
    async fn iterator_or_hand_over(
        &mut self,
        at: &StartAt,
        backoff: &mut impl Iterator<Item = Duration>,
        tx: &mpsc::Sender<Fetch>,
    ) -> Option<String> {
        let mut at = at.clone();
        loop {
            match self.iterator(&at, backoff).await {
                Ok(Some(iterator)) => return Some(iterator),
                Ok(None) => {
                    let _ = tx.send(Fetch::End).await;
                    return None;
                }
                Err(e) if refused_checkpoint(&at, &e, &self.shard_id, &self.metrics) => {
                    // Everything before the refused position is left out by the unpacker: at
                    // AT_SEQUENCE_NUMBER its resume filter already starts there; after
                    // AFTER_SEQUENCE_NUMBER, the whole record at the position goes too.
                    if let StartAt::AfterSequence(seq) = &at {
                        self.unpacker.skip_through(seq);
                    }
                    at = StartAt::TrimHorizon;
                }
                Err(e) if e.kind == ErrorKind::NotFound => {
                    let _ = tx.send(gone_or_failed(&self.api, &self.shard_id, e).await).await;
                    return None;
                }
                Err(e) => {
                    let _ = tx.send(Fetch::Failed(e)).await;
                    return None;
                }
            }
        }
    }

    /// A shard iterator, retrying throttled and transient failures.
    async fn iterator(
        &self,
        at: &StartAt,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> Result<Option<String>, KinesisError> {
        loop {
            match self.api.shard_iterator(&self.shard_id, at).await {
                Err(e) if e.kind.is_retryable() => {
                    let wait = backoff.next().unwrap_or(self.config.backoff.1);
                    tracing::debug!(shard_id = %self.shard_id, error = %e, ?wait, "GetShardIterator failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use aws_sdk_kinesis::primitives::Blob;
    use tokio::time::Instant;

    use super::*;

    /// Answers GetRecords from a script; records every GetShardIterator asked for.
    #[derive(Default)]
    pub(crate) struct Scripted {
        pub(crate) answers: Mutex<VecDeque<Result<Fetched, ErrorKind>>>,
        /// Errors for the next GetShardIterator calls.
        pub(crate) iterator_errors: Mutex<VecDeque<ErrorKind>>,
        pub(crate) iterators: Mutex<Vec<StartAt>>,
        calls: Mutex<Vec<Instant>>,
        /// What ListShards says of the shard.
        pub(crate) listed: Mutex<bool>,
    }

    pub(crate) fn page(seqs: &[&str], next: Option<&str>) -> Result<Fetched, ErrorKind> {
        let records = seqs
            .iter()
            .map(|s| {
                aws_sdk_kinesis::types::Record::builder()
                    .sequence_number(*s)
                    .partition_key("k")
                    .data(Blob::new(s.as_bytes()))
                    .build()
                    .unwrap()
            })
            .collect();
        Ok(Fetched { records, next_iterator: next.map(str::to_owned), millis_behind_latest: Some(0) })
    }

    impl Reader for Arc<Scripted> {
        async fn shard_iterator(&self, _shard_id: &str, at: &StartAt) -> Result<Option<String>, KinesisError> {
            self.iterators.lock().unwrap().push(at.clone());
            match self.iterator_errors.lock().unwrap().pop_front() {
                Some(kind) => Err(KinesisError::new(kind, "GetShardIterator", Some(format!("{kind:?}")), None)),
                None => Ok(Some("it".into())),
            }
        }

        async fn shard_listed(&self, _shard_id: &str) -> Result<bool, KinesisError> {
            Ok(*self.listed.lock().unwrap())
        }

        async fn get_records(&self, _iterator: &str, _limit: i32) -> Result<Fetched, KinesisError> {
            self.calls.lock().unwrap().push(Instant::now());
            match self.answers.lock().unwrap().pop_front() {
                Some(Ok(page)) => Ok(page),
                Some(Err(kind)) => Err(KinesisError::new(kind, "GetRecords", Some(format!("{kind:?}")), None)),
                None => Ok(Fetched { records: Vec::new(), next_iterator: None, millis_behind_latest: None }),
            }
        }
    }

    pub(crate) fn fetcher(reader: &Arc<Scripted>, metrics: &Arc<Metrics>) -> Fetcher<Arc<Scripted>> {
        Fetcher {
            api: reader.clone(),
            shard_id: "shard".into(),
            lease_key: "shard".into(),
            config: PollingConfig::default(),
            metrics: metrics.clone(),
            unpacker: Unpacker::new("shard".into(), None, None),
        }
    }

    pub(crate) async fn drain(mut rx: mpsc::Receiver<Fetch>) -> (Vec<String>, bool) {
        let mut seqs = Vec::new();
        let mut ended = false;
        while let Some(fetch) = rx.recv().await {
            match fetch {
                Fetch::Records { records, .. } => seqs.extend(records.iter().map(|r| r.sequence_number.to_string())),
                Fetch::End => ended = true,
                Fetch::Failed(e) => panic!("failed: {e}"),
            }
        }
        (seqs, ended)
    }

    #[tokio::test(start_paused = true)]
    async fn read_throttling_backs_off_exponentially_and_the_reads_go_on() {
        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().extend([
            page(&["1"], Some("a")),
            Err(ErrorKind::Throttled),
            Err(ErrorKind::Throttled),
            Err(ErrorKind::Throttled),
            Err(ErrorKind::Transient),
            page(&["2"], None),
        ]);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(fetcher(&reader, &metrics).run(StartAt::TrimHorizon, tx));
        let (seqs, ended) = drain(rx).await;
        assert_eq!(seqs, ["1", "2"]);
        assert!(ended);
        assert_eq!(metrics.read_throttles.load(std::sync::atomic::Ordering::Relaxed), 3);
        let calls = reader.calls.lock().unwrap().clone();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        // 200 ms after a page with records; then backoff waits that grow (jittered: each at
        // least the base delay, 100, 200, 400, 800 ms).
        assert!(gaps[0] >= Duration::from_millis(200), "{gaps:?}");
        for (gap, base) in gaps[1..].iter().zip([100u64, 200, 400, 800]) {
            assert!(*gap >= Duration::from_millis(base), "{gaps:?}");
        }
        assert!(gaps[4] > gaps[1], "the waits grow: {gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_iterator_is_renewed_after_the_last_record_read() {
        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().extend([
            page(&["10", "11"], Some("a")),
            Err(ErrorKind::Expired),
            page(&["12"], None),
        ]);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(fetcher(&reader, &metrics).run(StartAt::AtSequence("10".into()), tx));
        let (seqs, ended) = drain(rx).await;
        assert_eq!(seqs, ["10", "11", "12"]);
        assert!(ended);
        let iterators = reader.iterators.lock().unwrap().clone();
        assert_eq!(iterators, [StartAt::AtSequence("10".into()), StartAt::AfterSequence("11".into())]);
        assert_eq!(metrics.expired_iterators.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_retrying_cannot_help_is_handed_over() {
        let reader = Arc::new(Scripted::default());
        // Access denied, say.
        reader.answers.lock().unwrap().push_back(Err(ErrorKind::Fatal));
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(fetcher(&reader, &metrics).run(StartAt::Latest, tx));
        match rx.recv().await {
            Some(Fetch::Failed(e)) => assert_eq!(e.kind, ErrorKind::Fatal),
            other => panic!("{other:?}"),
        }
        assert!(rx.recv().await.is_none());
    }
}

#[cfg(test)]
mod refusals {
    use std::sync::atomic::Ordering::Relaxed;

    use super::tests::*;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_kinesis_refuses_is_read_past_from_the_oldest_record_not_wedged() {
        let reader = Arc::new(Scripted::default());
        reader.iterator_errors.lock().unwrap().push_back(ErrorKind::Invalid);
        // From TRIM_HORIZON: records before, at and after the checkpoint 200.
        reader.answers.lock().unwrap().extend([page(&["100", "200", "300"], Some("a")), page(&["400"], None)]);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(4);
        let mut fetcher = fetcher(&reader, &metrics);
        fetcher.unpacker = Unpacker::new("shard".into(), None, Some(("200".into(), 0)));
        tokio::spawn(fetcher.run(StartAt::AtSequence("200".into()), tx));
        let (seqs, ended) = drain(rx).await;
        assert_eq!(seqs, ["300", "400"], "nothing at or before the checkpoint, nothing after it skipped");
        assert!(ended);
        assert_eq!(*reader.iterators.lock().unwrap(), [StartAt::AtSequence("200".into()), StartAt::TrimHorizon]);
        assert_eq!(metrics.unusable_checkpoints.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_the_stream_no_longer_lists_is_ended_so_its_children_start() {
        for (listed, ends) in [(false, true), (true, false)] {
            let reader = Arc::new(Scripted::default());
            *reader.listed.lock().unwrap() = listed;
            reader.iterator_errors.lock().unwrap().push_back(ErrorKind::NotFound);
            let metrics = Arc::new(Metrics::default());
            let (tx, mut rx) = mpsc::channel(4);
            tokio::spawn(fetcher(&reader, &metrics).run(StartAt::TrimHorizon, tx));
            match rx.recv().await {
                Some(Fetch::End) => assert!(ends),
                Some(Fetch::Failed(e)) => assert!(!ends && e.kind == ErrorKind::NotFound),
                other => panic!("{other:?}"),
            }
        }
        // The same when GetRecords says it.
        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().extend([page(&["1"], Some("a")), Err(ErrorKind::NotFound)]);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(fetcher(&reader, &metrics).run(StartAt::TrimHorizon, tx));
        let (seqs, ended) = drain(rx).await;
        assert_eq!(seqs, ["1"]);
        assert!(ended);
    }
}
