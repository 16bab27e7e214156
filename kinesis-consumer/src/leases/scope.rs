//! Which leases of the table this worker's application reads: in a single-stream application the
//! leases without a stream identifier; in a multi-stream one the leases of streams, except those
//! of streams retired (gone from the tracker's list for longer than the wait before their leases
//! are deleted). Take rounds, the leader's assignment and discovery leave the others alone.

use std::collections::HashSet;
use std::sync::RwLock;

use crate::leases::lease::Lease;

/// The leases a worker takes, is assigned, and processes.
#[derive(Debug, Default)]
pub(crate) struct LeaseScope {
    multi_stream: bool,
    /// Stream identifiers (`account:stream:creationEpoch`) whose leases are no longer processed.
    retired: RwLock<HashSet<String>>,
}

impl LeaseScope {
    pub(crate) fn new(multi_stream: bool) -> Self {
        LeaseScope { multi_stream, retired: RwLock::default() }
    }

    /// Whether `lease` is one this worker processes.
    pub(crate) fn serves(&self, lease: &Lease) -> bool {
        match (&lease.stream_identifier, self.multi_stream) {
            (None, multi) => !multi,
            (Some(_), false) => false,
            (Some(stream), true) => !self.is_retired(Some(stream)),
        }
    }

    /// Whether the leases of the stream of this identifier (a lease's `streamName`; `None` for a
    /// single-stream lease, never retired) are no longer processed.
    pub(crate) fn is_retired(&self, stream_identifier: Option<&str>) -> bool {
        stream_identifier.is_some_and(|s| self.retired.read().unwrap_or_else(|e| e.into_inner()).contains(s))
    }

    /// Sets the streams whose leases are no longer processed.
    pub(crate) fn set_retired(&self, streams: HashSet<String>) {
        *self.retired.write().unwrap_or_else(|e| e.into_inner()) = streams;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::lease::Position;

    #[test]
    fn single_and_multi_stream_workers_leave_each_others_leases_alone() {
        let single = Lease::new("shardId-000000000000", Position::Latest);
        let a = Lease::new_in_stream("111122223333:a:1", "shardId-000000000000", Position::Latest);
        let b = Lease::new_in_stream("111122223333:b:1", "shardId-000000000000", Position::Latest);
        let scope = LeaseScope::new(false);
        assert!(scope.serves(&single) && !scope.serves(&a));
        let scope = LeaseScope::new(true);
        assert!(!scope.serves(&single) && scope.serves(&a) && scope.serves(&b));
        scope.set_retired(["111122223333:b:1".to_owned()].into());
        assert!(scope.serves(&a) && !scope.serves(&b));
        assert!(scope.is_retired(Some("111122223333:b:1")) && !scope.is_retired(None));
    }
}
