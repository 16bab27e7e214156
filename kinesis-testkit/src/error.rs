//! The one error type of the test bed.

use std::error::Error as StdError;
use std::fmt;

/// A boxed cause: an SDK error, an I/O error, a message from an emulator.
type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong while starting an emulator, preparing a stream or table, or reading a stream back.
///
/// `Display` says what the test bed was doing; the underlying error, if any, is the
/// [`source`](StdError::source). `Debug` prints both, with the whole cause chain, so that
/// `.expect("...")` in a test shows everything needed to fix the setup.
pub struct Error {
    message: String,
    source: Option<Cause>,
}

/// `Result` with the test bed's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn msg(message: impl Into<String>) -> Self {
        Self { message: message.into(), source: None }
    }

    pub(crate) fn with_source(message: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self { message: message.into(), source: Some(source.into()) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        let mut cause = self.source.as_deref().map(|c| c as &(dyn StdError + 'static));
        if cause.is_some() {
            f.write_str("\n\nCaused by:")?;
        }
        let mut depth = 0;
        while let Some(err) = cause {
            write!(f, "\n  {depth}: {err}")?;
            depth += 1;
            cause = err.source();
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|c| c as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_the_cause_chain() {
        let io = std::io::Error::other("connection refused");
        let err = Error::with_source("could not reach the emulator", io);
        let text = format!("{err:?}");
        assert!(text.starts_with("could not reach the emulator"), "{text}");
        assert!(text.contains("0: connection refused"), "{text}");
        assert_eq!(err.to_string(), "could not reach the emulator");
    }
}
