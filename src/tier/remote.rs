//! The remote tier: an object-store prefix ([`RemoteStore`]).

use super::{ChunkInfo, ChunkTier, ReuseRule};
use crate::chunk_id::ChunkId;
use crate::clock::Clock;
use crate::codec::{decode_chunk_object, Decoder};
use crate::error::{Error, Result};
use crate::format::manifest::{decode_manifest_file, Manifest};
use crate::local::GcLock;
use crate::remote::RemoteStore;
use std::path::PathBuf;

impl ChunkTier for RemoteStore {
    fn location(&self) -> String {
        self.url().to_string()
    }

    fn kind(&self) -> &'static str {
        "remote"
    }

    fn clock(&self) -> &dyn Clock {
        &**RemoteStore::clock(self)
    }

    fn threads(&self) -> usize {
        self.options().concurrency.max(1)
    }

    fn runs(&self) -> Result<Vec<String>> {
        self.block_on(RemoteStore::runs(self))?
    }

    fn steps(&self, run: &str) -> Result<Vec<u64>> {
        self.block_on(RemoteStore::steps(self, run))?
    }

    fn manifest_bytes(&self, run: &str, step: u64) -> Result<Vec<u8>> {
        let path = self.manifest_path(run, step);
        let b = self.block_on(self.get_manifest_object(&path))??;
        let at = PathBuf::from(path.to_string());
        let m = decode_manifest_file(&b, &at)?;
        if m.run != run || m.step != step {
            return Err(Error::manifest(
                &at,
                format!("names run {} step {}, not its location", m.run, m.step),
            ));
        }
        Ok(b.to_vec())
    }

    fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        self.block_on(RemoteStore::manifest(self, run, step))?
    }

    fn commit_manifest(&self, run: &str, step: u64, bytes: &[u8]) -> Result<bool> {
        let bytes = bytes::Bytes::copy_from_slice(bytes);
        self.block_on(self.put_manifest(run, step, bytes))?
    }

    fn delete_manifest(&self, run: &str, step: u64) -> Result<()> {
        self.block_on(self.delete_checkpoint(run, step))?
    }

    fn manifest_location(&self, run: &str, step: u64) -> PathBuf {
        PathBuf::from(self.manifest_path(run, step).to_string())
    }

    fn chunk_info(&self, id: &ChunkId) -> Result<Option<ChunkInfo>> {
        Ok(self.block_on(self.head_chunk(id))??.map(|m| ChunkInfo {
            id: *id,
            size: m.size,
            modified_ms: m.last_modified.timestamp_millis(),
        }))
    }

    fn list_chunks(&self) -> Result<Vec<ChunkInfo>> {
        Ok(self
            .block_on(RemoteStore::list_chunks(self))??
            .into_iter()
            .map(|(id, modified_ms, size)| ChunkInfo {
                id,
                size,
                modified_ms,
            })
            .collect())
    }

    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        _scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        let _budget = self.take_read_budget(len);
        let (object, at) = self.block_on(self.fetch_any_object(id, len))??;
        let target = match out {
            Some(o) => o,
            None => {
                buf.resize(len as usize, 0);
                &mut buf[..]
            }
        };
        decode_chunk_object(&object, id, target, decoder, &at)?;
        Ok(object.len() as u64)
    }

    fn read_chunk_object(&self, id: &ChunkId, len: u64) -> Result<bytes::Bytes> {
        let _budget = self.take_read_budget(len);
        let (object, at) = self.block_on(self.fetch_any_object(id, len))??;
        let mut out = vec![0u8; len as usize];
        decode_chunk_object(&object, id, &mut out, &mut Decoder::new()?, &at)?;
        Ok(object)
    }

    fn put_chunk_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<u64> {
        let object = self.encode_for_upload(object)?;
        let n = object.len() as u64;
        self.block_on(self.put_object(&self.chunk_path(id), object))??;
        self.metrics().add_upload(n);
        tracing::debug!(chunk = %id, bytes = n, "uploaded chunk");
        Ok(n)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.block_on(RemoteStore::delete_chunk(self, id))?
    }

    fn chunk_location(&self, id: &ChunkId) -> PathBuf {
        PathBuf::from(self.chunk_path(id).to_string())
    }

    fn reuse_rule(&self) -> ReuseRule {
        // The grace read from the remote's record by `upload_grace`, which
        // every writer calls before it looks at a chunk.
        let grace = self.reuse_grace();
        ReuseRule::Grace {
            refresh_after: grace / 2,
            commit_within: grace / 4,
        }
    }

    fn write_guard(&self) -> Result<Option<GcLock>> {
        Ok(None)
    }

    fn as_remote(&self) -> Option<&RemoteStore> {
        Some(self)
    }
}
