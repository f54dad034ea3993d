//! `cairn ls`.

use super::open::{open, print_json};
use super::size::human;
use cairn::Tier;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

#[derive(Serialize)]
struct Entry {
    run: String,
    step: u64,
    created_unix_ms: u64,
    created: String,
    tensors: usize,
    blobs: usize,
    /// Bytes of tensors and blobs.
    logical_bytes: u64,
    /// Uncompressed bytes of the distinct chunks it references.
    unique_bytes: u64,
    /// Stored bytes of those chunks.
    stored_bytes: u64,
    /// Stored bytes of chunks the previous step of the run did not have.
    new_stored_bytes: u64,
    /// logical / unique.
    dedup_ratio: f64,
    /// unique / stored.
    compression_ratio: f64,
    chunks: usize,
    /// Tiers known to hold it.
    tiers: Vec<String>,
    /// Training metrics stored with it (non-finite ones as null).
    metrics: cairn::Metrics,
    /// Set for a sharded step: the number of ranks it was saved by.
    #[serde(skip_serializing_if = "Option::is_none")]
    world_size: Option<u32>,
    /// Part manifests of a sharded step present in a local store.
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<usize>,
}

/// A sharded step with parts but no record (local stores): not a
/// checkpoint yet.
#[derive(Serialize)]
struct Pending {
    run: String,
    step: u64,
    pending: bool,
    /// Per world size found: the ranks that published a part.
    parts: BTreeMap<u32, Vec<u32>>,
}

/// A checkpoint (or, without a step, a run) that could not be read.
#[derive(Serialize)]
struct Bad {
    run: String,
    step: Option<u64>,
    error: String,
}

