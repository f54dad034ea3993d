//! The daemon's live status, shared with the HTTP endpoint.

use crate::clock::{Clock, SharedClock};
use crate::gc::GcReport;
use crate::remote::{RemoteMetrics, RemoteMetricsSnapshot};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A checkpoint whose upload failed and is waiting to be retried. Each
/// failing checkpoint is retried on its own, with a backoff that doubles
/// per failure; newer checkpoints and retention do not wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailingCheckpoint {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// The last error, as text.
    pub reason: String,
    /// What to do about it: [`crate::ErrorKind`] of the last error
    /// (`Unavailable`, `Data`, ...).
    pub kind: String,
    /// Failed attempts so far.
    pub attempts: u64,
    /// First failure, ms since the epoch.
    pub first_failed_unix_ms: i64,
    /// Last failure, ms since the epoch.
    pub last_failed_unix_ms: i64,
    /// Earliest next attempt, ms since the epoch.
    pub next_attempt_unix_ms: i64,
}

/// A point-in-time view of the daemon.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStatus {
    /// Local store.
    pub local: String,
    /// Remote URL.
    pub remote: String,
    /// Process start, ms since the epoch.
    pub started_unix_ms: i64,
    /// Committed local checkpoints not yet durable remotely, plus sharded
    /// steps with parts here not uploaded yet.
    pub queue_depth: u64,
    /// Part manifests of sharded steps this process uploaded (or found
    /// already on the remote with identical bytes).
    pub parts_uploaded: u64,
    /// Remote records of sharded steps this process published.
    pub records_published: u64,
    /// Sharded steps whose parts here are all on the remote and whose
    /// record waits for the parts of other nodes' ranks.
    pub awaiting_ranks: u64,
    /// Checkpoints this process made durable remotely.
    pub checkpoints_uploaded: u64,
    /// Scan cycles completed.
    pub cycles: u64,
    /// Errors this process met (each failed upload, retention or gc pass).
    pub errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Newest committed step per run, per tier.
    pub newest_local: BTreeMap<String, u64>,
    /// Newest step per run durable in the remote.
    pub newest_remote: BTreeMap<String, u64>,
    /// Checkpoints deleted by retention, per tier.
    pub retention_deleted_local: u64,
    /// Remote checkpoints deleted by retention.
    pub retention_deleted_remote: u64,
    /// Last local collection.
    pub last_local_gc: Option<GcReport>,
    /// Last remote collection.
    pub last_remote_gc: Option<GcReport>,
    /// Remote counters.
    pub remote_metrics: RemoteMetricsSnapshot,
    /// Checkpoints whose upload failed, oldest first, with the reason and
    /// the attempt count.
    pub failing: Vec<FailingCheckpoint>,
    /// Failed upload attempts this process met.
    pub upload_failures: u64,
    /// Last time a checkpoint became durable remotely, ms since the epoch.
    pub last_upload_unix_ms: Option<i64>,
    /// Since when work has been pending with no checkpoint becoming
    /// durable remotely (ms since the epoch); unset while the queue is
    /// empty.
    pub stalled_since_unix_ms: Option<i64>,
    /// Since when every scan of the local store has failed (ms since the
    /// epoch; say, the store was deleted); unset after a scan succeeds.
    pub scan_failing_since_unix_ms: Option<i64>,
    /// Why the last scan of the local store failed, while it fails.
    pub scan_error: Option<String>,
    /// Whether `/healthz` answers 200.
    pub healthy: bool,
    /// Why `/healthz` answers 503.
    pub unhealthy_reason: Option<String>,
}

/// Status shared between the daemon loop and the endpoint.
#[derive(Clone)]
pub struct SharedStatus {
    inner: Arc<Mutex<DaemonStatus>>,
    metrics: Arc<dyn Fn() -> RemoteMetricsSnapshot + Send + Sync>,
    clock: SharedClock,
    unhealthy_after: Option<Duration>,
}

