//! What a load run measured: the summary printed at the end, and with `--report FILE.html` a
//! self-contained page (no scripts, nothing fetched) with four charts drawn by `plotters` as
//! inline SVG:
//! - `throughput`: records per second sent, acknowledged and received;
//! - `latency`: put -> acknowledged p50, p90, p99 and max, per second acknowledged in;
//! - `shards`: each shard's use of its write limit per second (the larger of records / 1,000 and
//!   bytes / 1 MiB), with the limit drawn at 100 %;
//! - `throttles`: records and calls refused for throughput per second, and other errors.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::latency::LatencySummary;
use super::timeline::Timeline;
use super::verify::Counts;
use std::collections::BTreeMap;

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The stream and its open shards.
    pub stream: String,
    /// Open shards while the run started.
    pub shards: u32,
    /// Records `put` accepted.
    pub sent: u64,
    /// Records Kinesis acknowledged (receipts that succeeded).
    pub acknowledged: u64,
    /// Receipts that failed.
    pub failed: u64,
    /// Seconds from the first put to the last receipt.
    pub produce_secs: f64,
    /// Kinesis records put and their bytes (partition key + data, after compression).
    pub kinesis_records: u64,
    /// See `kinesis_records`.
    pub kinesis_bytes: u64,
    /// User-record bytes delivered (partition key + data, before compression).
    pub user_bytes: u64,
    /// Median of the per-second Kinesis bytes while putting, leaving out the first two seconds.
    pub steady_bytes_per_sec: Option<f64>,
    /// Per-record retries and the error codes seen.
    pub retries: u64,
    /// See `retries`.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Per producer: records sent, and the seconds from its start to its last put.
    pub per_producer: Vec<(u64, f64)>,
    /// The pace asked for, per producer.
    pub rate: Option<f64>,
    /// With `--verify`: the tally at the end, deliveries not of this run, and the seconds from the
    /// start until the last record arrived (or the wait ended).
    pub verified: Option<(Counts, u64, f64)>,
    /// Put -> acknowledged (the receipt resolved), per record acknowledged.
    pub ack_latency: Option<LatencySummary>,
    /// With `--verify`: put -> first delivery to a processor, per record acknowledged and
    /// received (millisecond resolution).
    pub processed_latency: Option<LatencySummary>,
    /// Second by second, for [`Report::html`].
    pub timeline: Timeline,
}

impl Report {
    /// Kinesis bytes per second over the whole run, as a share of the shards' 1 MiB/s each.
    pub fn utilisation(&self) -> f64 {
        self.kinesis_bytes as f64 / self.produce_secs.max(1e-9) / (f64::from(self.shards) * 1_048_576.0)
    }

