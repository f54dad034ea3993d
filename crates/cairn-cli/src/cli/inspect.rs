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
    /// For a tensor of a sharded step: its shards (`shape` is global).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shards: Vec<ShardRow>,
}

#[derive(Serialize)]
struct ShardRow {
    rank: u32,
    offsets: Vec<u64>,
    shape: Vec<u64>,
    bytes: u64,
    chunks: usize,
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
    /// Set for a sharded step: the number of ranks it was saved by.
    #[serde(skip_serializing_if = "Option::is_none")]
    world_size: Option<u32>,
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
            shards: Vec::new(),
        })
        .chain(
            m.sharded
                .iter()
                .filter(|t| glob.is_none_or(|g| glob_match(g, &t.name)))
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    dtype: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    bytes: t.shards.iter().map(|s| s.len).sum(),
                    chunks: t.shards.iter().map(|s| s.chunks.len()).sum(),
                    shard: None,
                    shards: t
                        .shards
                        .iter()
                        .map(|s| ShardRow {
                            rank: s.rank,
                            offsets: s.offsets.clone(),
                            shape: s.shape.clone(),
                            bytes: s.len,
                            chunks: s.chunks.len(),
                        })
                        .collect(),
                }),
        )
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
        world_size: m.world_size,
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
        "run {} step {}: {} in {} tensors, {} blobs{}",
        out.run,
        out.step,
        human(out.logical_bytes),
        m.tensor_count(),
        m.blobs.len(),
        match m.world_size {
            Some(w) => format!(", sharded over {w} ranks"),
            None => String::new(),
        }
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
        for s in &t.shards {
            outln!(
                "  shard rank {:<5} at {:<20} {:<20} {:>10} {:>6}",
                s.rank,
                format!("{:?}", s.offsets),
                format!("{:?}", s.shape),
                human(s.bytes),
                s.chunks
            );
        }
    }
    for b in &out.blobs {
        outln!("blob {:<55} {:>10}", b.name, human(b.bytes));
    }
    outln!("metadata: {}", out.metadata);
    Ok(0)
}
