//! The local tier: a store directory ([`Store`]).

use super::{ChunkInfo, ChunkTier, ReuseRule};
use crate::chunk_id::ChunkId;
use crate::clock::Clock;
use crate::codec::{compress_chunk_object, decode_chunk_object, CodecChoice, Decoder, Encoder};
use crate::error::{Error, Result};
use crate::format::chunk::{ChunkHeader, Codec, ALIGNED_PAYLOAD_OFFSET, HEADER_LEN};
use crate::format::manifest::Manifest;
use crate::layout::check_store_dir;
use crate::local::durable::fsync_dir_on;
use crate::local::GcLock;
use crate::store::Store;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

/// Threads that look up chunk files before a restore or verify reads
/// them ([`ChunkTier::prepare_reads`]): small reads, so more than the
/// readers.
const METADATA_THREADS: usize = 16;

/// Chunk files looked up before a restore's first read (16 GiB of 16 MiB
/// chunks, some 10-20 ms cold); the rest are looked up meanwhile.
const LOOKUP_FIRST: usize = 1024;

/// `lstat` every one of `paths`, [`METADATA_THREADS`] at a time, ignoring
/// failures: their directory blocks and inodes are then in memory.
fn look_up(paths: &[PathBuf]) {
    let _ = crate::parallel::try_for_each(
        paths.iter(),
        METADATA_THREADS,
        || Ok(()),
        |_, p| {
            let _ = std::fs::symlink_metadata(p);
            Ok(())
        },
    );
}

impl Store {
    /// A chunk object from another tier (or another store), re-encoded as
    /// this store's saves write chunks, so that what a copy or a repair
    /// leaves behind reads like a saved chunk:
    ///
    /// - codec `raw` (the default): a compressed object is decoded and its
    ///   hash verified; a raw payload is laid out as a save lays it out
    ///   (at `ALIGNED_PAYLOAD_OFFSET` where chunks are written with
    ///   O_DIRECT, so restores read it with O_DIRECT, else right after the
    ///   header);
    /// - codec `zstd`: a compressed object is kept as it is; a raw one is
    ///   compressed at the store's level when that saves 3%
    ///   (`compress_chunk_object`), else laid out as above.
    ///
    /// The name, the hash of the uncompressed bytes, is unchanged.
    fn local_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<bytes::Bytes> {
        let path = self.layout.chunk_path(id);
        let header = ChunkHeader::decode(&object, &path)?;
        let choice = self.opts.codec;
        if header.codec != Codec::Raw {
            if choice != CodecChoice::Raw {
                return Ok(object);
            }
            let offset = self.raw_payload_offset();
            let mut out = vec![0u8; offset + header.uncompressed_len as usize];
            decode_chunk_object(&object, id, &mut out[offset..], &mut Decoder::new()?, &path)?;
            out[..HEADER_LEN].copy_from_slice(&raw_header(&header, offset).encode());
            return Ok(out.into());
        }
        if choice != CodecChoice::Raw {
            if let Some(v) = compress_chunk_object(&object, &mut Encoder::new(choice)?) {
                return Ok(v.into());
            }
        }
        let offset = self.raw_payload_offset();
        if header.payload_offset as usize == offset {
            return Ok(object);
        }
        let payload = object
            .get(header.payload_offset as usize..)
            .filter(|p| p.len() as u64 == header.uncompressed_len)
            .ok_or_else(|| Error::CorruptChunk {
                chunk: id.to_hex(),
                path: path.clone(),
                reason: format!(
                    "object of {} bytes does not hold its {}-byte raw payload at offset {}",
                    object.len(),
                    header.uncompressed_len,
                    header.payload_offset
                ),
                tensors: Vec::new(),
            })?;
        let mut out = Vec::with_capacity(offset + payload.len());
        out.extend_from_slice(&raw_header(&header, offset).encode());
        out.resize(offset, 0);
        out.extend_from_slice(payload);
        Ok(out.into())
    }

    /// Where a save puts a raw chunk's payload in its file.
    fn raw_payload_offset(&self) -> usize {
        if self.chunks.direct_io() {
            ALIGNED_PAYLOAD_OFFSET as usize
        } else {
            HEADER_LEN
        }
    }
}

/// The header of `h`'s chunk stored raw with its payload at `offset`.
fn raw_header(h: &ChunkHeader, offset: usize) -> ChunkHeader {
    ChunkHeader {
        codec: Codec::Raw,
        filter: 0,
        stored_len: h.uncompressed_len,
        payload_offset: offset as u32,
        ..*h
    }
}

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

    fn reads_direct(&self) -> bool {
        self.chunks.direct_io()
    }

    /// Look up every chunk's file, 16 threads at a time, before the reads
    /// start: the first 1024 before returning, the rest on a
    /// thread of their own that runs ahead of the readers. With the
    /// kernel's metadata cold (a rebooted node), opening a chunk file reads
    /// its fan-out directory's block and its inode from the disk, small
    /// reads that, once a restore's O_DIRECT data reads are in flight,
    /// wait behind them in the device's queue (23 ms per open, median, in a
    /// traced cold read of 1 GiB), while the reading thread has nothing in
    /// flight. Looked up first, they share an empty queue and the opens
    /// then find them in memory. Links are not followed; a file that cannot
    /// be looked up is left to the read to report.
    fn prepare_reads(&self, chunks: &[(ChunkId, u64)]) {
        if chunks.len() < 2 {
            return;
        }
        let layout = self.chunks.layout();
        let mut first: Vec<PathBuf> = chunks.iter().map(|(id, _)| layout.chunk_path(id)).collect();
        let rest = first.split_off(LOOKUP_FIRST.min(first.len()));
        look_up(&first);
        if !rest.is_empty() {
            // A hint: if no thread can be started, the opens look up.
            let _ = std::thread::Builder::new()
                .name("cairn-lookup".into())
                .spawn(move || look_up(&rest));
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

    /// Stores the object as this store's own saves would write it (see
    /// `Store::local_object`): raw for a raw store, however the object
    /// came.
    fn put_chunk_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<u64> {
        let object = self.local_object(id, object)?;
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
