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
        if !m.tensors.iter().any(|t| glob_match(g, &t.name)) {
            return Err(cairn::Error::NotFound {
                what: format!("tensors matching {g:?} in run {run} step {step}"),
            });
        }
    }
    let dst = open_for_write(to, raw_opts)?;
    let total: u64 = m.distinct_chunks().iter().map(|c| c.1).sum();
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
