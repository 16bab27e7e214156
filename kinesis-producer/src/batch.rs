//! Packing Kinesis records into PutRecords calls: at most `max_count` entries and `max_bytes` of
//! partition keys plus data.

/// A PutRecords call being filled.
#[derive(Debug)]
pub(crate) struct Batch<T> {
    entries: Vec<T>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

impl<T> Batch<T> {
    pub(crate) fn new(max_count: usize, max_bytes: usize) -> Self {
        Batch { entries: Vec::new(), bytes: 0, max_count, max_bytes }
    }

    /// Whether an entry of `size` bytes fits.
    pub(crate) fn fits(&self, size: usize) -> bool {
        self.entries.len() < self.max_count && self.bytes + size <= self.max_bytes
    }

    /// Adds the entry, or hands it back when it does not fit.
    pub(crate) fn try_push(&mut self, entry: T, size: usize) -> Result<(), T> {
        if !self.fits(size) {
            return Err(entry);
        }
        self.entries.push(entry);
        self.bytes += size;
        Ok(())
    }

    /// Whether no further entry of the smallest size could fit.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.max_count || self.bytes >= self.max_bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn into_entries(self) -> Vec<T> {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_stops_at_exactly_500_entries() {
        let mut batch = Batch::new(500, 5 << 20);
        for i in 0..500 {
            assert!(batch.try_push(i, 1).is_ok());
        }
        assert!(batch.is_full());
        assert_eq!(batch.try_push(500, 1), Err(500));
        assert_eq!(batch.into_entries().len(), 500);
    }

    #[test]
    fn packing_stops_at_exactly_the_byte_cap() {
        let cap = 5 * 1024 * 1024;
        let mut batch = Batch::new(500, cap);
        assert!(batch.try_push("a", cap - 10).is_ok());
        assert_eq!(batch.try_push("b", 11), Err("b"));
        assert!(batch.try_push("c", 10).is_ok());
        assert!(batch.is_full());
        assert_eq!(batch.try_push("d", 1), Err("d"));
        assert_eq!(batch.into_entries(), vec!["a", "c"]);
    }

    #[test]
    fn an_empty_batch_takes_any_entry_up_to_the_cap() {
        let mut batch = Batch::new(500, 100);
        assert!(batch.is_empty());
        assert_eq!(batch.try_push(1, 101), Err(1));
        assert!(batch.try_push(2, 100).is_ok());
    }
}
