//! Downloading chunks: a HEAD for the size, then concurrent ranged GETs,
//! then full validation and hash verification before anything is used.

use super::RemoteStore;
use crate::chunk_id::ChunkId;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::format::chunk::{decode_chunk_object, MAX_PAYLOAD_OFFSET};
use futures::{StreamExt, TryStreamExt};

impl RemoteStore {
    /// Fetch chunk object `id` (uncompressed length `len`) whole, as
    /// stored. The size is checked against what such a chunk can occupy
    /// before anything is allocated; the content is not yet verified.
    pub async fn fetch_chunk_object(&self, id: &ChunkId, len: u64) -> Result<Vec<u8>> {
        let path = self.chunk_path(id);
        let meta = self
            .head_chunk(id)
            .await?
            .ok_or_else(|| Error::CorruptChunk {
                chunk: id.to_hex(),
                path: path.to_string().into(),
                reason: format!("missing from {}", self.url),
                tensors: Vec::new(),
            })?;
        let max = MAX_PAYLOAD_OFFSET as u64
            + (zstd::zstd_safe::compress_bound(len as usize) as u64).max(len);
        if meta.size > max {
            return Err(Error::CorruptChunk {
                chunk: id.to_hex(),
                path: path.to_string().into(),
                reason: format!(
                    "object is {} bytes, more than a {len}-byte chunk can take",
                    meta.size
                ),
                tensors: Vec::new(),
            });
        }
        let size = meta.size;
        let part = self.opts.part_size.max(1) as u64;
        let ranges: Vec<std::ops::Range<u64>> = (0..size.div_ceil(part))
            .map(|i| i * part..((i + 1) * part).min(size))
            .collect();
        let parts: Vec<bytes::Bytes> = futures::stream::iter(ranges)
            .map(|r| self.get_range(&path, r))
            .buffered(self.opts.concurrency.max(1))
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(size as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        self.metrics.add_download(out.len() as u64);
        Ok(out)
    }

    /// Fetch chunk `id` and decode it into `out` (exactly its uncompressed
    /// length), verifying its header and hash. Returns the object bytes,
    /// for writing back to a lower tier.
    pub async fn fetch_chunk_verified(&self, id: &ChunkId, out: &mut [u8]) -> Result<Vec<u8>> {
        let object = self.fetch_chunk_object(id, out.len() as u64).await?;
        let mut dec = Decoder::new()?;
        let path = std::path::PathBuf::from(self.chunk_path(id).to_string());
        decode_chunk_object(&object, id, out, &mut dec, &path)?;
        Ok(object)
    }
}
