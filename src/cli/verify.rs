//! `cairn verify`.

use super::size::human;
use cairn::{Store, StoreOptions};
use std::path::Path;

pub fn run(store: &Path, run: Option<&str>, step: Option<u64>, json: bool) -> cairn::Result<i32> {
    let store = Store::open_read_only(store, StoreOptions::default())?;
    let report = store.verify(run, step)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for p in &report.problems {
            match &p.chunk {
                Some(c) => println!(
                    "BAD  run {} step {}: chunk {c} ({}): {}; affects {}",
                    p.run,
                    p.step,
                    p.path.display(),
                    p.reason,
                    p.tensors.join(", ")
                ),
                None => println!("BAD  run {} step {}: {}", p.run, p.step, p.reason),
            }
        }
        println!(
            "{} checkpoints, {} chunks, {} read: {}",
            report.checkpoints,
            report.chunks_checked,
            human(report.bytes_read),
            if report.ok() {
                "all verified".to_string()
            } else {
                format!("{} problems", report.problems.len())
            }
        );
    }
    Ok(if report.ok() { 0 } else { 1 })
}
