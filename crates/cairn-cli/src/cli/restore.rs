//! `cairn restore`: copy a checkpoint between tiers.

use super::open::{open, open_for_write, print_json, progress};
use super::size::human;
use cairn::StepSel;
use cairn::{copy_checkpoint, glob_match, CopyOptions};

pub fn run(
    location: &str,
    run: &str,
    step: StepSel,
    to: &str,
    glob: Option<&str>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let src = open(location, raw_opts)?;
    let step = src.resolve(run, step)?;
    let m = src.manifest(run, step)?;
    if let Some(g) = glob {
        if !m.tensors.iter().any(|t| glob_match(g, &t.name))
            && !m.sharded.iter().any(|t| glob_match(g, &t.name))
        {
            return Err(cairn::Error::NotFound {
                what: format!("tensors matching {g:?} in run {run} step {step}"),
            });
        }
    }
    let dst = open_for_write(to, raw_opts)?;
    let total = progress_total(&m, glob);
    let pb = progress(total, &format!("restore {run}/{step}"));
    let select = glob.map(|g| move |name: &str| glob_match(g, name));
    let sel: Option<&(dyn Fn(&str) -> bool + Sync)> = select.as_ref().map(|f| f as _);
    let opts = CopyOptions {
        select: sel,
        // A chunk already at the target is read back and hashed before it
        // is relied on; a corrupt one is copied again.
        verify_present: true,
        threads: 8,
        progress: &|n| pb.inc(n),
    };
    let report = copy_checkpoint(src.as_tier(), dst.as_tier(), run, step, &opts)?;
    pb.finish_and_clear();
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "restored run {run} step {step} to {}: {} tensors, {} chunks ({} copied, {} already there), {} in {:.2?}",
            dst.location(),
            report.tensors,
            report.chunks,
            report.chunks_copied,
            report.chunks_skipped,
            human(report.bytes_copied),
            report.elapsed
        );
    }
    Ok(0)
}

/// Bytes the copy of the selected tensors (all with no glob) goes through:
/// the distinct chunks of the manifest as copied, which keeps only the
/// selected tensors (and every blob).
fn progress_total(m: &cairn::Manifest, glob: Option<&str>) -> u64 {
    let mut selected = m.clone();
    if let Some(g) = glob {
        selected.tensors.retain(|t| glob_match(g, &t.name));
        selected.sharded.retain(|t| glob_match(g, &t.name));
    }
    selected.distinct_chunks().iter().map(|c| c.1).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn::{DType, SaveState, Store, StoreOptions};

    /// `restore --tensor` progress totals the chunks of the selected
    /// tensors, not every chunk of the checkpoint.
    #[test]
    fn progress_totals_only_the_selected_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            StoreOptions {
                chunk_size: 64 << 10,
                staging_bytes: 8 << 20,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let small: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let state = SaveState::new()
            .tensor("big", DType::U8, &[big.len() as u64], &big)
            .tensor("small", DType::U8, &[small.len() as u64], &small);
        store.save("r", 1, &state).unwrap().wait().unwrap();
        let m = store.manifest("r", 1).unwrap();
        let all = progress_total(&m, None);
        let only_small = progress_total(&m, Some("small"));
        let mut expected = m.clone();
        expected.tensors.retain(|t| t.name == "small");
        let want: u64 = expected.distinct_chunks().iter().map(|c| c.1).sum();
        assert_eq!(only_small, want);
        assert!(only_small > 0 && only_small < all, "{only_small} of {all}");
        assert_eq!(all, m.distinct_chunks().iter().map(|c| c.1).sum::<u64>());
    }
}
