//! `--local` and `kinesis local`: the embedded emulators (ferrokinesis for Kinesis, dynoxide for
//! DynamoDB) on 127.0.0.1, in this process.
//!
//! The Kinesis emulator enforces the per-shard write limits (1,000 records/s and 1 MiB/s per
//! shard) unless `--no-throttle` is given, so that a run behaves like a real stream.

use kinesis_testkit::{DynamoDb, Kinesis, KinesisOptions};

use crate::loadgen::Clients;

/// Both emulators, running while this value lives.
#[derive(Debug)]
pub struct Emulators {
    kinesis: Kinesis,
    dynamodb: DynamoDb,
}

impl Emulators {
    /// Starts both, whatever `AWS_ENDPOINT_URL_*` say; the Kinesis one with the per-shard write
    /// limits when `throttle` is set.
    ///
    /// # Errors
    /// When either server cannot start.
    pub async fn start(throttle: bool) -> Result<Self, kinesis_testkit::Error> {
        let options = KinesisOptions { enforce_limits: throttle, ..KinesisOptions::default() };
        Ok(Self { kinesis: Kinesis::embedded(options).await?, dynamodb: DynamoDb::embedded().await? })
    }

    /// Clients for both, with the emulators' dummy credentials.
    pub fn clients(&self) -> Clients {
        Clients { kinesis: self.kinesis.client(), dynamodb: self.dynamodb.client() }
    }

    /// The shell lines that point the AWS SDKs and CLIs at these emulators.
    pub fn exports(&self) -> String {
        format!(
            "export AWS_ENDPOINT_URL_KINESIS={}\nexport AWS_ENDPOINT_URL_DYNAMODB={}\n\
             export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1\n",
            self.kinesis.endpoint_url(),
            self.dynamodb.endpoint_url()
        )
    }
}
