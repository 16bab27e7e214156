//! Enhanced fan-out: a registered stream consumer, and a fetcher that reads a shard with
//! SubscribeToShard instead of polling, handing the shard consumer the same [`Fetch`] items.
//!
//! - **Registration** ([`register`]): RegisterStreamConsumer, or the existing consumer of that
//!   name; then DescribeStreamConsumer until it is ACTIVE, backing off on LimitExceeded. This
//!   library never deregisters it: the consumer belongs to the application (as with the KCL), and
//!   is removed with DeregisterStreamConsumer when the application is retired.
//! - **Subscriptions**: from the lease's checkpoint (or the initial position); when a subscription
//!   ends (after 5 minutes) or fails, a new one starts AFTER the last continuation sequence number,
//!   so nothing is read twice or skipped. ResourceInUse (another subscription still open) and
//!   LimitExceeded back off.
//! - **Shard end**: the service's end signal only, an event without a continuation sequence
//!   number (the last event of a closed shard), after every record before it. ChildShards alone
//!   is no end: a server may attach them to every event of a closed shard while records remain
//!   (the KCL also ends on the missing continuation). For a server that never sends the signal, a
//!   closed shard is also recognised after a quiet spell by one GetRecords after the continuation
//!   point. A shard the stream no longer lists (ResourceNotFound) is ended, as with polling; a
//!   checkpoint the service refuses is read past from TRIM_HORIZON, as with polling.
//! - **Back-pressure**: the event stream's own flow control. The fetcher stops reading events while
//!   the bounded channel to the processor is full; the server then waits on the connection.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream};
use backon::ExponentialBackoff;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{ErrorKind, KinesisError};
use crate::metrics::Metrics;
use crate::record::{Unpacker, cmp_sequence_numbers};
use crate::retrieval::kinesis::{KinesisApi, StartAt};
use crate::retrieval::polling::{Fetch, backoff, gone_or_failed, refused_checkpoint};

/// Settings of enhanced fan-out.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FanOutConfig {
    /// The registered consumer's name (one per application, like the KCL's application name).
    pub consumer_name: String,
    /// How long registration may take, until the consumer is ACTIVE.
    pub registration_timeout: Duration,
    /// A subscription that delivers no event for this long is given up and made again (AWS sends
    /// an event at least every few seconds).
    pub event_timeout: Duration,
    /// After this long without records, check once whether the shard is closed and read to its
    /// end (for servers that do not send ChildShards).
    pub end_check_after: Duration,
    /// First and largest wait before subscribing again after a failure.
    pub backoff: (Duration, Duration),
    /// End each subscription after this long and make a new one (`None`: the server ends it,
    /// after 5 minutes on AWS). For tests of resubscription, and for servers whose sessions are
    /// longer than wanted.
    pub subscription_lifetime: Option<Duration>,
}

impl FanOutConfig {
    /// Fan-out as the consumer `consumer_name`, with default timings.
    pub fn new(consumer_name: impl Into<String>) -> Self {
        FanOutConfig {
            consumer_name: consumer_name.into(),
            registration_timeout: Duration::from_secs(120),
            event_timeout: Duration::from_secs(30),
            end_check_after: Duration::from_secs(5),
            backoff: (Duration::from_millis(200), Duration::from_secs(5)),
            subscription_lifetime: None,
        }
    }
}

/// How a worker reads its shards.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retrieval {
    /// GetRecords polling (the default).
    Polling,
    /// Enhanced fan-out: SubscribeToShard as a registered consumer.
    FanOut(FanOutConfig),
}

fn error<E, R>(operation: &'static str, e: SdkError<E, R>) -> KinesisError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let mut error = crate::retrieval::kinesis::error(operation, e);
    // ResourceInUse here means "not ready yet" (stream or consumer not ACTIVE, a subscription
    // still open): worth waiting for.
    if error.code.as_deref() == Some("ResourceInUseException") {
        error.kind = ErrorKind::Transient;
    }
    error
}

