//! `cairn inspect`.

use super::open::{open, print_json};
use super::size::human;
use cairn::glob_match;
use cairn::StepSel;
use serde::Serialize;

#[derive(Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    bytes: u64,
    chunks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<cairn::ShardInfo>,
}

#[derive(Serialize)]
struct BlobRow {
    name: String,
    bytes: u64,
}

#[derive(Serialize)]
struct Inspect {
    run: String,
    step: u64,
    created_unix_ms: u64,
    logical_bytes: u64,
    tensors: Vec<TensorRow>,
    blobs: Vec<BlobRow>,
    metadata: serde_json::Value,
}

pub fn run(
    location: &str,
    run: &str,
    step: StepSel,
    glob: Option<&str>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let step = tier.resolve(run, step)?;
    let m = tier.manifest(run, step)?;
    let tensors: Vec<TensorRow> = m
        .tensors
        .iter()
        .filter(|t| glob.is_none_or(|g| glob_match(g, &t.name)))
        .map(|t| TensorRow {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            bytes: t.len,
            chunks: t.chunks.len(),
            shard: t.shard.clone(),
        })
        .collect();
    if let (Some(g), true) = (glob, tensors.is_empty()) {
        return Err(cairn::Error::NotFound {
            what: format!("tensors matching {g:?} in run {run} step {step}"),
        });
    }
    let out = Inspect {
        run: run.to_string(),
        step,
        created_unix_ms: m.created_unix_ms,
        logical_bytes: m.logical_bytes(),
        tensors,
        blobs: m
            .blobs
            .iter()
            .map(|b| BlobRow {
                name: b.name.clone(),
                bytes: b.len,
            })
            .collect(),
        metadata: m.metadata.clone(),
    };
    if json {
        print_json(&out)?;
        return Ok(0);
    }
    outln!(
        "run {} step {}: {} in {} tensors, {} blobs",
        out.run,
        out.step,
        human(out.logical_bytes),
        m.tensors.len(),
        m.blobs.len()
    );
    outln!(
        "{:<60} {:<7} {:<20} {:>10} {:>6}",
        "TENSOR",
        "DTYPE",
        "SHAPE",
        "SIZE",
        "CHUNKS"
    );
    for t in &out.tensors {
        outln!(
            "{:<60} {:<7} {:<20} {:>10} {:>6}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            human(t.bytes),
            t.chunks
        );
    }
    for b in &out.blobs {
        outln!("blob {:<55} {:>10}", b.name, human(b.bytes));
    }
    outln!("metadata: {}", out.metadata);
    Ok(0)
}
