//! The flush daemon: drains committed local checkpoints to object storage,
//! oldest first, applies retention and garbage collection, and reports
//! status and metrics on loopback.
//!
//! Progress is recorded in the stores themselves, so `kill -9` loses
//! nothing: a checkpoint is done when its remote manifest exists, and the
//! local `remote.json` marker (written after the remote commit) spares the
//! next scan from asking. After a restart, a checkpoint without a marker is
//! uploaded again: chunks the remote already holds are skipped, and a
//! remote manifest that already exists (the daemon died between the commit
//! and the marker) is recognised as identical.

pub mod config;
pub mod http;
pub mod status;

pub use config::{DaemonConfig, GcConfig, RetentionConfig, MAX_CONFIG_LEN};
pub use status::{DaemonStatus, SharedStatus};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::remote::RemoteStore;
use crate::store::{Store, StoreOptions};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// A running flush daemon.
pub struct FlushDaemon {
    cfg: DaemonConfig,
    local: Arc<Store>,
    remote: RemoteStore,
    status: SharedStatus,
}

impl FlushDaemon {
    /// Open both stores and prepare the status.
    pub fn new(cfg: DaemonConfig) -> Result<Self> {
        cfg.check()?;
        let local = Store::open_read_only(&cfg.local, StoreOptions::default())?;
        let options: Vec<(String, String)> = cfg
            .remote_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let remote = RemoteStore::open(&cfg.remote, &options, cfg.remote_tuning.clone())?;
        let status = SharedStatus::new(
            DaemonStatus {
                local: cfg.local.display().to_string(),
                remote: cfg.remote.clone(),
                started_unix_ms: crate::clock::SystemClock.now_ms(),
                ..Default::default()
            },
            status::metrics_reader(remote.metrics_arc()),
        );
        Ok(FlushDaemon {
            cfg,
            local: Arc::new(local),
            remote,
            status,
        })
    }

    /// Use a different remote (e.g. one wrapped for fault injection).
    pub fn with_remote(mut self, remote: RemoteStore) -> Self {
        self.status = SharedStatus::new(
            self.status.snapshot(),
            status::metrics_reader(remote.metrics_arc()),
        );
        self.remote = remote;
        self
    }

