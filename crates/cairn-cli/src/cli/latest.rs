//! `cairn latest`: the newest step of a run, optionally the newest whose
//! metrics match conditions (where to roll back to after a loss spike).

use super::open::{open, print_json};
use serde::Serialize;

#[derive(Serialize)]
struct Found<'a> {
    run: &'a str,
    step: u64,
    metrics: std::collections::BTreeMap<&'a str, Option<f64>>,
}

pub fn run(
    location: &str,
    run: &str,
    filter: Option<&cairn::MetricFilter>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    let tier = open(location, raw_opts)?;
    let found = match filter {
        Some(f) => cairn::latest_matching(tier.as_tier(), run, f)?,
        None => tier.steps(run)?.last().copied(),
    };
    let Some(step) = found else {
        return Err(cairn::Error::NotFound {
            what: match filter {
                Some(f) => format!(
                    "a committed step of run {run} whose metrics match {f} in {}",
                    tier.location()
                ),
                None => format!(
                    "any committed checkpoint of run {run} in {}",
                    tier.location()
                ),
            },
        });
    };
    // The step printed is one a restore can read: its manifest is read and
    // checked, so a damaged newest step is an error naming it (as `ls`
    // reports it), not a number that fails later.
    let m = tier.manifest(run, step)?;
    if json {
        let metrics = m
            .metrics
            .iter()
            .map(|(k, v)| (k.as_str(), v.is_finite().then_some(*v)))
            .collect();
        print_json(&Found { run, step, metrics })?;
    } else {
        outln!("{step}");
    }
    Ok(0)
}
