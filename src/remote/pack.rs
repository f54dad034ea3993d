//! Packs: small chunk objects uploaded together as one larger object, so
//! that a checkpoint of many small chunks costs few PUTs and its restore
//! few GETs.
//!
//! ```text
//! <prefix>/packs/<2 hex>/<64 hex>                 a pack: chunk objects back to back,
//!                                                 named by the blake3 hash of its bytes
//! <prefix>/runs/<run>/<step:020>/packs.<64 hex>.json
//!                                                 the pack map of the manifest whose
//!                                                 bytes hash (blake3) to the 64 hex:
//!                                                 where each of its packed chunks lives
//! ```
//!
//! Every chunk object in a pack keeps its own header, so a chunk read with
//! a ranged GET is decoded and verified on its own. The pack map is put
//! before the manifest, so the manifest stays the one commit point: a
//! listed checkpoint's packed chunks are all in packs that were present
//! before it was listed. A map is named by the hash of the manifest it
//! belongs to, so a writer that loses the commit race to another manifest
//! of the same step never touches the winner's map, and readers find the
//! map from the manifest bytes they read. Chunks not in the pack map (or
//! in a pack that is gone) are read from `chunks/` as before, so remotes
//! written without packs read as they are. A pack is live while the pack
//! map of any committed checkpoint names it; collection deletes an
//! unreferenced pack only past the grace period, after a HEAD, as it does
//! a chunk object (`gc`).

use super::RemoteStore;
use crate::chunk_id::ChunkId;
use crate::codec::{decode_chunk_object, Decoder};
use crate::error::{Error, Result};
use crate::format::chunk::MAX_PAYLOAD_OFFSET;
use crate::layout::{step_dir_name, validate_run_name, RUNS_DIR};
use crate::restore::ChunkSource;
use crate::tier::ChunkTier;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock, RwLock};

/// Directory of the packs under a remote prefix.
pub const PACKS_DIR: &str = "packs";
/// File names of pack maps, next to the manifest:
/// `packs.<64 hex>.json`, the hex being the blake3 hash of the manifest's
/// bytes.
pub const PACK_MAP_PREFIX: &str = "packs.";
/// See [`PACK_MAP_PREFIX`].
pub const PACK_MAP_SUFFIX: &str = ".json";
/// The `format` field of every pack map.
pub const PACK_MAP_FORMAT: &str = "cairn-pack-map";
/// The pack map version this build writes and reads.
pub const PACK_MAP_VERSION: u32 = 1;
/// Largest pack map object read (a map lists each packed chunk once, about
/// 150 bytes each).
pub const MAX_PACK_MAP_LEN: u64 = 64 << 20;

/// Where a packed chunk object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLoc {
    /// The pack (the blake3 hash of its bytes).
    pub pack: ChunkId,
    /// Offset of the chunk object in the pack.
    pub offset: u64,
    /// Bytes of the chunk object (header and payload, as stored).
    pub len: u64,
}

/// One chunk object in a pack, as the pack map lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of its object in the pack.
    pub offset: u64,
    /// Bytes of its object.
    pub len: u64,
}

/// One pack and the chunks of a checkpoint stored in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackEntry {
    /// The pack.
    pub pack: ChunkId,
    /// Bytes of the pack object.
    pub size: u64,
    /// The checkpoint's chunks in it, by offset.
    pub chunks: Vec<PackedChunk>,
}

/// A checkpoint's pack map: which of its chunks are in which pack
/// (`runs/<run>/<step:020>/packs.<manifest hash>.json`, JSON; see
/// `docs/format.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackMap {
    /// Always [`PACK_MAP_FORMAT`].
    pub format: String,
    /// [`PACK_MAP_VERSION`].
    pub version: u32,
    /// The run of the checkpoint.
    pub run: String,
    /// The step of the checkpoint.
    pub step: u64,
    /// The packs.
    pub packs: Vec<PackEntry>,
}

impl PackMap {
    /// An empty map of `(run, step)`.
    pub fn new(run: &str, step: u64) -> Self {
        PackMap {
            format: PACK_MAP_FORMAT.to_string(),
            version: PACK_MAP_VERSION,
            run: run.to_string(),
            step,
            packs: Vec::new(),
        }
    }

