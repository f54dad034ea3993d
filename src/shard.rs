//! Sharded steps (format v2): many ranks save one step, one commit makes
//! it visible, and any world size restores any region of it.
//!
//! Each rank publishes a *part* manifest under the step
//! (`runs/<run>/<step>/parts/<rank>-of-<world>.<hash>.cairn`, create-only,
//! named by the blake3 hash of its bytes). Parts never make a step visible.
//! [`Store::commit`] reads the parts of every rank, checks that they agree
//! and that the shards of every tensor tile it without gap or overlap, and
//! publishes the step's record (`manifest.cairn`, format v2) through the
//! same durable, create-only path a single-process save uses.
//!
//! Reading a region: a [`TensorIndex`] per tensor cuts the global tensor
//! into slabs along dimension 0 (between consecutive shard boundaries),
//! each listing the shards that cross it. A region query binary-searches
//! the slabs it spans, intersects the region with those shards only, and
//! maps each contiguous run of the intersection to the chunk slices that
//! hold it (a binary search in the shard's prefix sums). Planning is thus
//! O(log shards + shards and chunks touched) per region after an
//! O(shards log shards) index build.

use crate::chunk_id::ChunkId;
use crate::dtype::DType;
use crate::error::{Error, Region, Result};
use crate::format::manifest::{
    decode_manifest_file, encode_manifest, BlobEntry, ChunkRef, EntryRef, Manifest, PartInfo,
    Shard, ShardedTensor, TensorEntry,
};
use crate::format::SHARDED_FORMAT_VERSION;
use crate::layout::{
    check_store_dir, parse_part_file_name, parse_step_dir_name, validate_run_name,
};
use crate::remote::{Created, RemoteStore};
use crate::restore::{execute, ChunkSource, RestorePlan, RestoreReport};
use crate::save::{stage_save, SaveHandle, SaveState};
use crate::store::{StepSel, Store};
use crate::tier::ChunkTier;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest time a collection leaves the parts of a step that has no
/// record, whatever grace it is given: the other ranks of the step may
/// still be saving, and the committer may not have run yet.
pub const PENDING_PART_MIN_GRACE: Duration = Duration::from_secs(3600);

/// What [`Store::commit`] published.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// The world size committed.
    pub world_size: u32,
    /// Part files read (one per rank, more where a rank saved twice with
    /// identical contents).
    pub parts: usize,
    /// Global tensors in the record.
    pub tensors: usize,
    /// Shards in the record.
    pub shards: usize,
    /// Regions saved by more than one rank (replicas), stored once.
    pub replicas: usize,
    /// Blobs in the record.
    pub blobs: usize,
    /// Bytes of the global tensors and blobs.
    pub logical_bytes: u64,
    /// `true` if this call published the record; `false` if an identical
    /// record was already there (another committer won with the same
    /// bytes).
    pub created: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// A part manifest found under a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartListing {
    /// The rank that saved it.
    pub rank: u32,
    /// The world size it was saved for.
    pub world_size: u32,
    /// Its file name in the step's `parts/` directory.
    pub file: String,
}

impl Store {
    /// Save `state` as rank `rank`'s part of sharded step `(run, step)`
    /// saved by `world_size` ranks. Tensors carry their place in the
    /// global tensor as [`crate::ShardInfo`] (a tensor without one is a
    /// replica of the whole tensor). The same staging and pipeline as
    /// [`Store::save`]; the handle resolves once the part manifest is
    /// published (create-only, named by its content hash, so a retried
    /// save never collides with an earlier attempt). A part does not make
    /// the step visible: [`Store::commit`] does.
    pub fn save_part(
        &self,
        run: &str,
        step: u64,
        rank: u32,
        world_size: u32,
        state: &SaveState<'_>,
    ) -> Result<SaveHandle> {
        let (pool, pipeline) = self.writer_parts()?;
        stage_save(
            &self.layout,
            pool,
            pipeline,
            self.options().chunk_size,
            run,
            step,
            state,
            Some(PartInfo {
                rank,
                world_size,
                attempt: None,
            }),
        )
    }

    /// The part manifests published under `(run, step)`, by rank then
    /// file name (committed or not).
    pub fn parts(&self, run: &str, step: u64) -> Result<Vec<PartListing>> {
        validate_run_name(run)?;
        self.layout.check_dirs(Some(run), Some(step))?;
        list_parts(&self.layout.parts_dir(run, step))
    }

    /// Read and validate one part manifest (by its file name from
    /// [`Store::parts`]).
    pub fn part_manifest(&self, run: &str, step: u64, file: &str) -> Result<Manifest> {
        validate_run_name(run)?;
        let Some((rank, world_size)) = parse_part_file_name(file) else {
            return Err(Error::invalid("part file name", format!("{file:?}")));
        };
        let path = self.layout.parts_dir(run, step).join(file);
        let bytes = crate::store::read_bounded(&path)?;
        let m = decode_manifest_file(&bytes, &path)?;
        if m.run != run
            || m.step != step
            || m.part.as_ref().map(|p| (p.rank, p.world_size)) != Some((rank, world_size))
        {
            return Err(Error::manifest(
                &path,
                format!(
                    "names run {} step {} part {:?}, not its location",
                    m.run, m.step, m.part
                ),
            ));
        }
        Ok(m)
    }

    /// Names of every run directory of the store, whether or not it has a
    /// committed checkpoint (a run may have pending sharded steps only).
    pub fn run_dirs(&self) -> Result<Vec<String>> {
        crate::layout::list_run_dirs(self.root())
    }