impl SharedStatus {
    /// A new status reading remote counters from `metrics`.
    pub fn new(
        status: DaemonStatus,
        metrics: Arc<dyn Fn() -> RemoteMetricsSnapshot + Send + Sync>,
    ) -> Self {
        SharedStatus {
            inner: Arc::new(Mutex::new(status)),
            metrics,
            clock: crate::clock::system_clock(),
            unhealthy_after: None,
        }
    }

    /// Report unhealthy once work has been pending for `after` with no
    /// checkpoint becoming durable remotely, reading time from `clock`.
    pub fn with_health(mut self, clock: SharedClock, after: Duration) -> Self {
        self.clock = clock;
        self.unhealthy_after = Some(after);
        self
    }

    /// `Ok` if healthy, else why not: work has been pending longer than
    /// the configured unhealthy-after with no checkpoint becoming durable
    /// remotely, or the local store could not be scanned for that long.
    pub fn health(&self) -> std::result::Result<(), String> {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::health_of(&s, self.clock.as_ref(), self.unhealthy_after)
    }

    fn health_of(
        s: &DaemonStatus,
        clock: &dyn Clock,
        after: Option<Duration>,
    ) -> std::result::Result<(), String> {
        let Some(after) = after else {
            return Ok(());
        };
        if let Some(since) = s.scan_failing_since_unix_ms {
            let failing = clock.since(since);
            if failing >= after {
                return Err(format!(
                    "the local store could not be scanned for {}s (unhealthy after {}s): {}",
                    failing.as_secs(),
                    after.as_secs_f64(),
                    s.scan_error.as_deref().unwrap_or("unknown error"),
                ));
            }
        }
        let Some(since) = s.stalled_since_unix_ms else {
            return Ok(());
        };
        let stalled = clock.since(since);
        if stalled < after {
            return Ok(());
        }
        let mut reason = format!(
            "no checkpoint became durable remotely for {}s (unhealthy after {}s) while {} {} pending",
            stalled.as_secs(),
            after.as_secs_f64(),
            s.queue_depth,
            if s.queue_depth == 1 { "is" } else { "are" },
        );
        for f in &s.failing {
            let _ = write!(
                reason,
                "; run {} step {} failed {} time{}: {}",
                f.run,
                f.step,
                f.attempts,
                if f.attempts == 1 { "" } else { "s" },
                f.reason
            );
        }
        Err(reason)
    }

    /// Change the status.
    pub fn update(&self, f: impl FnOnce(&mut DaemonStatus)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A copy of the status with current remote counters.
    pub fn snapshot(&self) -> DaemonStatus {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.remote_metrics = (self.metrics)();
        match Self::health_of(&s, self.clock.as_ref(), self.unhealthy_after) {
            Ok(()) => {
                s.healthy = true;
                s.unhealthy_reason = None;
            }
            Err(r) => {
                s.healthy = false;
                s.unhealthy_reason = Some(r);
            }
        }
        s
    }

    /// The status in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let s = self.snapshot();
        let m = &s.remote_metrics;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP cairn_{name} {help}\n# TYPE cairn_{name} {kind}\ncairn_{name} {v}"
            );
        };
        metric(
            "bytes_uploaded_total",
            "counter",
            "Bytes of chunk objects uploaded.",
            m.bytes_uploaded,
        );
        metric(
            "chunks_uploaded_total",
            "counter",
            "Chunk objects uploaded.",
            m.chunks_uploaded,
        );
        metric(
            "chunks_skipped_total",
            "counter",
            "Chunks the remote already held.",
            m.chunks_skipped,
        );
        metric(
            "bytes_downloaded_total",
            "counter",
            "Bytes of chunk objects downloaded.",
            m.bytes_downloaded,
        );
        metric(
            "manifests_uploaded_total",
            "counter",
            "Remote manifests committed.",
            m.manifests_uploaded,
        );
        metric(
            "retries_total",
            "counter",
            "Remote operations retried after a transient error.",
            m.retries,
        );
        metric(
            "remote_errors_total",
            "counter",
            "Remote operations that failed after retries (a not-found answer to a probe is not a failure).",
            m.errors,
        );
        metric(
            "errors_total",
            "counter",
            "Failed uploads, retention or gc passes.",
            s.errors,
        );
        metric(
            "checkpoints_uploaded_total",
            "counter",
            "Checkpoints made durable remotely.",
            s.checkpoints_uploaded,
        );
        metric(
            "parts_uploaded_total",
            "counter",
            "Part manifests of sharded steps uploaded.",
            s.parts_uploaded,
        );
        metric(
            "records_published_total",
            "counter",
            "Remote records of sharded steps published.",
            s.records_published,
        );
        metric(
            "sharded_steps_awaiting_ranks",
            "gauge",
            "Sharded steps uploaded here, waiting for other nodes' parts.",
            s.awaiting_ranks,
        );
        metric(
            "upload_failures_total",
            "counter",
            "Failed checkpoint upload attempts.",
            s.upload_failures,
        );
        metric(
            "checkpoints_failing",
            "gauge",
            "Checkpoints whose last upload attempt failed.",
            s.failing.len() as u64,
        );
        metric(
            "healthy",
            "gauge",
            "1 while /healthz answers 200, 0 while it answers 503.",
            s.healthy as u64,
        );
        metric(
            "queue_depth",
            "gauge",
            "Committed local checkpoints not yet durable remotely.",
            s.queue_depth,
        );
        let _ = writeln!(out, "# HELP cairn_newest_step Newest durable step per run and tier.\n# TYPE cairn_newest_step gauge");
        for (run, step) in &s.newest_local {
            let _ = writeln!(
                out,
                "cairn_newest_step{{run=\"{run}\",tier=\"local\"}} {step}"
            );
        }
        for (run, step) in &s.newest_remote {
            let _ = writeln!(
                out,
                "cairn_newest_step{{run=\"{run}\",tier=\"remote\"}} {step}"
            );
        }
        out
    }
}

