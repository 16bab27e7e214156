//! An AWS Lambda function for a Kinesis trigger that reads the user records of KPL-aggregated
//! (and this library's) Kinesis records, and reports the first one it cannot process as a partial
//! batch failure, so that Lambda retries from there and not the whole batch.
//!
//! Build it for Lambda with `cargo lambda build --release --example lambda_deaggregate` (or any
//! `provided.al2023` build of this binary; in your own crate, `kinesis-aggregation` with the
//! feature `lambda`, `lambda_runtime` and `tokio`), and give the event source mapping
//! `FunctionResponseTypes: ["ReportBatchItemFailures"]`. `tests/lambda.rs` runs its handler
//! in-process on the sample event of the AWS documentation and on records our producer wrote.

use kinesis::aggregation::lambda::{
    KinesisEvent, KinesisEventResponse, LambdaUserRecord, failure_response, user_records,
};
use lambda_runtime::{Error, LambdaEvent, service_fn};

/// The function: each user record to [`process`]; the first failure ends the batch.
pub async fn handler(event: LambdaEvent<KinesisEvent>) -> Result<KinesisEventResponse, Error> {
    Ok(handle(&event.payload, process))
}

/// Hands each user record of `event` to `process`, in order; at the first error, the partial
/// batch response naming that record (Lambda then retries from its Kinesis record on: the user
/// records before it in the same aggregate come again).
pub fn handle<E: std::fmt::Display>(
    event: &KinesisEvent,
    mut process: impl FnMut(&LambdaUserRecord) -> Result<(), E>,
) -> KinesisEventResponse {
    for record in user_records(event) {
        if let Err(error) = process(&record) {
            eprintln!("record {}/{} failed: {error}", record.sequence_number, record.sub_sequence_number);
            return failure_response(Some(&record));
        }
    }
    failure_response(None)
}

/// This example's work: print the record; data that is not UTF-8 fails (a stand-in for a real
/// failure).
pub fn process(record: &LambdaUserRecord) -> Result<(), std::str::Utf8Error> {
    let text = std::str::from_utf8(&record.data)?;
    println!(
        "{} {}/{} {}: {text}",
        record.partition_key,
        record.sequence_number,
        record.sub_sequence_number,
        if record.aggregated { "aggregated" } else { "plain" }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
