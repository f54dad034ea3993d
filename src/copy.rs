//! Copying a checkpoint between tiers: chunks the target lacks, in
//! parallel, each verified; then the manifest, last and only if absent.
//! One algorithm serves `cairn restore --to`, [`crate::Store::upload`] and
//! the flush daemon. A copy interrupted at any point leaves no checkpoint
//! at the target, and running it again skips the chunks already there.

use crate::chunk_id::ChunkId;
use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::encode_manifest;
use crate::parallel::try_for_each;
use crate::tier::{ChunkTier, ReuseRule};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// Tensors in the copied checkpoint.
    pub tensors: u64,
    /// Distinct chunks it references.
    pub chunks: u64,
    /// Chunks copied by this call.
    pub chunks_copied: u64,
    /// Chunks the target already held (e.g. from an interrupted copy).
    pub chunks_skipped: u64,
    /// Chunks the target held but too old to rely on, written again.
    pub chunks_renewed: u64,
    /// Chunks the target held but corrupt or unreadable, written again.
    pub chunks_repaired: u64,
    /// Renewed chunks found deleted after the commit and put back.
    pub chunks_restored_after_commit: u64,
    /// Bytes of chunk objects copied, as the target stores them.
    pub bytes_copied: u64,
    /// Whether the target already had this exact manifest.
    pub already_present: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// How [`copy_checkpoint`] treats what it finds at the target.
pub struct CopyOptions<'a> {
    /// Copy only the tensors this accepts (blobs always); the target gets
    /// a manifest listing just those.
    pub select: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    /// Read back and hash a chunk the target already holds before relying
    /// on it (a corrupt one is written again). Costs a read of each present
    /// chunk; `cairn restore --to` does it, the flush daemon does not.
    pub verify_present: bool,
    /// Chunks copied at once.
    pub threads: usize,
    /// Called with the uncompressed bytes of each chunk done.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

impl Default for CopyOptions<'_> {
    fn default() -> Self {
        CopyOptions {
            select: None,
            verify_present: false,
            threads: 8,
            progress: &|_| {},
        }
    }
}

/// What to do with one chunk after looking at the target.
enum Found {
    Reuse,
    Renew,
    Repair,
    Missing,
}

