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
//! agree to within `grace / 8`; the default grace is 24 hours.

use crate::chunk_id::ChunkId;
use crate::error::{Error, Result};
use crate::layout::parse_step_dir_name;
use crate::local::durable::fsync_dir;
use crate::local::GcLock;
use crate::remote::RemoteStore;
use crate::store::Store;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

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
    /// Nothing was deleted.
    pub dry_run: bool,
}

fn age(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or(Duration::ZERO)
}

impl Store {
    /// Collect unreferenced chunks of the local tier older than `grace`,
    /// leftover temporary files and uncommitted step directories. Waits for
    /// in-flight saves to commit and holds off new ones while it runs. Any
    /// unreadable manifest aborts the collection: nothing is deleted on
    /// partial knowledge.
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _lock = GcLock::exclusive(self.root())?;
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        for run in self.runs()? {
            for step in self.steps(&run)? {
                // A checkpoint deleted since the listing is no longer a root.
                let m = match self.manifest(&run, step) {
                    Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
                    other => other?,
                };
                referenced.extend(m.distinct_chunks().into_iter().map(|(id, _)| id));
                report.checkpoints += 1;
            }
        }
        report.referenced_chunks = referenced.len() as u64;
        for prefix in 0..=255u8 {
            let dir = self.layout.chunk_dir_for_prefix(prefix);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut removed = false;
            for ent in rd.flatten() {
                let name = ent.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) else {
                    continue;
                };
                if referenced.contains(&id) {
                    continue;
                }
                let Ok(meta) = ent.metadata() else { continue };
                if age(&meta) < grace {
                    report.chunks_in_grace += 1;
                    continue;
                }
                report.chunks_deleted += 1;
                report.bytes_reclaimed += meta.len();
                if !dry_run {
                    std::fs::remove_file(ent.path())
                        .map_err(|e| Error::io("remove chunk", ent.path(), e))?;
                    removed = true;
                }
            }
            if removed {
                fsync_dir(&dir)?;
            }
        }
        // Leftovers of interrupted saves.
        // Temporary files may belong to a repair or copy that does not
        // hold the lock; leave them at least ten minutes whatever the grace.
        let tmp_grace = grace.max(Duration::from_secs(600));
        if let Ok(rd) = std::fs::read_dir(self.layout.tmp_dir()) {
            for ent in rd.flatten() {
                if ent.metadata().is_ok_and(|m| age(&m) >= tmp_grace) {
                    report.leftovers_removed += 1;
                    if !dry_run {
                        let _ = std::fs::remove_file(ent.path());
                    }
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.layout.runs_dir()) {
            for run in rd.flatten() {
                let Ok(steps) = std::fs::read_dir(run.path()) else {
                    continue;
                };
                for st in steps.flatten() {
                    let p = st.path();
                    let named_step = st.file_name().to_str().and_then(parse_step_dir_name);
                    if named_step.is_some()
                        && !p.join(crate::layout::MANIFEST_FILE).exists()
                        && st.metadata().is_ok_and(|m| age(&m) >= grace)
                    {
                        report.leftovers_removed += 1;
                        if !dry_run {
                            let _ = std::fs::remove_dir_all(&p);
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Local retention: keep the newest `keep_last` checkpoints of every
    /// run; delete older ones, but only those recorded as durable in the
    /// remote at `remote_url`, and never the newest such one. Returns what
    /// was deleted.
    pub fn apply_local_retention(
        &self,
        keep_last: usize,
        remote_url: &str,
    ) -> Result<Vec<(String, u64)>> {
        let mut deleted = Vec::new();
        for run in self.runs()? {
            let steps = self.steps(&run)?;
            let newest_durable = steps
                .iter()
                .rev()
                .find(|&&s| self.is_uploaded(&run, s, remote_url))
                .copied();
            let cut = steps.len().saturating_sub(keep_last.max(1));
            for &s in &steps[..cut] {
                if Some(s) != newest_durable && self.is_uploaded(&run, s, remote_url) {
                    self.delete(&run, s)?;
                    deleted.push((run.clone(), s));
                }
            }
        }
        Ok(deleted)
    }
}

impl RemoteStore {
    /// Collect unreferenced chunk objects older than `grace` (see the
    /// module documentation for why this is safe with concurrent uploads).
    pub async fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let chunks = self.list_chunks().await?;
        let marked_at = Instant::now();
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        for run in self.runs().await? {
            for step in self.steps(&run).await? {
                // A checkpoint deleted since the listing is no longer a root.
                let m = match self.manifest(&run, step).await {
                    Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
                    other => other?,
                };
                referenced.extend(m.distinct_chunks().into_iter().map(|(id, _)| id));
                report.checkpoints += 1;
            }
        }
        report.referenced_chunks = referenced.len() as u64;
        let grace_ms = grace.as_millis() as i64;
        for (id, modified_ms, size) in chunks {
            if referenced.contains(&id) {
                continue;
            }
            if crate::remote::upload::now_ms() - modified_ms < grace_ms {
                report.chunks_in_grace += 1;
                continue;
            }
            // Re-check right before deleting: an uploader may have renewed it.
            match self.head_chunk(&id).await? {
                Some(meta)
                    if crate::remote::upload::now_ms() - meta.last_modified.timestamp_millis()
                        >= grace_ms => {}
                _ => {
                    report.chunks_in_grace += 1;
                    continue;
                }
            }
            if marked_at.elapsed() > grace / 4 {
                return Err(Error::Internal(
                    "remote collection took longer than a quarter of the grace period; stopped"
                        .into(),
                ));
            }
            report.chunks_deleted += 1;
            report.bytes_reclaimed += size;
            if !dry_run {
                self.delete_chunk(&id).await?;
            }
        }
        Ok(report)
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
