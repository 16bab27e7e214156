//! How a call names a Kinesis data stream: by its name or by its ARN.
//!
//! A name means the stream of that name in the caller's own account, in the client's region. An
//! ARN names a stream in any account and region the caller may use: since Kinesis resource
//! policies (2023), that is how an application reads or writes another account's stream. Every
//! call that names a stream then carries `StreamARN`.
//!
//! The rules are the Kinesis API reference's: a stream name matches `[a-zA-Z0-9_.-]+`, 1 to 128
//! characters; a stream ARN matches `arn:aws.*:kinesis:.*:\d{12}:.*stream/\S+`, at most 2,048
//! characters. This type takes the stricter form the KCL's `StreamIdentifier` takes,
//! `arn:<partition starting "aws">:kinesis:<region>:<12-digit account>:stream/<stream name>`,
//! since the stream's name is what the lease table and the metrics are keyed by.

use std::fmt;
use std::str::FromStr;

/// The longest stream name (Kinesis API reference, `StreamName`).
pub const MAX_STREAM_NAME_CHARS: usize = 128;
/// The longest stream ARN (Kinesis API reference, `StreamARN`).
pub const MAX_STREAM_ARN_CHARS: usize = 2048;

/// A Kinesis data stream, as a call names it.
///
/// Parse one from text with [`StreamAddress::parse`] (or `str::parse`): text starting with
/// `arn:` is an ARN, anything else a name.
///
/// ```
/// use kinesis_core::StreamAddress;
/// let by_name: StreamAddress = "orders".parse().unwrap();
/// assert_eq!(by_name.name(), "orders");
/// assert_eq!(by_name.request_fields(), (Some("orders".to_owned()), None));
///
/// let by_arn: StreamAddress = "arn:aws:kinesis:eu-west-1:123456789012:stream/orders".parse().unwrap();
/// assert_eq!(by_arn.name(), "orders");
/// assert_eq!(by_arn.arn().unwrap().account_id(), "123456789012");
/// // A call by ARN carries StreamARN alone.
/// assert_eq!(by_arn.request_fields(), (None, Some("arn:aws:kinesis:eu-west-1:123456789012:stream/orders".to_owned())));
///
/// assert!("orders/2024".parse::<StreamAddress>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamAddress {
    /// A stream of the caller's account, in the client's region.
    Name(String),
    /// A stream of any account and region, by its ARN.
    Arn(StreamArn),
}

/// A stream ARN, `arn:<partition>:kinesis:<region>:<account id>:stream/<name>`, with its parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamArn {
    arn: String,
    /// Byte offsets of the region, the account id and the name within `arn`.
    region: (usize, usize),
    account: (usize, usize),
    name: usize,
}

/// Text that names no stream: neither a valid stream name nor a valid stream ARN.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a Kinesis stream name or stream ARN: {reason}")]
pub struct InvalidStream {
    /// The text given.
    pub given: String,
    /// What is wrong with it.
    pub reason: String,
}

impl StreamAddress {
    /// A stream name or ARN from text: an ARN when it starts with `arn:`, else a name.
    ///
    /// # Errors
    /// [`InvalidStream`] when the text is neither a valid name (`[a-zA-Z0-9_.-]`, 1 to 128
    /// characters) nor a valid stream ARN.
    pub fn parse(text: &str) -> Result<Self, InvalidStream> {
        if text.starts_with("arn:") {
            return StreamArn::parse(text).map(StreamAddress::Arn);
        }
        check_name(text).map_err(|reason| InvalidStream { given: text.to_owned(), reason })?;
        Ok(StreamAddress::Name(text.to_owned()))
    }

    /// The stream's name (an ARN's last part).
    pub fn name(&self) -> &str {
        match self {
            StreamAddress::Name(name) => name,
            StreamAddress::Arn(arn) => arn.stream_name(),
        }
    }

    /// The ARN, when the stream was named by one.
    pub fn arn(&self) -> Option<&StreamArn> {
        match self {
            StreamAddress::Name(_) => None,
            StreamAddress::Arn(arn) => Some(arn),
        }
    }

    /// The `StreamName` and `StreamARN` of a request naming this stream: the name alone, or the
    /// ARN alone. AWS recommends `StreamARN` and requires it for another account's stream; it
    /// accepts both together when they agree (the KCL sends both in multi-stream mode), but
    /// ferrokinesis refuses PutRecords that carry both, so a call by ARN carries the ARN alone.
    ///
    /// Set them on any Kinesis request builder:
    /// `client.list_shards().set_stream_name(name).set_stream_arn(arn)`.
    pub fn request_fields(&self) -> (Option<String>, Option<String>) {
        match self {
            StreamAddress::Name(name) => (Some(name.clone()), None),
            StreamAddress::Arn(arn) => (None, Some(arn.as_str().to_owned())),
        }
    }
}

