//! The producer side of a run: N tasks put templated records through one `Producer`, paced or
//! flat out, and one task awaits the receipts in whatever order they resolve.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesis_producer::{DeliveryError, Producer, Receipt, ReceiptFuture, UserRecord};
use tokio::sync::mpsc;

use super::Plan;
use super::latency::Latencies;
use super::progress::Progress;
use super::template::Values;
use super::timeline::Timeline;
use super::verify::Tally;

#[allow(clippy::too_many_arguments)]
pub(super) async fn put_loop(
    k: usize,
    producers: usize,
    producer: &Producer,
    plan: &Plan,
    progress: &Progress,
    stop: &AtomicBool,
    receipts: &mpsc::Sender<Pending>,
    started: Instant,
) -> Result<(), kinesis_producer::PutError> {
    // Paced producers start spread over one interval, so that N of them do not put in step.
    let offset = plan.rate.map_or(0.0, |rate| k as f64 / (producers as f64 * rate));
    let (mut data, mut key) = (String::with_capacity(256), String::with_capacity(64));
    for seq in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(quotas) = &plan.quotas
            && seq >= quotas[k]
        {
            break;
        }
        let due = plan.rate.map(|rate| Duration::from_secs_f64(offset + seq as f64 / rate));
        if let Some(duration) = plan.duration
            && due.unwrap_or_else(|| started.elapsed()) >= duration
        {
            break;
        }
        if let Some(due) = due {
            tokio::time::sleep_until((started + due).into()).await;
        }
        let values = Values::new(k + 1, seq);
        data.clear();
        key.clear();
        plan.template.render(&values, &mut data);
        plan.key.render(&values, &mut key);
        let record = UserRecord::new(key.clone(), data.clone().into_bytes());
        let bytes = (key.len() + data.len()) as u64;
        // Latency counts from here: a put that waits for buffer space is part of it.
        let put_at = Instant::now();
        let receipt = producer.put(record).await?;
        progress.sent[k].fetch_add(1, Ordering::Relaxed);
        progress.last_put[k].store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if receipts.send(Pending { producer: k + 1, seq, receipt, put_at, bytes }).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Awaits receipts in whatever order they resolve (a record being retried must not hold up the
/// ones behind it); counts them, tells the tally where each record was stored and when it was put,
/// adds each to the timeline, and returns the put -> acknowledged latencies.
pub(super) async fn await_receipts(
    mut rx: mpsc::Receiver<Pending>,
    progress: Arc<Progress>,
    tally: Option<Arc<Tally>>,
    mut file: Option<std::io::LineWriter<std::fs::File>>,
    (timeline, started): (Arc<Mutex<Timeline>>, Instant),
) -> Latencies {
    let mut latencies = Latencies::default();
    use futures_util::StreamExt as _;
    use std::io::Write as _;
    let mut waiting = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            pending = rx.recv(), if open => match pending {
                Some(Pending { producer, seq, receipt, put_at, bytes }) => {
                    waiting.push(async move { (producer, seq, put_at, bytes, receipt.await) });
                }
                None => open = false,
            },
            Some((producer, seq, put_at, bytes, result)) = waiting.next(), if !waiting.is_empty() => match result as Result<Receipt, DeliveryError> {
                Ok(receipt) => {
                    let latency = put_at.elapsed();
                    latencies.record(latency);
                    timeline.lock().unwrap_or_else(|p| p.into_inner()).acknowledged(
                        started.elapsed(),
                        latency,
                        &receipt.shard_id,
                        receipt.aggregated_index,
                        bytes,
                    );
                    if let Some(tally) = &tally {
                        tally.acked(&receipt.sequence_number, receipt.aggregated_index, put_at);
                    }
                    if let Some(out) = &mut file {
                        let line = serde_json::json!({
                            "producer": producer,
                            "seq": seq,
                            "shard_id": &*receipt.shard_id,
                            "sequence_number": &*receipt.sequence_number,
                            "sub_sequence_number": receipt.aggregated_index,
                        });
                        if let Err(error) = writeln!(out, "{line}") {
                            eprintln!("cannot write the receipts file ({error}); no more receipts are written");
                            file = None;
                        }
                    }
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    if progress.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("a record was not delivered: {error} after {} attempts", error.attempts().len());
                    }
                }
            },
            else => break,
        }
    }
    latencies
}

/// A record put, waiting for its receipt.
pub(super) struct Pending {
    producer: usize,
    seq: u64,
    receipt: ReceiptFuture,
    /// When `put` was called.
    put_at: Instant,
    /// Partition key and data.
    bytes: u64,
}
