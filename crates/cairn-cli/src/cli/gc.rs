//! `cairn gc`.

use super::open::{open, print_json};
use super::size::human;
use cairn::Tier;
use std::time::Duration;

/// `--grace` of a local store when none is given.
const LOCAL_DEFAULT_GRACE: Duration = Duration::from_secs(3600);

pub fn run(
    location: &str,
    dry_run: bool,
    grace: Option<Duration>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    // Local stores may use any grace (the collection lock protects saves);
    // object stores need uploads to finish within a quarter of it.
    if let (true, Some(g)) = (cairn::is_url(location), grace) {
        cairn::check_remote_gc_grace(g)?;
    }
    let tier = open(location, raw_opts)?;
    let grace = match (grace, &tier) {
        (Some(g), _) => g,
        (None, Tier::Local(_)) => LOCAL_DEFAULT_GRACE,
        // The grace the remote's uploads rely on: a shorter one is refused.
        (None, Tier::Remote(r)) => r.recorded_gc_grace()?.unwrap_or(r.options().gc_grace),
    };
    let report = match &tier {
        Tier::Local(s) => s.gc(grace, dry_run)?,
        Tier::Remote(r) => r.gc(grace, dry_run)?,
    };
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "{} {} unreferenced chunks ({}); kept {} younger than {}; {} leftovers; {} chunks referenced by {} checkpoints",
            if dry_run { "would reclaim" } else { "reclaimed" },
            report.chunks_deleted,
            human(report.bytes_reclaimed),
            report.chunks_in_grace,
            humantime::format_duration(grace),
            report.leftovers_removed,
            report.referenced_chunks,
            report.checkpoints
        );
        if report.leftovers_failed > 0 {
            outln!(
                "could not remove {} entries of tmp/ (first: {}); they keep their space until removed",
                report.leftovers_failed,
                report.leftover_failure.as_deref().unwrap_or("?")
            );
        }
        if report.temporaries_in_grace > 0 {
            outln!(
                "kept {} entries of tmp/ younger than {}: a save, copy or repair may still be writing them",
                report.temporaries_in_grace,
                humantime::format_duration(grace.max(cairn::TMP_MIN_AGE))
            );
        }
        if report.parts_removed + report.pending_parts_kept > 0 {
            outln!(
                "{} {} part manifests of uncommitted steps; kept {} older than the grace that are not known to be drained (step not recorded as uploaded, no newer complete step)",
                if dry_run { "would remove" } else { "removed" },
                report.parts_removed,
                report.pending_parts_kept
            );
        }
        if report.referenced_packs + report.packs_deleted + report.packs_in_grace > 0 {
            outln!(
                "{} {} unreferenced packs (counted in the bytes above); kept {} younger than the grace; {} packs referenced",
                if dry_run { "would reclaim" } else { "reclaimed" },
                report.packs_deleted,
                report.packs_in_grace,
                report.referenced_packs
            );
        }
    }
    Ok(0)
}
