//! A producer's pipelines, one a stream, as the KPL keeps one pipeline per stream behind one
//! `KinesisProducer`: each stream has its own shard map, aggregators, rate limiters and retries
//! (an [`Engine`] task), and all of them share the producer's buffer caps, its calls in flight
//! (`max_in_flight_requests`) and its metrics registry, labelled by stream.
//!
//! A stream's pipeline starts on the first record put to it. A stream that does not exist fails
//! its own records (`NotFound`, from ListShards) and no other stream's.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use kinesis_core::StreamAddress;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::ProducerConfig;
use crate::engine::{Command, Engine};
use crate::error::PutErrorReason;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::transport::{KinesisTransport, Transport};

/// Commands a pipeline's inbox holds before `put` waits (buffer space is bounded by the
/// producer's semaphores, not by this).
const INBOX: usize = 16384;

/// One stream's pipeline, as the handle sees it. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Pipeline {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) metrics: Arc<Metrics>,
    /// The stream's record limit, once its pipeline learned it (0: not known).
    pub(crate) stream_limit: Arc<AtomicUsize>,
}

/// Every stream's metrics, for the publishers: they must not hold a pipeline's inbox, which
/// would keep its task alive.
pub(crate) type Registry = Arc<Mutex<Vec<(Arc<str>, Arc<Metrics>)>>>;

/// The pipelines of one producer.
#[derive(Debug)]
pub(crate) struct Streams {
    config: ProducerConfig,
    /// The producer's places for PutRecords calls in flight, shared by every pipeline.
    slots: Arc<Semaphore>,
    /// The client new streams' pipelines call through; `None` for a producer built over one
    /// transport, which has its one stream only.
    client: Option<aws_sdk_kinesis::Client>,
    /// By the stream as it was given (its name or its ARN); and whether the producer is shutting
    /// down (then no pipeline starts: set under the same lock as the snapshot shutdown takes, so
    /// a pipeline is either in that snapshot or never started).
    pipelines: Mutex<(HashMap<String, Pipeline>, bool)>,
    registry: Registry,
    /// Held by every pipeline task, and here until shutdown: its receivers see it close once
    /// the producer is shut down (or dropped) and every task has returned.
    running: Mutex<Option<watch::Sender<()>>>,
}

impl Streams {
    pub(crate) fn new(config: ProducerConfig, client: Option<aws_sdk_kinesis::Client>) -> (Self, watch::Receiver<()>) {
        let (running, stopped) = watch::channel(());
        let streams = Streams {
            slots: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            config,
            client,
            pipelines: Mutex::default(),
            registry: Registry::default(),
            running: Mutex::new(Some(running)),
        };
        (streams, stopped)
    }

    /// Starts the pipeline of `stream` (as given) over `transport`.
    pub(crate) fn start(&self, given: &str, transport: Arc<dyn Transport>) -> Pipeline {
        let pipeline = self.spawn(transport);
        lock(&self.pipelines).0.insert(given.to_owned(), pipeline.clone());
        pipeline
    }

    /// The pipeline of `stream` (a name or an ARN), started on first use.
    ///
    /// # Errors
    /// [`PutErrorReason::InvalidStream`] for text that names no stream;
    /// [`PutErrorReason::OtherStream`] on a producer built over one transport;
    /// [`PutErrorReason::Shutdown`] for a new stream once the producer is shutting down.
    pub(crate) fn pipeline(&self, stream: &str) -> Result<Pipeline, PutErrorReason> {
        // Held while a new stream's task is spawned (no await), so that a stream gets one.
        let mut guard = lock(&self.pipelines);
        let (pipelines, closing) = &mut *guard;
        if let Some(pipeline) = pipelines.get(stream) {
            return Ok(pipeline.clone());
        }
        if *closing {
            return Err(PutErrorReason::Shutdown);
        }
        let address = StreamAddress::parse(stream).map_err(PutErrorReason::InvalidStream)?;
        let Some(client) = &self.client else { return Err(PutErrorReason::OtherStream(stream.to_owned())) };
        let pipeline = self.spawn(Arc::new(KinesisTransport::new(client.clone(), address)));
        pipelines.insert(stream.to_owned(), pipeline.clone());
        Ok(pipeline)
    }

    /// Spawns a pipeline task over `transport`.
    fn spawn(&self, transport: Arc<dyn Transport>) -> Pipeline {
        let stream: Arc<str> = Arc::from(transport.stream_name());
        let metrics = Arc::new(Metrics::default());
        let stream_limit = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel(INBOX);
        let engine = Engine::new(
            self.config.clone(),
            (stream.clone(), transport),
            metrics.clone(),
            stream_limit.clone(),
            self.slots.clone(),
        );
        let running = lock(&self.running).clone();
        tokio::spawn(async move {
            engine.run(rx).await;
            drop(running);
        });
        lock(&self.registry).push((stream, metrics.clone()));
        Pipeline { tx, metrics, stream_limit }
    }

    /// Every pipeline started so far.
    pub(crate) fn all(&self) -> Vec<Pipeline> {
        lock(&self.pipelines).0.values().cloned().collect()
    }

    /// Every pipeline, for shutdown: none starts after this.
    pub(crate) fn close(&self) -> Vec<Pipeline> {
        let mut guard = lock(&self.pipelines);
        guard.1 = true;
        guard.0.values().cloned().collect()
    }

    /// The registry of every stream's metrics.
    pub(crate) fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Each stream's metrics now, by stream name.
    pub(crate) fn snapshots(registry: &Registry) -> Vec<(Arc<str>, MetricsSnapshot)> {
        lock(registry).iter().map(|(stream, metrics)| (stream.clone(), metrics.snapshot())).collect()
    }

    /// After shutdown: no pipeline starts any more; the `stopped` receivers close once every
    /// task has returned.
    pub(crate) fn stop(&self) {
        lock(&self.running).take();
    }
}

/// Locks a mutex held for a few instructions, never across an await; a panic elsewhere while
/// it was held leaves data that is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_stream_needs_valid_text_a_client_and_a_producer_not_shutting_down() {
        let (streams, _stopped) = Streams::new(ProducerConfig::default(), None);
        let first = streams.start("memory", Arc::new(crate::MemoryTransport::new(1)));
        let again = streams.pipeline("memory").expect("started");
        assert!(Arc::ptr_eq(&again.metrics, &first.metrics), "one pipeline a stream");
        assert!(matches!(streams.pipeline("not a stream"), Err(PutErrorReason::InvalidStream(_))));
        assert!(matches!(streams.pipeline("other"), Err(PutErrorReason::OtherStream(s)) if s == "other"));
        assert_eq!(streams.close().len(), 1);
        assert!(matches!(streams.pipeline("other"), Err(PutErrorReason::Shutdown)));
        assert!(streams.pipeline("memory").is_ok(), "a started stream is still found");
        let named: Vec<Arc<str>> = Streams::snapshots(&streams.registry()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(named, [Arc::from("memory")], "named by its transport");
    }
}
