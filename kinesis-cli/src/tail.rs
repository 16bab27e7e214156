//! `kinesis tail`: reads a stream's shards from a point (a time such as `10m ago`, a sequence
//! number, the oldest or the newest record), deaggregates (filtered to each shard's hash range),
//! filters, and prints one JSON line per user record; and `kinesis shard-for`, the shard a
//! partition key lands on.

use std::io::Write;
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use base64::Engine as _;
use clap::Args;
use kinesis_aggregation::Deaggregator;
use kinesis_core::StreamAddress;
use serde::Serialize;

use crate::stream::{StreamError, kinesis};

/// Where `kinesis tail` starts.
#[derive(Clone, Debug, PartialEq)]
pub enum From {
    /// Only records written from now on.
    Latest,
    /// The oldest records.
    TrimHorizon,
    /// The first record at or after a time (seconds since the epoch).
    Timestamp(f64),
    /// At a sequence number (in every shard that holds it; others from their oldest).
    At(String),
    /// After a sequence number.
    After(String),
}

/// A time on the command line: `10m ago` (any `humantime` duration, then `ago`), an RFC 3339
/// time (`2026-11-30T12:00:00Z`), or `timestamp SECONDS` (since the epoch). Returns seconds since
/// the epoch.
fn parse_time(text: &str, now: SystemTime) -> Option<f64> {
    let epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
    if let Some(ago) = text.strip_suffix(" ago") {
        return humantime::parse_duration(ago.trim()).ok().and_then(|d| now.checked_sub(d)).and_then(epoch);
    }
    if let Some(seconds) = text.strip_prefix("timestamp").map(|t| t.trim_start_matches([' ', '='])) {
        return seconds.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0);
    }
    humantime::parse_rfc3339_weak(text).ok().and_then(epoch)
}

const TIME_FORMS: &str = "\"10m ago\", an RFC 3339 time (2026-11-30T12:00:00Z) or \"timestamp SECONDS\"";

fn parse_from(text: &str) -> Result<From, String> {
    let (kind, value) = text.split_once(' ').or_else(|| text.split_once('=')).unwrap_or((text, ""));
    match (kind, value.trim()) {
        ("latest", "") => return Ok(From::Latest),
        ("trim-horizon", "") => return Ok(From::TrimHorizon),
        ("at", s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => return Ok(From::At(s.to_owned())),
        ("after", s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            return Ok(From::After(s.to_owned()));
        }
        _ => {}
    }
    parse_time(text, SystemTime::now()).map(From::Timestamp).ok_or_else(|| {
        format!("{text:?}: use latest, trim-horizon, {TIME_FORMS}, \"at SEQUENCE\" or \"after SEQUENCE\"")
    })
}

fn parse_to(text: &str) -> Result<f64, String> {
    parse_time(text, SystemTime::now()).ok_or_else(|| format!("{text:?}: use {TIME_FORMS}"))
}

/// `kinesis tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The stream's name, or its ARN (another account's stream: every call then carries
    /// `StreamARN`).
    pub stream: StreamAddress,
    /// Where to start: latest, trim-horizon, a time ("10m ago", "2026-11-30T12:00:00Z",
    /// "timestamp SECONDS"), "at SEQUENCE" or "after SEQUENCE".
    #[arg(long, default_value = "latest", value_parser = parse_from)]
    pub from: From,
    /// Stop at the first record that arrived after this time (the forms of --from's times); a
    /// shard is done once it is read past it, or up to its newest record when the time has passed.
    #[arg(long, value_parser = parse_to)]
    pub to: Option<f64>,
    /// Print only user records whose data (as text, invalid UTF-8 replaced) matches this regular
    /// expression.
    #[arg(long)]
    pub grep: Option<regex::Regex>,
    /// Print each record as indented JSON, its data as JSON when it is JSON.
    #[arg(long)]
    pub pretty: bool,
    /// Read this shard only.
    #[arg(long)]
    pub shard: Option<String>,
    /// Stop after this many user records (printed ones).
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Stop when no record came for this many seconds.
    #[arg(long)]
    pub idle_exit: Option<f64>,
}