impl StreamArn {
    /// A stream ARN from text.
    ///
    /// # Errors
    /// [`InvalidStream`] naming the part that is wrong.
    pub fn parse(text: &str) -> Result<Self, InvalidStream> {
        let invalid = |reason: &str| InvalidStream { given: text.to_owned(), reason: reason.to_owned() };
        if text.len() > MAX_STREAM_ARN_CHARS {
            return Err(invalid("an ARN has at most 2,048 characters"));
        }
        let parts: Vec<&str> = text.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts[..] else {
            return Err(invalid("a stream ARN has six parts: arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME"));
        };
        if arn != "arn" || !partition.starts_with("aws") {
            return Err(invalid("a stream ARN starts with arn:aws (or arn:aws-cn, arn:aws-us-gov, ...)"));
        }
        if service != "kinesis" {
            return Err(invalid("the service of a stream ARN is kinesis"));
        }
        if region.is_empty() || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(invalid("the region of a stream ARN is a region name such as us-east-1"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the account of a stream ARN is a 12-digit account id"));
        }
        let Some(name) = resource.strip_prefix("stream/") else {
            return Err(invalid("the resource of a stream ARN is stream/NAME"));
        };
        check_name(name).map_err(|reason| invalid(&format!("its stream name: {reason}")))?;
        let region_at = "arn:".len() + partition.len() + ":kinesis:".len();
        let account_at = region_at + region.len() + 1;
        let name_at = account_at + account.len() + 1 + "stream/".len();
        Ok(StreamArn {
            arn: text.to_owned(),
            region: (region_at, region_at + region.len()),
            account: (account_at, account_at + account.len()),
            name: name_at,
        })
    }

    /// The whole ARN.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The region, e.g. `us-east-1`.
    pub fn region(&self) -> &str {
        &self.arn[self.region.0..self.region.1]
    }

    /// The 12-digit id of the account that owns the stream.
    pub fn account_id(&self) -> &str {
        &self.arn[self.account.0..self.account.1]
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.arn[self.name..]
    }
}

/// Why `name` is not a valid stream name, if it is not.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_STREAM_NAME_CHARS {
        return Err(format!("a stream name has 1 to {MAX_STREAM_NAME_CHARS} characters"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(format!("{bad:?} is not allowed in a stream name (only a-z, A-Z, 0-9, _ . -)"));
    }
    Ok(())
}

impl FromStr for StreamAddress {
    type Err = InvalidStream;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        StreamAddress::parse(text)
    }
}

impl FromStr for StreamArn {
    type Err = InvalidStream;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        StreamArn::parse(text)
    }
}

/// The name, or the whole ARN.
impl fmt::Display for StreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddress::Name(name) => f.write_str(name),
            StreamAddress::Arn(arn) => f.write_str(arn.as_str()),
        }
    }
}

impl fmt::Display for StreamArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

impl From<StreamArn> for StreamAddress {
    fn from(arn: StreamArn) -> Self {
        StreamAddress::Arn(arn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_arns_are_told_apart_and_their_parts_read() {
        let name = StreamAddress::parse("my_stream-1.v2").unwrap();
        assert_eq!(name, StreamAddress::Name("my_stream-1.v2".into()));
        assert_eq!((name.name(), name.arn()), ("my_stream-1.v2", None));
        assert_eq!(name.to_string(), "my_stream-1.v2");

        for (text, partition_region, account, stream) in [
            ("arn:aws:kinesis:us-east-1:123456789012:stream/orders", "us-east-1", "123456789012", "orders"),
            ("arn:aws-cn:kinesis:cn-north-1:000000000000:stream/a.b-c_d", "cn-north-1", "000000000000", "a.b-c_d"),
            ("arn:aws-us-gov:kinesis:us-gov-west-1:210987654321:stream/x", "us-gov-west-1", "210987654321", "x"),
        ] {
            let address = StreamAddress::parse(text).unwrap();
            let arn = address.arn().expect("an ARN");
            assert_eq!(
                (arn.region(), arn.account_id(), arn.stream_name(), address.name()),
                (partition_region, account, stream, stream)
            );
            assert_eq!(address.to_string(), text);
            assert_eq!(address.request_fields(), (None, Some(text.to_owned())));
        }
    }

    #[test]
    fn text_that_names_no_stream_is_refused_with_the_reason() {
        let long_name = "s".repeat(129);
        let cases = [
            ("", "1 to 128 characters"),
            (long_name.as_str(), "1 to 128 characters"),
            ("orders/2024", "'/' is not allowed"),
            ("my stream", "' ' is not allowed"),
            ("arn:aws:kinesis:us-east-1:123456789012", "six parts"),
            ("arn:azure:kinesis:us-east-1:123456789012:stream/s", "starts with arn:aws"),
            ("arn:aws:sqs:us-east-1:123456789012:stream/s", "service of a stream ARN is kinesis"),
            ("arn:aws:kinesis::123456789012:stream/s", "region"),
            ("arn:aws:kinesis:us-east-1:12345:stream/s", "12-digit account id"),
            ("arn:aws:kinesis:us-east-1:12345678901a:stream/s", "12-digit account id"),
            ("arn:aws:kinesis:us-east-1:123456789012:table/s", "stream/NAME"),
            ("arn:aws:kinesis:us-east-1:123456789012:stream/", "its stream name"),
            ("arn:aws:kinesis:us-east-1:123456789012:stream/s/consumer/c:1", "its stream name"),
        ];
        for (text, reason) in cases {
            let error = StreamAddress::parse(text).unwrap_err();
            assert_eq!(error.given, text);
            assert!(error.reason.contains(reason), "{text:?}: {error}");
        }
    }
}
