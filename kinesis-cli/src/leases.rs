//! `kinesis leases APP`: who holds which shard of a consumer application, where its checkpoint is
//! and how far behind the shard's newest record that is; read from the application's lease table,
//! ours or the Java KCL's (2.x or 3.x schema, single- or multi-stream).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::types::ShardIteratorType;
use clap::Args;
use kinesis_consumer::{Lease, LeaseTable, Position, StreamAddress, StreamIdentifier};
use serde::Serialize;

use crate::stream::StreamError;

/// `kinesis leases`.
#[derive(Debug, Args)]
pub struct LeasesArgs {
    /// The application: its lease table's name.
    pub application: String,
    /// The stream (name or ARN) of a single-stream application, to tell how far behind each
    /// checkpoint is (a multi-stream table names its streams; without either, that is left out).
    #[arg(long)]
    pub stream: Option<StreamAddress>,
    /// Print again every this many seconds, until Ctrl-C.
    #[arg(long, num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// JSON lines (one per lease, then one per worker) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The most GetRecords pages (10,000 records each) read per shard to count the records after
    /// its checkpoint; past them the count is a lower bound (`>N`).
    #[arg(long, default_value_t = 3)]
    pub max_pages: u32,
}

/// One lease, as printed.
#[derive(Debug, Serialize)]
struct LeaseRow {
    /// The stream: the name of a multi-stream lease's stream, else `--stream`'s.
    stream: Option<String>,
    shard_id: String,
    owner: Option<String>,
    /// The checkpoint (`TRIM_HORIZON`, `LATEST`, `SHARD_END`, or a sequence number) and, inside
    /// an aggregate, `/sub-sequence`.
    checkpoint: String,
    /// Kinesis records after the checkpoint (a lower bound when `behind_records_more`).
    behind_records: Option<u64>,
    behind_records_more: bool,
    /// How long the oldest record after the checkpoint has been in the stream, in milliseconds.
    behind_ms: Option<u64>,
    /// KCL 3.x graceful handoff under way: the owner still processing (`checkpointOwner`).
    handing_off_from: Option<String>,
    parents: Vec<String>,
    counter: u64,
}

/// How far behind a checkpoint is.
#[derive(Debug, Default, PartialEq, Eq)]
struct Behind {
    records: Option<u64>,
    more: bool,
    millis: Option<u64>,
}

/// Runs `kinesis leases`: one row per lease, then the lease count per worker; with `--watch`, again
/// every so many seconds until Ctrl-C.
///
/// # Errors
/// [`StreamError`] when the table cannot be read (a Kinesis call that fails leaves that row's
/// "behind" empty instead).
pub async fn run_leases(
    kinesis: &aws_sdk_kinesis::Client,
    dynamodb: &aws_sdk_dynamodb::Client,
    args: LeasesArgs,
    out: &mut dyn Write,
) -> Result<(), StreamError> {
    let table = LeaseTable::new(dynamodb.clone(), args.application.clone());
    loop {
        let mut leases = table
            .list()
            .await
            .map_err(|e| StreamError::Kinesis { operation: "Scan (lease table)", source: Box::new(e) })?;
        leases.sort_by(|a, b| (&a.stream_identifier, a.shard()).cmp(&(&b.stream_identifier, b.shard())));
        let mut rows = Vec::with_capacity(leases.len());
        for lease in &leases {
            rows.push(row(kinesis, lease, args.stream.as_ref(), args.max_pages).await);
        }
        if args.watch.is_some() && !args.json {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        print(out, &args.application, &rows, args.json)?;
        out.flush()?;
        let Some(every) = args.watch else { return Ok(()) };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs_f64(every.max(0.5))) => {}
        }
    }
}

async fn row(kinesis: &aws_sdk_kinesis::Client, lease: &Lease, stream: Option<&StreamAddress>, pages: u32) -> LeaseRow {
    // A multi-stream lease names its stream; the caller's account is assumed (by name).
    let address = match &lease.stream_identifier {
        Some(id) => StreamIdentifier::parse(id).ok().and_then(|id| StreamAddress::parse(id.stream_name()).ok()),
        None => stream.cloned(),
    };
    let behind = match &address {
        Some(address) => behind(kinesis, address, lease.shard(), &lease.checkpoint.position, pages).await,
        None => Behind::default(),
    };
    let position = lease.checkpoint.position.as_str();
    let checkpoint = match lease.checkpoint.sub_sequence {
        0 => position.to_owned(),
        sub => format!("{position}/{sub}"),
    };
    LeaseRow {
        stream: address.map(|a| a.name().to_owned()),
        shard_id: lease.shard().to_owned(),
        owner: lease.owner.clone(),
        checkpoint,
        behind_records: behind.records,
        behind_records_more: behind.more,
        behind_ms: behind.millis,
        handing_off_from: lease.checkpoint_owner.clone(),
        parents: lease.parent_shard_ids.clone(),
        counter: lease.counter,
    }
}

