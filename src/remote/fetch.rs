//! Downloading chunks: a HEAD for the size, then concurrent ranged GETs,
//! then full validation and hash verification before anything is used.

use super::RemoteStore;
use crate::chunk_id::ChunkId;
use crate::codec::decode_chunk_object;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::format::chunk::MAX_PAYLOAD_OFFSET;
use futures::{StreamExt, TryStreamExt};

impl RemoteStore {
    /// Fetch chunk object `id` (uncompressed length `len`) whole, as
    /// stored. The size is checked against what such a chunk can occupy
    /// before anything is allocated; the content is not yet verified.
    pub async fn fetch_chunk_object(&self, id: &ChunkId, len: u64) -> Result<bytes::Bytes> {
        let path = self.chunk_path(id);
        let max = MAX_PAYLOAD_OFFSET as u64
            + (zstd::zstd_safe::compress_bound(len as usize) as u64).max(len);
        let too_big = |size: u64| Error::CorruptChunk {
            chunk: id.to_hex(),
            path: path.to_string().into(),
            reason: format!("object is {size} bytes, more than a {len}-byte chunk can take"),
            tensors: Vec::new(),
        };
        let missing = || Error::CorruptChunk {
            chunk: id.to_hex(),
            path: path.to_string().into(),
            reason: format!("missing from {}", self.url),
            tensors: Vec::new(),
        };
        // Objects up to a few parts come in one GET; larger ones in
        // concurrent ranged GETs. The size is checked before the body is
        // read either way.
        let whole_limit = 4 * self.opts.part_size.max(1) as u64;
        let first = self
            .retry(|| async {
                self.metrics.add_get();
                let r = self
                    .inner
                    .get(&path)
                    .await
                    .map_err(|e| Error::remote("get chunk", &path, e))?;
                let size = r.meta.size;
                if size > max {
                    return Err(too_big(size));
                }
                if size > whole_limit {
                    return Ok(Err(size));
                }
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| Error::remote("get chunk", &path, e))?;
                super::check_body_len(&path, "get chunk", b.len() as u64, size)?;
                Ok(Ok(b))
            })
            .await;
        let size = match first {
            Ok(Ok(bytes)) => {
                self.metrics.add_download(bytes.len() as u64);
                return Ok(bytes);
            }
            Ok(Err(size)) => size,
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Err(missing()),
            Err(e) => return Err(e),
        };
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
        Ok(out.into())
    }

    /// Fetch chunk `id` and decode it into `out` (exactly its uncompressed
    /// length), verifying its header and hash. Returns the object bytes,
    /// for writing back to a lower tier.
    pub async fn fetch_chunk_verified(&self, id: &ChunkId, out: &mut [u8]) -> Result<bytes::Bytes> {
        let object = self.fetch_chunk_object(id, out.len() as u64).await?;
        let mut dec = Decoder::new()?;
        let path = std::path::PathBuf::from(self.chunk_path(id).to_string());
        decode_chunk_object(&object, id, out, &mut dec, &path)?;
        Ok(object)
    }
}