    /// Every packed chunk and where it lives.
    pub fn locations(&self) -> impl Iterator<Item = (ChunkId, PackLoc)> + '_ {
        self.packs.iter().flat_map(|p| {
            p.chunks.iter().map(|c| {
                (
                    c.id,
                    PackLoc {
                        pack: p.pack,
                        offset: c.offset,
                        len: c.len,
                    },
                )
            })
        })
    }

    /// Parse and validate a stored map of `(run, step)`: the format and
    /// version, the run and step it names, every chunk inside its pack,
    /// no chunk listed twice and no two chunk objects of a pack
    /// overlapping.
    pub fn decode(bytes: &[u8], run: &str, step: u64, at: &str) -> Result<PackMap> {
        let bad = |reason: String| Error::manifest(PathBuf::from(at), reason);
        let m: PackMap =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("pack map: {e}")))?;
        if m.format != PACK_MAP_FORMAT {
            return Err(bad(format!("pack map: format is {:?}", m.format)));
        }
        if m.version != PACK_MAP_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "pack map",
                path: PathBuf::from(at),
                found: m.version.into(),
                supported: PACK_MAP_VERSION.into(),
            });
        }
        if m.run != run || m.step != step {
            return Err(bad(format!(
                "pack map names run {} step {}, not its location",
                m.run, m.step
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &m.packs {
            let mut spans: Vec<(u64, u64)> = Vec::with_capacity(p.chunks.len());
            for c in &p.chunks {
                if c.len == 0 || c.offset.checked_add(c.len).is_none_or(|end| end > p.size) {
                    return Err(bad(format!(
                        "pack map: chunk {} at {}+{} lies outside pack {} of {} bytes",
                        c.id, c.offset, c.len, p.pack, p.size
                    )));
                }
                if !seen.insert(c.id) {
                    return Err(bad(format!("pack map: chunk {} listed twice", c.id)));
                }
                spans.push((c.offset, c.offset + c.len));
            }
            spans.sort_unstable();
            if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
                return Err(bad(format!(
                    "pack map: chunk objects at {}..{} and {}..{} of pack {} overlap",
                    w[0].0, w[0].1, w[1].0, w[1].1, p.pack
                )));
            }
        }
        Ok(m)
    }
}

/// Where the packed chunks of the checkpoints a store has read live, for
/// reads that name only a chunk (verify, a tier's repair, `restore --to`).
#[derive(Debug, Default)]
pub(crate) struct PackIndex {
    locs: RwLock<HashMap<ChunkId, PackLoc>>,
}

impl PackIndex {
    fn add(&self, map: &PackMap) {
        if map.packs.is_empty() {
            return;
        }
        let mut g = self.locs.write().unwrap_or_else(|p| p.into_inner());
        g.extend(map.locations());
    }

    /// Forget every chunk located in one of `packs`.
    fn forget(&self, packs: &HashSet<ChunkId>) {
        if packs.is_empty() {
            return;
        }
        let mut g = self.locs.write().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, loc| !packs.contains(&loc.pack));
    }

    fn len(&self) -> usize {
        self.locs.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn get(&self, id: &ChunkId) -> Option<PackLoc> {
        self.locs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }
}

/// How a pack ended up in the remote after [`RemoteStore::store_pack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackStored {
    /// It was absent and this call put it.
    Uploaded,
    /// It was present and fresh: nothing was sent.
    Present,
    /// It was present but too old to rely on: put again, renewing it.
    Renewed,
}

/// Whether `e` says a chunk's pack is gone from the remote.
fn is_pack_missing(e: &Error) -> bool {
    matches!(e, Error::CorruptChunk { reason, .. } if reason.starts_with(PACK_MISSING))
}

/// How a missing pack is reported.
const PACK_MISSING: &str = "pack missing from";

/// The most bytes a stored object of a `len`-byte chunk can take.
pub(crate) fn max_object_len(len: u64) -> u64 {
    MAX_PAYLOAD_OFFSET as u64 + (zstd::zstd_safe::compress_bound(len as usize) as u64).max(len)
}

impl RemoteStore {
    /// Path of pack `id`: `packs/<2 hex>/<64 hex>`.
    pub fn pack_path(&self, id: &ChunkId) -> ObjPath {
        self.prefix
            .child(PACKS_DIR)
            .child(id.prefix())
            .child(id.to_hex())
    }

    /// Path of the pack map of the manifest of `(run, step)` whose bytes
    /// hash to `manifest` ([`ChunkId::of`] of the manifest object), next
    /// to it.
    pub fn pack_map_path(&self, run: &str, step: u64, manifest: &ChunkId) -> ObjPath {
        self.prefix
            .child(RUNS_DIR)
            .child(run)
            .child(step_dir_name(step))
            .child(format!(
                "{PACK_MAP_PREFIX}{}{PACK_MAP_SUFFIX}",
                manifest.to_hex()
            ))
    }