    /// The live status.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Run until `shutdown` turns true. An upload in progress at shutdown
    /// is abandoned before its remote commit; the next start completes it.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let listener = http::bind(self.cfg.listen)
            .await
            .map_err(|e| Error::io("bind status endpoint", self.cfg.listen.to_string(), e))?;
        tracing::info!(
            local = %self.cfg.local.display(),
            remote = %self.cfg.remote,
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "cairn daemon started"
        );
        let server = tokio::spawn(http::serve(listener, self.status.clone(), shutdown.clone()));
        let mut last_gc: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = self.cycle() => {
                    if let Err(e) = r {
                        self.record_error("scan cycle failed", &e);
                    }
                }
                _ = shutdown.changed() => break,
            }
            let gc_due = self
                .cfg
                .gc
                .interval
                .filter(|i| !i.is_zero())
                .is_some_and(|i| last_gc.is_none_or(|t| t.elapsed() >= i));
            if gc_due {
                tokio::select! {
                    r = self.collect() => {
                        if let Err(e) = r {
                            self.record_error("garbage collection failed", &e);
                        }
                    }
                    _ = shutdown.changed() => break,
                }
                last_gc = Some(Instant::now());
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!("cairn daemon stopping");
        let _ = server.await;
        Ok(())
    }

    fn record_error(&self, what: &str, e: &Error) {
        tracing::error!(error = %e, "{what}");
        self.status.update(|s| {
            s.errors += 1;
            s.last_error = Some(e.to_string());
        });
    }

    /// One scan: upload what is pending, oldest first, then retention.
    pub async fn cycle(&self) -> Result<()> {
        let local = self.local.clone();
        let url = self.remote.url().to_string();
        // (created_ms, run, step), not yet durable remotely.
        let (pending, newest_local) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut pending = Vec::new();
            let mut newest = std::collections::BTreeMap::new();
            for run in local.runs()? {
                let steps = local.steps(&run)?;
                if let Some(&s) = steps.last() {
                    newest.insert(run.clone(), s);
                }
                for s in steps {
                    if !local.is_uploaded(&run, s, &url) {
                        let created = local
                            .manifest(&run, s)
                            .map(|m| m.created_unix_ms)
                            .unwrap_or(0);
                        pending.push((created, run.clone(), s));
                    }
                }
            }
            pending.sort();
            Ok((pending, newest))
        })
        .await
        .map_err(|e| Error::Internal(format!("scan: {e}")))??;
        self.status.update(|s| {
            s.queue_depth = pending.len() as u64;
            s.newest_local = newest_local;
        });
        for (i, (_, run, step)) in pending.iter().enumerate() {
            let report = {
                let (local, remote) = (self.local.clone(), self.remote.clone());
                let (run, step) = (run.clone(), *step);
                tokio::task::spawn_blocking(move || local.upload_to(&remote, &run, step))
                    .await
                    .map_err(|e| Error::Internal(format!("upload: {e}")))??
            };
            tracing::info!(
                run = %run,
                step = *step,
                chunks_uploaded = report.chunks_uploaded,
                chunks_skipped = report.chunks_skipped,
                bytes_uploaded = report.bytes_uploaded,
                already_committed = report.already_committed,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "checkpoint durable remotely"
            );
            self.status.update(|s| {
                s.checkpoints_uploaded += 1;
                s.queue_depth = (pending.len() - i - 1) as u64;
            });
        }
        self.retention().await?;
        let mut newest_remote = std::collections::BTreeMap::new();
        for run in self.remote.runs().await? {
            if let Some(&s) = self.remote.steps(&run).await?.last() {
                newest_remote.insert(run, s);
            }
        }
        self.status.update(|s| {
            s.newest_remote = newest_remote;
            s.cycles += 1;
        });
        Ok(())
    }

    /// Local retention first: it deletes a local checkpoint only while the
    /// remote still holds it, so it must look before remote retention
    /// thins the remote out.
    async fn retention(&self) -> Result<()> {
        let r = &self.cfg.retention;
        if let Some(keep) = r.local_keep_last {
            let local = self.local.clone();
            let remote = self.remote.clone();
            let deleted =
                tokio::task::spawn_blocking(move || local.apply_local_retention(keep, &remote))
                    .await
                    .map_err(|e| Error::Internal(format!("retention: {e}")))??;
            for (run, step) in &deleted {
                tracing::info!(run = %run, step = *step, "local retention deleted checkpoint");
            }
            self.status
                .update(|s| s.retention_deleted_local += deleted.len() as u64);
        }
        if let Some(keep) = r.remote_keep_last {
            let deleted = self
                .remote
                .apply_retention(keep, r.remote_keep_every)
                .await?;
            for (run, step) in &deleted {
                tracing::info!(run = %run, step = *step, "remote retention deleted checkpoint");
            }
            self.status
                .update(|s| s.retention_deleted_remote += deleted.len() as u64);
        }
        Ok(())
    }

    /// Collect garbage on both tiers.
    pub async fn collect(&self) -> Result<()> {
        let local = self.local.clone();
        let grace = self.cfg.gc.local_grace;
        let lr = tokio::task::spawn_blocking(move || local.gc(grace, false))
            .await
            .map_err(|e| Error::Internal(format!("gc: {e}")))??;
        tracing::info!(
            chunks_deleted = lr.chunks_deleted,
            bytes = lr.bytes_reclaimed,
            "local gc"
        );
        let remote = self.remote.clone();
        let rr = tokio::task::spawn_blocking(move || remote.gc(remote.options().gc_grace, false))
            .await
            .map_err(|e| Error::Internal(format!("gc: {e}")))??;
        tracing::info!(
            chunks_deleted = rr.chunks_deleted,
            bytes = rr.bytes_reclaimed,
            "remote gc"
        );
        self.status.update(|s| {
            s.last_local_gc = Some(lr);
            s.last_remote_gc = Some(rr);
        });
        Ok(())
    }
}