    /// Writes the summary.
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let limit = f64::from(self.shards) * 1_048_576.0;
        writeln!(out, "== loadgen summary: stream {}, {} shards", self.stream, self.shards)?;
        writeln!(out, "sent          {}", self.sent)?;
        writeln!(out, "acknowledged  {}", self.acknowledged)?;
        writeln!(out, "failed        {}", self.failed)?;
        if let Some((counts, unexpected, secs)) = &self.verified {
            writeln!(out, "received      {}", counts.received)?;
            writeln!(out, "duplicates    {}", counts.duplicates)?;
            writeln!(out, "lost          {}", counts.lost())?;
            if *unexpected > 0 {
                writeln!(out, "unexpected    {unexpected} (received, but not acknowledged in this run)")?;
            }
            writeln!(
                out,
                "consumed      {:.0} records/s ({} deliveries by {:.1} s)",
                counts.deliveries as f64 / secs.max(1e-9),
                counts.deliveries,
                secs
            )?;
        }
        writeln!(
            out,
            "produced      {:.0} records/s ({} acknowledged in {:.1} s)",
            self.acknowledged as f64 / self.produce_secs.max(1e-9),
            self.acknowledged,
            self.produce_secs
        )?;
        writeln!(
            out,
            "kinesis bytes {:.2} MB/s = {:.1} % of the shards' write limit over the run{}",
            self.kinesis_bytes as f64 / self.produce_secs.max(1e-9) / 1e6,
            100.0 * self.utilisation(),
            match self.steady_bytes_per_sec {
                Some(steady) => format!("; steady state {:.1} %", 100.0 * steady / limit),
                None => String::new(),
            }
        )?;
        writeln!(
            out,
            "records       {} Kinesis records, {:.1} user records each; {:.2} user bytes per Kinesis byte",
            self.kinesis_records,
            self.acknowledged as f64 / self.kinesis_records.max(1) as f64,
            self.user_bytes as f64 / self.kinesis_bytes.max(1) as f64
        )?;
        if let Some(latency) = &self.ack_latency {
            writeln!(out, "put->ack      {latency}")?;
        }
        if let Some(latency) = &self.processed_latency {
            writeln!(out, "put->process  {latency}")?;
        }
        writeln!(out, "retries       {} (errors {:?})", self.retries, self.errors_by_code)?;
        if let Some(rate) = self.rate {
            let rates: Vec<f64> =
                self.per_producer.iter().filter(|(_, s)| *s > 0.0).map(|(n, s)| *n as f64 / s).collect();
            if !rates.is_empty() {
                let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
                let max = rates.iter().copied().fold(0.0, f64::max);
                let total: f64 = rates.iter().sum();
                writeln!(
                    out,
                    "pacing        {rate} records/s per producer asked; per producer {min:.2}..{max:.2} records/s; \
                     all {total:.1} records/s of {:.1} asked ({:+.2} %)",
                    rate * rates.len() as f64,
                    100.0 * (total / (rate * rates.len() as f64) - 1.0)
                )?;
            }
        }
        Ok(())
    }
}

/// Why the report page could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// plotters could not draw a chart.
    #[error("cannot draw the {chart} chart: {message}")]
    Chart {
        /// The chart's id.
        chart: &'static str,
        /// plotters' error.
        message: String,
    },
    /// The file cannot be written.
    #[error("cannot write the report {path}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A line on a chart: its name, colour and points.
struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(name: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), color, points }
    }
}

/// One chart: id (the page's element id), title, what it shows, axes, lines, and a dashed line
/// at `limit`.
struct Chart<'a> {
    id: &'static str,
    title: &'a str,
    caption: &'a str,
    y_label: &'a str,
    x_end: f64,
    series: Vec<Series>,
    limit: Option<(f64, &'a str)>,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 340;

impl Chart<'_> {
    /// The chart as an `<svg>` element.
    fn svg(&self) -> Result<String, ReportError> {
        let fail = |e: &dyn std::fmt::Display| ReportError::Chart { chart: self.id, message: e.to_string() };
        let top = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(self.limit.map(|(y, _)| y))
            .fold(0.0f64, f64::max);
        let y_end = if top > 0.0 { top * 1.1 } else { 1.0 };
        let x_end = self.x_end.max(1.0);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| fail(&e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(self.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(0.0..x_end, 0.0..y_end)
                .map_err(|e| fail(&e))?;
            chart
                .configure_mesh()
                .x_desc("seconds since the start")
                .y_desc(self.y_label)
                .x_label_formatter(&|x| if x_end >= 10.0 { format!("{x:.0}") } else { format!("{x:.1}") })
                .y_label_formatter(&|y| if y_end >= 10.0 { format!("{y:.0}") } else { format!("{y:.1}") })
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| fail(&e))?;
            for series in &self.series {
                let color = series.color;
                chart
                    // Each point marked too: a run of a second or two still shows its figures.
                    .draw_series(
                        LineSeries::new(series.points.iter().copied(), color.filled().stroke_width(2)).point_size(2),
                    )
                    .map_err(|e| fail(&e))?
                    .label(series.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            if let Some((y, name)) = self.limit {
                let limit = RGBColor(120, 120, 120);
                chart
                    .draw_series(DashedLineSeries::new([(0.0, y), (x_end, y)], 6, 4, limit.stroke_width(1)))
                    .map_err(|e| fail(&e))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], limit));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(|e| fail(&e))?;
            root.present().map_err(|e| fail(&e))?;
        }
        Ok(svg)
    }
}

