//! Chunk file header: 64 bytes in front of every chunk payload.
//!
//! ```text
//! offset size field
//!      0    8 magic "CAIRNCHK"
//!      8    2 format version (u16 LE) = 1
//!     10    1 codec: 0 raw, 1 zstd
//!     11    1 filter: 0 none, 2/4/8 byte-grouping with that element width
//!     12    4 payload offset (u32 LE): 64, or up to 65536 for writers
//!               that align the payload for direct I/O; the bytes between
//!               the header and the payload must be zero
//!     16    8 uncompressed length (u64 LE)
//!     24    8 stored payload length (u64 LE)
//!     32   32 blake3 hash of the uncompressed bytes
//! ```

use super::FORMAT_VERSION;
use crate::chunk_id::ChunkId;
use crate::error::{Error, Result};
use std::path::Path;

/// Magic bytes at the start of every chunk file.
pub const CHUNK_MAGIC: [u8; 8] = *b"CAIRNCHK";
/// Size of the chunk header in bytes.
pub const HEADER_LEN: usize = 64;
/// Payload offset used by direct-I/O writers: one 4 KiB block.
pub const ALIGNED_PAYLOAD_OFFSET: u32 = 4096;
/// Largest payload offset a reader accepts.
pub const MAX_PAYLOAD_OFFSET: u32 = 65536;

/// Largest uncompressed chunk any reader accepts (1 GiB). Declared lengths
/// above it are rejected before anything is allocated.
pub const MAX_CHUNK_LEN: u64 = 1 << 30;

/// How a chunk payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Payload is the uncompressed bytes.
    Raw = 0,
    /// Payload is one zstd frame.
    Zstd = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// A decoded chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Payload codec.
    pub codec: Codec,
    /// Byte-grouping width applied before compression (0 = none).
    pub filter: u8,
    /// Length of the uncompressed bytes.
    pub uncompressed_len: u64,
    /// Length of the payload.
    pub stored_len: u64,
    /// Where the payload starts in the file (64 or an aligned offset).
    pub payload_offset: u32,
    /// blake3 of the uncompressed bytes.
    pub id: ChunkId,
}

impl ChunkHeader {
    /// Serialize to the 64-byte on-disk form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&CHUNK_MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[10] = self.codec as u8;
        h[11] = self.filter;
        h[12..16].copy_from_slice(&self.payload_offset.to_le_bytes());
        h[16..24].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.stored_len.to_le_bytes());
        h[32..64].copy_from_slice(&self.id.0);
        h
    }

    /// Parse and validate a header read from `path` (used in errors).
    pub fn decode(buf: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptChunk {
            chunk: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            reason,
            tensors: Vec::new(),
        };
        if buf.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "truncated header: {} of {HEADER_LEN} bytes",
                buf.len()
            )));
        }
        if buf[0..8] != CHUNK_MAGIC {
            return Err(corrupt("bad magic (not a cairn chunk)".into()));
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "chunk",
                path: path.to_path_buf(),
                found: version as u64,
                supported: FORMAT_VERSION as u64,
            });
        }
        let codec = Codec::from_u8(buf[10]).ok_or(Error::UnknownCodec {
            what: "codec",
            value: buf[10],
            path: path.to_path_buf(),
        })?;
        let filter = buf[11];
        if !matches!(filter, 0 | 2 | 4 | 8) {
            return Err(Error::UnknownCodec {
                what: "filter",
                value: filter,
                path: path.to_path_buf(),
            });
        }
        let payload_offset = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        if !(HEADER_LEN as u32..=MAX_PAYLOAD_OFFSET).contains(&payload_offset) {
            return Err(corrupt(format!(
                "payload offset {payload_offset} outside {HEADER_LEN}..={MAX_PAYLOAD_OFFSET}"
            )));
        }
        let uncompressed_len = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
        let stored_len = u64::from_le_bytes(buf[24..32].try_into().unwrap_or_default());
        if uncompressed_len > MAX_CHUNK_LEN {
            return Err(corrupt(format!(
                "declared length {uncompressed_len} exceeds the {MAX_CHUNK_LEN}-byte limit"
            )));
        }
        let max_stored = zstd::zstd_safe::compress_bound(uncompressed_len as usize) as u64;
        if stored_len > max_stored.max(uncompressed_len) {
            return Err(corrupt(format!(
                "declared payload length {stored_len} is impossible for {uncompressed_len} bytes"
            )));
        }
        if codec == Codec::Raw && stored_len != uncompressed_len {
            return Err(corrupt(format!(
                "raw chunk declares payload {stored_len} != length {uncompressed_len}"
            )));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&buf[32..64]);
        Ok(ChunkHeader {
            codec,
            filter,
            uncompressed_len,
            stored_len,
            payload_offset,
            id: ChunkId(id),
        })
    }
}

impl ChunkHeader {
    /// Check a decoded header against what the reader expects: the chunk's
    /// id (its name), its uncompressed length (from the manifest) and the
    /// total length of the file or object.
    pub fn check(
        &self,
        id: &ChunkId,
        expected_len: u64,
        total_len: u64,
        path: &Path,
    ) -> Result<()> {
        let corrupt = |reason: String| Error::CorruptChunk {
            chunk: id.to_hex(),
            path: path.to_path_buf(),
            reason,
            tensors: Vec::new(),
        };
        if self.id != *id {
            return Err(corrupt(format!("header names chunk {}", self.id)));
        }
        if self.uncompressed_len != expected_len {
            return Err(corrupt(format!(
                "header declares {} bytes, the manifest {expected_len}",
                self.uncompressed_len
            )));
        }
        let want = self.payload_offset as u64 + self.stored_len;
        if total_len != want {
            return Err(corrupt(format!(
                "file is {total_len} bytes, header declares {want} (truncated or extended)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        let h = ChunkHeader {
            codec: Codec::Zstd,
            filter: 4,
            uncompressed_len: 1000,
            stored_len: 900,
            payload_offset: 64,
            id: ChunkId::of(b"x"),
        };
        let p = Path::new("c");
        let enc = h.encode();
        assert_eq!(ChunkHeader::decode(&enc, p).unwrap(), h);
        let mut bad = enc;
        bad[8] = 9;
        assert!(matches!(
            ChunkHeader::decode(&bad, p),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
        let mut bad = enc;
        bad[10] = 7;
        assert!(matches!(
            ChunkHeader::decode(&bad, p),
            Err(Error::UnknownCodec { value: 7, .. })
        ));
        let mut bad = enc;
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ChunkHeader::decode(&bad, p).is_err());
        assert!(ChunkHeader::decode(&enc[..10], p).is_err());
        let mut bad = enc;
        bad[12] = 3;
        assert!(ChunkHeader::decode(&bad, p).is_err());
    }
}
