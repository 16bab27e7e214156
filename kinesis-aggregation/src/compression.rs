//! Opt-in compression of a Kinesis record's data: `F3 89 9A C3` ++ zlib stream.
//!
//! The producer can compress the data of every Kinesis record it sends (an aggregate, or a plain
//! record). [`deaggregate`](crate::deaggregate) recognises such data and inflates it before anything
//! else, so compressed and plain records can share a stream.
//!
//! **Only this library reads it.** The stock KCL, Lambda and Firehose see the compressed bytes as
//! one opaque record. Turn it on only when every reader of the stream uses this library.
//!
//! Why it cannot be confused with user data: the magic is not valid UTF-8 (so no text or JSON record
//! starts with it), it differs from the KPL magic in its last byte, and the zlib stream that follows
//! carries a header check and an Adler-32 checksum of the content. Data that has the magic but does
//! not inflate cleanly, or inflates past [`MAX_INFLATED_BYTES`], is left as it is.

use std::io::{Read, Write};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

/// The four bytes that start a compressed record.
pub const COMPRESSED_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC3];

/// The most bytes a compressed record may inflate to: the largest record a stream can take.
pub const MAX_INFLATED_BYTES: usize = crate::limits::MAX_CONFIGURABLE_RECORD_BYTES;

/// Compresses `data` (zlib, default level) behind the magic.
pub fn compress(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    out.extend_from_slice(&COMPRESSED_MAGIC);
    let mut encoder = ZlibEncoder::new(out, Compression::default());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    Bytes::from(encoder.finish().unwrap_or_default())
}

/// Whether `data` starts with the compression magic (it may still not be a valid stream).
pub fn is_compressed(data: &[u8]) -> bool {
    data.starts_with(&COMPRESSED_MAGIC)
}

/// The inflated content of compressed data; `None` when `data` is not a complete, valid
/// compressed record (no magic, a broken stream, a bad checksum, trailing bytes, or more than
/// [`MAX_INFLATED_BYTES`]).
pub fn decompress(data: &[u8]) -> Option<Bytes> {
    let stream = data.strip_prefix(&COMPRESSED_MAGIC)?;
    let mut decoder = ZlibDecoder::new(stream);
    let mut out = Vec::new();
    // One byte past the cap tells "too large" apart from "exactly the cap".
    decoder.by_ref().take(MAX_INFLATED_BYTES as u64 + 1).read_to_end(&mut out).ok()?;
    if out.len() > MAX_INFLATED_BYTES || decoder.total_in() as usize != stream.len() {
        return None;
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let data = b"{\"sensor\":7,\"t\":21.5}".repeat(200);
        let packed = compress(&data);
        assert!(is_compressed(&packed));
        assert!(packed.len() < data.len() / 4);
        assert_eq!(decompress(&packed).as_deref(), Some(&data[..]));
        assert_eq!(decompress(&compress(b"")).as_deref(), Some(&b""[..]));

        // Not ours: no magic, a damaged stream, trailing bytes, the KPL magic.
        assert_eq!(decompress(&data), None);
        let mut damaged = packed.to_vec();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x40;
        assert_eq!(decompress(&damaged), None);
        let mut trailing = packed.to_vec();
        trailing.push(0);
        assert_eq!(decompress(&trailing), None);
        assert_eq!(decompress(&[0xF3, 0x89, 0x9A, 0xC2, 1, 2, 3]), None);
        assert!(String::from_utf8(COMPRESSED_MAGIC.to_vec()).is_err(), "no text starts with the magic");
    }

    #[test]
    fn inflating_past_the_cap_is_refused() {
        let bomb = compress(&vec![0u8; MAX_INFLATED_BYTES + 1]);
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(decompress(&bomb), None);
        let exact = compress(&vec![0u8; MAX_INFLATED_BYTES]);
        assert_eq!(decompress(&exact).map(|d| d.len()), Some(MAX_INFLATED_BYTES));
    }
}