/// Copy checkpoint `(run, step)` from `src` to `dst`: the chunks `dst`
/// lacks, in parallel, each verified as it is read and published
/// atomically; then the manifest, create-only. This is the one algorithm
/// behind `cairn restore --to`, [`crate::Store::upload`] and the flush
/// daemon, so every writer follows the target's [`ReuseRule`]:
///
/// - on the local tier, the copy holds the collection lock until it
///   commits, so a present chunk is safe to rely on;
/// - on the remote tier, a present chunk is relied on only if younger than
///   `refresh_after` (an older one is written again, renewing it); the
///   manifest is committed only within `commit_within` of the first look;
///   and renewed chunks are checked once more after the commit, since a
///   collector may have deleted one on its old age just before the renewal
///   landed (the manifest now protects it, so it is put back);
/// - on a remote with `pack_threshold` set, chunks up to that size go into
///   packs under the same rules (a chunk in a pack of an earlier
///   checkpoint is reused only while that pack is younger than
///   `refresh_after`, else packed again; renewed packs are checked after
///   the commit), and the checkpoint's pack map is put before its
///   manifest.
pub fn copy_checkpoint(
    src: &dyn ChunkTier,
    dst: &dyn ChunkTier,
    run: &str,
    step: u64,
    opts: &CopyOptions<'_>,
) -> Result<CopyReport> {
    let t0 = Instant::now();
    // Copied chunks are unreferenced until the manifest commits: hold off
    // collection meanwhile, as a save does.
    let _guard = dst.write_guard()?;
    // On a remote, the grace its collectors use (recorded there) bounds how
    // old a chunk this copy relies on may be.
    if let Some(r) = dst.as_remote() {
        r.upload_grace()?;
    }
    let started_ms = dst.clock().now_ms();
    let mut manifest = src.manifest(run, step)?;
    let bytes = match opts.select {
        None => src.manifest_bytes(run, step)?,
        Some(f) => {
            manifest.tensors.retain(|t| f(&t.name));
            manifest.sharded.retain(|t| f(&t.name));
            if manifest.tensor_count() == 0 {
                return Err(Error::NotFound {
                    what: format!("tensors matching the selection in run {run} step {step}"),
                });
            }
            encode_manifest(&manifest)?
        }
    };
    let chunks: Vec<(ChunkId, u64)> = manifest.distinct_chunks();
    // A remote that packs takes its small chunks in packs (see
    // `remote::pack`); the others go one object each.
    let packing = dst.as_remote().filter(|r| r.options().pack_threshold > 0);
    let (small, single): (Vec<_>, Vec<_>) = match packing {
        Some(r) => {
            let t = r.options().pack_threshold as u64;
            chunks.iter().partition(|(_, len)| *len <= t)
        }
        None => (Vec::new(), chunks.clone()),
    };
    let copied = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let renewed_n = AtomicU64::new(0);
    let repaired = AtomicU64::new(0);
    let bytes_copied = AtomicU64::new(0);
    let renewed: Mutex<Vec<(ChunkId, u64)>> = Mutex::new(Vec::new());
    let put = |id: &ChunkId, len: u64| -> Result<()> {
        let object = src.read_chunk_object(id, len)?;
        let n = dst.put_chunk_object(id, object)?;
        copied.fetch_add(1, Ordering::Relaxed);
        bytes_copied.fetch_add(n, Ordering::Relaxed);
        Ok(())
    };
    try_for_each(
        single.iter().copied(),
        opts.threads,
        || Ok(()),
        |_, (id, len)| {
            let found = match dst.chunk_info(&id)? {
                None => Found::Missing,
                Some(info) if !dst.is_fresh(&info) => Found::Renew,
                Some(_) if opts.verify_present => match dst.read_chunk_object(&id, len) {
                    Ok(_) => Found::Reuse,
                    Err(e) if matches!(e.kind(), ErrorKind::Data | ErrorKind::NotFound) => {
                        tracing::warn!(chunk = %id, error = %e, "chunk at the target is unusable; copying it again");
                        Found::Repair
                    }
                    Err(e) => return Err(e),
                },
                Some(_) => Found::Reuse,
            };
            match found {
                Found::Reuse => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                }
                Found::Missing => put(&id, len)?,
                Found::Repair => {
                    put(&id, len)?;
                    repaired.fetch_add(1, Ordering::Relaxed);
                }
                Found::Renew => {
                    renewed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, len));
                    put(&id, len)?;
                    renewed_n.fetch_add(1, Ordering::Relaxed);
                }
            }
            (opts.progress)(len);
            Ok(())
        },
    )?;
    let mut renewed_packs = Vec::new();
    let manifest_hash = ChunkId::of(&bytes);
    let mut map_put = None;
    if let Some(remote) = packing {
        let fresh = |modified_ms: i64| {
            dst.is_fresh(&crate::tier::ChunkInfo {
                id: ChunkId::of(b""),
                size: 0,
                modified_ms,
            })
        };
        let up = crate::remote::pack::upload_packed(
            src,
            remote,
            run,
            step,
            &manifest_hash,
            &small,
            opts,
            &fresh,
        )?;
        copied.fetch_add(up.chunks_packed, Ordering::Relaxed);
        skipped.fetch_add(up.chunks_reused, Ordering::Relaxed);
        bytes_copied.fetch_add(up.bytes, Ordering::Relaxed);
        renewed_n.fetch_add(up.renewed.len() as u64, Ordering::Relaxed);
        renewed_packs = up.renewed;
        // The pack map goes before the manifest: the manifest stays the
        // one commit point. It is named by the manifest's hash, so it
        // never replaces the map of another manifest of this step.
        if let Some(map) = up.map.filter(|m| !m.packs.is_empty()) {
            remote.block_on(remote.put_pack_map(&map, &manifest_hash))??;
            map_put = Some(map);
        }
    }
    if let (Some(remote), None) = (dst.as_remote(), &map_put) {
        // No map for this manifest: one left by an interrupted packing
        // upload of the same manifest would be trusted by readers over the
        // chunk objects just put, so it goes before the commit.
        if remote
            .block_on(remote.head_pack_map(run, step, &manifest_hash))??
            .is_some()
            && !remote.block_on(remote.has_manifest(run, step))??
        {
            remote.block_on(remote.delete_pack_map(run, step, &manifest_hash))??;
        }
    }
    if let ReuseRule::Grace { commit_within, .. } = dst.reuse_rule() {
        // A chunk found present was young enough to be safe from
        // collection for commit_within after the first look; publish
        // within that window or not at all (the next attempt starts over).
        let took = dst.clock().since(started_ms);
        if took > commit_within {
            return Err(Error::DeadlineExceeded {
                what: format!("copy of run {run} step {step} to {}", dst.location()),
                took,
                limit: commit_within,
            });
        }
    }
    crate::failpoint::hit("copy.before_commit")
        .map_err(|e| Error::io("fail point", dst.manifest_location(run, step), e))?;
    let created = dst.commit_manifest(run, step, &bytes)?;
    let mut restored_after = 0;
    for (id, len) in renewed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        if dst.chunk_info(&id)?.is_none() {
            tracing::warn!(chunk = %id, "renewed chunk vanished under collection; copying it again");
            put(&id, len)?;
            restored_after += 1;
        }
    }
    if let (Some(remote), Some(map)) = (packing, &map_put) {
        // A collector may have removed an old map of this manifest (left by
        // an interrupted upload) between its HEAD and this upload's put;
        // the manifest now protects it, so it is put back.
        if remote
            .block_on(remote.head_pack_map(run, step, &manifest_hash))??
            .is_none()
        {
            tracing::warn!(
                run,
                step,
                "pack map vanished under collection; putting it again"
            );
            remote.block_on(remote.put_pack_map(map, &manifest_hash))??;
            restored_after += 1;
        }
    }
    if let Some(remote) = packing {
        for (id, pack) in renewed_packs {
            if remote.block_on(remote.head_pack(&id))??.is_none() {
                tracing::warn!(pack = %id, "renewed pack vanished under collection; putting it again");
                remote.block_on(remote.put_pack_again(&id, pack))??;
                restored_after += 1;
            }
        }
    }
    Ok(CopyReport {
        run: run.to_string(),
        step,
        tensors: manifest.tensor_count() as u64,
        chunks: chunks.len() as u64,
        chunks_copied: copied.into_inner(),
        chunks_skipped: skipped.into_inner(),
        chunks_renewed: renewed_n.into_inner(),
        chunks_repaired: repaired.into_inner(),
        chunks_restored_after_commit: restored_after,
        bytes_copied: bytes_copied.into_inner(),
        already_present: !created,
        elapsed: t0.elapsed(),
    })
}

/// A shell-style glob: `*` any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("model.layers.*.weight", "model.layers.3.weight"));
        assert!(!glob_match("model.layers.*.weight", "model.layers.3.bias"));
        assert!(glob_match("l?.w", "l1.w"));
        assert!(!glob_match("l?.w", "l12.w"));
        assert!(glob_match("*.exp_avg*", "optimizer.w.exp_avg_sq"));
        assert!(!glob_match("", "x"));
    }
}
