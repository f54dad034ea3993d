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

pub fn run(
    location: &str,
    run: &str,
    a: u64,
    b: u64,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let ma = tier.manifest(run, tier.resolve(run, cairn::StepSel::Step(a))?)?;
    let mb = tier.manifest(run, tier.resolve(run, cairn::StepSel::Step(b))?)?;
    let ta: BTreeMap<&str, _> = ma.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let tb: BTreeMap<&str, _> = mb.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut d = Diff {
        run: run.to_string(),
        a,
        b,
        ..Default::default()
    };
    for (name, t) in &tb {
        match ta.get(name) {
            None => {
                d.added.push(name.to_string());
                d.bytes_differing += t.len;
            }
            Some(old) => {
                let layout_changed = old.dtype != t.dtype || old.shape != t.shape;
                let differing = if layout_changed || old.chunks.len() != t.chunks.len() {
                    t.len
                } else {
                    old.chunks
                        .iter()
                        .zip(&t.chunks)
                        .filter(|(x, y)| x != y)
                        .map(|(_, y)| y.len)
                        .sum()
                };
                if differing > 0 || layout_changed {
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
    // Small tensors share packed chunks, so a neighbour's change alters
    // their references too: compare their bytes to know.
    let packed: Vec<String> = d
        .changed
        .iter()
        .filter(|c| !c.layout_changed && tb[c.name.as_str()].len <= 1 << 20)
        .map(|c| c.name.clone())
        .collect();
    if !packed.is_empty() {
        let filter = cairn::TensorFilter::names(packed.iter().cloned());
        let ra = tier.restore(run, cairn::StepSel::Step(a), &filter)?;
        let rb = tier.restore(run, cairn::StepSel::Step(b), &filter)?;
        let same: std::collections::HashSet<&str> = ra
            .tensors
            .iter()
            .zip(&rb.tensors)
            .filter(|(x, y)| x.name == y.name && x.data == y.data)
            .map(|(x, _)| x.name.as_str())
            .collect();
        let before = d.changed.len();
        d.changed.retain(|c| !same.contains(c.name.as_str()));
        d.unchanged += before - d.changed.len();
        for c in d.changed.iter_mut().filter(|c| packed.contains(&c.name)) {
            let (x, y) = (
                ra.tensor(&c.name).map(|t| &t.data),
                rb.tensor(&c.name).map(|t| &t.data),
            );
            if let (Some(x), Some(y)) = (x, y) {
                c.bytes_differing = x.iter().zip(y).filter(|(p, q)| p != q).count() as u64;
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
