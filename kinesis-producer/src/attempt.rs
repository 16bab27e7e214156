//! The attempts to send a record: what a receipt and a delivery error both report.

use std::time::{Duration, SystemTime};

/// One attempt to send a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When the PutRecords call started.
    pub at: SystemTime,
    /// How long the call took.
    pub duration: Duration,
    /// The error code of this attempt; `None` for the one that succeeded.
    pub error_code: Option<String>,
}

/// The attempts to send one record, oldest first: a slice (`Deref<Target = [Attempt]>`). The
/// usual single attempt is held inline, so a receipt costs no allocation for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempts(AttemptsRepr);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum AttemptsRepr {
    #[default]
    None,
    One(Attempt),
    Many(Vec<Attempt>),
}

impl Attempts {
    pub(crate) fn from_vec(mut all: Vec<Attempt>) -> Attempts {
        Attempts(match all.len() {
            0 => AttemptsRepr::None,
            1 => all.pop().map_or(AttemptsRepr::None, AttemptsRepr::One),
            _ => AttemptsRepr::Many(all),
        })
    }

    pub(crate) fn push(&mut self, attempt: Attempt) {
        self.0 = match std::mem::take(&mut self.0) {
            AttemptsRepr::None => AttemptsRepr::One(attempt),
            AttemptsRepr::One(first) => AttemptsRepr::Many(vec![first, attempt]),
            AttemptsRepr::Many(mut all) => {
                all.push(attempt);
                AttemptsRepr::Many(all)
            }
        };
    }

    /// The attempts as a slice.
    pub fn as_slice(&self) -> &[Attempt] {
        match &self.0 {
            AttemptsRepr::None => &[],
            AttemptsRepr::One(attempt) => std::slice::from_ref(attempt),
            AttemptsRepr::Many(all) => all,
        }
    }

    /// The attempts as a `Vec`.
    pub fn into_vec(self) -> Vec<Attempt> {
        match self.0 {
            AttemptsRepr::None => Vec::new(),
            AttemptsRepr::One(attempt) => vec![attempt],
            AttemptsRepr::Many(all) => all,
        }
    }
}

impl std::ops::Deref for Attempts {
    type Target = [Attempt];

    fn deref(&self) -> &[Attempt] {
        self.as_slice()
    }
}

impl<'a> IntoIterator for &'a Attempts {
    type Item = &'a Attempt;
    type IntoIter = std::slice::Iter<'a, Attempt>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(code: Option<&str>) -> Attempt {
        Attempt { at: SystemTime::UNIX_EPOCH, duration: Duration::from_millis(1), error_code: code.map(str::to_owned) }
    }

    #[test]
    fn attempts_keep_their_order_from_none_to_many() {
        let mut attempts = Attempts::default();
        assert!(attempts.is_empty());
        attempts.push(attempt(Some("A")));
        assert_eq!(attempts.as_slice(), &[attempt(Some("A"))]);
        attempts.push(attempt(Some("B")));
        attempts.push(attempt(None));
        let codes: Vec<Option<&str>> = attempts.iter().map(|a| a.error_code.as_deref()).collect();
        assert_eq!(codes, [Some("A"), Some("B"), None]);
        assert_eq!(attempts.into_vec().len(), 3);
    }
}