/// One element of the JSON listing, in run and step order.
#[derive(Serialize)]
#[serde(untagged)]
enum Row<'a> {
    Ok(&'a Entry),
    Bad(&'a Bad),
    Pending(&'a Pending),
}

/// Record a run (no step) or checkpoint that could not be read, in
/// listing order.
fn flag(
    order: &mut Vec<(bool, usize)>,
    bad: &mut Vec<Bad>,
    run: &str,
    step: Option<u64>,
    e: &cairn::Error,
) {
    order.push((true, bad.len()));
    bad.push(Bad {
        run: run.to_string(),
        step,
        error: e.to_string(),
    });
}

pub fn run(
    location: &str,
    run_filter: Option<&str>,
    metric_filter: Option<&cairn::MetricFilter>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let mut sizes = tier.chunk_sizes()?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    // (is_bad, index) in listing order, for the JSON output.
    let mut order = Vec::new();
    let has_pending = |r: &str| -> cairn::Result<bool> {
        Ok(match &tier {
            Tier::Local(s) => !s.pending_steps(r)?.is_empty(),
            _ => false,
        })
    };
    let runs = match run_filter {
        Some(r) if tier.steps(r)?.is_empty() && !has_pending(r)? => {
            return Err(cairn::Error::NotFound {
                what: format!("any committed checkpoint of run {r} in {}", tier.location()),
            })
        }
        Some(r) => vec![r.to_string()],
        None => tier.runs()?,
    };
    for run in runs {
        let mut prev: HashSet<cairn::ChunkId> = HashSet::new();
        let steps = match tier.steps(&run) {
            Ok(s) => s,
            // With --run, an invalid name is a bad argument, not bad data.
            Err(e) if run_filter.is_some() => return Err(e),
            Err(e) => {
                flag(&mut order, &mut bad, &run, None, &e);
                continue;
            }
        };
        for step in steps {
            // One unreadable checkpoint does not hide the others. Packed
            // chunks of a remote checkpoint are not chunk objects: their
            // stored sizes are in the checkpoint's pack map.
            let read = tier.manifest(&run, step).and_then(|m| {
                let chunks = m.distinct_chunks();
                if chunks.iter().any(|c| !sizes.contains_key(&c.0)) {
                    for (id, len) in tier.packed_chunk_sizes(&run, step)? {
                        sizes.entry(id).or_insert(len);
                    }
                }
                Ok((m, chunks))
            });
            let (m, chunks) = match read {
                Ok(r) => r,
                Err(e) => {
                    flag(&mut order, &mut bad, &run, Some(step), &e);
                    continue;
                }
            };
            let unique: u64 = chunks.iter().map(|c| c.1).sum();
            let stored: u64 = chunks
                .iter()
                .map(|c| sizes.get(&c.0).copied().unwrap_or(0))
                .sum();
            let new_stored: u64 = chunks
                .iter()
                .filter(|c| !prev.contains(&c.0))
                .map(|c| sizes.get(&c.0).copied().unwrap_or(0))
                .sum();
            prev = chunks.iter().map(|c| c.0).collect();
            // Filtered out after `prev` is set: NEW stays relative to the
            // run's previous step, listed or not.
            if metric_filter.is_some_and(|f| !f.matches(&m.metrics)) {
                continue;
            }
            let logical = m.logical_bytes();
            let mut tiers = vec![tier.kind().to_string()];
            if let Tier::Local(s) = &tier {
                if let Some(url) = upload_url(s, &run, step) {
                    tiers.push(format!("remote ({url})"));
                }
            }
            let created = created_text(m.created_unix_ms);
            let parts = match &tier {
                Tier::Local(s) if m.world_size.is_some() => s.parts(&run, step).ok().map(|p| {
                    p.iter()
                        .filter(|p| Some(p.world_size) == m.world_size)
                        .count()
                }),
                _ => None,
            };
            order.push((false, out.len()));
            out.push(Entry {
                world_size: m.world_size,
                parts,
                run: run.clone(),
                step,
                created_unix_ms: m.created_unix_ms,
                created,
                tensors: m.tensor_count(),
                blobs: m.blobs.len(),
                logical_bytes: logical,
                unique_bytes: unique,
                stored_bytes: stored,
                new_stored_bytes: new_stored,
                dedup_ratio: if unique > 0 {
                    logical as f64 / unique as f64
                } else {
                    1.0
                },
                compression_ratio: if stored > 0 {
                    unique as f64 / stored as f64
                } else {
                    1.0
                },
                chunks: chunks.len(),
                tiers,
                metrics: m.metrics,
            });
        }
    }
    // Sharded steps saved by some ranks but not committed (local only).
    let mut pending = Vec::new();
    if let Tier::Local(s) = &tier {
        let runs = match run_filter {
            Some(r) => vec![r.to_string()],
            None => s.run_dirs()?,
        };
        for run in runs {
            // A run that cannot be read (a symbolic link, permissions) is
            // a BAD row, once, and the others are still listed.
            let steps = match s.pending_steps(&run) {
                Ok(steps) => steps,
                Err(e) => {
                    if !bad.iter().any(|b| b.run == run && b.step.is_none()) {
                        flag(&mut order, &mut bad, &run, None, &e);
                    }
                    continue;
                }
            };
            for step in steps {
                let mut parts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
                for p in s.parts(&run, step)? {
                    let ranks = parts.entry(p.world_size).or_default();
                    if ranks.last() != Some(&p.rank) {
                        ranks.push(p.rank);
                    }
                }
                pending.push(Pending {
                    run: run.clone(),
                    step,
                    pending: true,
                    parts,
                });
            }
        }
    }
    // A metric selection that matches nothing is an error, as every
    // selection is (`latest --where` too).
    if let (Some(f), true) = (metric_filter, out.is_empty() && bad.is_empty()) {
        return Err(cairn::Error::NotFound {
            what: format!("checkpoints whose metrics match {f} in {}", tier.location()),
        });
    }
    if json {
        let rows: Vec<Row> = order
            .iter()
            .map(|&(is_bad, i)| {
                if is_bad {
                    Row::Bad(&bad[i])
                } else {
                    Row::Ok(&out[i])
                }
            })
            .chain(pending.iter().map(Row::Pending))
            .collect();
        print_json(&rows)?;
    } else if out.is_empty() && bad.is_empty() && pending.is_empty() {
        outln!("no checkpoints in {}", tier.location());
    } else if !out.is_empty() {
        let with_metrics = out.iter().any(|e| !e.metrics.is_empty());
        outln!(
            "{:<20} {:>10} {:<20} {:>8} {:>10} {:>10} {:>10} {:>6} {:>6}  TIERS{}",
            "RUN",
            "STEP",
            "CREATED",
            "TENSORS",
            "SIZE",
            "STORED",
            "NEW",
            "DEDUP",
            "COMPR",
            if with_metrics { "  METRICS" } else { "" }
        );
        for e in &out {
            outln!(
                "{:<20} {:>10} {:<20} {:>8} {:>10} {:>10} {:>10} {:>5.2}x {:>5.2}x  {}{}",
                e.run,
                e.step,
                e.created,
                e.tensors,
                human(e.logical_bytes),
                human(e.stored_bytes),
                human(e.new_stored_bytes),
                e.dedup_ratio,
                e.compression_ratio,
                e.tiers.join(", ")
                    + &match (e.world_size, e.parts) {
                        (Some(w), Some(p)) => format!("; world {w}, {p} parts committed"),
                        (Some(w), None) => format!("; world {w}"),
                        _ => String::new(),
                    },
                metrics_text(&e.metrics)
            );
        }
    }
    if !json {
        for p in &pending {
            let worlds: Vec<String> = p
                .parts
                .iter()
                .map(|(w, ranks)| format!("world {w}: {} of {w} parts", ranks.len()))
                .collect();
            outln!(
                "PENDING  run {} step {}: {} (not committed)",
                p.run,
                p.step,
                worlds.join("; ")
            );
        }
    }
    if !json {
        for b in &bad {
            match b.step {
                Some(step) => outln!("BAD  run {} step {}: {}", b.run, step, b.error),
                None => outln!("BAD  run {}: {}", b.run, b.error),
            }
        }
    }
    Ok(if bad.is_empty() { 0 } else { 1 })
}

/// `  loss=2.31 grad_norm=0.9`, or nothing without metrics.
fn metrics_text(m: &std::collections::BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", metric_text(*v)))
        .collect();
    format!("  {}", parts.join(" "))
}

/// A metric's value, exactly (the shortest text that reads back as the
/// same number): plainly (`2.31`), or with an exponent where plain digits
/// would run long (`1e308`, `2.5e-9`).
fn metric_text(v: f64) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() >= 1e16 || v.abs() < 1e-5) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

fn upload_url(store: &cairn::Store, run: &str, step: u64) -> Option<String> {
    store.uploaded_to(run, step)
}

/// First millisecond of the year 10000, which RFC 3339 cannot write.
const YEAR_10000_MS: u64 = 253_402_300_800_000;

/// A manifest's creation time as RFC 3339 (UTC, seconds), or, past what
/// that format can write, as milliseconds since the Unix epoch.
fn created_text(unix_ms: u64) -> String {
    if unix_ms < YEAR_10000_MS {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms),
        )
        .to_string()
    } else {
        format!("{unix_ms} ms after 1970")
    }
}