/// Build the counter reader for a remote store's metrics.
pub fn metrics_reader(
    m: Arc<RemoteMetrics>,
) -> Arc<dyn Fn() -> RemoteMetricsSnapshot + Send + Sync> {
    Arc::new(move || m.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn shared(clock: &ManualClock) -> SharedStatus {
        SharedStatus::new(
            DaemonStatus::default(),
            metrics_reader(Arc::new(RemoteMetrics::default())),
        )
        .with_health(Arc::new(clock.clone()), Duration::from_secs(60))
    }

    /// Unhealthy only once work has been pending for the configured time
    /// with no upload succeeding, read from the clock; healthy again when
    /// the queue empties.
    #[test]
    fn health_follows_the_clock() {
        let clock = ManualClock::at_ms(1_000_000);
        let s = shared(&clock);
        assert!(s.health().is_ok());
        s.update(|d| {
            d.queue_depth = 2;
            d.stalled_since_unix_ms = Some(clock.now_ms());
            d.failing.push(FailingCheckpoint {
                run: "r".into(),
                step: 7,
                reason: "corrupt chunk ab".into(),
                kind: "Data".into(),
                attempts: 3,
                first_failed_unix_ms: 0,
                last_failed_unix_ms: 0,
                next_attempt_unix_ms: 0,
            });
        });
        clock.advance(Duration::from_secs(59));
        assert!(s.health().is_ok());
        assert!(s.snapshot().healthy);
        clock.advance(Duration::from_secs(1));
        let reason = s.health().unwrap_err();
        assert!(reason.contains("2 are pending"), "{reason}");
        assert!(
            reason.contains("run r step 7 failed 3 times: corrupt chunk ab"),
            "{reason}"
        );
        let snap = s.snapshot();
        assert!(!snap.healthy);
        assert_eq!(snap.unhealthy_reason.as_deref(), Some(reason.as_str()));
        assert!(s.prometheus().contains("cairn_healthy 0"));
        assert!(s.prometheus().contains("cairn_checkpoints_failing 1"));
        s.update(|d| {
            d.queue_depth = 0;
            d.stalled_since_unix_ms = None;
            d.failing.clear();
        });
        assert!(s.health().is_ok());
        assert!(s.prometheus().contains("cairn_healthy 1"));
    }
}