/// Reads the shard after `position` (at most `pages` pages) to count the Kinesis records there
/// and the age of the oldest. `None`s where it cannot be known (AT_TIMESTAMP: the time is the
/// application's; a call that failed).
async fn behind(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamAddress,
    shard_id: &str,
    position: &Position,
    pages: u32,
) -> Behind {
    let (name, arn) = stream.request_fields();
    let request = client.get_shard_iterator().set_stream_name(name).set_stream_arn(arn).shard_id(shard_id);
    let request = match position {
        Position::ShardEnd | Position::Latest => return Behind { records: Some(0), more: false, millis: Some(0) },
        Position::AtTimestamp => return Behind::default(),
        Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Position::Sequence(sequence) => {
            request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(sequence)
        }
    };
    let Ok(Some(mut iterator)) = request.send().await.map(|o| o.shard_iterator().map(str::to_owned)) else {
        return Behind::default();
    };
    let (mut records, mut oldest) = (0u64, None);
    for _ in 0..pages {
        let Ok(page) = client
            .get_records()
            .set_stream_arn(stream.arn().map(|a| a.as_str().to_owned()))
            .shard_iterator(&iterator)
            .send()
            .await
        else {
            return Behind::default();
        };
        if oldest.is_none() {
            oldest = page.records().first().and_then(|r| r.approximate_arrival_timestamp()).map(|t| t.as_secs_f64());
        }
        records += page.records().len() as u64;
        let caught_up = page.records().is_empty() && page.millis_behind_latest().is_none_or(|m| m == 0);
        match page.next_shard_iterator() {
            Some(next) if !caught_up => iterator = next.to_owned(),
            _ => {
                let millis = oldest.map_or(0, age_ms);
                return Behind { records: Some(records), more: false, millis: Some(millis) };
            }
        }
    }
    Behind { records: Some(records), more: true, millis: oldest.map(age_ms) }
}

fn age_ms(arrival_secs: f64) -> u64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    ((now - arrival_secs).max(0.0) * 1000.0) as u64
}

/// The rows as a table or JSON lines, then the lease count per worker (`(none)`: free leases).
fn print(out: &mut dyn Write, application: &str, rows: &[LeaseRow], json: bool) -> std::io::Result<()> {
    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        *per_worker.entry(row.owner.as_deref().unwrap_or("(none)")).or_default() += 1;
    }
    if json {
        for row in rows {
            writeln!(out, "{}", serde_json::to_string(row).unwrap_or_default())?;
        }
        for (worker, leases) in &per_worker {
            writeln!(out, "{}", serde_json::json!({ "worker": worker, "leases": leases }))?;
        }
        return Ok(());
    }
    writeln!(out, "{application}: {} leases", rows.len())?;
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let table: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let records = match (r.behind_records, r.behind_records_more) {
                (Some(n), true) => format!(">{n}"),
                (Some(n), false) => n.to_string(),
                (None, _) => "-".into(),
            };
            let age = r
                .behind_ms
                .map_or_else(|| "-".into(), |ms| humantime::format_duration(Duration::from_millis(ms)).to_string());
            [
                text(&r.stream),
                r.shard_id.clone(),
                text(&r.owner),
                r.checkpoint.clone(),
                records,
                age,
                text(&r.handing_off_from),
                r.parents.join(","),
            ]
        })
        .collect();
    let header =
        ["stream", "shard", "owner", "checkpoint", "behind (records)", "behind (time)", "handing off from", "parents"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &table {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    writeln!(out)?;
    for (worker, leases) in &per_worker {
        writeln!(out, "{worker}: {leases} leases")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_has_a_row_per_lease_and_a_count_per_worker() {
        let row = |shard: &str, owner: Option<&str>, records: Option<u64>, more: bool| LeaseRow {
            stream: Some("orders".into()),
            shard_id: shard.into(),
            owner: owner.map(str::to_owned),
            checkpoint: "49590338271490256608559692538361571095921575989136588898/3".into(),
            behind_records: records,
            behind_records_more: more,
            behind_ms: records.map(|_| 1_500),
            handing_off_from: None,
            parents: vec![],
            counter: 7,
        };
        let rows = [
            row("shardId-000000000000", Some("w1"), Some(12), false),
            row("shardId-000000000001", Some("w1"), Some(30_000), true),
            row("shardId-000000000002", None, None, false),
        ];
        let mut out = Vec::new();
        print(&mut out, "app", &rows, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(">30000") && text.contains("1s 500ms"), "{text}");
        assert!(text.contains("w1: 2 leases") && text.contains("(none): 1 leases"), "{text}");
        let mut out = Vec::new();
        print(&mut out, "app", &rows, true).unwrap();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["behind_records"], 12);
        assert_eq!(lines[3], serde_json::json!({ "worker": "(none)", "leases": 1 }));
    }
}
