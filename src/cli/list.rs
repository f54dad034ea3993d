//! `cairn ls`.

use super::size::human;
use cairn::{Store, StoreOptions};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
struct Entry {
    run: String,
    step: u64,
    created_unix_ms: u64,
    tensors: usize,
    blobs: usize,
    logical_bytes: u64,
    chunks: usize,
}

pub fn run(store: &Path, json: bool) -> cairn::Result<i32> {
    let store = Store::open_read_only(store, StoreOptions::default())?;
    let mut out = Vec::new();
    for run in store.runs()? {
        for step in store.steps(&run)? {
            let m = store.manifest(&run, step)?;
            out.push(Entry {
                run: run.clone(),
                step,
                created_unix_ms: m.created_unix_ms,
                tensors: m.tensors.len(),
                blobs: m.blobs.len(),
                logical_bytes: m.logical_bytes(),
                chunks: m.distinct_chunks().len(),
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else if out.is_empty() {
        println!("no checkpoints in {}", store.root().display());
    } else {
        println!(
            "{:<24} {:>12} {:>8} {:>7} {:>12}",
            "RUN", "STEP", "TENSORS", "CHUNKS", "SIZE"
        );
        for e in &out {
            println!(
                "{:<24} {:>12} {:>8} {:>7} {:>12}",
                e.run,
                e.step,
                e.tensors,
                e.chunks,
                human(e.logical_bytes)
            );
        }
    }
    Ok(0)
}
