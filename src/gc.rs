//! Garbage collection of unreferenced chunks, on both tiers, safe while
//! saves and uploads are in flight.
//!
//! **Local tier: a lock.** Every save holds a shared `flock` on
//! `<store>/gc.lock` from the moment it starts staging until its manifest
//! is published (or it fails); a collection holds the exclusive lock for
//! its whole mark-and-sweep. So no save is in flight while a collection
//! decides what is garbage: every chunk a save relies on — written by it,
//! or found already stored — is referenced by a published manifest before
//! a collection can look. The lock is released by the kernel if either
//! process dies.
//!
//! **Remote tier: a grace period.** Uploaders on many nodes share a bucket,
//! and object stores have no locks. A collection lists chunk objects with
//! their last-modified times, then lists every manifest, and deletes a chunk
//! only if no manifest references it, its object is older than `grace`, and
//! a fresh HEAD just before the delete still says so. An uploader skips a
//! chunk the remote holds only if its object is younger than `grace / 2`
//! (otherwise it uploads it again, renewing it), and aborts a checkpoint
//! whose upload takes longer than `grace / 4`. A chunk the uploader skipped
//! therefore cannot reach the age of `grace` until `grace / 2` after the
//! uploader looked, by which time the uploader has either published its
//! manifest (which the collection's manifest listing, made within `grace / 4`
//! of its deletes, will see) or given up. The argument assumes clocks
//! agree to within `grace / 8`; the default grace is 24 hours. Packs of
//! small chunks follow the same rule, a pack being referenced while the
//! pack map of any committed checkpoint names it (see `remote::pack`).

use crate::chunk_id::ChunkId;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::layout::{check_store_dir, parse_step_dir_name, validate_run_name};
use crate::local::durable::fsync_dir_on;
use crate::local::GcLock;
use crate::remote::RemoteStore;
use crate::store::Store;
use crate::tier::ChunkTier;
use serde::Serialize;
use std::collections::HashSet;
use std::time::Duration;

/// What a collection found and removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Checkpoints whose manifests were read (the roots).
    pub checkpoints: u64,
    /// Chunks referenced by them.
    pub referenced_chunks: u64,
    /// Unreferenced chunks removed (or, in a dry run, that would be).
    pub chunks_deleted: u64,
    /// Bytes of those chunks.
    pub bytes_reclaimed: u64,
    /// Unreferenced chunks kept because they are younger than the grace
    /// period.
    pub chunks_in_grace: u64,
    /// Leftover temporary files and uncommitted step directories removed.
    pub leftovers_removed: u64,
    /// Entries of a local `tmp/` old enough to go that could not be
    /// removed (permissions, a busy or read-only file system): they keep
    /// their space until removed. `leftover_failure` names the first.
    pub leftovers_failed: u64,
    /// The first entry of `leftovers_failed` and why its removal failed.
    pub leftover_failure: Option<String>,
    /// Entries of a local `tmp/` kept because they are younger than
    /// [`TMP_MIN_AGE`] (or the grace, where that is longer): a save, copy
    /// or repair may still be writing them.
    pub temporaries_in_grace: u64,
    /// Part manifests removed (or, in a dry run, that would be): those of
    /// steps never committed, once the newest is older than the grace
    /// (at least [`crate::PENDING_PART_MIN_GRACE`]) and, on the local
    /// tier, the step is recorded as uploaded or a newer step of its run
    /// is complete; and those of a committed step saved for another world
    /// size, as old.
    pub parts_removed: u64,
    /// Part manifests of steps without a record kept although older than
    /// the grace: the step is not recorded as uploaded and no newer step
    /// of its run is complete, so they may be the only copy of a save
    /// still to be drained to the remote tier.
    pub pending_parts_kept: u64,
    /// Packs referenced by the pack maps of the checkpoints read (remote
    /// tier).
    pub referenced_packs: u64,
    /// Unreferenced packs removed (or, in a dry run, that would be); their
    /// bytes count in `bytes_reclaimed`.
    pub packs_deleted: u64,
    /// Unreferenced packs kept because they are younger than the grace
    /// period.
    pub packs_in_grace: u64,
    /// Nothing was deleted.
    pub dry_run: bool,
}

