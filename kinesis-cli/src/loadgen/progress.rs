//! What a run shows while it runs: the counters the producer tasks and the receipt task share,
//! the progress bar or the `--log` lines, and once a second the samples behind the steady-state
//! figure and the `--report` timeline.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kinesis_producer::Producer;

use super::LoadgenArgs;
use super::timeline::{Timeline, Totals, throttles_and_others};
use super::verify::Tally;

/// Counters shared by the producer tasks, the receipt task and the progress display.
#[derive(Default)]
pub(super) struct Progress {
    /// Per producer: records `put` accepted.
    pub(super) sent: Vec<AtomicU64>,
    /// Records acknowledged.
    pub(super) acked: AtomicU64,
    /// Receipts that failed.
    pub(super) failed: AtomicU64,
    /// Per producer: microseconds from the start to its last put.
    pub(super) last_put: Vec<AtomicU64>,
}

impl Progress {
    /// Records `put` accepted, all producers together.
    pub(super) fn sent_total(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// The run's running totals now, for the timeline.
pub(super) fn totals(producer: &Producer, progress: &Progress, tally: &Tally) -> Totals {
    let (throttles, other_errors) = throttles_and_others(&producer.metrics().errors_by_code);
    let counts = tally.counts();
    Totals {
        sent: progress.sent_total(),
        acknowledged: progress.acked.load(Ordering::Relaxed),
        received: counts.deliveries - counts.duplicates,
        throttles,
        other_errors,
    }
}

/// The `--log` lines: one per producer.
pub(super) fn log_lines(progress: &Progress, secs: f64) {
    let sent = progress.sent_total();
    for (k, count) in progress.sent.iter().enumerate() {
        println!(
            "producer {} has sent {} records, elapsed {secs:.1} s, all producers have sent {sent} records, tps = {:.0}",
            k + 1,
            count.load(Ordering::Relaxed),
            sent as f64 / secs.max(1e-9)
        );
    }
}

/// The progress bar, or the `--log` lines; and once a second a sample of Kinesis bytes per
/// second and of the timeline's totals.
pub(super) async fn display(
    producer: Producer,
    progress: Arc<Progress>,
    tally: Arc<Tally>,
    args: LoadgenArgs,
    total: Option<u64>,
    started: Instant,
    (samples, timeline): (Arc<Mutex<Vec<u64>>>, Arc<Mutex<Timeline>>),
) {
    let bar = if args.log || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let (length, unit) = match (total, args.duration) {
            (Some(total), _) => (total, "records"),
            (None, Some(d)) => (d.as_secs(), "s"),
            (None, None) => (0, ""),
        };
        let bar = ProgressBar::new(length);
        let style =
            ProgressStyle::with_template(&format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}"))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar
    };
    let plain_lines = !args.log && bar.is_hidden();
    let tick = Duration::from_millis(250);
    let mut next_sample = Duration::from_secs(1);
    let mut next_line = args.log_interval;
    let (mut last_bytes, mut window) = (0u64, std::collections::VecDeque::<(Instant, u64)>::new());
    loop {
        tokio::time::sleep(tick).await;
        let elapsed = started.elapsed();
        let sent = progress.sent_total();
        // Records/s over the last 2 s.
        window.push_back((Instant::now(), sent));
        while window.len() > 9 {
            window.pop_front();
        }
        let rate = match (window.front(), window.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64(),
            _ => 0.0,
        };
        let acked = progress.acked.load(Ordering::Relaxed);
        let received = if args.verify { format!(" received {}", tally.counts().received) } else { String::new() };
        if elapsed >= next_sample {
            next_sample += Duration::from_secs(1);
            let totals = totals(&producer, &progress, &tally);
            timeline.lock().unwrap_or_else(|p| p.into_inner()).sample(elapsed, totals);
            let bytes = producer.metrics().kinesis_records_data_put;
            let still_putting = match (total, args.duration) {
                (Some(total), _) => sent < total,
                (None, Some(d)) => elapsed < d,
                (None, None) => true,
            };
            if still_putting {
                samples.lock().unwrap_or_else(|p| p.into_inner()).push(bytes - last_bytes);
            }
            last_bytes = bytes;
        }
        if !bar.is_hidden() {
            bar.set_position(if total.is_some() { sent } else { elapsed.as_secs() });
            bar.set_message(format!("{rate:.0} records/s  acked {acked}{received}"));
        }
        if elapsed >= next_line {
            next_line += args.log_interval;
            let secs = elapsed.as_secs_f64();
            if args.log {
                log_lines(&progress, secs);
            } else if plain_lines {
                eprintln!("{secs:6.1} s  sent {sent}  acked {acked}{received}  {rate:.0} records/s");
            }
        }
    }
}
