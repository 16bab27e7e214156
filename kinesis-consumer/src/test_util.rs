//! For tests of applications and of this crate (feature `test-util`): what a lease table's fenced
//! writes return. With the feature, [`crate::LeaseTable`]'s fenced writes (`take`, `renew`,
//! `release`, `checkpoint`) are public too, so that a test can leave a table as a worker (or the
//! KCL) would. Not part of the stable API.

pub use crate::leases::table::Outcome;
