//! The local tier: a store directory ([`Store`]).

use super::{ChunkInfo, ChunkTier, ReuseRule};
use crate::chunk_id::ChunkId;
use crate::clock::Clock;
use crate::codec::{decode_chunk_object, Decoder};
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::layout::check_store_dir;
use crate::local::durable::fsync_dir_on;
use crate::local::GcLock;
use crate::store::Store;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

fn modified_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

impl ChunkTier for Store {
    fn location(&self) -> String {
        self.root().display().to_string()
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn clock(&self) -> &dyn Clock {
        &**Store::clock(self)
    }

    fn threads(&self) -> usize {
        self.options().read_threads
    }

    fn runs(&self) -> Result<Vec<String>> {
        Store::runs(self)
    }

    fn steps(&self, run: &str) -> Result<Vec<u64>> {
        Store::steps(self, run)
    }

    fn manifest_bytes(&self, run: &str, step: u64) -> Result<Vec<u8>> {
        Store::manifest_bytes(self, run, step)
    }

    /// One `stat` for a numbered step instead of a listing.
    fn resolve(&self, run: &str, sel: crate::store::StepSel) -> Result<u64> {
        Store::resolve(self, run, sel)
    }

    fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        Store::manifest(self, run, step)
    }

    fn commit_manifest(&self, run: &str, step: u64, bytes: &[u8]) -> Result<bool> {
        Store::commit_manifest(self, run, step, bytes)
    }

    fn delete_manifest(&self, run: &str, step: u64) -> Result<()> {
        Store::delete(self, run, step)
    }

    fn manifest_location(&self, run: &str, step: u64) -> PathBuf {
        self.layout.manifest_path(run, step)
    }

    fn chunk_info(&self, id: &ChunkId) -> Result<Option<ChunkInfo>> {
        let path = self.layout.chunk_path(id);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ChunkInfo {
                id: *id,
                size: m.len(),
                modified_ms: modified_ms(&m),
            })),
            // Not a regular file: not a chunk a writer may rely on.
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("examine chunk", path, e)),
        }
    }

    fn list_chunks(&self) -> Result<Vec<ChunkInfo>> {
        let mut out = Vec::new();
        for prefix in 0..=255u8 {
            let dir = self.layout.chunk_dir_for_prefix(prefix);
            if !check_store_dir(&dir)? {
                continue;
            }
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("list directory", &dir, e))?;
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("list directory", &dir, e))?;
                let Some(id) = ent
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<ChunkId>().ok())
                else {
                    continue;
                };
                // A chunk counts only in its own fan-out directory.
                if id.0[0] != prefix {
                    continue;
                }
                // Not followed: a link is not a chunk file.
                let meta = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io("examine chunk", ent.path(), e)),
                };
                if meta.is_file() {
                    out.push(ChunkInfo {
                        id,
                        size: meta.len(),
                        modified_ms: modified_ms(&meta),
                    });
                }
            }
        }
        Ok(out)
    }

    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        let chunk = self.chunks.open_chunk(id, len)?;
        match out {
            Some(o) => chunk.read_verified(o, scratch, decoder),
            None => {
                buf.resize(len as usize, 0);
                chunk.read_verified(buf, scratch, decoder)
            }
        }
    }

    fn read_chunk_object(&self, id: &ChunkId, len: u64) -> Result<bytes::Bytes> {
        let object = self.chunks.read_object(id, len)?;
        let mut out = vec![0u8; len as usize];
        decode_chunk_object(
            &object,
            id,
            &mut out,
            &mut Decoder::new()?,
            &self.layout.chunk_path(id),
        )?;
        Ok(bytes::Bytes::from(object))
    }

    fn put_chunk_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<u64> {
        self.chunks.put_object(id, &object)?;
        Ok(object.len() as u64)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        let path = self.layout.chunk_path(id);
        let dir = self.layout.chunk_dir_for_prefix(id.0[0]);
        if !check_store_dir(&dir)? {
            return Ok(());
        }
        match self.layout.fs().remove_file(&path) {
            Ok(()) => fsync_dir_on(self.layout.fs(), &dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove chunk", path, e)),
        }
    }

    fn chunk_location(&self, id: &ChunkId) -> PathBuf {
        self.layout.chunk_path(id)
    }

    fn reuse_rule(&self) -> ReuseRule {
        ReuseRule::Locked
    }

    fn write_guard(&self) -> Result<Option<GcLock>> {
        GcLock::shared(self.root()).map(Some)
    }
}