/// Registers the stream consumer (or finds the one registered before) and waits until it is
/// ACTIVE. Returns its ARN.
pub(crate) async fn register(
    client: &aws_sdk_kinesis::Client,
    stream: &kinesis_core::StreamAddress,
    config: &FanOutConfig,
) -> Result<String, KinesisError> {
    let deadline = Instant::now() + config.registration_timeout;
    let mut waits = backoff((Duration::from_millis(100), Duration::from_secs(2)));
    let mut pause = async |what: &str, e: Option<KinesisError>| -> Result<(), KinesisError> {
        if Instant::now() >= deadline {
            return Err(e.unwrap_or_else(|| {
                KinesisError::new(
                    ErrorKind::Transient,
                    "DescribeStreamConsumer",
                    None,
                    Some(format!("{what} within {:?}", config.registration_timeout).into()),
                )
            }));
        }
        tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(2))).await;
        Ok(())
    };
    // The consumer calls take the stream's ARN: the one given, else the one described (which
    // also tells the stream exists).
    let (name, arn) = stream.request_fields();
    let stream_arn = loop {
        match client.describe_stream_summary().set_stream_name(name.clone()).set_stream_arn(arn.clone()).send().await {
            Ok(out) => match out.stream_description_summary() {
                Some(summary) => break summary.stream_arn().to_owned(),
                None => pause("the stream described", None).await?,
            },
            Err(e) => {
                let e = error("DescribeStreamSummary", e);
                if !e.kind.is_retryable() {
                    return Err(e);
                }
                pause("the stream described", Some(e)).await?;
            }
        }
    };
    loop {
        match client
            .register_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(&config.consumer_name)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(stream = stream.name(), consumer = %config.consumer_name, "stream consumer registered");
                break;
            }
            // Registered before (by this worker's earlier run, or another worker): use it.
            Err(e) if e.code() == Some("ResourceInUseException") => break,
            Err(e) => {
                let e = error("RegisterStreamConsumer", e);
                if !e.kind.is_retryable() {
                    return Err(e);
                }
                pause("the consumer registered", Some(e)).await?;
            }
        }
    }
    loop {
        let described =
            client.describe_stream_consumer().stream_arn(&stream_arn).consumer_name(&config.consumer_name).send().await;
        match described {
            Ok(out) => {
                if let Some(consumer) = out.consumer_description() {
                    if consumer.consumer_status() == &ConsumerStatus::Active {
                        return Ok(consumer.consumer_arn().to_owned());
                    }
                    if consumer.consumer_status() == &ConsumerStatus::Deleting {
                        // Being deregistered: register it again once it is gone.
                        let _ = client
                            .register_stream_consumer()
                            .stream_arn(&stream_arn)
                            .consumer_name(&config.consumer_name)
                            .send()
                            .await;
                    }
                }
                pause("the consumer ACTIVE", None).await?;
            }
            Err(e) => {
                let e = error("DescribeStreamConsumer", e);
                if !e.kind.is_retryable() && e.kind != ErrorKind::NotFound {
                    return Err(e);
                }
                pause("the consumer ACTIVE", Some(e)).await?;
            }
        }
    }
}

/// Empty pages followed when checking that a closed shard is read to its end.
const END_CHECK_PAGES: usize = 5;

/// Reads one shard by subscription.
pub(crate) struct FanOutFetcher {
    pub api: KinesisApi,
    pub client: aws_sdk_kinesis::Client,
    pub consumer_arn: Arc<str>,
    pub shard_id: Arc<str>,
    /// The lease's key, which names the shard in the metrics.
    pub lease_key: Arc<str>,
    pub config: FanOutConfig,
    pub metrics: Arc<Metrics>,
    pub unpacker: Unpacker,
    /// The sequence number of the last Kinesis record read.
    pub last_read: Option<String>,
    /// When records last came (across subscriptions): after `end_check_after` without any, one
    /// GetRecords checks whether the shard is closed and read to its end.
    pub last_records: Instant,
}

fn starting_position(at: &StartAt) -> StartingPosition {
    let builder = StartingPosition::builder();
    let builder = match at {
        StartAt::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        StartAt::Latest => builder.r#type(ShardIteratorType::Latest),
        StartAt::AtTimestamp(at) => builder.r#type(ShardIteratorType::AtTimestamp).timestamp(DateTime::from(*at)),
        StartAt::AtSequence(seq) => builder.r#type(ShardIteratorType::AtSequenceNumber).sequence_number(seq),
        StartAt::AfterSequence(seq) => builder.r#type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq),
    };
    // Only the type is required, and it is always set.
    builder.build().expect("a StartingPosition with a type always builds")
}

/// How a subscription ended.
enum Ended {
    /// The server ended it (its lifetime is up) or it failed: subscribe again.
    Again,
    /// The shard is read to its end.
    ShardEnd,
    /// The consumer is gone (the receiver was dropped).
    Stop,
}