    /// Steps of `run` that have parts but no record: saved by some ranks,
    /// not committed (yet). Ascending. A step directory that cannot be
    /// read is left out ([`Store::steps`] lists it, so that reading it
    /// reports the error).
    pub fn pending_steps(&self, run: &str) -> Result<Vec<u64>> {
        validate_run_name(run)?;
        let dir = self.layout.run_dir(run);
        if !check_store_dir(&self.layout.runs_dir())? || !check_store_dir(&dir)? {
            return Ok(Vec::new());
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => return Err(Error::io("list directory", &dir, e)),
        };
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let Some(step) = ent.file_name().to_str().and_then(parse_step_dir_name) else {
                continue;
            };
            if self.layout.manifest_path(run, step).exists() {
                continue;
            }
            // A step directory that cannot be read is listed by
            // `steps` (reading it reports the error), not here.
            if list_parts(&self.layout.parts_dir(run, step)).is_ok_and(|p| !p.is_empty()) {
                out.push(step);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Commit sharded step `(run, step)` saved by `world_size` ranks:
    /// read the parts of that world size, check them, and publish the
    /// step's record (format v2) create-only through the durable commit
    /// path. Only then is the step visible.
    ///
    /// Refused, with an error naming what is wrong: a rank without a part
    /// ([`Error::MissingRank`]); parts disagreeing on a tensor's dtype or
    /// global shape, or holding different bytes under one blob name
    /// ([`Error::PartsDisagree`]); shards overlapping without being
    /// replicas of the same region ([`Error::ShardOverlap`]); an element
    /// no shard covers ([`Error::ShardGap`]). Replicas of one region are
    /// stored once (the lowest rank's). The record's metadata is rank 0's.
    /// Two attempts of one rank with identical tensors, blobs and metadata
    /// are one part (the first file name is used); with different contents
    /// the commit is refused, the error's `hint` saying where the parts
    /// are and how to go on.
    ///
    /// The record is a function of the parts alone, so concurrent
    /// committers of the same parts publish identical bytes: one creates
    /// it, the others return `created: false`. A record with different
    /// bytes already there is [`Error::AlreadyExists`].
    pub fn commit(&self, run: &str, step: u64, world_size: u32) -> Result<CommitReport> {
        self.commit_attempt(run, step, world_size, None)
    }

    /// [`Store::commit`] of the parts of one save attempt
    /// ([`SaveState::attempt`]), leaving the parts of other attempts of the
    /// step aside (collection removes them once the step is committed and
    /// they are past the grace). With `None`, the parts of the one attempt
    /// every rank saved (parts that name no attempt are one attempt); two
    /// complete attempts with different contents are refused.
    pub fn commit_attempt(
        &self,
        run: &str,
        step: u64,
        world_size: u32,
        attempt: Option<&str>,
    ) -> Result<CommitReport> {
        let t0 = Instant::now();
        validate_run_name(run)?;
        if world_size == 0 {
            return Err(Error::invalid("world size", "must be at least 1"));
        }
        if let Some(a) = attempt {
            crate::save::validate_attempt(a)?;
        }
        // No collection while the record is built from the parts and
        // published: what the parts reference stays stored.
        let _guard = crate::local::GcLock::shared(self.root())?;
        self.layout.check_dirs(Some(run), Some(step))?;
        // The daemon committed the step on the remote from the parts it
        // uploaded (an attempt whose own commit never ran): a record built
        // here from another attempt's parts would differ from it.
        if !self.layout.manifest_path(run, step).exists() {
            if let Some(url) = self.uploaded_to(run, step) {
                return Err(Error::CommittedRemotely {
                    run: run.to_string(),
                    step,
                    url,
                });
            }
        }
        let listing = list_parts(&self.layout.parts_dir(run, step))?;
        let parts_at = self.layout.parts_dir(run, step).display().to_string();
        let (parts, files) = pick_parts(
            run,
            step,
            world_size,
            attempt,
            &parts_at,
            &listing,
            &|file| self.part_manifest(run, step, file),
        )?;
        let (record, mut report) = build_record(run, step, world_size, &parts, &|a, b| {
            Ok(self.read_entry(a)? == self.read_entry(b)?)
        })?;
        let bytes = encode_manifest(&record)?;
        report.created = self.commit_manifest(run, step, &bytes)?;
        report.parts = files;
        report.elapsed = t0.elapsed();
        Ok(report)
    }

    /// The bytes of one entry, verified.
    fn read_entry(&self, e: &EntryRef<'_>) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; e.len as usize];
        let plan = RestorePlan::new(std::slice::from_ref(e), vec![&mut buf[..]])?;
        execute(plan, &self.chunk_source(), self.options().read_threads)?;
        Ok(buf)
    }

    /// Read the region `offsets`/`shape` of tensor `name` of a committed
    /// step into `out` (row-major, exactly `dtype size * product(shape)`
    /// bytes). Only the chunks whose bytes overlap the region are read,
    /// each once and verified (blake3 of the whole chunk); with a remote
    /// attached, a chunk missing or corrupt locally is fetched from it.
    /// Works on sharded records (any world size reads any region) and on
    /// the tensors of single-process checkpoints alike.
    pub fn restore_region(
        &self,
        run: &str,
        step: StepSel,
        name: &str,
        offsets: &[u64],
        shape: &[u64],
        out: &mut [u8],
    ) -> Result<RestoreReport> {
        self.restore_regions(
            run,
            step,
            &mut [RegionTarget {
                name,
                offsets,
                shape,
                out,
            }],
        )
    }

    /// Read several regions at once ([`Store::restore_region`] for each):
    /// the manifest is read and each tensor indexed once, and a chunk
    /// several regions need is read once.
    pub fn restore_regions(
        &self,
        run: &str,
        step: StepSel,
        targets: &mut [RegionTarget<'_>],
    ) -> Result<RestoreReport> {
        let step = self.resolve(run, step)?;
        let manifest = self.manifest(run, step)?;
        let source = self.chunk_source();
        let mut r = restore_regions_from(&manifest, targets, &source, self.options().read_threads)?;
        r.repaired = source.repaired();
        Ok(r)
    }
}

/// One region of a tensor to read, and where to put it.
#[derive(Debug)]
pub struct RegionTarget<'a> {
    /// The tensor.
    pub name: &'a str,
    /// Offset of the region in each dimension of the global tensor.
    pub offsets: &'a [u64],
    /// Shape of the region.
    pub shape: &'a [u64],
    /// Receives the region's bytes, row-major; exactly its length.
    pub out: &'a mut [u8],
}

impl RemoteStore {
    /// [`Store::restore_region`] straight from the remote tier, with no
    /// local copy. Blocking; call it from a plain thread or
    /// `spawn_blocking`. A process reading several regions calls
    /// [`RemoteStore::restore_regions`] once instead: chunks shared by the
    /// regions are then downloaded once.
    pub fn restore_region(
        &self,
        run: &str,
        step: StepSel,
        name: &str,
        offsets: &[u64],
        shape: &[u64],
        out: &mut [u8],
    ) -> Result<RestoreReport> {
        self.restore_regions(
            run,
            step,
            &mut [RegionTarget {
                name,
                offsets,
                shape,
                out,
            }],
        )
    }

    /// [`Store::restore_regions`] straight from the remote tier: one
    /// manifest read, one plan for every region, and each chunk any of
    /// them needs downloaded once (small shards are packed into shared
    /// chunks, so regions of different tensors often need the same chunk).
    /// Blocking.
    pub fn restore_regions(
        &self,
        run: &str,
        step: StepSel,
        targets: &mut [RegionTarget<'_>],
    ) -> Result<RestoreReport> {
        let step = ChunkTier::resolve(self, run, step)?;
        let manifest = ChunkTier::manifest(self, run, step)?;
        let source = crate::remote::pack::PackedReader::new(self);
        restore_regions_from(&manifest, targets, &source, self.options().concurrency)
    }
}

/// What [`Store::upload_parts`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartsUploadReport {
    /// Part manifests put (or found identical) on the remote.
    pub parts: usize,
    /// Chunks uploaded (renewed ones included).
    pub chunks_uploaded: u64,
    /// Chunks the remote already held, young enough to rely on.
    pub chunks_skipped: u64,
    /// Set when this call found every part of the world on the remote and
    /// committed (or found) the remote record.
    pub committed: Option<CommitReport>,
}

impl Store {
    /// Upload this store's parts of sharded step `(run, step)` for world
    /// size `world_size` to `remote` (each node of a job uploads its own
    /// ranks' parts: chunks first, then the part manifest, create-only),
    /// then try to commit the remote record: whichever uploader (or
    /// trainer) first finds every rank's part on the remote publishes it,
    /// create-only; identical bytes already there count as success. A
    /// rank still missing remotely is not an error: `committed` is `None`.
    /// Follows the remote's reuse rule as uploads do: a chunk found
    /// remotely is relied on only if younger than half the collection
    /// grace, and the part must be put within a quarter of it. Blocking.
    pub fn upload_parts(
        &self,
        remote: &RemoteStore,
        run: &str,
        step: u64,
        world_size: u32,
    ) -> Result<PartsUploadReport> {
        self.upload_parts_except(remote, run, step, world_size, &|_| false)
    }

    /// [`Store::upload_parts`], leaving out the part files for which
    /// `skip` is true (the flush daemon's: those it already uploaded).
    pub(crate) fn upload_parts_except(
        &self,
        remote: &RemoteStore,
        run: &str,
        step: u64,
        world_size: u32,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<PartsUploadReport> {
        let mut report = PartsUploadReport::default();
        let dst: &dyn ChunkTier = remote;
        // Chunks are relied on within the grace recorded at the remote.
        remote.upload_grace()?;
        for p in self.parts(run, step)? {
            if p.world_size != world_size || skip(&p.file) {
                continue;
            }
            let started_ms = dst.clock().now_ms();
            let m = self.part_manifest(run, step, &p.file)?;
            let mut renewed = Vec::new();
            for (id, len) in m.distinct_chunks() {
                match dst.chunk_info(&id)? {
                    Some(info) if dst.is_fresh(&info) => report.chunks_skipped += 1,
                    found => {
                        let object = ChunkTier::read_chunk_object(self, &id, len)?;
                        dst.put_chunk_object(&id, object)?;
                        report.chunks_uploaded += 1;
                        if found.is_some() {
                            renewed.push((id, len));
                        }
                    }
                }
            }
            if let crate::tier::ReuseRule::Grace { commit_within, .. } = dst.reuse_rule() {
                let took = dst.clock().since(started_ms);
                if took > commit_within {
                    return Err(Error::DeadlineExceeded {
                        what: format!(
                            "upload of part {} of run {run} step {step} to {}",
                            p.file,
                            dst.location()
                        ),
                        took,
                        limit: commit_within,
                    });
                }
            }
            let bytes =
                crate::store::read_bounded(&self.layout.parts_dir(run, step).join(&p.file))?;
            remote.put_part(run, step, &p.file, bytes)?;
            for (id, len) in renewed {
                if dst.chunk_info(&id)?.is_none() {
                    let object = ChunkTier::read_chunk_object(self, &id, len)?;
                    dst.put_chunk_object(&id, object)?;
                }
            }
            report.parts += 1;
        }
        report.committed = match remote.commit(run, step, world_size) {
            Ok(r) => Some(r),
            Err(Error::MissingRank { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(report)
    }
}

impl RemoteStore {
    fn parts_prefix(&self, run: &str, step: u64) -> object_store::path::Path {
        let m = self.manifest_path(run, step);
        let mut parts: Vec<object_store::path::PathPart<'_>> = m.parts().collect();
        parts.pop();
        let mut p: object_store::path::Path = parts.into_iter().collect();
        p = p.child(crate::layout::PARTS_DIR);
        p
    }

    /// Put a part manifest (its file name from the local store) only if
    /// absent; identical bytes already there are success. Blocking.
    pub fn put_part(&self, run: &str, step: u64, file: &str, bytes: Vec<u8>) -> Result<()> {
        validate_run_name(run)?;
        let Some((rank, world_size)) = parse_part_file_name(file) else {
            return Err(Error::invalid("part file name", format!("{file:?}")));
        };
        let path = self.parts_prefix(run, step).child(file);
        let display = std::path::PathBuf::from(path.to_string());
        let m = decode_manifest_file(&bytes, &display)?;
        if m.run != run
            || m.step != step
            || m.part.as_ref().map(|p| (p.rank, p.world_size)) != Some((rank, world_size))
        {
            return Err(Error::manifest(&display, "does not name its location"));
        }
        let bytes = bytes::Bytes::from(bytes);
        // Named by its hash: what is there is these bytes, unless the
        // object was damaged; it is read to make sure.
        let read = || async { crate::remote::found(self.get_object(&path, "get part").await) };
        match self.block_on(self.put_create_only_or_read(
            &path,
            bytes.clone(),
            "put part",
            read,
        ))?? {
            Created::New => Ok(()),
            Created::Existing(existing) if existing == bytes => Ok(()),
            Created::Existing(_) => Err(Error::manifest(
                &display,
                "a different object holds this part's name",
            )),
        }
    }

    /// The part manifests on the remote under `(run, step)`, with their
    /// last-modified times (ms since the epoch). Blocking.
    pub fn parts(&self, run: &str, step: u64) -> Result<Vec<(PartListing, i64)>> {
        validate_run_name(run)?;
        let prefix = self.parts_prefix(run, step);
        let metas: Vec<object_store::ObjectMeta> = self.block_on(self.retry(|| async {
            use futures::TryStreamExt;
            self.object_store()
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| Error::remote("list parts", &prefix, e))
        }))??;
        let mut out = Vec::new();
        for m in metas {
            let Some(file) = m.location.filename() else {
                continue;
            };
            if let Some((rank, world_size)) = parse_part_file_name(file) {
                out.push((
                    PartListing {
                        rank,
                        world_size,
                        file: file.to_string(),
                    },
                    m.last_modified.timestamp_millis(),
                ));
            }
        }
        out.sort_by(|a, b| {
            (a.0.world_size, a.0.rank, &a.0.file).cmp(&(b.0.world_size, b.0.rank, &b.0.file))
        });
        Ok(out)
    }

    /// Read and validate one remote part manifest. Blocking.
    pub fn part_manifest(&self, run: &str, step: u64, file: &str) -> Result<Manifest> {
        let Some((rank, world_size)) = parse_part_file_name(file) else {
            return Err(Error::invalid("part file name", format!("{file:?}")));
        };
        let path = self.parts_prefix(run, step).child(file);
        let bytes = self.block_on(self.get_manifest_object(&path))??;
        let display = std::path::PathBuf::from(path.to_string());
        let m = decode_manifest_file(&bytes, &display)?;
        if m.run != run
            || m.step != step
            || m.part.as_ref().map(|p| (p.rank, p.world_size)) != Some((rank, world_size))
        {
            return Err(Error::manifest(&display, "does not name its location"));
        }
        Ok(m)
    }

    /// Every part manifest on the remote: `(run, step, part, modified ms)`.
    /// Blocking.
    pub(crate) fn all_parts(&self) -> Result<Vec<(String, u64, PartListing, i64)>> {
        let m = self.manifest_path("r", 0);
        let comps: Vec<object_store::path::PathPart<'_>> = m.parts().collect();
        let runs: object_store::path::Path = comps[..comps.len().saturating_sub(3)]
            .iter()
            .cloned()
            .collect();
        let metas: Vec<object_store::ObjectMeta> = self.block_on(self.retry(|| async {
            use futures::TryStreamExt;
            self.object_store()
                .list(Some(&runs))
                .try_collect()
                .await
                .map_err(|e| Error::remote("list parts", &runs, e))
        }))??;
        let mut out = Vec::new();
        for meta in metas {
            let Some(rel) = meta.location.prefix_match(&runs) else {
                continue;
            };
            let rel: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
            let [run, step, dir, file] = rel.as_slice() else {
                continue;
            };
            let (Some(step), Some((rank, world_size))) =
                (parse_step_dir_name(step), parse_part_file_name(file))
            else {
                continue;
            };
            if dir != crate::layout::PARTS_DIR || validate_run_name(run).is_err() {
                continue;
            }
            out.push((
                run.clone(),
                step,
                PartListing {
                    rank,
                    world_size,
                    file: file.clone(),
                },
                meta.last_modified.timestamp_millis(),
            ));
        }
        Ok(out)
    }

    /// Delete one remote part manifest. Blocking.
    pub(crate) fn delete_part(&self, run: &str, step: u64, file: &str) -> Result<()> {
        let path = self.parts_prefix(run, step).child(file);
        self.block_on(self.retry(|| async {
            match self.object_store().delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::remote("delete part", &path, e)),
            }
        }))?
    }

    /// [`Store::commit`] on the remote tier: read the remote parts of every
    /// rank, check them by the same rules, and put the record create-only.
    /// Blocking.
    pub fn commit(&self, run: &str, step: u64, world_size: u32) -> Result<CommitReport> {
        self.commit_attempt(run, step, world_size, None)
    }

    /// [`Store::commit_attempt`] on the remote tier. Blocking.
    pub fn commit_attempt(
        &self,
        run: &str,
        step: u64,
        world_size: u32,
        attempt: Option<&str>,
    ) -> Result<CommitReport> {
        let t0 = Instant::now();
        validate_run_name(run)?;
        if world_size == 0 {
            return Err(Error::invalid("world size", "must be at least 1"));
        }
        if let Some(a) = attempt {
            crate::save::validate_attempt(a)?;
        }
        let listing: Vec<PartListing> =
            self.parts(run, step)?.into_iter().map(|(p, _)| p).collect();
        let parts_at = format!(
            "{} (the objects under {}/)",
            self.url(),
            self.parts_prefix(run, step)
        );
        let (parts, files) = pick_parts(
            run,
            step,
            world_size,
            attempt,
            &parts_at,
            &listing,
            &|file| self.part_manifest(run, step, file),
        )?;
        crate::failpoint::hit("remote_commit.before_record")
            .map_err(|e| Error::io("fail point", self.manifest_path(run, step).to_string(), e))?;
        let read = |e: &EntryRef<'_>| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; e.len as usize];
            let plan = RestorePlan::new(std::slice::from_ref(e), vec![&mut buf[..]])?;
            execute(plan, self, self.options().concurrency.max(1))?;
            Ok(buf)
        };
        let (record, mut report) = build_record(run, step, world_size, &parts, &|a, b| {
            Ok(read(a)? == read(b)?)
        })?;
        let bytes = encode_manifest(&record)?;
        report.created = ChunkTier::commit_manifest(self, run, step, &bytes)?;
        report.parts = files;
        report.elapsed = t0.elapsed();
        Ok(report)
    }
}

/// Choose the part of every rank of `world_size` from `listing` (sorted by
/// rank, then file name), reading each with `read`. Parts are grouped by
/// the save attempt they name ([`PartInfo::attempt`]; parts naming none
/// are one group). With `attempt`, that attempt's parts are taken and the
/// others left aside. Without, the one attempt every rank saved is taken;
/// two complete attempts with different contents are refused. Within the
/// attempt, a rank's first file is its part, after checking that its other
/// files hold the same tensors, blobs and metadata. The local and the
/// remote commit use this one rule, so both build the same record from
/// the same parts. Returns the parts in rank order and the number of part
/// files of the attempt.
fn pick_parts(
    run: &str,
    step: u64,
    world_size: u32,
    attempt: Option<&str>,
    parts_at: &str,
    listing: &[PartListing],
    read: &dyn Fn(&str) -> Result<Manifest>,
) -> Result<(Vec<Manifest>, usize)> {
    type Files<'l> = Vec<Vec<(&'l PartListing, Manifest)>>;
    let mut groups: Vec<(Option<String>, Files<'_>)> = Vec::new();
    for p in listing.iter().filter(|p| p.world_size == world_size) {
        let m = read(&p.file)?;
        let named = m.part.as_ref().and_then(|x| x.attempt.clone());
        if attempt.is_some_and(|want| named.as_deref() != Some(want)) {
            continue;
        }
        let g = match groups.iter().position(|g| g.0 == named) {
            Some(g) => g,
            None => {
                groups.push((named, (0..world_size).map(|_| Vec::new()).collect()));
                groups.len() - 1
            }
        };
        groups[g].1[p.rank as usize].push((p, m));
    }
    let complete = |g: &Files<'_>| g.iter().all(|r| !r.is_empty());
    let Some(at) = groups.iter().position(|g| complete(&g.1)) else {
        // The attempt closest to complete (the first of those) names the
        // rank it waits for.
        let most = groups
            .iter()
            .rev()
            .max_by_key(|g| g.1.iter().filter(|r| !r.is_empty()).count());
        let rank = most.map_or(0, |g| g.1.iter().position(|r| r.is_empty()).unwrap_or(0));
        return Err(Error::MissingRank {
            run: run.to_string(),
            step,
            rank: rank as u32,
            world_size,
        });
    };
    let same = |a: &Manifest, b: &Manifest| {
        a.tensors == b.tensors && a.blobs == b.blobs && a.metadata == b.metadata
    };
    let chosen = groups.swap_remove(at);
    for other in groups.iter().filter(|g| complete(&g.1)) {
        for (rank, (mine, theirs)) in chosen.1.iter().zip(&other.1).enumerate() {
            if !same(&mine[0].1, &theirs[0].1) {
                return Err(Error::PartsDisagree {
                    name: format!("part of rank {rank}"),
                    what: "attempt",
                    first_rank: rank as u32,
                    first: mine[0].0.file.clone(),
                    other_rank: rank as u32,
                    other: theirs[0].0.file.clone(),
                    hint: format!(
                        "; two save attempts of run {run} step {step} ({} and {}) are each saved \
                         by every rank, with different contents: commit one by naming its attempt, \
                         or remove the other's part files from {parts_at}",
                        attempt_label(&chosen.0),
                        attempt_label(&other.0)
                    ),
                });
            }
        }
    }
    let mut parts = Vec::with_capacity(world_size as usize);
    let mut files = 0;
    for (rank, mut attempts) in chosen.1.into_iter().enumerate() {
        let (first, m) = &attempts[0];
        for (other, o) in &attempts[1..] {
            if !same(m, o) {
                return Err(Error::PartsDisagree {
                    name: format!("part of rank {rank}"),
                    what: "part",
                    first_rank: rank as u32,
                    first: first.file.clone(),
                    other_rank: rank as u32,
                    other: other.file.clone(),
                    hint: format!(
                        "; two saves of this rank in {} differ: an earlier save of run {run} step \
                         {step} was abandoned before its commit (or two jobs save this step). \
                         Name each save attempt (the DCP writer does; `SaveState::attempt`, \
                         `attempt=` in Python) and commit it by name, or, with no save of the \
                         step running, remove the abandoned attempt's part file from {parts_at} \
                         and commit again, or save to another step",
                        attempt_label(&chosen.0)
                    ),
                });
            }
        }
        files += attempts.len();
        parts.push(attempts.swap_remove(0).1);
    }
    Ok((parts, files))
}

/// How an error names an attempt.
fn attempt_label(attempt: &Option<String>) -> String {
    match attempt {
        Some(a) => format!("attempt {a:?}"),
        None => "the parts that name no attempt".to_string(),
    }
}

/// Read regions of tensors of `manifest` from `source`.
pub(crate) fn restore_regions_from(
    manifest: &Manifest,
    targets: &mut [RegionTarget<'_>],
    source: &dyn ChunkSource,
    threads: usize,
) -> Result<RestoreReport> {
    let t0 = Instant::now();
    let mut indexes: HashMap<&str, TensorIndex<'_>> = HashMap::new();
    let mut plan = RestorePlan::new(&[], Vec::new())?;
    let mut logical = 0;
    for t in targets.iter_mut() {
        if !indexes.contains_key(t.name) {
            let index = TensorIndex::of(manifest, t.name)?;
            indexes.insert(index.name, index);
        }
        let index = &indexes[t.name];
        logical += t.out.len() as u64;
        index.plan_region(t.offsets, t.shape, &mut *t.out, &mut plan)?;
    }
    let planned = t0.elapsed();
    let mut report = execute(plan, source, threads.max(1))?;
    report.step = manifest.step;
    report.logical_bytes = logical;
    report.planned = planned;
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// The part files in `dir` (absent: none), by rank then name.
pub(crate) fn list_parts(dir: &std::path::Path) -> Result<Vec<PartListing>> {
    if !check_store_dir(dir)? {
        return Ok(Vec::new());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("list directory", dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("list directory", dir, e))?;
        let Ok(file) = ent.file_name().into_string() else {
            continue;
        };
        if let Some((rank, world_size)) = parse_part_file_name(&file) {
            out.push(PartListing {
                rank,
                world_size,
                file,
            });
        }
    }
    out.sort_by(|a, b| (a.world_size, a.rank, &a.file).cmp(&(b.world_size, b.rank, &b.file)));
    Ok(out)
}

/// Blob byte comparison for [`build_record`]: `Ok(true)` if the two
/// entries hold the same bytes.
type SameBytes<'f> = dyn Fn(&EntryRef<'_>, &EntryRef<'_>) -> Result<bool> + 'f;

/// One region of a tensor as a part saved it.
struct Saved<'m> {
    region: Region,
    len: u64,
    chunks: &'m [ChunkRef],
}

/// Build the record of a sharded step from its parts, one per rank in
/// rank order, and check them. Pure but for `same_bytes`.
pub(crate) fn build_record(
    run: &str,
    step: u64,
    world_size: u32,
    parts: &[Manifest],
    same_bytes: &SameBytes<'_>,
) -> Result<(Manifest, CommitReport)> {
    struct Acc<'m> {
        name: &'m str,
        dtype: DType,
        shape: Vec<u64>,
        first_rank: u32,
        saved: Vec<Saved<'m>>,
    }
    let mut order: Vec<Acc<'_>> = Vec::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut blobs: Vec<(u32, &BlobEntry)> = Vec::new();
    let mut blob_by_name: HashMap<&str, usize> = HashMap::new();
    for (rank, m) in parts.iter().enumerate() {
        let rank = rank as u32;
        for t in &m.tensors {
            let (global, offsets) = match &t.shard {
                Some(s) => (s.global_shape.clone(), s.offsets.clone()),
                None => (t.shape.clone(), vec![0; t.shape.len()]),
            };
            let idx = *by_name.entry(t.name.as_str()).or_insert_with(|| {
                order.push(Acc {
                    name: &t.name,
                    dtype: t.dtype,
                    shape: global.clone(),
                    first_rank: rank,
                    saved: Vec::new(),
                });
                order.len() - 1
            });
            let acc = &mut order[idx];
            if acc.dtype != t.dtype {
                return Err(Error::PartsDisagree {
                    name: t.name.clone(),
                    what: "dtype",
                    first_rank: acc.first_rank,
                    first: acc.dtype.to_string(),
                    other_rank: rank,
                    other: t.dtype.to_string(),
                    hint: String::new(),
                });
            }
            if acc.shape != global {
                return Err(Error::PartsDisagree {
                    name: t.name.clone(),
                    what: "global shape",
                    first_rank: acc.first_rank,
                    first: format!("{:?}", acc.shape),
                    other_rank: rank,
                    other: format!("{global:?}"),
                    hint: String::new(),
                });
            }
            acc.saved.push(Saved {
                region: Region {
                    rank,
                    offsets,
                    shape: t.shape.clone(),
                },
                len: t.len,
                chunks: &t.chunks,
            });
        }
        for b in &m.blobs {
            match blob_by_name.get(b.name.as_str()) {
                None => {
                    blob_by_name.insert(&b.name, blobs.len());
                    blobs.push((rank, b));
                }
                Some(&i) => {
                    let (r0, b0) = blobs[i];
                    fn e(b: &BlobEntry) -> EntryRef<'_> {
                        EntryRef {
                            name: &b.name,
                            len: b.len,
                            chunks: &b.chunks,
                        }
                    }
                    let same =
                        b0.len == b.len && (b0.chunks == b.chunks || same_bytes(&e(b0), &e(b))?);
                    if !same {
                        return Err(Error::PartsDisagree {
                            name: b.name.clone(),
                            what: "blob bytes",
                            first_rank: r0,
                            first: format!("{} bytes", b0.len),
                            other_rank: rank,
                            other: if b.len == b0.len {
                                format!("{} bytes that differ from them", b.len)
                            } else {
                                format!("{} bytes", b.len)
                            },
                            hint: String::new(),
                        });
                    }
                }
            }
        }
    }
    let mut report = CommitReport {
        run: run.to_string(),
        step,
        world_size,
        parts: parts.len(),
        tensors: order.len(),
        shards: 0,
        replicas: 0,
        blobs: blobs.len(),
        logical_bytes: 0,
        created: false,
        elapsed: Duration::ZERO,
    };
    let mut sharded = Vec::with_capacity(order.len());
    for mut acc in order {
        // Replicas of one region: keep the lowest rank's.
        acc.saved.sort_by(|a, b| {
            (&a.region.offsets, &a.region.shape, a.region.rank).cmp(&(
                &b.region.offsets,
                &b.region.shape,
                b.region.rank,
            ))
        });
        let before = acc.saved.len();
        acc.saved.dedup_by(|later, first| {
            later.region.offsets == first.region.offsets && later.region.shape == first.region.shape
        });
        report.replicas += before - acc.saved.len();
        // Empty regions hold nothing.
        acc.saved.retain(|s| s.region.shape.iter().all(|&d| d > 0));
        let regions: Vec<&Region> = acc.saved.iter().map(|s| &s.region).collect();
        check_cover(acc.name, &acc.shape, &regions)?;
        report.logical_bytes += crate::dtype::byte_len(acc.dtype, &acc.shape).unwrap_or(0);
        report.shards += acc.saved.len();
        sharded.push(ShardedTensor {
            name: acc.name.to_string(),
            dtype: acc.dtype,
            shape: acc.shape,
            shards: acc
                .saved
                .into_iter()
                .map(|s| Shard {
                    rank: s.region.rank,
                    offsets: s.region.offsets,
                    shape: s.region.shape,
                    len: s.len,
                    chunks: s.chunks.to_vec(),
                })
                .collect(),
        });
    }
    report.logical_bytes += blobs.iter().map(|b| b.1.len).sum::<u64>();
    let first = parts.first();
    let record = Manifest {
        format_version: SHARDED_FORMAT_VERSION as u32,
        run: run.to_string(),
        step,
        // A function of the parts, so concurrent committers agree.
        created_unix_ms: parts.iter().map(|p| p.created_unix_ms).max().unwrap_or(0),
        chunk_size: first.map_or(0, |p| p.chunk_size),
        tensors: Vec::new(),
        blobs: blobs.into_iter().map(|(_, b)| b.clone()).collect(),
        metadata: first.map_or(serde_json::Value::Null, |p| p.metadata.clone()),
        // Training metrics as the lowest rank's part recorded them.
        metrics: first.map(|p| p.metrics.clone()).unwrap_or_default(),
        part: None,
        world_size: Some(world_size),
        sharded,
        attempt: first
            .and_then(|p| p.part.as_ref())
            .and_then(|p| p.attempt.clone()),
    };
    Ok((record, report))
}

/// Check that `regions` (non-empty boxes, no two identical) tile a tensor
/// of shape `global`: no element uncovered, none covered twice.
///
/// Sweeps dimension 0 between consecutive region boundaries; within each
/// slab the regions crossing it must tile the remaining dimensions,
/// checked the same way, down to the last dimension where the crossing
/// regions, sorted by offset, must abut. For the layouts trainers use
/// (row, column and block shards) this is O(n log n) in the regions.
pub(crate) fn check_cover(name: &str, global: &[u64], regions: &[&Region]) -> Result<()> {
    if global.contains(&0) {
        return Ok(());
    }
    if global.is_empty() {
        return match regions {
            [] => Err(Error::ShardGap {
                tensor: name.to_string(),
                global_shape: global.to_vec(),
                point: Vec::new(),
            }),
            [_] => Ok(()),
            [a, b, ..] => Err(Error::ShardOverlap {
                tensor: name.to_string(),
                first: Box::new((*a).clone()),
                second: Box::new((*b).clone()),
            }),
        };
    }
    let mut idx: Vec<usize> = (0..regions.len()).collect();
    let mut prefix = Vec::with_capacity(global.len());
    cover(name, global, regions, &mut idx, 0, &mut prefix)
}

fn cover(
    name: &str,
    global: &[u64],
    regions: &[&Region],
    idx: &mut [usize],
    dim: usize,
    prefix: &mut Vec<u64>,
) -> Result<()> {
    let off = |i: usize| regions[i].offsets[dim];
    let end = |i: usize| regions[i].offsets[dim] + regions[i].shape[dim];
    let gap = |prefix: &[u64], at: u64| {
        let mut point = prefix.to_vec();
        point.push(at);
        point.resize(global.len(), 0);
        Err(Error::ShardGap {
            tensor: name.to_string(),
            global_shape: global.to_vec(),
            point,
        })
    };
    idx.sort_unstable_by_key(|&i| (off(i), end(i)));
    if dim + 1 == global.len() {
        let mut cursor = 0;
        let mut prev: Option<usize> = None;
        for &i in idx.iter() {
            if off(i) > cursor {
                return gap(prefix, cursor);
            }
            if let (true, Some(p)) = (off(i) < cursor, prev) {
                return Err(Error::ShardOverlap {
                    tensor: name.to_string(),
                    first: Box::new(regions[p].clone()),
                    second: Box::new(regions[i].clone()),
                });
            }
            cursor = end(i);
            prev = Some(i);
        }
        if cursor < global[dim] {
            return gap(prefix, cursor);
        }
        return Ok(());
    }
    let mut points: Vec<u64> = Vec::with_capacity(idx.len() * 2 + 1);
    points.push(0);
    for &i in idx.iter() {
        points.push(off(i));
        points.push(end(i));
    }
    points.sort_unstable();
    points.dedup();
    let mut next = 0;
    let mut active: Vec<usize> = Vec::new();
    for &b in &points {
        if b >= global[dim] {
            break;
        }
        active.retain(|&i| end(i) > b);
        while next < idx.len() && off(idx[next]) <= b {
            active.push(idx[next]);
            next += 1;
        }
        if active.is_empty() {
            return gap(prefix, b);
        }
        let mut sub = active.clone();
        prefix.push(b);
        cover(name, global, regions, &mut sub, dim + 1, prefix)?;
        prefix.pop();
    }
    Ok(())
}

/// One stored region of a tensor, for planning reads.
struct ShardView<'m> {
    offsets: Vec<u64>,
    shape: Vec<u64>,
    chunks: &'m [ChunkRef],
    /// Start of each chunk slice within the shard's bytes.
    starts: Vec<u64>,
}

