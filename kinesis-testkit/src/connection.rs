//! Where an emulator (or a real account) is, and how to sign requests for it.

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::{BehaviorVersion, Region};

/// The region used for the local servers, and for environment endpoints when none is configured.
pub(crate) const DEFAULT_REGION: &str = "us-east-1";

/// Where the endpoint of a [`Kinesis`](crate::Kinesis) or [`DynamoDb`](crate::DynamoDb) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// A server embedded in this process (ferrokinesis or dynoxide).
    Embedded,
    /// `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB`: kinesis-local, another emulator
    /// or a real account.
    Environment,
    /// A kinesis-local process started by [`KinesisLocal`](crate::KinesisLocal).
    KinesisLocal,
    /// A local server whose URL the caller gave ([`Kinesis::connect`](crate::Kinesis::connect)),
    /// e.g. one this test bed started in another process.
    Given,
}

/// Endpoint, region and credentials: all an SDK client needs.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) endpoint_url: String,
    pub(crate) origin: Origin,
    pub(crate) region: Region,
    pub(crate) credentials: SharedCredentialsProvider,
}

impl Connection {
    /// A local server: dummy static credentials, `us-east-1`.
    pub(crate) fn local(endpoint_url: String, origin: Origin) -> Self {
        Self { endpoint_url, origin, region: Region::new(DEFAULT_REGION), credentials: dummy_credentials() }
    }

    /// An endpoint named by the environment: region and credentials from aws-config's default
    /// chains, falling back to `us-east-1` and dummy credentials when none are configured.
    pub(crate) async fn from_environment(endpoint_url: String) -> Self {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let region = sdk.region().cloned().unwrap_or_else(|| Region::new(DEFAULT_REGION));
        let credentials = match sdk.credentials_provider() {
            Some(provider) if provider.provide_credentials().await.is_ok() => provider,
            _ => dummy_credentials(),
        };
        Self { endpoint_url, origin: Origin::Environment, region, credentials }
    }

    /// One SDK configuration for every service client: endpoint, region, credentials, retries.
    fn sdk_config(&self, retries: bool) -> aws_config::SdkConfig {
        let mut builder = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(self.region.clone())
            .credentials_provider(self.credentials.clone())
            .endpoint_url(&self.endpoint_url);
        if !retries {
            builder = builder.retry_config(no_retries());
        }
        builder.build()
    }

    pub(crate) fn kinesis_config(&self, retries: bool) -> aws_sdk_kinesis::Config {
        aws_sdk_kinesis::Config::from(&self.sdk_config(retries))
    }

    pub(crate) fn dynamodb_config(&self, retries: bool) -> aws_sdk_dynamodb::Config {
        aws_sdk_dynamodb::Config::from(&self.sdk_config(retries))
    }
}

/// One attempt per call: the SDK retries nothing, so a test sees raw throttling.
fn no_retries() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(1)
}

fn dummy_credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new("testkit", "testkit", None, None, "kinesis-testkit"))
}

/// The value of an endpoint variable, when it is set and not blank.
pub(crate) fn env_endpoint(variable: &str) -> Option<String> {
    std::env::var(variable).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}
