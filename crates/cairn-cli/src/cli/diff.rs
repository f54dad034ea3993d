//! `cairn diff`.

use super::open::{open, print_json};
use super::size::human;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize, Default)]
struct Diff {
    run: String,
    a: u64,
    b: u64,
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<Changed>,
    unchanged: usize,
    /// Bytes of B's tensors that differ from A (added tensors included).
    bytes_differing: u64,
}

#[derive(Serialize)]
struct Changed {
    name: String,
    bytes_differing: u64,
    /// dtype or shape changed too.
    layout_changed: bool,
}

/// A tensor of one step as `diff` compares it: whole, or the shards of a
/// sharded step (format v2), which are compared shard by shard.
struct Item<'a> {
    dtype: cairn::DType,
    /// The (global) shape.
    shape: &'a [u64],
    /// Bytes of the whole tensor.
    len: u64,
    /// Stored regions: offsets (empty for a whole tensor), shape, slices.
    pieces: Vec<(&'a [u64], &'a [u64], &'a [cairn::ChunkRef])>,
}

/// Every tensor of `m` by name, whole or sharded.
fn items(m: &cairn::Manifest) -> BTreeMap<&str, Item<'_>> {
    let whole = m.tensors.iter().map(|t| {
        (
            t.name.as_str(),
            Item {
                dtype: t.dtype,
                shape: &t.shape,
                len: t.len,
                pieces: vec![(&[][..], &t.shape[..], &t.chunks[..])],
            },
        )
    });
    let sharded = m.sharded.iter().map(|t| {
        (
            t.name.as_str(),
            Item {
                dtype: t.dtype,
                shape: &t.shape,
                len: t.shards.iter().map(|s| s.len).sum(),
                pieces: t
                    .shards
                    .iter()
                    .map(|s| (&s.offsets[..], &s.shape[..], &s.chunks[..]))
                    .collect(),
            },
        )
    });
    whole.chain(sharded).collect()
}

/// Tensors stored differently in the two steps (whole in one, sharded in
/// the other, or sharded otherwise) up to this size are read from both to
/// compare their bytes; larger ones count as differing whole.
const COMPARE_STORED_DIFFERENTLY: u64 = 256 << 20;

/// Bytes that differ between `x` and `y` (equal lengths).
fn differing_bytes(x: &[u8], y: &[u8]) -> u64 {
    x.iter().zip(y).filter(|(p, q)| p != q).count() as u64
}

pub fn run(
    location: &str,
    run: &str,
    a: cairn::StepSel,
    b: cairn::StepSel,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let (a, b) = (tier.resolve(run, a)?, tier.resolve(run, b)?);
    let ma = tier.manifest(run, a)?;
    let mb = tier.manifest(run, b)?;
    let ta = items(&ma);
    let tb = items(&mb);
    let mut d = Diff {
        run: run.to_string(),
        a,
        b,
        ..Default::default()
    };
    // Changed tensors whose bytes are read from both steps to compare.
    let mut to_read: Vec<String> = Vec::new();
    for (name, t) in &tb {
        match ta.get(name) {
            None => {
                d.added.push(name.to_string());
                d.bytes_differing += t.len;
            }
            Some(old) => {
                let layout_changed = old.dtype != t.dtype || old.shape != t.shape;
                let same_pieces = old.pieces.len() == t.pieces.len()
                    && old
                        .pieces
                        .iter()
                        .zip(&t.pieces)
                        .all(|(x, y)| x.0 == y.0 && x.1 == y.1 && x.2.len() == y.2.len());
                let differing = if layout_changed || !same_pieces {
                    t.len
                } else {
                    old.pieces
                        .iter()
                        .zip(&t.pieces)
                        .flat_map(|(x, y)| x.2.iter().zip(y.2))
                        .filter(|(x, y)| x != y)
                        .map(|(_, y)| y.len)
                        .sum()
                };
                if differing > 0 || layout_changed {
                    // Small tensors share packed chunks, so a neighbour's
                    // change alters their references too; and references
                    // cannot be compared across different storage: compare
                    // the bytes to know.
                    if !layout_changed
                        && (t.len <= 1 << 20
                            || (!same_pieces && t.len <= COMPARE_STORED_DIFFERENTLY))
                    {
                        to_read.push(name.to_string());
                    }
                    d.bytes_differing += differing;
                    d.changed.push(Changed {
                        name: name.to_string(),
                        bytes_differing: differing,
                        layout_changed,
                    });
                } else {
                    d.unchanged += 1;
                }
            }
        }
    }
    if !to_read.is_empty() {
        // Small ones together, larger ones one at a time (two copies of
        // each are held while comparing).
        let (small, large): (Vec<String>, Vec<String>) = to_read
            .into_iter()
            .partition(|n| tb[n.as_str()].len <= 1 << 20);
        let mut groups: Vec<Vec<String>> = large.into_iter().map(|n| vec![n]).collect();
        if !small.is_empty() {
            groups.push(small);
        }
        // From the manifests read above, without their blobs (restore
        // reads every blob of a manifest, whatever the filter).
        let (mut ma, mut mb) = (ma.clone(), mb.clone());
        ma.blobs.clear();
        mb.blobs.clear();
        let mut found: BTreeMap<String, u64> = BTreeMap::new();
        for names in groups {
            let filter = cairn::TensorFilter::names(names.iter().cloned());
            let ra = tier.restore_from_manifest(ma.clone(), &filter)?;
            let rb = tier.restore_from_manifest(mb.clone(), &filter)?;
            for n in &names {
                if let (Some(x), Some(y)) = (ra.tensor(n), rb.tensor(n)) {
                    found.insert(n.clone(), differing_bytes(&x.data, &y.data));
                }
            }
        }
        let before = d.changed.len();
        d.changed
            .retain(|c| found.get(&c.name).is_none_or(|&n| n > 0));
        d.unchanged += before - d.changed.len();
        for c in &mut d.changed {
            if let Some(&n) = found.get(&c.name) {
                c.bytes_differing = n;
            }
        }
        d.bytes_differing = d
            .added
            .iter()
            .map(|n| tb[n.as_str()].len)
            .chain(d.changed.iter().map(|c| c.bytes_differing))
            .sum();
    }
    d.removed = ta
        .keys()
        .filter(|n| !tb.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    if json {
        print_json(&d)?;
    } else {
        for n in &d.added {
            outln!("+ {n}");
        }
        for n in &d.removed {
            outln!("- {n}");
        }
        for c in &d.changed {
            outln!(
                "~ {} ({} differ{})",
                c.name,
                human(c.bytes_differing),
                if c.layout_changed {
                    ", dtype/shape changed"
                } else {
                    ""
                }
            );
        }
        outln!(
            "run {run}: step {a} -> {b}: {} added, {} removed, {} changed, {} unchanged; {} differ",
            d.added.len(),
            d.removed.len(),
            d.changed.len(),
            d.unchanged,
            human(d.bytes_differing)
        );
    }
    Ok(0)
}