/// Where the regions of one tensor are stored, built once per manifest:
/// shards cut into slabs along dimension 0 for binary search.
pub(crate) struct TensorIndex<'m> {
    name: &'m str,
    dtype: DType,
    shape: Vec<u64>,
    shards: Vec<ShardView<'m>>,
    /// `(start, end, shards crossing [start, end))` along dimension 0,
    /// ascending; for a 0-dim tensor, one slab of every shard.
    slabs: Vec<(u64, u64, Vec<usize>)>,
}

impl<'m> TensorIndex<'m> {
    /// The index of tensor `name` of `m`: a sharded tensor of a record,
    /// or a plain tensor (one region: where its shard info puts it, else
    /// the whole tensor).
    pub(crate) fn of(m: &'m Manifest, name: &str) -> Result<Self> {
        if let Some(t) = m.sharded.iter().find(|t| t.name == name) {
            return Ok(TensorIndex::new(t));
        }
        let Some(t) = m.tensors.iter().find(|t| t.name == name) else {
            return Err(Error::NotFound {
                what: format!("tensor {name:?} in run {} step {}", m.run, m.step),
            });
        };
        Ok(TensorIndex::plain(t))
    }

    fn plain(t: &'m TensorEntry) -> Self {
        let (shape, offsets) = match &t.shard {
            Some(s) => (s.global_shape.clone(), s.offsets.clone()),
            None => (t.shape.clone(), vec![0; t.shape.len()]),
        };
        Self::build(
            &t.name,
            t.dtype,
            shape,
            vec![ShardView::new(offsets, t.shape.clone(), &t.chunks)],
        )
    }