    /// The pack map of the manifest of `(run, step)` whose bytes hash to
    /// `manifest`, validated, or `None` when there is none (a checkpoint
    /// without packed chunks, or written before packs).
    pub async fn pack_map_of(
        &self,
        run: &str,
        step: u64,
        manifest: &ChunkId,
    ) -> Result<Option<PackMap>> {
        validate_run_name(run)?;
        let path = self.pack_map_path(run, step, manifest);
        let at = path.to_string();
        let r = self
            .retry(|| async {
                let op = "get pack map";
                let r = self
                    .inner
                    .get(&path)
                    .await
                    .map_err(|e| Error::remote(op, &path, e))?;
                let too_large = || {
                    Error::manifest(
                        PathBuf::from(&at),
                        format!("pack map larger than {MAX_PACK_MAP_LEN} bytes"),
                    )
                };
                if r.meta.size > MAX_PACK_MAP_LEN {
                    return Err(too_large());
                }
                // The body is read up to the cap, whatever the listing said.
                let mut body = Vec::new();
                let mut stream = r.into_stream();
                while let Some(part) = stream
                    .try_next()
                    .await
                    .map_err(|e| Error::remote(op, &path, e))?
                {
                    if body.len() as u64 + part.len() as u64 > MAX_PACK_MAP_LEN {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&part);
                }
                Ok(body)
            })
            .await;
        match r {
            Ok(b) => Ok(Some(PackMap::decode(&b, run, step, &at)?)),
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The pack map of the committed checkpoint `(run, step)`: its manifest
    /// is read to name the map. `None` when the step has no manifest or
    /// its manifest no map.
    pub async fn pack_map(&self, run: &str, step: u64) -> Result<Option<PackMap>> {
        validate_run_name(run)?;
        let path = self.manifest_path(run, step);
        match self.get_manifest_object(&path).await {
            Ok(b) => self.pack_map_of(run, step, &ChunkId::of(&b)).await,
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Read the pack map of the manifest of `(run, step)` hashing to
    /// `manifest` and remember where its chunks live, for reads that name
    /// only a chunk.
    pub(crate) async fn learn_pack_map(
        &self,
        run: &str,
        step: u64,
        manifest: &ChunkId,
    ) -> Result<Option<PackMap>> {
        let m = self.pack_map_of(run, step, manifest).await?;
        if let Some(m) = &m {
            self.packed.add(m);
        }
        Ok(m)
    }

    /// Put the pack map of a checkpoint whose manifest bytes hash to
    /// `manifest` (before that manifest). A map left by an interrupted
    /// upload of the same manifest is replaced; the map of any other
    /// manifest of the step is not touched.
    pub async fn put_pack_map(&self, map: &PackMap, manifest: &ChunkId) -> Result<()> {
        validate_run_name(&map.run)?;
        let path = self.pack_map_path(&map.run, map.step, manifest);
        let bytes = serde_json::to_vec(map)
            .map_err(|e| Error::Internal(format!("encode pack map: {e}")))?;
        self.put_object(&path, bytes::Bytes::from(bytes)).await?;
        self.packed.add(map);
        Ok(())
    }

    /// Metadata of the pack map of `(run, step)` for the manifest hashing
    /// to `manifest`, or `None` if the remote does not hold it.
    pub async fn head_pack_map(
        &self,
        run: &str,
        step: u64,
        manifest: &ChunkId,
    ) -> Result<Option<ObjectMeta>> {
        validate_run_name(run)?;
        self.head_object("head pack map", &self.pack_map_path(run, step, manifest))
            .await
    }

    /// Delete the pack map of `(run, step)` for the manifest hashing to
    /// `manifest` (absent is fine).
    pub async fn delete_pack_map(&self, run: &str, step: u64, manifest: &ChunkId) -> Result<()> {
        validate_run_name(run)?;
        let path = self.pack_map_path(run, step, manifest);
        self.retry(|| async {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::remote("delete pack map", &path, e)),
            }
        })
        .await
    }

    /// Metadata of pack `id`, or `None` if the remote does not hold it.
    pub async fn head_pack(&self, id: &ChunkId) -> Result<Option<ObjectMeta>> {
        self.head_object("head pack", &self.pack_path(id)).await
    }

    /// Store pack `bytes` under the hash of its bytes. A HEAD first: a
    /// pack present and `fresh` (by its last-modified time, in ms) is left
    /// as it is; one present but stale is put again, renewing it; an
    /// absent one is put. Puts are plain, as for chunk objects: the name is
    /// the hash of the bytes, so overwriting another uploader's copy is
    /// harmless, and a create-only put refused because another put is in
    /// flight would say nothing about whether that one lands. With
    /// `verify_present`, a fresh pack found present is read back and
    /// hashed first, and put again unless it matches.
    pub async fn store_pack(
        &self,
        bytes: bytes::Bytes,
        fresh: &(dyn Fn(i64) -> bool + Sync),
        verify_present: bool,
    ) -> Result<(ChunkId, PackStored)> {
        let id = ChunkId::of(&bytes);
        let path = self.pack_path(&id);
        let n = bytes.len() as u64;
        match self.head_pack(&id).await? {
            Some(m) if fresh(m.last_modified.timestamp_millis()) => {
                // With verify_present, a present pack is relied on only
                // once it reads back with its own hash; otherwise it is put
                // again over the bad copy.
                let good = !verify_present
                    || match self.get_object(&path, "get pack").await {
                        Ok(b) => ChunkId::of(&b) == id,
                        Err(Error::Remote {
                            source: object_store::Error::NotFound { .. },
                            ..
                        }) => false,
                        Err(e) => return Err(e),
                    };
                if good {
                    return Ok((id, PackStored::Present));
                }
                tracing::warn!(pack = %id, "pack at the target does not read back whole; putting it again");
            }
            Some(_) => {
                self.put_object(&path, bytes).await?;
                self.metrics.add_pack_upload(n);
                return Ok((id, PackStored::Renewed));
            }
            None => {}
        }
        self.put_object(&path, bytes).await?;
        self.metrics.add_pack_upload(n);
        tracing::debug!(pack = %id, bytes = n, "uploaded pack");
        Ok((id, PackStored::Uploaded))
    }

    /// Put pack `bytes` again (after a collection removed it under a
    /// renewal; see `copy_checkpoint`).
    pub(crate) async fn put_pack_again(&self, id: &ChunkId, bytes: bytes::Bytes) -> Result<()> {
        let n = bytes.len() as u64;
        self.put_object(&self.pack_path(id), bytes).await?;
        self.metrics.add_pack_upload(n);
        Ok(())
    }

    /// Every pack object: id, last-modified time (ms since the epoch) and
    /// size. Objects not at the path of a pack are skipped.
    pub async fn list_packs(&self) -> Result<Vec<(ChunkId, i64, u64)>> {
        let path = self.prefix.child(PACKS_DIR);
        let metas: Vec<ObjectMeta> = self
            .retry(|| async {
                self.inner
                    .list(Some(&path))
                    .try_collect()
                    .await
                    .map_err(|e| Error::remote("list packs", &path, e))
            })
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = super::listed_chunk_id(&path, &m.location)?;
                Some((id, m.last_modified.timestamp_millis(), m.size))
            })
            .collect())
    }

    /// Every pack map object under `runs/`: run, step, the hash of the
    /// manifest it belongs to, last-modified time (ms since the epoch).
    /// Listed by collection to find maps whose checkpoint is gone. Objects
    /// that are not at the path of a pack map of a valid run name are
    /// skipped.
    pub async fn list_pack_maps(&self) -> Result<Vec<(String, u64, ChunkId, i64)>> {
        let base = self.prefix.child(RUNS_DIR);
        let metas: Vec<ObjectMeta> = self
            .retry(|| async {
                self.inner
                    .list(Some(&base))
                    .try_collect()
                    .await
                    .map_err(|e| Error::remote("list", &base, e))
            })
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.prefix_match(&base)?.collect();
                let [run, step, file] = parts.as_slice() else {
                    return None;
                };
                validate_run_name(run.as_ref()).ok()?;
                let hash: ChunkId = file
                    .as_ref()
                    .strip_prefix(PACK_MAP_PREFIX)?
                    .strip_suffix(PACK_MAP_SUFFIX)?
                    .parse()
                    .ok()?;
                Some((
                    run.as_ref().to_string(),
                    crate::layout::parse_step_dir_name(step.as_ref())?,
                    hash,
                    m.last_modified.timestamp_millis(),
                ))
            })
            .collect())
    }

    /// Delete pack `id` (absent is fine).
    pub async fn delete_pack(&self, id: &ChunkId) -> Result<()> {
        let path = self.pack_path(id);
        self.retry(|| async {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::remote("delete pack", &path, e)),
            }
        })
        .await
    }

    /// How many packed chunks this store knows the pack of: those of the
    /// pack maps it has read or put, less those in packs its collections
    /// deleted since. A long-running daemon's memory for pack locations
    /// follows what the remote holds, not everything it ever uploaded.
    pub fn packed_chunks_known(&self) -> usize {
        self.packed.len()
    }

    /// Forget where the chunks of `packs` (deleted) lived.
    pub(crate) fn forget_packs(&self, packs: &HashSet<ChunkId>) {
        self.packed.forget(packs);
    }

    /// Where chunk `id` lives in a pack, if a pack map this store read
    /// lists it.
    pub(crate) fn packed_location(&self, id: &ChunkId) -> Option<PackLoc> {
        self.packed.get(id)
    }

    /// Learn the pack map of every committed checkpoint (for a read of a
    /// chunk found neither at `chunks/` nor in a map read so far).
    pub(crate) async fn learn_all_pack_maps(&self) -> Result<()> {
        for run in self.runs().await? {
            for step in self.steps(&run).await? {
                let path = self.manifest_path(&run, step);
                let bytes = match self.get_manifest_object(&path).await {
                    Ok(b) => b,
                    // Deleted since the listing.
                    Err(Error::Remote {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e),
                };
                self.learn_pack_map(&run, step, &ChunkId::of(&bytes))
                    .await?;
            }
        }
        Ok(())
    }

    /// Where a packed chunk is, for messages: the pack and the offset.
    pub(crate) fn packed_display(&self, loc: &PackLoc) -> PathBuf {
        PathBuf::from(format!(
            "{} (bytes {}..{})",
            self.pack_path(&loc.pack),
            loc.offset,
            loc.offset + loc.len
        ))
    }

    /// Bytes `range` of pack `pack`, read for chunk `id` at `loc` (for
    /// messages). A pack that ends before the range (a map that says more
    /// than the pack holds, answered with a short body or a refusal) is a
    /// [`Error::CorruptChunk`] naming the chunk, found by a HEAD of the
    /// pack, not retried.
    pub(crate) async fn get_pack_range(
        &self,
        id: &ChunkId,
        loc: &PackLoc,
        pack: &ChunkId,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes> {
        let path = self.pack_path(pack);
        let want = range.end - range.start;
        let r = self
            .retry(|| {
                let range = range.clone();
                let path = &path;
                async move {
                    self.metrics.add_get();
                    self.inner
                        .get_range(path, range)
                        .await
                        .map_err(|e| Error::remote("get range", path, e))
                }
            })
            .await;
        let short = match &r {
            Ok(b) if b.len() as u64 == want => None,
            Ok(b) => Some(b.len() as u64),
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => None,
            Err(_) => Some(0),
        };
        if short.is_some() {
            if let Some(meta) = self.head_pack(pack).await? {
                if meta.size < range.end {
                    return Err(Error::CorruptChunk {
                        chunk: id.to_hex(),
                        path: self.packed_display(loc),
                        reason: format!(
                            "the pack is {} bytes, shorter than its pack map says (bytes {}..{})",
                            meta.size, range.start, range.end
                        ),
                        tensors: Vec::new(),
                    });
                }
            }
        }
        let b = r?;
        super::check_body_len(&path, "get range", b.len() as u64, want)?;
        Ok(b)
    }

    /// Fetch the object of chunk `id` (`len` bytes uncompressed) from its
    /// pack with one ranged GET; not yet verified.
    pub async fn fetch_packed_object(
        &self,
        id: &ChunkId,
        loc: &PackLoc,
        len: u64,
    ) -> Result<bytes::Bytes> {
        if loc.len > max_object_len(len) {
            return Err(Error::CorruptChunk {
                chunk: id.to_hex(),
                path: self.packed_display(loc),
                reason: format!(
                    "object is {} bytes, more than a {len}-byte chunk can take",
                    loc.len
                ),
                tensors: Vec::new(),
            });
        }
        match self
            .get_pack_range(id, loc, &loc.pack, loc.offset..loc.offset + loc.len)
            .await
        {
            Ok(b) => {
                self.metrics.add_download(b.len() as u64);
                Ok(b)
            }
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Err(Error::CorruptChunk {
                chunk: id.to_hex(),
                path: self.packed_display(loc),
                reason: format!("{PACK_MISSING} {}", self.url),
                tensors: Vec::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Fetch chunk object `id` wherever it lives: in a pack a map read by
    /// this store lists, else (or when that pack is gone and no other map
    /// lists the chunk elsewhere) at `chunks/`; a chunk missing there is
    /// looked up in the pack maps of every committed checkpoint once more.
    /// Returns the object (not yet verified) and where it was read, for
    /// messages.
    pub(crate) async fn fetch_any_object(
        &self,
        id: &ChunkId,
        len: u64,
    ) -> Result<(bytes::Bytes, PathBuf)> {
        if let Some(loc) = self.packed_location(id) {
            match self.fetch_packed_object(id, &loc, len).await {
                Ok(b) => return Ok((b, self.packed_display(&loc))),
                // The pack is gone (collected after its last checkpoint
                // was deleted): the chunk may live in another checkpoint's
                // pack, or at chunks/.
                Err(e @ Error::CorruptChunk { .. }) if is_pack_missing(&e) => {
                    self.learn_all_pack_maps().await?;
                    match self.packed_location(id) {
                        Some(now) if now != loc => {
                            match self.fetch_packed_object(id, &now, len).await {
                                Ok(b) => return Ok((b, self.packed_display(&now))),
                                Err(e) if is_pack_missing(&e) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        // A map naming a pack that is gone (one left by an
                        // interrupted upload, committed with a later one that
                        // put every chunk at chunks/): read chunks/.
                        _ => {}
                    }
                    return match self.fetch_chunk_object(id, len).await {
                        Ok(b) => Ok((b, PathBuf::from(self.chunk_path(id).to_string()))),
                        Err(c @ Error::CorruptChunk { .. }) => {
                            if self.head_chunk(id).await?.is_some() {
                                Err(c)
                            } else {
                                Err(e)
                            }
                        }
                        Err(c) => Err(c),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        match self.fetch_chunk_object(id, len).await {
            Ok(b) => Ok((b, PathBuf::from(self.chunk_path(id).to_string()))),
            Err(e @ Error::CorruptChunk { .. }) => {
                // Missing at chunks/: perhaps packed by a checkpoint whose
                // map this store has not read yet.
                if self.head_chunk(id).await?.is_some() {
                    return Err(e);
                }
                self.learn_all_pack_maps().await?;
                match self.packed_location(id) {
                    Some(loc) => match self.fetch_packed_object(id, &loc, len).await {
                        Ok(b) => Ok((b, self.packed_display(&loc))),
                        Err(p) if is_pack_missing(&p) => Err(e),
                        Err(p) => Err(p),
                    },
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// A range of one pack holding chunks a restore reads one after the
/// other: fetched with one ranged GET by the first reader that needs it,
/// handed out chunk by chunk, and dropped (with its share of the read
/// budget) once its last chunk is taken.
struct Segment<'a> {
    pack: ChunkId,
    start: u64,
    end: u64,
    chunks: usize,
    state: Mutex<SegState<'a>>,
    ready: Condvar,
}

enum SegState<'a> {
    Idle,
    Fetching,
    Ready {
        bytes: bytes::Bytes,
        left: usize,
        _budget: super::BudgetGuard<'a>,
    },
    /// Every chunk taken, or the fetch failed: read chunk by chunk.
    Gone,
    /// The pack is gone: its chunks are read from `chunks/`.
    Missing,
}

/// The segments of one restore and, per chunk, its segment and location.
type Segments<'a> = (Vec<Segment<'a>>, HashMap<ChunkId, (usize, PackLoc)>);

/// The source a restore from the remote reads through: chunks of the same
/// pack that the restore reads one after the other, adjacent in the pack,
/// are fetched together with one ranged GET (up to an eighth of the read
/// budget per range, which the range holds until its last chunk is
/// taken), many ranges at once; every chunk is decoded and verified on its
/// own as it is taken. Other chunks are read as the remote tier reads
/// them. The restore hands out chunks in its plan's order, so the readers
/// of one range take its chunks one after the other and none waits for
/// budget that a range holds for a chunk not yet handed out.
pub(crate) struct PackedReader<'a> {
    store: &'a RemoteStore,
    segs: OnceLock<Segments<'a>>,
}

impl<'a> PackedReader<'a> {
    /// A reader of `store`'s chunks; ranges are planned by
    /// [`ChunkSource::prepare`].
    pub(crate) fn new(store: &'a RemoteStore) -> Self {
        PackedReader {
            store,
            segs: OnceLock::new(),
        }
    }

    /// The object of packed chunk `id` from its range, fetching the range
    /// if this is its first chunk; `None` to read the chunk on its own.
    fn take(&self, id: &ChunkId) -> Result<Option<(bytes::Bytes, PackLoc)>> {
        let Some((segs, by_id)) = self.segs.get() else {
            return Ok(None);
        };
        let Some(&(si, loc)) = by_id.get(id) else {
            return Ok(None);
        };
        let seg = &segs[si];
        // A poisoned lock only means another reader panicked.
        fn lock<'m, 'a>(m: &'m Mutex<SegState<'a>>) -> std::sync::MutexGuard<'m, SegState<'a>> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        let mut st = lock(&seg.state);
        loop {
            match &mut *st {
                SegState::Idle => {
                    *st = SegState::Fetching;
                    drop(st);
                    let budget = self.store.take_read_budget(seg.end - seg.start);
                    let r = self
                        .store
                        .block_on(self.store.get_pack_range(
                            id,
                            &loc,
                            &seg.pack,
                            seg.start..seg.end,
                        ))
                        .and_then(|r| r);
                    st = lock(&seg.state);
                    match r {
                        Ok(bytes) => {
                            *st = SegState::Ready {
                                bytes,
                                left: seg.chunks,
                                _budget: budget,
                            };
                            seg.ready.notify_all();
                        }
                        Err(Error::Remote {
                            source: object_store::Error::NotFound { .. },
                            ..
                        }) => {
                            *st = SegState::Missing;
                            seg.ready.notify_all();
                        }
                        Err(e) => {
                            *st = SegState::Gone;
                            seg.ready.notify_all();
                            return Err(e);
                        }
                    }
                }
                SegState::Fetching => {
                    st = seg.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                SegState::Ready { bytes, left, .. } => {
                    let from = (loc.offset - seg.start) as usize;
                    let object = bytes.slice(from..from + loc.len as usize);
                    *left -= 1;
                    if *left == 0 {
                        *st = SegState::Gone;
                    }
                    self.store.metrics.add_download(loc.len);
                    return Ok(Some((object, loc)));
                }
                SegState::Gone => return Ok(None),
                SegState::Missing => {
                    return Err(Error::CorruptChunk {
                        chunk: id.to_hex(),
                        path: self.store.packed_display(&loc),
                        reason: format!("{PACK_MISSING} {}", self.store.url),
                        tensors: Vec::new(),
                    })
                }
            }
        }
    }
}

impl ChunkSource for PackedReader<'_> {
    fn prepare(&self, chunks: &[(ChunkId, u64)]) {
        let cap = (super::read_budget(&self.store.opts) / 8).max(1);
        let mut segs: Vec<Segment<'_>> = Vec::new();
        let mut by_id = HashMap::new();
        let mut open = false;
        for &(ref id, chunk_len) in chunks {
            // An entry larger than its chunk can take is read on its own,
            // and refused there before any budget is taken.
            let Some(loc) = self
                .store
                .packed_location(id)
                .filter(|l| l.len <= max_object_len(chunk_len))
            else {
                open = false;
                continue;
            };
            let extend = open
                && segs.last().is_some_and(|s| {
                    s.pack == loc.pack
                        && s.end == loc.offset
                        && loc.offset + loc.len - s.start <= cap
                });
            if extend {
                let s = segs.last_mut().expect("open segment");
                s.end += loc.len;
                s.chunks += 1;
            } else {
                segs.push(Segment {
                    pack: loc.pack,
                    start: loc.offset,
                    end: loc.offset + loc.len,
                    chunks: 1,
                    state: Mutex::new(SegState::Idle),
                    ready: Condvar::new(),
                });
                open = true;
            }
            by_id.insert(*id, (segs.len() - 1, loc));
        }
        let _ = self.segs.set((segs, by_id));
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
        let (object, loc) = match self.take(id) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return ChunkTier::read_chunk(self.store, id, len, out, buf, scratch, decoder)
            }
            // The map names a pack that is gone (one left by an interrupted
            // upload, committed with a later upload that put every chunk at
            // chunks/): read the chunk object there.
            Err(e) if is_pack_missing(&e) => {
                let _budget = self.store.take_read_budget(len);
                let object = match self
                    .store
                    .block_on(self.store.fetch_chunk_object(id, len))?
                {
                    Ok(b) => b,
                    Err(Error::CorruptChunk { .. })
                        if self.store.block_on(self.store.head_chunk(id))??.is_none() =>
                    {
                        return Err(e)
                    }
                    Err(c) => return Err(c),
                };
                let target = match out {
                    Some(o) => o,
                    None => {
                        buf.resize(len as usize, 0);
                        &mut buf[..]
                    }
                };
                let at = PathBuf::from(self.store.chunk_path(id).to_string());
                decode_chunk_object(&object, id, target, decoder, &at)?;
                return Ok(object.len() as u64);
            }
            Err(e) => return Err(e),
        };
        let at = self.store.packed_display(&loc);
        if loc.len > max_object_len(len) {
            return Err(Error::CorruptChunk {
                chunk: id.to_hex(),
                path: at,
                reason: format!(
                    "object is {} bytes, more than a {len}-byte chunk can take",
                    loc.len
                ),
                tensors: Vec::new(),
            });
        }
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
}

/// What [`upload_packed`] did.
#[derive(Debug, Default)]
pub(crate) struct PackUpload {
    /// The checkpoint's pack map (to put before its manifest).
    pub map: Option<PackMap>,
    /// Chunks put into packs by this call.
    pub chunks_packed: u64,
    /// Chunks found in fresh packs of the remote (reused).
    pub chunks_reused: u64,
    /// Bytes of packs uploaded.
    pub bytes: u64,
    /// Packs found stale and put again: checked once more after the commit.
    pub renewed: Vec<(ChunkId, bytes::Bytes)>,
}

/// Upload chunks `small` (id, uncompressed length) of checkpoint
/// `(run, step)`, whose manifest bytes hash to `manifest`, from `src` into
/// packs of `dst`, and build the pack map that locates them. A chunk found
/// in a pack that the map of this manifest (left by an interrupted upload,
/// or already committed) or of the newest other committed step of the run
/// lists (maps that cannot be read are passed over with a warning) is
/// reused when that pack is
/// `fresh` (the target's reuse rule, by its last-modified time) and, with
/// `opts.verify_present`, reads back whole; the rest are read from `src` (each
/// verified), encoded for the wire, and concatenated in order into packs
/// of at most `pack_size` uncompressed bytes, each stored by
/// [`RemoteStore::store_pack`]. The same chunks in the same order make the
/// same packs, so an upload run again after a kill finds its packs there.
#[allow(clippy::too_many_arguments)]
pub(crate) fn upload_packed(
    src: &dyn ChunkTier,
    dst: &RemoteStore,
    run: &str,
    step: u64,
    manifest: &ChunkId,
    small: &[(ChunkId, u64)],
    opts: &crate::copy::CopyOptions<'_>,
    fresh: &(dyn Fn(i64) -> bool + Sync),
) -> Result<PackUpload> {
    let (verify_present, threads, progress) = (opts.verify_present, opts.threads, opts.progress);
    let mut out = PackUpload::default();
    if small.is_empty() {
        return Ok(out);
    }
    // Packs a checkpoint of this run already relies on.
    let mut known: HashMap<ChunkId, PackLoc> = HashMap::new();
    // Reading them is only an optimisation: a map that cannot be read is
    // passed over.
    let own = dst.block_on(dst.pack_map_of(run, step, manifest))?;
    let previous = dst.block_on(async {
        let steps = dst.steps(run).await?;
        let previous = steps
            .iter()
            .rev()
            .find(|&&s| s < step)
            .or_else(|| steps.iter().rev().find(|&&s| s != step));
        match previous {
            Some(&s) => dst.pack_map(run, s).await,
            None => Ok(None),
        }
    })?;
    for m in [own, previous] {
        match m {
            Ok(Some(m)) => {
                for (id, loc) in m.locations() {
                    known.entry(id).or_insert(loc);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(run, step, error = %e, "a pack map to reuse packs from is unreadable; packing without it")
            }
        }
    }
    let mut pack_fresh: HashMap<ChunkId, bool> = HashMap::new();
    let mut sizes: HashMap<ChunkId, u64> = HashMap::new();
    let mut placed: Vec<(ChunkId, PackLoc)> = Vec::new();
    let mut to_pack: Vec<(ChunkId, u64)> = Vec::new();
    let mut dec = Decoder::new()?;
    for &(id, len) in small {
        let reuse = match known.get(&id) {
            Some(loc) => {
                let ok = match pack_fresh.get(&loc.pack) {
                    Some(&ok) => ok,
                    None => {
                        let meta = dst.block_on(dst.head_pack(&loc.pack))??;
                        let ok = meta
                            .as_ref()
                            .is_some_and(|m| fresh(m.last_modified.timestamp_millis()));
                        if let Some(m) = &meta {
                            sizes.insert(loc.pack, m.size);
                        }
                        pack_fresh.insert(loc.pack, ok);
                        ok
                    }
                };
                let ok = ok && loc.offset + loc.len <= sizes.get(&loc.pack).copied().unwrap_or(0);
                if ok && verify_present {
                    let read = dst
                        .block_on(dst.fetch_packed_object(&id, loc, len))?
                        .and_then(|object| {
                            let mut buf = vec![0u8; len as usize];
                            decode_chunk_object(
                                &object,
                                &id,
                                &mut buf,
                                &mut dec,
                                &dst.packed_display(loc),
                            )
                        });
                    match read {
                        Ok(()) => Some(*loc),
                        Err(e) if matches!(e.kind(), crate::error::ErrorKind::Data) => {
                            tracing::warn!(chunk = %id, error = %e, "packed chunk at the target is unusable; packing it again");
                            None
                        }
                        Err(e) => return Err(e),
                    }
                } else if ok {
                    Some(*loc)
                } else {
                    None
                }
            }
            None => None,
        };
        match reuse {
            Some(loc) => {
                placed.push((id, loc));
                out.chunks_reused += 1;
                progress(len);
            }
            None => to_pack.push((id, len)),
        }
    }
    // Pack the rest in order: batches of at most pack_size uncompressed
    // bytes, read and encoded in parallel, concatenated in order.
    let limit = dst.options().pack_size.max(1) as u64;
    let mut batches: Vec<&[(ChunkId, u64)]> = Vec::new();
    let (mut from, mut sum) = (0usize, 0u64);
    for (i, &(_, len)) in to_pack.iter().enumerate() {
        if i > from && sum + len > limit {
            batches.push(&to_pack[from..i]);
            from = i;
            sum = 0;
        }
        sum += len;
    }
    if from < to_pack.len() {
        batches.push(&to_pack[from..]);
    }
    // Encoding the next batch overlaps the put of the previous pack.
    let build = |batch: &[(ChunkId, u64)]| -> Result<(bytes::Bytes, Vec<(u64, u64)>)> {
        let objects: Vec<Mutex<Option<bytes::Bytes>>> =
            batch.iter().map(|_| Mutex::new(None)).collect();
        crate::parallel::try_for_each(
            batch.iter().enumerate(),
            threads,
            || Ok(()),
            |_, (i, &(id, len))| {
                let object = src.read_chunk_object(&id, len)?;
                let object = dst.encode_for_upload(object)?;
                *objects[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(object);
                Ok(())
            },
        )?;
        let mut pack = Vec::new();
        let mut offsets = Vec::with_capacity(batch.len());
        for (slot, &(id, _)) in objects.into_iter().zip(batch) {
            let object = slot
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .ok_or_else(|| Error::Internal(format!("chunk {id} was not encoded")))?;
            offsets.push((pack.len() as u64, object.len() as u64));
            pack.extend_from_slice(&object);
        }
        Ok((bytes::Bytes::from(pack), offsets))
    };
    type Put<'s> = std::thread::ScopedJoinHandle<'s, Result<(ChunkId, PackStored)>>;
    std::thread::scope(|s| -> Result<()> {
        let mut settle = |put: Put<'_>,
                          pack: bytes::Bytes,
                          batch: &[(ChunkId, u64)],
                          offsets: Vec<(u64, u64)>|
         -> Result<()> {
            let (pid, stored) = put
                .join()
                .map_err(|_| Error::Internal("pack upload thread panicked".into()))??;
            crate::failpoint::hit("pack.after_put").map_err(|e| {
                Error::io(
                    "fail point",
                    PathBuf::from(dst.pack_path(&pid).to_string()),
                    e,
                )
            })?;
            let n = pack.len() as u64;
            match stored {
                PackStored::Uploaded => out.bytes += n,
                PackStored::Renewed => {
                    out.bytes += n;
                    out.renewed.push((pid, pack));
                }
                PackStored::Present => {}
            }
            for (&(id, len), (offset, olen)) in batch.iter().zip(offsets) {
                placed.push((
                    id,
                    PackLoc {
                        pack: pid,
                        offset,
                        len: olen,
                    },
                ));
                out.chunks_packed += 1;
                progress(len);
            }
            Ok(())
        };
        let mut pending = None;
        for batch in batches {
            let (pack, offsets) = build(batch)?;
            if let Some((put, pack, batch, offsets)) = pending.take() {
                settle(put, pack, batch, offsets)?;
            }
            let body = pack.clone();
            let put: Put<'_> = s.spawn(move || {
                dst.block_on(dst.store_pack(body, fresh, verify_present))
                    .and_then(|r| r)
            });
            pending = Some((put, pack, batch, offsets));
        }
        if let Some((put, pack, batch, offsets)) = pending.take() {
            settle(put, pack, batch, offsets)?;
        }
        Ok(())
    })?;
    // The map: packs in order of first use, chunks by offset.
    let mut map = PackMap::new(run, step);
    let mut index: HashMap<ChunkId, usize> = HashMap::new();
    for (id, loc) in placed {
        let i = *index.entry(loc.pack).or_insert_with(|| {
            map.packs.push(PackEntry {
                pack: loc.pack,
                size: 0,
                chunks: Vec::new(),
            });
            map.packs.len() - 1
        });
        let p = &mut map.packs[i];
        p.size = p.size.max(loc.offset + loc.len);
        p.chunks.push(PackedChunk {
            id,
            offset: loc.offset,
            len: loc.len,
        });
    }
    for p in &mut map.packs {
        if let Some(&s) = sizes.get(&p.pack) {
            p.size = s;
        }
        p.chunks.sort_by_key(|c| c.offset);
    }
    // Sizes of new packs are their lengths (the largest end).
    out.map = Some(map);
    Ok(out)
}