#[derive(Serialize)]
struct RecordLine<'a> {
    shard_id: &'a str,
    sequence_number: &'a str,
    sub_sequence_number: Option<u64>,
    partition_key: &'a str,
    explicit_hash_key: Option<&'a str>,
    /// When Kinesis received the Kinesis record, seconds since the epoch.
    approximate_arrival: Option<f64>,
    /// The data as text when it is UTF-8, else absent.
    data: Option<&'a str>,
    data_b64: String,
}

/// Runs `kinesis tail`: reads the stream's shards (open ones only from `latest`; one with
/// `--shard`) from `--from`, deaggregates (filtered to the shard's hash range), and prints one
/// JSON line per user record that `--grep` keeps, until a stop condition (`--to`, `--max-records`,
/// `--idle-exit`, or every shard read to its end).
///
/// # Errors
/// [`StreamError`] when a call fails, or `--shard` names no shard of the stream.
pub async fn run_tail(
    client: &aws_sdk_kinesis::Client,
    args: TailArgs,
    out: &mut dyn Write,
) -> Result<(), StreamError> {
    struct Reader {
        shard_id: String,
        iterator: Option<String>,
        deaggregator: Deaggregator,
    }
    let all = kinesis_core::list_shards(client, &args.stream).await.map_err(kinesis("ListShards"))?;
    if let Some(wanted) = &args.shard
        && !all.iter().any(|s| &s.shard_id == wanted)
    {
        return Err(StreamError::BadArgument(format!("{wanted}: no such shard in {}", args.stream)));
    }
    let chosen = all.into_iter().filter(|s| args.shard.as_ref().is_none_or(|w| &s.shard_id == w));
    let mut readers = Vec::new();
    for shard in chosen.filter(|s| s.open || args.from != From::Latest || args.shard.is_some()) {
        let (stream_name, stream_arn) = args.stream.request_fields();
        let request = client
            .get_shard_iterator()
            .set_stream_name(stream_name.clone())
            .set_stream_arn(stream_arn.clone())
            .shard_id(&shard.shard_id);
        let request = match &args.from {
            From::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            From::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            From::Timestamp(t) => {
                request.shard_iterator_type(ShardIteratorType::AtTimestamp).timestamp(DateTime::from_secs_f64(*t))
            }
            From::At(seq) => {
                request.shard_iterator_type(ShardIteratorType::AtSequenceNumber).starting_sequence_number(seq)
            }
            From::After(seq) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(seq)
            }
        };
        let iterator = match request.send().await {
            Ok(out) => out.shard_iterator().map(str::to_owned),
            // A sequence number belongs to one shard: the others start at their oldest record.
            Err(_) if matches!(args.from, From::At(_) | From::After(_)) => client
                .get_shard_iterator()
                .set_stream_name(stream_name)
                .set_stream_arn(stream_arn)
                .shard_id(&shard.shard_id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .map_err(kinesis("GetShardIterator"))?
                .shard_iterator()
                .map(str::to_owned),
            Err(e) => return Err(kinesis("GetShardIterator")(e)),
        };
        let deaggregator = Deaggregator::with_hash_range(shard.hash_range);
        readers.push(Reader { shard_id: shard.shard_id, iterator, deaggregator });
    }
    let mut printed = 0u64;
    let mut last_record = tokio::time::Instant::now();
    loop {
        let mut any = false;
        for reader in &mut readers {
            let Some(iterator) = reader.iterator.take() else { continue };
            let page = client
                .get_records()
                .set_stream_arn(args.stream.arn().map(|a| a.as_str().to_owned()))
                .shard_iterator(iterator)
                .send()
                .await
                .map_err(kinesis("GetRecords"))?;
            reader.iterator = page.next_shard_iterator().map(str::to_owned);
            let passed = |to: f64| {
                to < SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
            };
            // Caught up with a `--to` in the past: nothing later can be before it.
            if page.records().is_empty() && page.millis_behind_latest() == Some(0) && args.to.is_some_and(passed) {
                reader.iterator = None;
            }
            for record in page.records() {
                any = true;
                let arrival = record.approximate_arrival_timestamp().map(|t| t.as_secs_f64());
                if let (Some(to), Some(arrival)) = (args.to, arrival)
                    && arrival > to
                {
                    reader.iterator = None;
                    break;
                }
                let data = bytes::Bytes::copy_from_slice(record.data().as_ref());
                for user in reader.deaggregator.deaggregate(record.partition_key(), data).records {
                    if let Some(grep) = &args.grep
                        && !grep.is_match(&String::from_utf8_lossy(user.data()))
                    {
                        continue;
                    }
                    let line = RecordLine {
                        shard_id: &reader.shard_id,
                        sequence_number: record.sequence_number(),
                        sub_sequence_number: user.sub_sequence_number(),
                        partition_key: user.partition_key(),
                        explicit_hash_key: user.explicit_hash_key(),
                        approximate_arrival: arrival,
                        data: std::str::from_utf8(user.data()).ok(),
                        data_b64: base64::engine::general_purpose::STANDARD.encode(user.data()),
                    };
                    write_line(out, &line, args.pretty)?;
                    printed += 1;
                    if args.max_records.is_some_and(|max| printed >= max) {
                        out.flush()?;
                        return Ok(());
                    }
                }
            }
        }
        out.flush()?;
        if any {
            last_record = tokio::time::Instant::now();
        } else if args.idle_exit.is_some_and(|secs| last_record.elapsed().as_secs_f64() >= secs)
            || readers.iter().all(|r| r.iterator.is_none())
        {
            return Ok(());
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One record: a JSON line, or with `pretty` indented JSON whose `data` is the JSON value the
/// data holds, when it holds one.
fn write_line(out: &mut dyn Write, line: &RecordLine<'_>, pretty: bool) -> std::io::Result<()> {
    if !pretty {
        return writeln!(out, "{}", serde_json::to_string(line).unwrap_or_default());
    }
    let mut value = serde_json::to_value(line).unwrap_or_default();
    if let Some(parsed) = line.data.and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok()) {
        value["data"] = parsed;
    }
    writeln!(out, "{}", serde_json::to_string_pretty(&value).unwrap_or_default())
}

/// `kinesis shard-for`.
#[derive(Debug, Args)]
pub struct ShardForArgs {
    /// The partition key.
    pub partition_key: String,
    /// The stream (name or ARN) whose open shard for the key to find; without it, only the hash
    /// key is printed.
    #[arg(long)]
    pub stream: Option<StreamAddress>,
}

/// Runs `kinesis shard-for`: the key's hash key (MD5 of its UTF-8 bytes, as a 128-bit number: how
/// Kinesis routes a record) and, with `--stream`, the open shard whose hash-key range holds it.
///
/// # Errors
/// [`StreamError`] when ListShards fails, or the stream has no open shard for the key.
pub async fn run_shard_for(
    client: &aws_sdk_kinesis::Client,
    args: ShardForArgs,
    out: &mut dyn Write,
) -> Result<(), StreamError> {
    let hash_key = kinesis_aggregation::hash_key(&args.partition_key);
    let mut line = serde_json::json!({ "partition_key": args.partition_key, "hash_key": hash_key.to_string() });
    if let Some(stream) = &args.stream {
        let shards = kinesis_core::list_shards(client, stream).await.map_err(kinesis("ListShards"))?;
        let shard = shards
            .iter()
            .find(|s| s.open && s.hash_range.contains(hash_key))
            .ok_or_else(|| StreamError::BadArgument(format!("{stream} has no open shard for hash key {hash_key}")))?;
        line["shard_id"] = shard.shard_id.clone().into();
        line["starting_hash_key"] = shard.hash_range.start.to_string().into();
        line["ending_hash_key"] = shard.hash_range.end.to_string().into();
    }
    writeln!(out, "{line}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_ago_rfc3339_or_seconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time("10m ago", now), Some(1_800_000_000.0 - 600.0));
        assert_eq!(parse_time("1h 30m ago", now), Some(1_800_000_000.0 - 5_400.0));
        assert_eq!(parse_time("2026-11-30T12:00:00Z", now), Some(1_796_040_000.0));
        assert_eq!(parse_time("timestamp 1700000000.5", now), Some(1_700_000_000.5));
        for bad in ["10 parsecs ago", "yesterday", "timestamp x", "2026-13-01T00:00:00Z"] {
            assert_eq!(parse_time(bad, now), None, "{bad}");
        }
        assert!(matches!(parse_from("5s ago"), Ok(From::Timestamp(_))));
        assert_eq!(parse_from("at 123"), Ok(From::At("123".into())));
        assert!(parse_from("at x").unwrap_err().contains("10m ago"));
    }
}
