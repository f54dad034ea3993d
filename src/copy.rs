//! Copying a checkpoint between tiers (`cairn restore --to`): chunks the
//! target lacks, in parallel, each verified; then the manifest, last and
//! only if absent. A copy interrupted at any point leaves no checkpoint at
//! the target, and running it again skips the chunks already there.

use crate::chunk_id::ChunkId;
use crate::error::{Error, Result};
use crate::format::manifest::encode_manifest;
use crate::tier::Tier;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Bytes of chunk objects copied.
    pub bytes_copied: u64,
    /// Whether the target already had this exact manifest.
    pub already_present: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// Copy checkpoint `(run, step)` from `src` to `dst`. With `select`, only
/// the tensors it accepts are copied (blobs always) and the target gets a
/// manifest listing just those. `progress` is called with bytes copied.
pub fn copy_checkpoint(
    src: &Tier,
    dst: &Tier,
    run: &str,
    step: u64,
    select: Option<&(dyn Fn(&str) -> bool + Sync)>,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<CopyReport> {
    let t0 = Instant::now();
    // Copied chunks are unreferenced until the manifest commits: hold off
    // local collection meanwhile, as a save does.
    let _gc_lock = match dst {
        Tier::Local(s) => Some(crate::local::GcLock::shared(s.root())?),
        Tier::Remote(_) => None,
    };
    let mut manifest = src.manifest(run, step)?;
    let bytes = match select {
        None => src.manifest_bytes(run, step)?,
        Some(f) => {
            manifest.tensors.retain(|t| f(&t.name));
            if manifest.tensors.is_empty() {
                return Err(Error::NotFound {
                    what: format!("tensors matching the selection in run {run} step {step}"),
                });
            }
            encode_manifest(&manifest)?
        }
    };
    let chunks: Vec<(ChunkId, u64)> = manifest.distinct_chunks();
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let bytes_copied = AtomicU64::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, chunks.len().max(1)) {
            s.spawn(|| loop {
                if first_err.lock().map(|g| g.is_some()).unwrap_or(true) {
                    return;
                }
                let Some(&(id, len)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let r = (|| -> Result<()> {
                    if dst.has_verified_chunk(&id, len)? {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        progress(len);
                        return Ok(());
                    }
                    let object = src.read_chunk_object(&id, len)?;
                    let n = object.len() as u64;
                    dst.put_chunk_object(&id, object)?;
                    copied.fetch_add(1, Ordering::Relaxed);
                    bytes_copied.fetch_add(n, Ordering::Relaxed);
                    progress(len);
                    Ok(())
                })();
                if let Err(e) = r {
                    let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
                    g.get_or_insert(e);
                    return;
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if let Tier::Remote(r) = dst {
        // Same rule as uploads: chunks found present were young enough to
        // be safe from remote collection for gc_grace / 4 (see crate::gc).
        if t0.elapsed() > r.options().gc_grace / 4 {
            return Err(Error::Internal(format!(
                "copy of run {run} step {step} took {:?}, longer than a quarter of the gc grace period; not committing",
                t0.elapsed()
            )));
        }
    }
    let created = dst.commit_manifest(run, step, bytes)?;
    Ok(CopyReport {
        run: run.to_string(),
        step,
        tensors: manifest.tensors.len() as u64,
        chunks: chunks.len() as u64,
        chunks_copied: copied.into_inner(),
        chunks_skipped: skipped.into_inner(),
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