    /// The index of a sharded tensor of a record.
    pub(crate) fn new(t: &'m ShardedTensor) -> Self {
        let shards = t
            .shards
            .iter()
            .map(|s| ShardView::new(s.offsets.clone(), s.shape.clone(), &s.chunks))
            .collect();
        Self::build(&t.name, t.dtype, t.shape.clone(), shards)
    }

    fn build(name: &'m str, dtype: DType, shape: Vec<u64>, shards: Vec<ShardView<'m>>) -> Self {
        let nonempty: Vec<usize> = (0..shards.len())
            .filter(|&i| shards[i].shape.iter().all(|&d| d > 0))
            .collect();
        let mut slabs = Vec::new();
        if shape.is_empty() {
            slabs.push((0, 1, nonempty));
        } else {
            let off = |i: usize| shards[i].offsets[0];
            let end = |i: usize| shards[i].offsets[0] + shards[i].shape[0];
            let mut by_off = nonempty;
            by_off.sort_unstable_by_key(|&i| off(i));
            let mut points: Vec<u64> = by_off.iter().flat_map(|&i| [off(i), end(i)]).collect();
            points.sort_unstable();
            points.dedup();
            let mut next = 0;
            let mut active: Vec<usize> = Vec::new();
            for w in points.windows(2) {
                let (b, e) = (w[0], w[1]);
                active.retain(|&i| end(i) > b);
                while next < by_off.len() && off(by_off[next]) <= b {
                    active.push(by_off[next]);
                    next += 1;
                }
                if !active.is_empty() {
                    slabs.push((b, e, active.clone()));
                }
            }
        }
        TensorIndex {
            name,
            dtype,
            shape,
            shards,
            slabs,
        }
    }

