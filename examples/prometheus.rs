//! The producer's and the consumer's metrics as a Prometheus text page on localhost.
//!
//! It starts the embedded emulators (ferrokinesis, dynoxide), a 2-shard stream, a producer putting
//! a steady trickle of records and a consumer worker reading them, publishes both of their metrics
//! to the `metrics` facade every second (the `metrics` features of `kinesis-producer` and
//! `kinesis-consumer`), and serves what the Prometheus recorder renders at
//! `http://127.0.0.1:PORT/metrics`, with a small HTTP/1.1 responder of its own.
//!
//! ```text
//! cargo run --example prometheus [-- --port 9898] [--duration SECS] [--rate RECORDS_PER_SEC]
//! curl -s http://127.0.0.1:9898/metrics | grep -E 'IncomingRecords|RecordsProcessed|IteratorAge'
//! ```
//!
//! It runs until Ctrl-C, or for `--duration` seconds, then shuts the producer and the worker down
//! gracefully. `--port 0` takes a port the OS chooses; the URL printed says which.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis::producer::{Producer, UserRecord};
use kinesis_testkit::{TestBed, unique_name};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the producer and the worker publish their snapshots.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;

struct Options {
    port: u16,
    duration: Option<Duration>,
    rate: u32,
}

fn options() -> Result<Options, BoxError> {
    let mut options = Options { port: 9898, duration: None, rate: 100 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => options.port = args.next().ok_or("--port PORT")?.parse()?,
            "--duration" => {
                options.duration = Some(Duration::from_secs(args.next().ok_or("--duration SECS")?.parse()?))
            }
            "--rate" => options.rate = args.next().ok_or("--rate RECORDS_PER_SEC")?.parse()?,
            other => return Err(format!("unknown argument {other}; see the example's docs").into()),
        }
    }
    Ok(options)
}

/// Checkpoints every batch, counting its records.
struct Checkpointing(Arc<AtomicU64>);

impl Processor for Checkpointing {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.0.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        if let Err(error) = checkpointer.checkpoint().await {
            eprintln!("checkpoint of {} failed: {error}", checkpointer.shard_id());
        }
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let options = options()?;
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    // Bound first, so that a busy port fails before anything starts.
    let listener = TcpListener::bind(("127.0.0.1", options.port)).await?;
    let address = listener.local_addr()?;

    let bed = TestBed::start().await?;
    let stream = bed.kinesis.create_stream(2).await?;
    let application = unique_name("prometheus-app");

    let producer = Producer::builder(bed.kinesis.client(), &stream).build()?;
    let producer_publisher = producer.spawn_metrics_publisher(PUBLISH_EVERY);

    let mut config = SchedulerConfig::new(&stream, &application);
    config.worker_id = "worker-1".to_owned();
    config.initial_position = InitialPosition::TrimHorizon;
    config.failover = Duration::from_secs(2);
    config.polling.idle_time_between_reads = Duration::from_millis(200);
    let processed = Arc::new(AtomicU64::new(0));
    let counted = processed.clone();
    let worker = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |_: &str| {
        Checkpointing(counted.clone())
    })?;
    let worker_publisher = worker.spawn_metrics_publisher(PUBLISH_EVERY);

    let server = tokio::spawn(serve(listener, prometheus.clone()));
    let upkeep = tokio::spawn(async move {
        // Histograms and summaries need it; this example has none, but it costs nothing.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            prometheus.run_upkeep();
        }
    });
    let load = tokio::spawn(put_steadily(producer.clone(), options.rate));

    println!("stream {stream}, lease table {application}, {} records/s", options.rate);
    println!("metrics at http://{address}/metrics");
    match options.duration {
        Some(duration) => println!("running for {} s (or until Ctrl-C)", duration.as_secs()),
        None => println!("running until Ctrl-C"),
    }
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let until = async {
        match options.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => break,
            result = tokio::signal::ctrl_c() => {
                result?;
                break;
            }
            _ = report.tick() => {
                let put = producer.metrics();
                println!(
                    "put {} user records in {} Kinesis records; processed {}",
                    put.user_records_put,
                    put.kinesis_records_put,
                    processed.load(Ordering::Relaxed)
                );
            }
        }
    }

    println!("shutting down");
    load.abort();
    producer.shutdown().await;
    worker.shutdown().await?;
    // Both publishers publish a last time once their producer or worker has stopped.
    producer_publisher.await?;
    worker_publisher.await?;
    server.abort();
    upkeep.abort();
    let put = producer.metrics();
    println!(
        "put {} user records ({} failed, {} expired); processed {}",
        put.user_records_put,
        put.user_records_failed,
        put.user_record_expired,
        processed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Puts about `rate` records a second until aborted.
async fn put_steadily(producer: Producer, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent: u64 = 0;
    let mut due: f64 = 0.0;
    loop {
        tick.tick().await;
        due += f64::from(rate) / 10.0;
        while due >= 1.0 {
            due -= 1.0;
            let record = UserRecord::new(format!("sensor-{}", sent % 50), format!("{{\"n\":{sent}}}"));
            match producer.put(record).await {
                // Delivery shows in the metrics; nothing here waits for it.
                Ok(receipt) => drop(receipt),
                Err(error) => {
                    eprintln!("put failed: {error}");
                    return;
                }
            }
            sent += 1;
        }
    }
}

/// Accepts connections until aborted, each answered by a task of its own.
async fn serve(listener: TcpListener, prometheus: PrometheusHandle) {
    loop {
        match listener.accept().await {
            Ok((connection, _)) => {
                let prometheus = prometheus.clone();
                tokio::spawn(async move {
                    if let Err(error) = respond(connection, &prometheus).await {
                        eprintln!("HTTP: {error}");
                    }
                });
            }
            Err(error) => {
                eprintln!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it, then closes the connection: `GET /metrics` gets the
/// Prometheus text page, anything else a 404 or 405. The body of a request is never read.
async fn respond(mut connection: TcpStream, prometheus: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = connection.read(&mut buffer).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    let complete = match tokio::time::timeout(Duration::from_secs(10), read_head).await {
        Ok(result) => result?,
        Err(_) => false,
    };
    if !complete {
        return write(&mut connection, "400 Bad Request", "text/plain", "bad request\n", true).await;
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let page = prometheus.render();
            write(&mut connection, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &page, method == "GET").await
        }
        ("GET" | "HEAD", _) => {
            write(&mut connection, "404 Not Found", "text/plain", "try /metrics\n", method == "GET").await
        }
        _ => write(&mut connection, "405 Method Not Allowed", "text/plain", "GET only\n", true).await,
    }
}

async fn write(
    connection: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    connection.write_all(head.as_bytes()).await?;
    if with_body {
        connection.write_all(body.as_bytes()).await?;
    }
    connection.shutdown().await
}
