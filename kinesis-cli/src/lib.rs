//! The logic of the command-line tools `kinesis` and `kinesis-agg`. Each command reads from a
//! `Read`, writes to a `Write` and returns a typed error, so that the binaries stay thin and tests
//! can drive the commands directly. `kinesis agg` and `kinesis-agg` share [`agg`].

pub mod agg;
pub mod leases;
pub mod loadgen;
#[cfg(feature = "local")]
pub mod local;
pub mod stream;
pub mod tail;

/// Formats an error and its chain of causes on one line: `outer: cause: root cause`.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line.replace('\n', " ")
}
