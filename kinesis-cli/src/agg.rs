//! `kinesis-agg`: aggregate JSON-lines user records into KPL records, and decode KPL records.
//!
//! ```text
//! kinesis-agg encode [--max-size N] < records.jsonl     one Kinesis record per output line
//! kinesis-agg decode [--partition-key PK] FILE|-        the user records, as a JSON array
//! ```
//!
//! Input lines of `encode`: `{"partition_key": "...", "explicit_hash_key": "..." (optional),
//! "data_b64": "..."}`. Output lines: `{"partition_key": "a", "explicit_hash_key": "...",
//! "data_b64": "..."}`. `decode` prints `[{"partition_key", "explicit_hash_key", "data_b64",
//! "sub_sequence_number", "aggregated"}]`, the shape of the shared vectors' `expected_deagg_kcl.json`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use clap::{Args, Subcommand};
use kinesis_aggregation::{
    Aggregator, AggregatorConfig, HashKey, InvalidHashKey, Outcome, PushError, TryPush, UserRecord, deaggregate, limits,
};
use serde::{Deserialize, Serialize};

/// The `encode` and `decode` commands.
#[derive(Debug, Subcommand)]
pub enum AggCommand {
    /// Aggregate JSON-lines user records from stdin into KPL records, one JSON line each.
    Encode(EncodeArgs),
    /// Print the user records of one Kinesis record's data (raw bytes) as a JSON array.
    Decode(DecodeArgs),
}

/// Arguments of `encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// The largest aggregate (magic + protobuf + MD5) in bytes; at most 10 MiB.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_AGGREGATE_BYTES)]
    pub max_size: usize,
}

/// Arguments of `decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The file holding the record's data, or `-` for stdin.
    pub file: PathBuf,
    /// The Kinesis record's partition key, given to a record that is not an aggregate.
    #[arg(long)]
    pub partition_key: Option<String>,
}

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggError {
    /// Reading the input or writing the output failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// An input line is not a valid record.
    #[error("line {line}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        #[source]
        cause: LineError,
    },
    /// An argument is out of range.
    #[error("{0}")]
    BadArgument(String),
}

/// What is wrong with one input line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// Not the expected JSON object.
    #[error("not a JSON record {{\"partition_key\", \"explicit_hash_key\"?, \"data_b64\"}}")]
    Json(#[source] serde_json::Error),
    /// `data_b64` is not base64.
    #[error("data_b64 is not valid base64")]
    Base64(#[source] base64::DecodeError),
    /// The explicit hash key is not a decimal in range.
    #[error("bad explicit_hash_key")]
    ExplicitHashKey(#[source] InvalidHashKey),
    /// The aggregator refused the record.
    #[error("record refused")]
    Refused(#[source] PushError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRecord {
    partition_key: String,
    #[serde(default)]
    explicit_hash_key: Option<String>,
    data_b64: String,
}

#[derive(Serialize)]
struct OutputRecord<'a> {
    partition_key: &'a str,
    explicit_hash_key: Option<String>,
    data_b64: String,
}

#[derive(Serialize)]
struct DecodedRecord<'a> {
    partition_key: Option<&'a str>,
    explicit_hash_key: Option<&'a str>,
    data_b64: String,
    sub_sequence_number: Option<u64>,
    aggregated: bool,
}

/// Runs one command. `stdin` feeds `encode` and `decode -`; `notes` gets human-readable remarks.
///
/// # Errors
/// [`AggError`] on unreadable input, a bad line (with its number) or a bad argument.
pub fn run(
    command: AggCommand,
    stdin: &mut dyn BufRead,
    stdout: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), AggError> {
    match command {
        AggCommand::Encode(args) => encode(&args, stdin, stdout),
        AggCommand::Decode(args) => decode(&args, stdin, stdout, notes),
    }
}

fn encode(args: &EncodeArgs, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<(), AggError> {
    let smallest = limits::FRAMING_LEN + 6;
    if !(smallest..=limits::MAX_CONFIGURABLE_RECORD_BYTES).contains(&args.max_size) {
        return Err(AggError::BadArgument(format!(
            "--max-size {} is out of range: use {smallest} to {} bytes",
            args.max_size,
            limits::MAX_CONFIGURABLE_RECORD_BYTES
        )));
    }
    let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(args.max_size));
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let bad = |cause| AggError::BadLine { line: number, cause };
        let mut record = parse_line(&line).map_err(bad)?;
        loop {
            match agg.try_push(record).map_err(|e| bad(LineError::Refused(e)))? {
                TryPush::Added => break,
                TryPush::NoCapacity(back) => {
                    write_aggregate(&mut agg, out)?;
                    record = back;
                }
            }
        }
    }
    write_aggregate(&mut agg, out)?;
    out.flush()?;
    Ok(())
}