impl FanOutFetcher {
    /// Reads the shard from `start` until its end, a fatal error, or the receiver is dropped.
    pub(crate) async fn run(mut self, start: StartAt, tx: mpsc::Sender<Fetch>) {
        let mut position = start;
        let mut waits = backoff(self.config.backoff);
        let mut first = true;
        loop {
            if tx.is_closed() {
                return;
            }
            let subscribed = self
                .client
                .subscribe_to_shard()
                .consumer_arn(self.consumer_arn.as_ref())
                .shard_id(self.shard_id.as_ref())
                .starting_position(starting_position(&position))
                .send()
                .await;
            let mut out = match subscribed {
                Ok(out) => out,
                Err(e) => {
                    let e = error("SubscribeToShard", e);
                    if refused_checkpoint(&position, &e, &self.shard_id, &self.metrics) {
                        position = StartAt::TrimHorizon;
                        continue;
                    }
                    if e.kind == ErrorKind::NotFound {
                        let _ = tx.send(gone_or_failed(&self.api, &self.shard_id, e).await).await;
                        return;
                    }
                    if e.kind == ErrorKind::Throttled || e.kind.is_retryable() {
                        let wait = waits.next().unwrap_or(self.config.backoff.1);
                        tracing::debug!(shard_id = %self.shard_id, error = %e, ?wait, "SubscribeToShard refused; trying again");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let _ = tx.send(Fetch::Failed(e)).await;
                    return;
                }
            };
            Metrics::add(&self.metrics.subscriptions, 1);
            if !first {
                Metrics::add(&self.metrics.resubscriptions, 1);
            }
            first = false;
            match self.read(&mut out.event_stream, &mut position, &tx, &mut waits).await {
                Ended::Again => {}
                Ended::ShardEnd => {
                    let _ = tx.send(Fetch::End).await;
                    return;
                }
                Ended::Stop => return,
            }
        }
    }

    async fn read(
        &mut self,
        events: &mut aws_sdk_kinesis::primitives::event_stream::EventReceiver<
            SubscribeToShardEventStream,
            aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError,
        >,
        position: &mut StartAt,
        tx: &mpsc::Sender<Fetch>,
        waits: &mut ExponentialBackoff,
    ) -> Ended {
        let ends_at = self.config.subscription_lifetime.map(|lifetime| Instant::now() + lifetime);
        loop {
            if ends_at.is_some_and(|at| Instant::now() >= at) {
                // Dropping the receiver closes the subscription's connection.
                return Ended::Again;
            }
            let event = match tokio::time::timeout(self.config.event_timeout, events.recv()).await {
                Err(_) => {
                    tracing::debug!(shard_id = %self.shard_id, "no event within the timeout; subscribing again");
                    return Ended::Again;
                }
                Ok(Ok(None)) => return Ended::Again,
                Ok(Err(e)) => {
                    let code = e.code().map(str::to_owned);
                    let wait = waits.next().unwrap_or(self.config.backoff.1);
                    tracing::debug!(shard_id = %self.shard_id, ?code, ?wait, "subscription failed; subscribing again");
                    tokio::time::sleep(wait).await;
                    return Ended::Again;
                }
                Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => event,
                Ok(Ok(Some(_))) => continue,
            };
            *waits = backoff(self.config.backoff);
            self.metrics.behind(&self.lease_key, Some(event.millis_behind_latest()));
            let had_records = !event.records().is_empty();
            let continuation = event.continuation_sequence_number().to_owned();
            // The service's end signal: no continuation (the last event of a closed shard). A
            // server that attaches ChildShards to other events too (ferrokinesis does, to every
            // event of a closed shard) is taken at its word only for an event without records,
            // and only once a GetRecords after the position confirms the shard is read to its end.
            let drained_hint = !had_records && !event.child_shards().is_empty();
            // The next subscription starts after the last record read; before any record, after
            // the continuation point (a LATEST start must not move on). Emulators do not all
            // honour a continuation number that is not a record's.
            if self.last_read.is_none() && !continuation.is_empty() {
                *position = StartAt::AfterSequence(continuation.clone());
            }
            // A server that replays (an unknown starting number read from the start) must not
            // deliver a record twice.
            let mut kinesis_records = event.records;
            if let Some(last) = &self.last_read {
                kinesis_records.retain(|r| cmp_sequence_numbers(&r.sequence_number, last).is_gt());
            }
            if let Some(last) = kinesis_records.last() {
                self.last_read = Some(last.sequence_number.clone());
                *position = StartAt::AfterSequence(last.sequence_number.clone());
            }
            let mut records = Vec::with_capacity(kinesis_records.len());
            self.metrics.unpacked(self.unpacker.unpack(kinesis_records, &mut records));
            if !records.is_empty() {
                // Waiting here is the back-pressure: no event is read until the processor catches up.
                if tx.send(Fetch::Records { records, millis_behind_latest: None }).await.is_err() {
                    return Ended::Stop;
                }
            }
            if continuation.is_empty() {
                return Ended::ShardEnd;
            }
            if drained_hint && self.read_to_end(position).await {
                return Ended::ShardEnd;
            }
            if had_records {
                self.last_records = Instant::now();
            } else if self.last_records.elapsed() >= self.config.end_check_after {
                self.last_records = Instant::now();
                if self.read_to_end(position).await {
                    return Ended::ShardEnd;
                }
            }
        }
    }

    /// Whether the shard is closed and nothing is left after `position` (one GetRecords).
    ///
    /// A closed shard read past its last record answers with no next iterator, perhaps only after
    /// a few empty pages (ferrokinesis gives one more iterator to a position before the shard's
    /// closing time): empty pages are followed, a few at most. A record after the position means
    /// the shard is not read to its end.
    async fn read_to_end(&self, position: &StartAt) -> bool {
        let Ok(Some(mut iterator)) = self.api.shard_iterator(&self.shard_id, position).await else { return false };
        for _ in 0..END_CHECK_PAGES {
            match self.api.get_records(&iterator, 1).await {
                Ok(page) if !page.records.is_empty() => return false,
                Ok(page) => match page.next_iterator {
                    None => return true,
                    Some(next) => iterator = next,
                },
                Err(_) => return false,
            }
        }
        false
    }
}