/// The least age of an entry of a local `tmp/` that a collection removes,
/// whatever its grace: a restore's repair of a chunk and a copy into the
/// store write there without the collection lock.
pub const TMP_MIN_AGE: Duration = Duration::from_secs(600);

/// How old a file is by `clock` (zero if its time is unknown or ahead).
fn age(clock: &dyn Clock, meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .map(|m| clock.age_of(m))
        .unwrap_or(Duration::ZERO)
}

/// The mark phase of a collection, the same on every tier: every chunk
/// referenced by a committed checkpoint, and how many checkpoints were
/// read. A checkpoint deleted since the listing is no longer a root; any
/// other error reading a root aborts, so nothing is deleted on partial
/// knowledge.
pub(crate) fn mark(tier: &dyn ChunkTier) -> Result<(HashSet<ChunkId>, u64)> {
    let mut referenced = HashSet::new();
    let mut checkpoints = 0;
    for run in tier.runs()? {
        for step in tier.steps(&run)? {
            let m = match tier.manifest(&run, step) {
                Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
                other => other?,
            };
            referenced.extend(m.distinct_chunks().into_iter().map(|(id, _)| id));
            checkpoints += 1;
        }
    }
    Ok((referenced, checkpoints))
}

impl Store {
    /// Collect unreferenced chunks of the local tier older than `grace`,
    /// leftover temporary files and uncommitted step directories. Waits for
    /// in-flight saves to commit and holds off new ones while it runs. Any
    /// run or step directory that cannot be listed and any unreadable
    /// manifest aborts the collection: nothing is deleted on partial
    /// knowledge. A store-owned directory that is a symbolic link aborts it
    /// too; nothing is ever deleted through a link.
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _lock = GcLock::exclusive(self.root())?;
        let clock: &dyn Clock = &**self.clock();
        self.layout.check_dirs(None, None)?;
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let (mut referenced, checkpoints) = mark(self)?;
        report.checkpoints = checkpoints;
        // Parts are roots until collected; expired ones go first, so no
        // part ever names a chunk that is gone.
        let part_grace = grace.max(crate::shard::PENDING_PART_MIN_GRACE);
        let parts = self.scan_parts(clock, part_grace)?;
        referenced.extend(parts.roots);
        report.parts_removed = parts.expired_files;
        report.pending_parts_kept = parts.kept_undrained;
        if !dry_run {
            for dir in &parts.expired_steps {
                self.layout
                    .fs()
                    .remove_dir_all(dir)
                    .map_err(|e| Error::io("remove uncommitted step", dir, e))?;
                if let Some(parent) = dir.parent() {
                    fsync_dir_on(self.layout.fs(), parent)?;
                }
            }
            for f in &parts.expired_parts {
                self.layout
                    .fs()
                    .remove_file(f)
                    .map_err(|e| Error::io("remove part", f, e))?;
                if let Some(parent) = f.parent() {
                    fsync_dir_on(self.layout.fs(), parent)?;
                }
            }
        }
        report.referenced_chunks = referenced.len() as u64;
        for prefix in 0..=255u8 {
            let dir = self.layout.chunk_dir_for_prefix(prefix);
            if !check_store_dir(&dir)? {
                continue;
            }
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("list directory", &dir, e))?;
            let mut removed = false;
            for ent in rd.flatten() {
                let name = ent.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) else {
                    continue;
                };
                if referenced.contains(&id) {
                    continue;
                }
                // Not followed: a link is not a chunk file.
                let Ok(meta) = ent.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                if age(clock, &meta) < grace {
                    report.chunks_in_grace += 1;
                    continue;
                }
                report.chunks_deleted += 1;
                report.bytes_reclaimed += meta.len();
                if !dry_run {
                    self.layout
                        .fs()
                        .remove_file(&ent.path())
                        .map_err(|e| Error::io("remove chunk", ent.path(), e))?;
                    removed = true;
                }
            }
            if removed {
                fsync_dir_on(self.layout.fs(), &dir)?;
            }
        }
        // Leftovers of interrupted saves, copies and benches: files, and
        // directories (a bench's many-file sweep) removed whole.
        // Temporary files may belong to a repair or copy that does not
        // hold the lock; leave them at least `TMP_MIN_AGE` whatever the
        // grace.
        let tmp_grace = grace.max(TMP_MIN_AGE);
        let tmp_dir = self.layout.tmp_dir();
        let tmp_entries = if check_store_dir(&tmp_dir)? {
            std::fs::read_dir(&tmp_dir).ok()
        } else {
            None
        };
        if let Some(rd) = tmp_entries {
            for ent in rd.flatten() {
                // Never followed: a link is removed, never its target.
                let Ok(meta) = std::fs::symlink_metadata(ent.path()) else {
                    continue;
                };
                if age(clock, &meta) < tmp_grace {
                    report.temporaries_in_grace += 1;
                    continue;
                }
                if dry_run {
                    report.leftovers_removed += 1;
                    continue;
                }
                let fs = self.layout.fs();
                let removed = if meta.is_dir() {
                    fs.remove_dir_all(&ent.path())
                } else {
                    fs.remove_file(&ent.path())
                };
                match removed {
                    Ok(()) => report.leftovers_removed += 1,
                    // One that vanished meanwhile was removed by its writer.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    // Not a reason to stop collecting chunks; reported.
                    Err(e) => {
                        report.leftovers_failed += 1;
                        if report.leftover_failure.is_none() {
                            report.leftover_failure =
                                Some(format!("{}: {e}", ent.path().display()));
                        }
                    }
                }
            }
        }
        let runs_dir = self.layout.runs_dir();
        let runs = if check_store_dir(&runs_dir)? {
            std::fs::read_dir(&runs_dir).map_err(|e| Error::io("list directory", &runs_dir, e))?
        } else {
            return Ok(report);
        };
        for run in runs.flatten() {
            if run
                .file_name()
                .to_str()
                .is_none_or(|n| validate_run_name(n).is_err())
            {
                continue;
            }
            // A run directory must be a directory, never a link.
            let Ok(ft) = run.file_type() else { continue };
            if ft.is_symlink() {
                check_store_dir(&run.path())?;
            }
            if !ft.is_dir() {
                continue;
            }
            let steps = std::fs::read_dir(run.path())
                .map_err(|e| Error::io("list directory", run.path(), e))?;
            for st in steps.flatten() {
                let p = st.path();
                if st
                    .file_name()
                    .to_str()
                    .and_then(parse_step_dir_name)
                    .is_none()
                {
                    continue;
                }
                // A step directory must be a directory, never a link.
                let Ok(meta) = st.metadata() else { continue };
                if meta.file_type().is_symlink() {
                    check_store_dir(&p)?;
                }
                if !meta.is_dir() {
                    continue;
                }
                let manifest = p.join(crate::layout::MANIFEST_FILE);
                let committed = match std::fs::symlink_metadata(&manifest) {
                    Ok(_) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => return Err(Error::io("examine manifest", &manifest, e)),
                };
                // Steps with parts follow the parts' rule (above).
                let has_parts =
                    !crate::shard::list_parts(&p.join(crate::layout::PARTS_DIR))?.is_empty();
                if !committed && !has_parts && age(clock, &meta) >= grace {
                    report.leftovers_removed += 1;
                    if !dry_run {
                        let _ = self.layout.fs().remove_dir_all(&p);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Local retention: keep the newest `keep_last` checkpoints of every
    /// run; delete older ones, but only those recorded as uploaded to
    /// `remote` whose remote manifest still exists (one HEAD each, just
    /// before the delete), and never the newest checkpoint durable in
    /// `remote` as seen now. A remote emptied behind the store's back (a
    /// lifecycle rule, an operator) therefore costs no local copy. Blocking:
    /// call it from a plain thread or from `tokio::task::spawn_blocking`
    /// (whose runtime then runs the HEADs), not from async code. Returns
    /// what was deleted.
    pub fn apply_local_retention(
        &self,
        keep_last: usize,
        remote: &RemoteStore,
    ) -> Result<Vec<(String, u64)>> {
        let url = remote.url();
        // Inside spawn_blocking, use the caller's runtime: the store's own
        // runtime could not be dropped later from async code.
        let handle = tokio::runtime::Handle::try_current().ok();
        let durable_now = |run: &str, s: u64| -> Result<bool> {
            match &handle {
                Some(h) => h.block_on(remote.has_manifest(run, s)),
                None => remote.block_on(remote.has_manifest(run, s))?,
            }
        };
        let mut deleted = Vec::new();
        for run in self.runs()? {
            let steps = self.steps(&run)?;
            let cut = steps.len().saturating_sub(keep_last.max(1));
            if cut == 0 {
                continue;
            }
            let mut newest_durable = None;
            for &s in steps.iter().rev() {
                if self.is_uploaded(&run, s, url) && durable_now(&run, s)? {
                    newest_durable = Some(s);
                    break;
                }
            }
            // Nothing is durable remotely: keep everything.
            let Some(newest_durable) = newest_durable else {
                continue;
            };
            for &s in &steps[..cut] {
                if s < newest_durable && self.is_uploaded(&run, s, url) && durable_now(&run, s)? {
                    self.delete(&run, s)?;
                    deleted.push((run.clone(), s));
                }
            }
        }
        Ok(deleted)
    }
}

/// The part manifests of a local store, as a collection sees them.
struct PartScan {
    /// Chunks referenced by the parts that stay.
    roots: HashSet<ChunkId>,
    /// Step directories of uncommitted steps whose parts all expired.
    expired_steps: Vec<std::path::PathBuf>,
    /// Stale part files of committed steps (another world size), expired.
    expired_parts: Vec<std::path::PathBuf>,
    /// Part files in either.
    expired_files: u64,
    /// Part files of steps without a record past the grace, kept because
    /// nothing shows they were drained.
    kept_undrained: u64,
}

impl Store {
    /// Find every part manifest: which are roots, which expired.
    fn scan_parts(&self, clock: &dyn Clock, grace: Duration) -> Result<PartScan> {
        let mut scan = PartScan {
            roots: HashSet::new(),
            expired_steps: Vec::new(),
            expired_parts: Vec::new(),
            expired_files: 0,
            kept_undrained: 0,
        };
        let runs_dir = self.layout.runs_dir();
        if !check_store_dir(&runs_dir)? {
            return Ok(scan);
        }
        let runs =
            std::fs::read_dir(&runs_dir).map_err(|e| Error::io("list directory", &runs_dir, e))?;
        for run in runs.flatten() {
            // A stray file (a README, notes) is no run, as for listing;
            // a link is examined below, which refuses it.
            if run.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let Some(run) = run
                .file_name()
                .to_str()
                .filter(|n| validate_run_name(n).is_ok())
                .map(str::to_string)
            else {
                continue;
            };
            let run_dir = self.layout.run_dir(&run);
            if !check_store_dir(&run_dir)? {
                continue;
            }
            let steps: Vec<u64> = std::fs::read_dir(&run_dir)
                .map_err(|e| Error::io("list directory", &run_dir, e))?
                .flatten()
                .filter_map(|st| st.file_name().to_str().and_then(parse_step_dir_name))
                .collect();
            // The newest step of the run that is complete: recorded here,
            // or recorded as uploaded (the remote holds its record).
            let newest_complete = steps
                .iter()
                .copied()
                .filter(|&s| {
                    std::fs::symlink_metadata(self.layout.manifest_path(&run, s))
                        .is_ok_and(|m| m.is_file())
                        || self.uploaded_to(&run, s).is_some()
                })
                .max();
            for step in steps {
                let parts = self.parts(&run, step)?;
                if parts.is_empty() {
                    continue;
                }
                let parts_dir = self.layout.parts_dir(&run, step);
                let file_age = |file: &str| {
                    std::fs::symlink_metadata(parts_dir.join(file))
                        .map(|m| age(clock, &m))
                        .unwrap_or(Duration::ZERO)
                };
                let record = match self.manifest(&run, step) {
                    Ok(m) => Some(m),
                    Err(e) if e.kind() == crate::error::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                let keep: Vec<&crate::shard::PartListing> = match &record {
                    None => {
                        if parts.iter().all(|p| file_age(&p.file) >= grace) {
                            // Past the grace, the parts may still be the
                            // only copy of ranks whose upload waits on an
                            // unreachable remote: they go only once the
                            // step is recorded as uploaded, or a newer step
                            // of the run is complete.
                            let drained = self.uploaded_to(&run, step).is_some()
                                || newest_complete.is_some_and(|c| c > step);
                            if drained {
                                scan.expired_steps.push(self.layout.step_dir(&run, step));
                                scan.expired_files += parts.len() as u64;
                                continue;
                            }
                            scan.kept_undrained += parts.len() as u64;
                        }
                        parts.iter().collect()
                    }
                    Some(m) => {
                        // Parts of another world size, or of a save
                        // attempt other than the committed one, are left
                        // from saves that were not committed.
                        let mut keep = Vec::new();
                        for p in &parts {
                            let stale = file_age(&p.file) >= grace
                                && (m.world_size != Some(p.world_size)
                                    || self
                                        .part_manifest(&run, step, &p.file)?
                                        .part
                                        .and_then(|x| x.attempt)
                                        != m.attempt);
                            if stale {
                                scan.expired_parts.push(parts_dir.join(&p.file));
                                scan.expired_files += 1;
                            } else {
                                keep.push(p);
                            }
                        }
                        keep
                    }
                };
                for p in keep {
                    let m = self.part_manifest(&run, step, &p.file)?;
                    scan.roots
                        .extend(m.distinct_chunks().into_iter().map(|(id, _)| id));
                }
            }
        }
        Ok(scan)
    }
}

impl RemoteStore {
    /// Collect unreferenced chunk objects and packs older than `grace` (see
    /// the module documentation for why this is safe with concurrent
    /// uploads), and pack maps left without a checkpoint as old.
    /// A zero `grace` is refused (`InvalidInput`): it would let the
    /// collection delete chunks an upload is relying on right now.
    /// Blocking; call it from a plain thread or `spawn_blocking`.
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        if grace.is_zero() {
            return Err(Error::invalid(
                "remote gc grace",
                "must be positive: uploads must finish within a quarter of it",
            ));
        }
        // Uploads rely on chunks up to half the recorded grace old: a
        // shorter collection could delete them under an upload.
        self.check_collection_grace(grace, dry_run)?;
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let tier: &dyn ChunkTier = self;
        let clock = tier.clock();
        // Chunks are listed before the roots: a chunk uploaded after this
        // listing is not a candidate at all.
        let chunks = tier.list_chunks()?;
        let packs = self.block_on(self.list_packs())??;
        let pack_maps = self.block_on(self.list_pack_maps())??;
        let marked_at = clock.now_ms();
        let (mut referenced, checkpoints) = mark(tier)?;
        // Every delete comes within `grace / 4` of the marking (the
        // manifest listing), or the collection stops: see the module
        // documentation for why the argument needs it.
        let within_deadline = || {
            let took = clock.since(marked_at);
            if took > grace / 4 {
                return Err(Error::DeadlineExceeded {
                    what: format!("remote collection of {}", tier.location()),
                    took,
                    limit: grace / 4,
                });
            }
            Ok(())
        };
        report.checkpoints = checkpoints;
        // A pack is live while the pack map of any committed checkpoint
        // names it: the map named by the hash of the committed manifest's
        // bytes. Maps are read after the pack listing, so a pack put since
        // is not a candidate; an unreadable map aborts.
        let mut live_packs: HashSet<ChunkId> = HashSet::new();
        let mut committed: HashSet<(String, u64, ChunkId)> = HashSet::new();
        for run in tier.runs()? {
            for step in tier.steps(&run)? {
                let path = self.manifest_path(&run, step);
                let bytes = match self.block_on(self.get_manifest_object(&path))? {
                    Ok(b) => b,
                    // Deleted since the listing: no root.
                    Err(Error::Remote {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e),
                };
                let hash = ChunkId::of(&bytes);
                if let Some(m) = self.block_on(self.pack_map_of(&run, step, &hash))?? {
                    live_packs.extend(m.packs.iter().map(|p| p.pack));
                }
                committed.insert((run.clone(), step, hash));
            }
        }
        report.referenced_packs = live_packs.len() as u64;
        // Pack maps of no committed manifest (an interrupted upload, one
        // that lost the commit race to another manifest of its step, or a
        // deleted checkpoint): removed past the grace, by the rule of chunk
        // objects. An uploader puts its map (renewing one of the same
        // manifest) within `grace / 4` of its commit, so a map still older
        // than the grace at a HEAD just before the delete, within
        // `grace / 4` of the marking, belongs to no manifest committed
        // since; an uploader that put it between that HEAD and the delete
        // puts it back after its commit.
        for (run, step, hash, modified) in pack_maps {
            if committed.contains(&(run.clone(), step, hash)) || clock.since(modified) < grace {
                continue;
            }
            match self.block_on(self.head_pack_map(&run, step, &hash))?? {
                Some(now) if clock.since(now.last_modified.timestamp_millis()) >= grace => {}
                _ => continue,
            }
            within_deadline()?;
            report.leftovers_removed += 1;
            if !dry_run {
                self.block_on(self.delete_pack_map(&run, step, &hash))??;
            }
        }
        // Remote parts (uploaded by each node of a sharded job) are roots,
        // until those of a step without a record all pass the grace.
        let part_grace = grace.max(crate::shard::PENDING_PART_MIN_GRACE);
        let mut by_step: std::collections::BTreeMap<
            (String, u64),
            Vec<(crate::shard::PartListing, i64)>,
        > = Default::default();
        for (run, step, p, modified) in self.all_parts()? {
            by_step.entry((run, step)).or_default().push((p, modified));
        }
        for ((run, step), parts) in by_step {
            let committed = self.block_on(self.has_manifest(&run, step))??;
            if !committed && parts.iter().all(|(_, m)| clock.since(*m) >= part_grace) {
                report.parts_removed += parts.len() as u64;
                if !dry_run {
                    for (p, _) in &parts {
                        self.delete_part(&run, step, &p.file)?;
                    }
                }
                continue;
            }
            for (p, _) in &parts {
                let m = self.part_manifest(&run, step, &p.file)?;
                referenced.extend(m.distinct_chunks().into_iter().map(|(id, _)| id));
            }
        }
        report.referenced_chunks = referenced.len() as u64;
        for c in chunks {
            if referenced.contains(&c.id) {
                continue;
            }
            if clock.since(c.modified_ms) < grace {
                report.chunks_in_grace += 1;
                continue;
            }
            // Re-check right before deleting: an uploader may have renewed it.
            match tier.chunk_info(&c.id)? {
                Some(now) if clock.since(now.modified_ms) >= grace => {}
                _ => {
                    report.chunks_in_grace += 1;
                    continue;
                }
            }
            within_deadline()?;
            report.chunks_deleted += 1;
            report.bytes_reclaimed += c.size;
            if !dry_run {
                tier.delete_chunk(&c.id)?;
            }
        }
        // Packs, by the same rule as chunk objects: unreferenced, older
        // than the grace, and still so at a HEAD just before the delete.
        // The store then forgets where the chunks of the deleted packs
        // were, also when the collection stops part-way.
        let mut deleted = std::collections::HashSet::new();
        let swept = (|| {
            for (id, modified, size) in packs {
                if live_packs.contains(&id) {
                    continue;
                }
                if clock.since(modified) < grace {
                    report.packs_in_grace += 1;
                    continue;
                }
                match self.block_on(self.head_pack(&id))?? {
                    Some(now) if clock.since(now.last_modified.timestamp_millis()) >= grace => {}
                    _ => {
                        report.packs_in_grace += 1;
                        continue;
                    }
                }
                within_deadline()?;
                report.packs_deleted += 1;
                report.bytes_reclaimed += size;
                if !dry_run {
                    self.block_on(self.delete_pack(&id))??;
                    deleted.insert(id);
                }
            }
            Ok(())
        })();
        self.forget_packs(&deleted);
        swept.map(|()| report)
    }

    /// Remote retention: for every run keep the newest `keep_last` (at
    /// least one) checkpoints and every step divisible by `keep_every`
    /// (when set); delete the other manifests. Returns what was deleted.
    pub async fn apply_retention(
        &self,
        keep_last: usize,
        keep_every: Option<u64>,
    ) -> Result<Vec<(String, u64)>> {
        let mut deleted = Vec::new();
        for run in self.runs().await? {
            let steps = self.steps(&run).await?;
            let cut = steps.len().saturating_sub(keep_last.max(1));
            for &s in &steps[..cut] {
                if keep_every.is_some_and(|k| k > 0 && s % k == 0) {
                    continue;
                }
                self.delete_checkpoint(&run, s).await?;
                deleted.push((run.clone(), s));
            }
        }
        Ok(deleted)
    }
}