fn parse_line(line: &[u8]) -> Result<UserRecord, LineError> {
    let input: InputRecord = serde_json::from_slice(line).map_err(LineError::Json)?;
    let data = B64.decode(input.data_b64.as_bytes()).map_err(LineError::Base64)?;
    let mut record = UserRecord::new(input.partition_key, data);
    if let Some(text) = input.explicit_hash_key {
        record = record.with_explicit_hash_key(HashKey::parse(&text).map_err(LineError::ExplicitHashKey)?);
    }
    Ok(record)
}

fn write_aggregate(agg: &mut Aggregator, out: &mut dyn Write) -> Result<(), AggError> {
    if let Some(record) = agg.finish() {
        let line = OutputRecord {
            partition_key: &record.partition_key,
            explicit_hash_key: record.explicit_hash_key.map(|k| k.to_string()),
            data_b64: B64.encode(&record.data),
        };
        serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn decode(
    args: &DecodeArgs,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), AggError> {
    let mut data = Vec::new();
    if args.file.as_os_str() == "-" {
        stdin.read_to_end(&mut data)?;
    } else {
        data = std::fs::read(&args.file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", args.file.display())))?;
    }
    let outer_key = args.partition_key.as_deref();
    let result = deaggregate(outer_key.unwrap_or_default(), Bytes::from(data));
    if let Outcome::Corrupt(why) = result.outcome {
        writeln!(
            notes,
            "note: the data starts with the KPL magic but is not a valid aggregate ({why:?}); passed through whole"
        )?;
    }
    let records: Vec<DecodedRecord> = result
        .records
        .iter()
        .map(|r| DecodedRecord {
            partition_key: if r.is_aggregated() { Some(r.partition_key()) } else { outer_key },
            explicit_hash_key: r.explicit_hash_key(),
            data_b64: B64.encode(r.data()),
            sub_sequence_number: r.sub_sequence_number(),
            aggregated: r.is_aggregated(),
        })
        .collect();
    serde_json::to_writer_pretty(&mut *out, &records).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_lines(input: &str, max_size: usize) -> Result<Vec<serde_json::Value>, AggError> {
        let mut out = Vec::new();
        encode(&EncodeArgs { max_size }, &mut input.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
    }

    #[test]
    fn encode_starts_a_new_aggregate_when_the_next_record_does_not_fit() {
        let line = format!("{{\"partition_key\":\"k\",\"data_b64\":\"{}\"}}\n", B64.encode([1u8; 30]));
        let input = line.repeat(10);
        let out = encode_lines(&input, 120).unwrap();
        assert!(out.len() > 1);
        let mut total = 0;
        for record in &out {
            assert_eq!(record["partition_key"], "a");
            let data = B64.decode(record["data_b64"].as_str().unwrap()).unwrap();
            assert!(data.len() <= 120);
            total += deaggregate("a", Bytes::from(data)).records.len();
        }
        assert_eq!(total, 10);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let cases = [
            ("{\"partition_key\":\"k\",\"data_b64\":\"AA==\"}\nnot json\n", 2, "not a JSON record"),
            ("{\"partition_key\":\"k\",\"data_b64\":\"%%%\"}\n", 1, "base64"),
            ("\n{\"partition_key\":\"\",\"data_b64\":\"\"}\n", 2, "empty"),
            ("{\"partition_key\":\"k\",\"explicit_hash_key\":\"-5\",\"data_b64\":\"\"}\n", 1, "explicit_hash_key"),
            ("{\"partition_key\":\"k\",\"data_b64\":\"\",\"extra\":1}\n", 1, "not a JSON record"),
        ];
        for (input, line, words) in cases {
            let err = encode_lines(input, 51_200).unwrap_err();
            assert!(matches!(err, AggError::BadLine { line: l, .. } if l == line), "{input:?}: {err:?}");
            let text = crate::one_line(&err);
            assert!(text.contains(words), "{input:?}: {text}");
        }
        let too_big = format!("{{\"partition_key\":\"k\",\"data_b64\":\"{}\"}}", B64.encode([0u8; 200]));
        let text = crate::one_line(&encode_lines(&too_big, 100).unwrap_err());
        assert!(text.contains("over the maximum of 100"), "{text}");
        assert!(matches!(encode_lines("", 5), Err(AggError::BadArgument(_))));
    }
}
