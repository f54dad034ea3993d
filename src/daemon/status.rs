//! The daemon's live status, shared with the HTTP endpoint.

use crate::gc::GcReport;
use crate::remote::{RemoteMetrics, RemoteMetricsSnapshot};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// A point-in-time view of the daemon.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStatus {
    /// Local store.
    pub local: String,
    /// Remote URL.
    pub remote: String,
    /// Process start, ms since the epoch.
    pub started_unix_ms: i64,
    /// Committed local checkpoints not yet durable remotely.
    pub queue_depth: u64,
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
}

/// Status shared between the daemon loop and the endpoint.
#[derive(Clone)]
pub struct SharedStatus {
    inner: Arc<Mutex<DaemonStatus>>,
    metrics: Arc<dyn Fn() -> RemoteMetricsSnapshot + Send + Sync>,
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
        }
    }

    /// Change the status.
    pub fn update(&self, f: impl FnOnce(&mut DaemonStatus)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A copy of the status with current remote counters.
    pub fn snapshot(&self) -> DaemonStatus {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.remote_metrics = (self.metrics)();
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
            "Remote operations that failed after retries.",
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