    /// The global shape.
    pub(crate) fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Bytes of the whole tensor.
    pub(crate) fn byte_len(&self) -> u64 {
        crate::dtype::byte_len(self.dtype, &self.shape).unwrap_or(0)
    }

    /// Shards whose dimension-0 range meets `[lo, hi)`.
    fn candidates(&self, lo: u64, hi: u64) -> Vec<usize> {
        if self.shape.is_empty() {
            return self.slabs.first().map(|s| s.2.clone()).unwrap_or_default();
        }
        let first = self.slabs.partition_point(|s| s.1 <= lo);
        let mut out: Vec<usize> = self.slabs[first..]
            .iter()
            .take_while(|s| s.0 < hi)
            .flat_map(|s| s.2.iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Add to `plan` the reads that fill `out` with the region
    /// `offsets`/`shape` of this tensor.
    pub(crate) fn plan_region<'a>(
        &self,
        offsets: &[u64],
        shape: &[u64],
        out: &'a mut [u8],
        plan: &mut RestorePlan<'a>,
    ) -> Result<()> {
        let n = self.shape.len();
        let what = || format!("region of tensor {:?}", self.name);
        if offsets.len() != n || shape.len() != n {
            return Err(Error::invalid(
                what(),
                format!(
                    "offsets {offsets:?} and shape {shape:?} must have the tensor's {n} dimensions"
                ),
            ));
        }
        for i in 0..n {
            if offsets[i]
                .checked_add(shape[i])
                .is_none_or(|e| e > self.shape[i])
            {
                return Err(Error::invalid(
                    what(),
                    format!(
                        "{offsets:?}+{shape:?} lies outside the global shape {:?}",
                        self.shape
                    ),
                ));
            }
        }
        let esize = self.dtype.size() as u64;
        let want = crate::dtype::byte_len(self.dtype, shape);
        if want != Some(out.len() as u64) {
            return Err(Error::invalid(
                format!("buffer for {}", what()),
                format!(
                    "is {} bytes, the region of {shape:?} {} needs {want:?}",
                    out.len(),
                    self.dtype
                ),
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        // (out offset, len, chunk slice index into `refs`, offset in chunk)
        let mut pieces: Vec<(u64, u64, ChunkId, u64, u64)> = Vec::new();
        let (lo0, hi0) = match n {
            0 => (0, 1),
            _ => (offsets[0], offsets[0] + shape[0]),
        };
        let rstr = strides(shape);
        for si in self.candidates(lo0, hi0) {
            let s = &self.shards[si];
            let mut lo = vec![0u64; n];
            let mut hi = vec![0u64; n];
            let mut empty = false;
            for i in 0..n {
                lo[i] = s.offsets[i].max(offsets[i]);
                hi[i] = (s.offsets[i] + s.shape[i]).min(offsets[i] + shape[i]);
                empty |= lo[i] >= hi[i];
            }
            if empty {
                continue;
            }
            let sstr = strides(&s.shape);
            // Merge trailing dimensions that both the shard and the region
            // span whole into one contiguous run.
            let (mut k, mut run) = match n {
                0 => (0, 1),
                _ => (n - 1, hi[n - 1] - lo[n - 1]),
            };
            let full = |i: usize| {
                lo[i] == s.offsets[i]
                    && hi[i] == s.offsets[i] + s.shape[i]
                    && lo[i] == offsets[i]
                    && hi[i] == offsets[i] + shape[i]
            };
            while k > 0 && full(k) {
                k -= 1;
                run *= hi[k] - lo[k];
            }
            let outer: u64 = (0..k).map(|i| hi[i] - lo[i]).product();
            let mut idx: Vec<u64> = lo[..k].to_vec();
            for _ in 0..outer {
                let mut src = 0u64;
                let mut dst = 0u64;
                for i in 0..n {
                    let c = if i < k { idx[i] } else { lo[i] };
                    src += (c - s.offsets[i]) * sstr[i];
                    dst += (c - offsets[i]) * rstr[i];
                }
                s.map_run(
                    src * esize,
                    run * esize,
                    dst * esize,
                    &mut pieces,
                    self.name,
                )?;
                // The next outer index, row-major.
                for d in (0..k).rev() {
                    idx[d] += 1;
                    if idx[d] < hi[d] {
                        break;
                    }
                    idx[d] = lo[d];
                }
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let mut rest: &'a mut [u8] = out;
        let mut cursor = 0u64;
        for (dst, len, id, chunk_len, chunk_off) in pieces {
            if dst != cursor {
                let at = if dst > cursor { cursor } else { dst };
                if dst < cursor {
                    return Err(Error::Internal(format!(
                        "tensor {:?}: shards overlap at byte {at} of the region",
                        self.name
                    )));
                }
                return Err(self.gap_at(offsets, &rstr, cursor / esize));
            }
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
            rest = tail;
            plan.place(id, chunk_len, chunk_off, head, self.name);
            cursor += len;
        }
        if !rest.is_empty() {
            return Err(self.gap_at(offsets, &rstr, cursor / esize));
        }
        Ok(())
    }

    /// The error for element `elem` (row-major in the region) being stored
    /// nowhere.
    fn gap_at(&self, offsets: &[u64], rstr: &[u64], mut elem: u64) -> Error {
        let mut point = Vec::with_capacity(offsets.len());
        for (o, st) in offsets.iter().zip(rstr) {
            point.push(o + elem / st);
            elem %= st;
        }
        Error::ShardGap {
            tensor: self.name.to_string(),
            global_shape: self.shape.clone(),
            point,
        }
    }
}

impl<'m> ShardView<'m> {
    fn new(offsets: Vec<u64>, shape: Vec<u64>, chunks: &'m [ChunkRef]) -> Self {
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            starts.push(at);
            at += c.len;
        }
        ShardView {
            offsets,
            shape,
            chunks,
            starts,
        }
    }

    /// Map the shard's bytes `[src, src + len)`, destined for region byte
    /// `dst`, to chunk slices.
    fn map_run(
        &self,
        mut src: u64,
        mut len: u64,
        mut dst: u64,
        pieces: &mut Vec<(u64, u64, ChunkId, u64, u64)>,
        name: &str,
    ) -> Result<()> {
        let mut j = self.starts.partition_point(|&s| s <= src).saturating_sub(1);
        while len > 0 {
            let Some(c) = self.chunks.get(j) else {
                return Err(Error::Internal(format!(
                    "tensor {name:?}: shard bytes run past its chunks"
                )));
            };
            let within = src - self.starts[j];
            let take = len.min(c.len.saturating_sub(within));
            if take > 0 {
                pieces.push((dst, take, c.id, c.chunk_len, c.offset + within));
                src += take;
                dst += take;
                len -= take;
            }
            j += 1;
        }
        Ok(())
    }
}

/// Row-major element strides of `shape`.
fn strides(shape: &[u64]) -> Vec<u64> {
    let mut out = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        out[i] = out[i + 1] * shape[i + 1];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(rank: u32, offsets: &[u64], shape: &[u64]) -> Region {
        Region {
            rank,
            offsets: offsets.to_vec(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn cover_finds_gaps_and_overlaps() {
        let a = r(0, &[0, 0], &[2, 4]);
        let b = r(1, &[2, 0], &[2, 4]);
        assert!(check_cover("w", &[4, 4], &[&a, &b]).is_ok());
        let c = r(1, &[2, 0], &[2, 3]);
        match check_cover("w", &[4, 4], &[&a, &c]) {
            Err(Error::ShardGap { point, .. }) => assert_eq!(point, vec![2, 3]),
            other => panic!("{other:?}"),
        }
        let d = r(1, &[1, 0], &[3, 4]);
        match check_cover("w", &[4, 4], &[&a, &d]) {
            Err(Error::ShardOverlap { first, second, .. }) => {
                assert_eq!((first.rank, second.rank), (0, 1))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_cover("s", &[], &[]),
            Err(Error::ShardGap { .. })
        ));
        assert!(check_cover("z", &[0, 3], &[]).is_ok());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<u64>::new());
    }
}
