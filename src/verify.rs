//! Verify: re-read and re-hash every chunk of the selected checkpoints and
//! name each problem with the chunk and the tensors it hits. The same
//! procedure runs on any tier through [`ChunkTier`].

use crate::chunk_id::ChunkId;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::parallel::try_for_each;
use crate::store::{StepSel, Store};
use crate::tier::ChunkTier;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// One thing wrong in a store.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// The bad chunk, when the problem is a chunk.
    pub chunk: Option<String>,
    /// The file or object at fault.
    pub path: PathBuf,
    /// Tensors and blobs affected.
    pub tensors: Vec<String>,
    /// What is wrong.
    pub reason: String,
}

/// Result of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Checkpoints examined.
    pub checkpoints: u64,
    /// Part manifests of sharded steps examined (local stores: committed
    /// and pending parts).
    pub parts: u64,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Everything found wrong; empty means every byte checked out.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Where a chunk is used: run, step, entry name.
type EntryAt = (String, u64, String);

/// Verify checkpoints of `src`: all, one run's, or one step's. A named run
/// with no committed checkpoint, or a step that is not committed, is
/// [`Error::NotFound`] rather than an empty report.
pub fn verify(src: &dyn ChunkTier, run: Option<&str>, step: Option<u64>) -> Result<VerifyReport> {
    verify_with_parts(src, None, run, step)
}

/// [`verify`], and with `parts` (the same local store) the chunks of the
/// part manifests of every selected step, committed or pending; a pending
/// step named by `step` is verified through its parts alone.
fn verify_with_parts(
    src: &dyn ChunkTier,
    parts: Option<&Store>,
    run: Option<&str>,
    step: Option<u64>,
) -> Result<VerifyReport> {
    let mut runs = match run {
        Some(r) => vec![r.to_string()],
        None => src.runs()?,
    };
    if let (Some(store), None) = (parts, run) {
        // Runs with pending steps only.
        for r in store.run_dirs()? {
            if !runs.contains(&r) && !store.pending_steps(&r)?.is_empty() {
                runs.push(r);
            }
        }
    }
    let mut report = VerifyReport::default();
    let mut chunks: BTreeMap<ChunkId, (u64, Vec<EntryAt>)> = BTreeMap::new();
    for r in &runs {
        let pending = match parts {
            Some(store) => store.pending_steps(r)?,
            None => Vec::new(),
        };
        let steps = match step {
            Some(s) if pending.contains(&s) => Vec::new(),
            Some(s) => vec![src.resolve(r, StepSel::Step(s))?],
            None => {
                let steps = src.steps(r)?;
                if steps.is_empty() && run.is_some() && pending.is_empty() {
                    return Err(Error::NotFound {
                        what: format!("any committed checkpoint of run {r}"),
                    });
                }
                steps
            }
        };
        if let Some(store) = parts {
            let mut with_parts: Vec<u64> = steps.iter().copied().chain(pending).collect();
            if let Some(s) = step {
                with_parts.retain(|&x| x == s);
            }
            for s in with_parts {
                for p in store.parts(r, s)? {
                    report.parts += 1;
                    let m = match store.part_manifest(r, s, &p.file) {
                        Ok(m) => m,
                        Err(e) => {
                            report.problems.push(Problem {
                                run: r.clone(),
                                step: s,
                                chunk: None,
                                path: store.layout.parts_dir(r, s).join(&p.file),
                                tensors: Vec::new(),
                                reason: e.to_string(),
                            });
                            continue;
                        }
                    };
                    for e in m.all_entries() {
                        let name = format!("{} (part of rank {})", e.name, p.rank);
                        for c in e.chunks {
                            let slot = chunks.entry(c.id).or_insert((c.chunk_len, Vec::new()));
                            if slot.1.last().is_none_or(|l| l.2 != name || l.1 != s) {
                                slot.1.push((r.clone(), s, name.clone()));
                            }
                        }
                    }
                }
            }
        }
        for s in steps {
            report.checkpoints += 1;
            let m = match src.manifest(r, s) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(Problem {
                        run: r.clone(),
                        step: s,
                        chunk: None,
                        path: src.manifest_location(r, s),
                        tensors: Vec::new(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            for e in m.all_entries() {
                for c in e.chunks {
                    let slot = chunks.entry(c.id).or_insert((c.chunk_len, Vec::new()));
                    if slot.1.last().is_none_or(|l| l.2 != e.name || l.1 != s) {
                        slot.1.push((r.clone(), s, e.name.to_string()));
                    }
                }
            }
        }
    }
    let list: Vec<_> = chunks.into_iter().collect();
    let order: Vec<(ChunkId, u64)> = list.iter().map(|(id, (len, _))| (*id, *len)).collect();
    src.prepare_reads(&order);
    let bytes = AtomicU64::new(0);
    let checked = AtomicU64::new(0);
    let bad: Mutex<HashMap<ChunkId, Error>> = Mutex::new(HashMap::new());
    try_for_each(
        list.iter(),
        src.threads(),
        || Ok((Vec::new(), Vec::new(), Decoder::new()?)),
        |(buf, scratch, dec), (id, (len, _))| {
            match src.read_chunk(id, *len, None, buf, scratch, dec) {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    bad.lock().unwrap_or_else(|p| p.into_inner()).insert(*id, e);
                }
            }
            checked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;
    report.chunks_checked = checked.into_inner();
    report.bytes_read = bytes.into_inner();
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    for (id, (_, users)) in &list {
        let Some(err) = bad.get(id) else { continue };
        let mut per_ckpt: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for (r, s, name) in users {
            per_ckpt
                .entry((r.clone(), *s))
                .or_default()
                .push(name.clone());
        }
        for ((r, s), tensors) in per_ckpt {
            report.problems.push(Problem {
                run: r,
                step: s,
                chunk: Some(id.to_hex()),
                path: src.chunk_location(id),
                tensors,
                reason: match err {
                    Error::CorruptChunk { reason, .. } => reason.clone(),
                    other => other.to_string(),
                },
            });
        }
    }
    Ok(report)
}

impl Store {
    /// Verify checkpoints: all of them, one run's, or one step's.
    /// The part manifests of sharded steps (committed or pending) are
    /// verified too: each parses, and every chunk it references is read
    /// and hashed.
    pub fn verify(&self, run: Option<&str>, step: Option<u64>) -> Result<VerifyReport> {
        verify_with_parts(self, Some(self), run, step)
    }
}
