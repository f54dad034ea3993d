//! `cairn verify`.

use super::open::{open, print_json};
use super::size::human;

pub fn run(
    location: &str,
    run: Option<&str>,
    step: Option<cairn::StepSel>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let step = match (run, step) {
        (Some(run), Some(sel)) => Some(tier.resolve(run, sel)?),
        _ => None,
    };
    let report = tier.verify(run, step)?;
    if json {
        print_json(&report)?;
    } else {
        for p in &report.problems {
            match &p.chunk {
                Some(c) => outln!(
                    "BAD  run {} step {}: chunk {c} ({}): {}; affects {}",
                    p.run,
                    p.step,
                    p.path.display(),
                    p.reason,
                    p.tensors.join(", ")
                ),
                None => outln!("BAD  run {} step {}: {}", p.run, p.step, p.reason),
            }
        }
        outln!(
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