/// Colours told apart by most readers (Okabe and Ito's palette).
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

impl Report {
    /// The four charts, in page order.
    fn charts(&self) -> Vec<Chart<'static>> {
        let t = &self.timeline;
        let x_end = t.last_second() as f64;
        let rates = t.rates();
        let line = |pick: fn(&super::timeline::Rates) -> f64| rates.iter().map(|r| (r.at, pick(r))).collect::<Vec<_>>();
        let mut throughput = vec![
            Series::new("sent", COLORS[0], line(|r| r.sent)),
            Series::new("acknowledged", COLORS[1], line(|r| r.acknowledged)),
        ];
        if self.verified.is_some() {
            throughput.push(Series::new("received", COLORS[2], line(|r| r.received)));
        }
        let percentile = |pick: fn(&LatencySummary) -> f64| {
            t.latencies().map(|(second, l)| (second as f64 + 0.5, pick(l))).collect::<Vec<_>>()
        };
        let latency = vec![
            Series::new("p50", COLORS[0], percentile(|l| l.p50)),
            Series::new("p90", COLORS[1], percentile(|l| l.p90)),
            Series::new("p99", COLORS[5], percentile(|l| l.p99)),
            Series::new("max", COLORS[7], percentile(|l| l.max)),
        ];
        let shards = t
            .shards()
            .enumerate()
            .map(|(i, (shard, seconds))| {
                // Every second of the run, 0 where the shard took nothing.
                let points = (0..=t.last_second())
                    .map(|s| (s as f64 + 0.5, 100.0 * seconds.get(&s).map_or(0.0, |c| c.utilisation())))
                    .collect();
                Series::new(shard.trim_start_matches("shardId-"), COLORS[i % COLORS.len()], points)
            })
            .collect();
        let throttles = vec![
            Series::new("throttled (records and calls)", COLORS[5], line(|r| r.throttles)),
            Series::new("other errors", COLORS[0], line(|r| r.other_errors)),
        ];
        vec![
            Chart {
                id: "throughput",
                title: "Records per second",
                caption: "User records put (sent), acknowledged by Kinesis (the receipt resolved) and, with \
                          --verify, received by the consumer group for the first time; each point is the \
                          rate over the second before it.",
                y_label: "records/s",
                x_end,
                series: throughput,
                limit: None,
            },
            Chart {
                id: "latency",
                title: "Put -> acknowledged latency, per second acknowledged in",
                caption: "From put (a wait for buffer space included) to the receipt, of the records \
                          acknowledged in each second: median, 90th and 99th percentiles and the most.",
                y_label: "ms",
                x_end,
                series: latency,
                limit: None,
            },
            Chart {
                id: "shards",
                title: "Write limit used per shard",
                caption: "Per shard and second acknowledged in, the larger of Kinesis records / 1,000 and \
                          user-record bytes / 1 MiB: the share of the shard's write limit used (user bytes \
                          stand for the stored bytes: an aggregate adds a few, compression takes some away).",
                y_label: "% of the shard's limit",
                x_end,
                series: shards,
                limit: Some((100.0, "the limit")),
            },
            Chart {
                id: "throttles",
                title: "Throttles and errors per second",
                caption: "Records refused with ProvisionedThroughputExceeded and calls refused with \
                          ThrottlingException or LimitExceededException (each is retried until its time \
                          to live runs out), and every other error the producer counted.",
                y_label: "per second",
                x_end,
                series: throttles,
                limit: None,
            },
        ]
    }

    /// The report page: the summary and the four charts, self-contained (inline SVG and CSS).
    ///
    /// # Errors
    /// [`ReportError::Chart`] when plotters cannot draw a chart.
    pub fn html(&self) -> Result<String, ReportError> {
        let mut summary = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.print(&mut summary);
        let mut page = String::with_capacity(256 * 1024);
        let _ = write!(
            page,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>kinesis loadgen: {stream}</title>\n<style>\n\
             body {{ font-family: sans-serif; margin: 24px auto; max-width: 1000px; color: #222; }}\n\
             pre {{ background: #f6f6f6; padding: 12px; overflow-x: auto; font-size: 13px; }}\n\
             figure {{ margin: 24px 0; }} figcaption {{ font-size: 14px; color: #555; }}\n\
             svg {{ max-width: 100%; height: auto; }}\n</style>\n</head>\n<body>\n\
             <h1>kinesis loadgen: stream {stream}, {shards} shards</h1>\n<pre id=\"summary\">{summary}</pre>\n",
            stream = escape(&self.stream),
            shards = self.shards,
            summary = escape(&String::from_utf8_lossy(&summary)),
        );
        for chart in self.charts() {
            let _ = write!(
                page,
                "<figure id=\"{id}\">\n{svg}\n<figcaption>{caption}</figcaption>\n</figure>\n",
                id = chart.id,
                svg = chart.svg()?,
                caption = escape(chart.caption),
            );
        }
        page.push_str("</body>\n</html>\n");
        Ok(page)
    }

    /// Writes [`Report::html`] to `path`.
    ///
    /// # Errors
    /// [`ReportError`]: a chart that cannot be drawn, or the file that cannot be written.
    pub fn write_html(&self, path: &Path) -> Result<(), ReportError> {
        let page = self.html()?;
        std::fs::write(path, page).map_err(|source| ReportError::Write { path: path.to_owned(), source })
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::timeline::Totals;
    use super::*;

    fn report(timeline: Timeline) -> Report {
        Report {
            stream: "orders<&>".into(),
            shards: 2,
            sent: 3_000,
            acknowledged: 3_000,
            failed: 0,
            produce_secs: 3.0,
            kinesis_records: 30,
            kinesis_bytes: 300_000,
            user_bytes: 300_000,
            steady_bytes_per_sec: None,
            retries: 0,
            errors_by_code: BTreeMap::new(),
            per_producer: vec![(3_000, 3.0)],
            rate: None,
            verified: None,
            ack_latency: None,
            processed_latency: None,
            timeline,
        }
    }

    #[test]
    fn the_page_has_the_summary_and_four_charts_each_with_its_lines() {
        let mut timeline = Timeline::default();
        for s in 0..=3u64 {
            let n = s * 1_000;
            timeline.sample(Duration::from_secs(s), Totals { sent: n, acknowledged: n, ..Totals::default() });
        }
        for i in 0..3_000u64 {
            let shard = if i % 2 == 0 { "shardId-000000000000" } else { "shardId-000000000001" };
            timeline.acknowledged(
                Duration::from_millis(i),
                Duration::from_millis(20 + i % 50),
                shard,
                Some(i % 100),
                100,
            );
        }
        timeline.finish();
        let page = report(timeline).html().unwrap();
        assert!(page.starts_with("<!DOCTYPE html>") && page.ends_with("</html>\n"));
        // The stream name is escaped, in the title and in the summary.
        assert!(page.contains("stream orders&lt;&amp;&gt;, 2 shards") && !page.contains("orders<&>"));
        assert!(page.contains("<pre id=\"summary\">== loadgen summary"));
        let mut charts = Vec::new();
        for figure in page.split("<figure id=\"").skip(1) {
            let (id, rest) = figure.split_once('"').unwrap();
            let svg = &rest[..rest.find("</svg>").expect("an svg in each figure")];
            // plotters draws each line as a polyline; legend keys, axes, ticks and dashes have 2
            // points, a data line of 4 seconds more.
            let lines = svg
                .split("<polyline")
                .skip(1)
                .filter(|line| {
                    let points = line.split("points=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or("");
                    points.split_whitespace().count() >= 3
                })
                .count();
            charts.push((id.to_owned(), lines));
        }
        let ids: Vec<_> = charts.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["throughput", "latency", "shards", "throttles"]);
        // sent + acknowledged (no --verify: no received); p50, p90, p99, max; two shards;
        // throttles + other errors.
        for ((id, lines), want) in charts.iter().zip([2, 4, 2, 2]) {
            assert_eq!(*lines, want, "{id}: data lines");
        }
        assert!(page.contains("000000000001"), "the second shard in the legend");
    }
}
