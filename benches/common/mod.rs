//! The benchmark workload shared by every bench: 100-byte payloads and 16-character partition keys
//! drawn from 1,000 distinct keys, from a fixed-seed generator so every run uses the same records.

use kinesis_aggregation::UserRecord;

/// Distinct partition keys.
pub const KEYS: usize = 1_000;
/// Bytes of data per record.
pub const PAYLOAD: usize = 100;

/// A small deterministic generator (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `records` user records of the workload.
pub fn workload(records: usize) -> Vec<UserRecord> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let keys: Vec<String> = (0..KEYS)
        .map(|_| (0..16).map(|_| ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize] as char).collect())
        .collect();
    (0..records)
        .map(|_| {
            let key = keys[(rng.next() % KEYS as u64) as usize].clone();
            let data: Vec<u8> = (0..PAYLOAD).map(|_| rng.next() as u8).collect();
            UserRecord::new(key, data)
        })
        .collect()
}
