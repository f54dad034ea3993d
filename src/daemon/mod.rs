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
//!
//! Failures are isolated per checkpoint: one that cannot be uploaded (a
//! corrupt local chunk, a permission error) is retried on its own with a
//! backoff, listed in `/status` with its reason and attempt count and
//! counted in `/metrics`, while newer checkpoints upload and retention
//! runs. `/healthz` turns 503, with the reason, once work has been pending
//! for `unhealthy_after` with no checkpoint becoming durable remotely.
//!
//! Sharded steps (parts saved here by some ranks of a job whose other
//! ranks saved on other nodes, no local record) are drained too: the
//! daemon uploads this node's parts ([`Store::upload_parts`]: chunks, then
//! each part manifest, create-only) and, once the remote lists a part of
//! every rank, puts the remote record create-only ([`RemoteStore::commit`]);
//! whichever node's daemon (or trainer) gets there first creates it, and
//! identical bytes already there count as success. The step's local upload
//! marker is written once the remote record exists. A daemon killed at any
//! point repeats only idempotent steps after a restart.
//!
//! A stop (SIGTERM) cancels the remote store ([`RemoteStore::cancel`]):
//! the upload on its blocking thread fails at its next remote call, and
//! the daemon waits for it (at most [`STOP_GRACE`]) before the runtime goes
//! away. What the stop interrupts is left as a crash would leave it: an
//! upload stopped before its manifest put commits nothing; one whose put
//! was already sent may land without its post-commit re-checks, which the
//! next start's upload of the step does not repeat for chunks it finds
//! fresh. Each scan checks that the local store is
//! still there; a store that disappeared fails every scan and, after
//! `unhealthy_after`, `/healthz`.

pub mod config;
pub mod http;
pub mod status;

pub use config::{DaemonConfig, GcConfig, RetentionConfig, MAX_CONFIG_LEN};
pub use status::{DaemonStatus, SharedStatus};

use crate::clock::SharedClock;
use crate::error::{Error, Result};
use crate::remote::RemoteStore;
use crate::shard::PartListing;
use crate::store::{Store, StoreOptions};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a stop waits, after cancelling the remote, for the work in
/// flight (an upload, retention, a collection) to return.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

pub use status::FailingCheckpoint;

/// A running flush daemon.
pub struct FlushDaemon {
    cfg: DaemonConfig,
    local: Arc<Store>,
    remote: RemoteStore,
    status: SharedStatus,
    clock: SharedClock,
    /// Checkpoints whose last upload attempt failed, by (run, step).
    failures: Mutex<BTreeMap<(String, u64), FailingCheckpoint>>,
    /// Part files of sharded steps this process uploaded: (run, step,
    /// file). After a restart they are uploaded again (chunks the remote
    /// holds are skipped; the part put is create-only).
    parts_done: Mutex<HashSet<(String, u64, String)>>,
    /// A task of this daemon panicked: `run` fails at the end.
    panicked: AtomicBool,
    /// A stop gave up waiting for the work in flight: `run` fails.
    stop_timed_out: AtomicBool,
}

impl FlushDaemon {
    /// Open both stores and prepare the status. A missing local store is
    /// [`Error::NotFound`] naming the path: the daemon drains a store that
    /// a trainer's saves created, and never creates one itself.
    pub fn new(cfg: DaemonConfig) -> Result<Self> {
        cfg.check()?;
        let local = match Store::open_read_only(&cfg.local, StoreOptions::default()) {
            Err(Error::NotFound { .. }) => {
                return Err(Error::NotFound {
                    what: format!(
                        "local store {}: no cairn store there (a trainer's first save creates it; check LOCAL or `local` in the config)",
                        cfg.local.display()
                    ),
                })
            }
            r => r?,
        };
        let options: Vec<(String, String)> = cfg
            .remote_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(dir) = crate::local::nesting::file_url_path(&cfg.remote) {
            // A remote in the local store's directory (or holding it): the
            // upload would copy the store onto itself, and local retention
            // would then delete checkpoints as "durable remotely".
            if crate::local::nesting::overlap(&dir, &cfg.local)? {
                return Err(Error::invalid(
                    "remote URL",
                    format!(
                        "{} is the local store {} or overlaps it; give the remote its own directory",
                        cfg.remote,
                        cfg.local.display()
                    ),
                ));
            }
            crate::local::nesting::check_not_among_store_entries(&dir, "remote")?;
        }
        let remote = RemoteStore::open(&cfg.remote, &options, cfg.remote_tuning.clone())?;
        let clock = crate::clock::system_clock();
        let status = SharedStatus::new(
            DaemonStatus {
                local: cfg.local.display().to_string(),
                remote: cfg.remote.clone(),
                started_unix_ms: clock.now_ms(),
                healthy: true,
                ..Default::default()
            },
            status::metrics_reader(remote.metrics_arc()),
        )
        .with_health(clock.clone(), cfg.unhealthy_after);
        Ok(FlushDaemon {
            cfg,
            local: Arc::new(local),
            remote,
            status,
            clock,
            failures: Mutex::new(BTreeMap::new()),
            parts_done: Mutex::new(HashSet::new()),
            panicked: AtomicBool::new(false),
            stop_timed_out: AtomicBool::new(false),
        })
    }

    /// Use a different remote (e.g. one wrapped for fault injection).
    pub fn with_remote(mut self, remote: RemoteStore) -> Self {
        self.status = SharedStatus::new(
            self.status.snapshot(),
            status::metrics_reader(remote.metrics_arc()),
        )
        .with_health(self.clock.clone(), self.cfg.unhealthy_after);
        self.remote = remote;
        self
    }

    /// Read time from `clock`: retry backoff, the unhealthy-after rule and
    /// the collection interval (e.g. a [`crate::ManualClock`] in tests).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.status = SharedStatus::new(
            self.status.snapshot(),
            status::metrics_reader(self.remote.metrics_arc()),
        )
        .with_health(clock.clone(), self.cfg.unhealthy_after);
        self.clock = clock;
        self
    }

    /// The live status.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Run until `shutdown` turns true. Then the remote is cancelled
    /// ([`RemoteStore::cancel`]): an upload in progress is abandoned as a
    /// crash would abandon it (the next start completes it), and the work in
    /// flight is awaited for at most [`STOP_GRACE`](crate::STOP_GRACE), so that no task is
    /// left running on a runtime being shut down. Fails if a task of the
    /// daemon panicked, or the work in flight did not return in time.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        // A store cancelled before (by another daemon's stop, or the
        // program) would make every cycle end at once, unreported.
        if self.stopping() {
            return Err(Error::invalid(
                "remote store",
                format!(
                    "{} was cancelled (RemoteStore::cancel is for good): give the daemon a store of its own",
                    self.remote.url()
                ),
            ));
        }
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
        let mut last_gc: Option<i64> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.until_stop(self.cycle(), &mut shutdown).await {
                Some(Err(e)) if !self.stopping() => self.record_error("scan cycle failed", &e),
                _ => {}
            }
            if self.stopping() {
                break;
            }
            let gc_due = self
                .cfg
                .gc
                .interval
                .filter(|i| !i.is_zero())
                .is_some_and(|i| last_gc.is_none_or(|t| self.clock.since(t) >= i));
            if gc_due {
                match self.until_stop(self.collect(), &mut shutdown).await {
                    Some(Err(e)) if !self.stopping() => {
                        self.record_error("garbage collection failed", &e)
                    }
                    _ => {}
                }
                if self.stopping() {
                    break;
                }
                last_gc = Some(self.clock.now_ms());
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!("cairn daemon stopping");
        let _ = server.await;
        if self.panicked.load(Ordering::Relaxed) {
            return Err(Error::Internal(
                "a task of the daemon panicked (see the log)".into(),
            ));
        }
        if self.stop_timed_out.load(Ordering::Relaxed) {
            return Err(Error::Internal(format!(
                "work in flight did not return within {STOP_GRACE:?} of the stop; it was abandoned as a crash would abandon it"
            )));
        }
        Ok(())
    }

    /// Whether a stop has begun (the remote is cancelled).
    fn stopping(&self) -> bool {
        self.remote.is_cancelled()
    }

    /// Drive `work` to its end, unless a stop is requested meanwhile: then
    /// cancel the remote, so that `work` ends promptly (an upload before
    /// its remote commit), wait at most [`STOP_GRACE`] for it, and return
    /// `None`.
    async fn until_stop<T>(
        &self,
        work: impl Future<Output = Result<T>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Result<T>> {
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => return Some(r),
            _ = shutdown.changed() => {}
        }
        tracing::info!("stop requested: cancelling remote operations in flight");
        self.remote.cancel();
        match tokio::time::timeout(STOP_GRACE, work).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "work in flight ended by the stop"),
            Err(_) => {
                tracing::error!(
                    grace_ms = STOP_GRACE.as_millis() as u64,
                    "work in flight did not return after the stop; abandoning it"
                );
                self.stop_timed_out.store(true, Ordering::Relaxed);
            }
        }
        None
    }

    /// The result of a blocking task; a panic in it is remembered (`run`
    /// then fails) and is an [`Error::Internal`] naming `what`.
    fn joined<T>(
        &self,
        what: &str,
        r: std::result::Result<Result<T>, tokio::task::JoinError>,
    ) -> Result<T> {
        r.unwrap_or_else(|e| {
            if e.is_panic() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            Err(Error::Internal(format!("{what} task: {e}")))
        })
    }

    fn record_error(&self, what: &str, e: &Error) {
        tracing::error!(error = %e, "{what}");
        self.status.update(|s| {
            s.errors += 1;
            s.last_error = Some(e.to_string());
        });
    }

    /// The wait before retrying a checkpoint that has failed `attempts`
    /// times: `poll_interval`, doubling per failure, at most
    /// `max_retry_backoff`.
    fn backoff(&self, attempts: u64) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30) as u32;
        self.cfg
            .poll_interval
            .saturating_mul(1u32 << doublings)
            .min(self.cfg.max_retry_backoff)
    }

    /// Record a failed upload of `(run, step)`: its attempt count, reason
    /// and next attempt.
    fn record_failure(&self, run: &str, step: u64, e: &Error) {
        let now = self.clock.now_ms();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let f = failures
            .entry((run.to_string(), step))
            .or_insert_with(|| FailingCheckpoint {
                run: run.to_string(),
                step,
                reason: String::new(),
                kind: String::new(),
                attempts: 0,
                first_failed_unix_ms: now,
                last_failed_unix_ms: now,
                next_attempt_unix_ms: now,
            });
        f.attempts += 1;
        f.reason = e.to_string();
        f.kind = format!("{:?}", e.kind());
        f.last_failed_unix_ms = now;
        let wait = self.backoff(f.attempts);
        f.next_attempt_unix_ms = now.saturating_add(wait.as_millis() as i64);
        tracing::warn!(
            run = %run,
            step,
            attempts = f.attempts,
            retry_in_ms = wait.as_millis() as u64,
            error = %e,
            "checkpoint upload failed; newer checkpoints proceed"
        );
        let failing: Vec<FailingCheckpoint> = failures.values().cloned().collect();
        drop(failures);
        self.status.update(|s| {
            s.errors += 1;
            s.upload_failures += 1;
            s.last_error = Some(format!("upload of run {run} step {step}: {e}"));
            s.failing = failing;
        });
    }

    /// One scan: upload what is pending, oldest first, then retention. A
    /// checkpoint whose upload fails is retried later with backoff (see
    /// [`FailingCheckpoint`]); the checkpoints after it and retention go
    /// ahead.
    pub async fn cycle(&self) -> Result<()> {
        let local = self.local.clone();
        let url = self.remote.url().to_string();
        // (created_ms, run, step), not yet durable remotely.
        let scanned = tokio::task::spawn_blocking(move || -> Result<_> {
            check_store(&local)?;
            let sharded = scan_sharded(&local, &url);
            let mut pending = Vec::new();
            let mut newest = BTreeMap::new();
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
            Ok((pending, newest, sharded))
        })
        .await;
        let (pending, newest_local, sharded) = match self.joined("scan", scanned) {
            Ok(s) => {
                self.status.update(|s| {
                    s.scan_failing_since_unix_ms = None;
                    s.scan_error = None;
                });
                s
            }
            Err(e) => {
                let now = self.clock.now_ms();
                self.status.update(|s| {
                    s.scan_failing_since_unix_ms.get_or_insert(now);
                    s.scan_error = Some(e.to_string());
                });
                return Err(e);
            }
        };
        let now = self.clock.now_ms();
        let failing: Vec<FailingCheckpoint> = {
            // Forget failures of checkpoints no longer pending (deleted,
            // or uploaded by someone else).
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|(run, step), _| {
                pending.iter().any(|(_, r, s)| r == run && s == step)
                    || sharded.iter().any(|(r, s, _)| r == run && s == step)
            });
            failures.values().cloned().collect()
        };
        let sharded_work = {
            let mut done = self.parts_done.lock().unwrap_or_else(|p| p.into_inner());
            // Forget the parts of steps no longer pending here (published,
            // or collected).
            done.retain(|(run, step, _)| sharded.iter().any(|(r, s, _)| r == run && s == step));
            sharded
                .iter()
                .filter(|(r, s, parts)| {
                    parts
                        .iter()
                        .any(|p| !done.contains(&(r.clone(), *s, p.file.clone())))
                })
                .count()
        };
        let queued = pending.len() + sharded_work;
        self.status.update(|s| {
            s.queue_depth = queued as u64;
            s.newest_local = newest_local;
            s.failing = failing;
            if queued == 0 {
                s.stalled_since_unix_ms = None;
            } else if s.stalled_since_unix_ms.is_none() {
                s.stalled_since_unix_ms = Some(now);
            }
        });
        let mut remaining = queued;
        for (_, run, step) in &pending {
            let not_before = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(run.clone(), *step))
                .map(|f| f.next_attempt_unix_ms);
            if not_before.is_some_and(|t| self.clock.now_ms() < t) {
                continue;
            }
            let result = {
                let (local, remote) = (self.local.clone(), self.remote.clone());
                let (run, step) = (run.clone(), *step);
                let r =
                    tokio::task::spawn_blocking(move || local.upload_to(&remote, &run, step)).await;
                self.joined("upload", r)
            };
            let report = match result {
                Ok(r) => r,
                // Abandoned by a stop: not a failure of the checkpoint.
                Err(e) if self.stopping() => return Err(e),
                Err(e) => {
                    self.record_failure(run, *step, &e);
                    continue;
                }
            };
            let failed_before = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(run.clone(), *step))
                .map_or(0, |f| f.attempts);
            tracing::info!(
                run = %run,
                step = *step,
                chunks_uploaded = report.chunks_uploaded,
                chunks_skipped = report.chunks_skipped,
                bytes_uploaded = report.bytes_uploaded,
                already_committed = report.already_committed,
                failed_attempts_before = failed_before,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "checkpoint durable remotely"
            );
            remaining -= 1;
            let now = self.clock.now_ms();
            let failing: Vec<FailingCheckpoint> = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            self.status.update(|s| {
                s.checkpoints_uploaded += 1;
                s.queue_depth = remaining as u64;
                s.last_upload_unix_ms = Some(now);
                s.stalled_since_unix_ms = (remaining > 0).then_some(now);
                s.failing = failing;
            });
        }
        self.flush_sharded(&sharded, &mut remaining).await;
        if self.stopping() {
            return Err(Error::Cancelled {
                url: self.remote.url().to_string(),
            });
        }
        if let Err(e) = self.retention().await {
            self.record_error("retention failed", &e);
        }
        let mut newest_remote = BTreeMap::new();
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
    /// Drain the sharded steps `sharded` found by the scan (see the module
    /// docs), each on its own with the same failure backoff as
    /// checkpoints. `remaining` counts the queue for the status.
    async fn flush_sharded(
        &self,
        sharded: &[(String, u64, Vec<PartListing>)],
        remaining: &mut usize,
    ) {
        let mut awaiting = 0u64;
        for (run, step, parts) in sharded {
            let not_before = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(run.clone(), *step))
                .map(|f| f.next_attempt_unix_ms);
            if not_before.is_some_and(|t| self.clock.now_ms() < t) {
                continue;
            }
            let done: HashSet<String> = {
                let all = self.parts_done.lock().unwrap_or_else(|p| p.into_inner());
                parts
                    .iter()
                    .filter(|p| all.contains(&(run.clone(), *step, p.file.clone())))
                    .map(|p| p.file.clone())
                    .collect()
            };
            let had_work = done.len() < parts.len();
            let result = {
                let (local, remote) = (self.local.clone(), self.remote.clone());
                let (run, step, parts) = (run.clone(), *step, parts.clone());
                let r = tokio::task::spawn_blocking(move || {
                    flush_sharded_step(&local, &remote, &run, step, &parts, &done)
                })
                .await;
                self.joined("sharded upload", r)
            };
            let out = match result {
                Ok(o) => o,
                Err(_) if self.stopping() => return,
                Err(e) => {
                    self.record_failure(run, *step, &e);
                    continue;
                }
            };
            {
                let mut all = self.parts_done.lock().unwrap_or_else(|p| p.into_inner());
                for f in &out.uploaded {
                    all.insert((run.clone(), *step, f.clone()));
                }
            }
            let failed_before = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(run.clone(), *step))
                .map_or(0, |f| f.attempts);
            if had_work {
                *remaining = remaining.saturating_sub(1);
            }
            let now = self.clock.now_ms();
            let failing: Vec<FailingCheckpoint> = self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let published = out.published;
            if published.is_none() {
                awaiting += 1;
            }
            let left = *remaining;
            let uploaded = out.uploaded.len() as u64;
            self.status.update(|s| {
                s.parts_uploaded += uploaded;
                s.queue_depth = left as u64;
                s.failing = failing;
                if let Some(created) = published {
                    s.checkpoints_uploaded += 1;
                    s.records_published += created as u64;
                    s.last_upload_unix_ms = Some(now);
                    s.stalled_since_unix_ms = (left > 0).then_some(now);
                }
            });
            match published {
                Some(created) => tracing::info!(
                    run = %run,
                    step = *step,
                    parts_uploaded = uploaded,
                    record_created = created,
                    failed_attempts_before = failed_before,
                    "sharded step durable remotely"
                ),
                None => tracing::info!(
                    run = %run,
                    step = *step,
                    parts_uploaded = uploaded,
                    "sharded step: parts here uploaded, waiting for other ranks' parts"
                ),
            }
        }
        self.status.update(|s| s.awaiting_ranks = awaiting);
    }

    /// Local retention first: it deletes a local checkpoint only while the
    /// remote still holds it, so it must look before remote retention
    /// thins the remote out.
    async fn retention(&self) -> Result<()> {
        let r = &self.cfg.retention;
        if let Some(keep) = r.local_keep_last {
            let local = self.local.clone();
            let remote = self.remote.clone();
            let r = tokio::task::spawn_blocking(move || local.apply_local_retention(keep, &remote))
                .await;
            let deleted = self.joined("retention", r)?;
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
        let r = tokio::task::spawn_blocking(move || local.gc(grace, false)).await;
        let lr = self.joined("local gc", r)?;
        tracing::info!(
            chunks_deleted = lr.chunks_deleted,
            bytes = lr.bytes_reclaimed,
            "local gc"
        );
        let remote = self.remote.clone();
        let r =
            tokio::task::spawn_blocking(move || remote.gc(remote.collection_grace()?, false)).await;
        let rr = self.joined("remote gc", r)?;
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

/// Fail unless `local` is still a store: its marker and its `runs`
/// directory exist. A store deleted (or unmounted) under a running daemon
/// is an error of every scan, not an empty store.
fn check_store(local: &Store) -> Result<()> {
    let layout = crate::layout::Layout::new(local.root());
    for (what, path, present) in [
        ("store marker", layout.marker(), layout.marker().is_file()),
        (
            "runs directory",
            layout.runs_dir(),
            layout.runs_dir().is_dir(),
        ),
    ] {
        if !present {
            return Err(Error::NotFound {
                what: format!(
                    "local store {}: its {what} {} is gone (the daemon never recreates a store)",
                    local.root().display(),
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Sharded steps of `local` with parts and no local record, not yet
/// recorded as published at `url`, with their parts. A run or step that
/// cannot be listed is left out with a warning: it must not stop the
/// uploads of other checkpoints.
fn scan_sharded(local: &Store, url: &str) -> Vec<(String, u64, Vec<PartListing>)> {
    let mut out = Vec::new();
    let runs = match local.run_dirs() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list runs for sharded steps");
            return out;
        }
    };
    for run in runs {
        let steps = match local.pending_steps(&run) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(run = %run, error = %e, "cannot list sharded steps");
                continue;
            }
        };
        for step in steps {
            if local.is_uploaded(&run, step, url) {
                continue;
            }
            match local.parts(&run, step) {
                Ok(parts) if !parts.is_empty() => out.push((run.clone(), step, parts)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(run = %run, step, error = %e, "cannot list parts")
                }
            }
        }
    }
    out
}

/// What one pass over a sharded step did.
#[derive(Debug, Default)]
struct ShardedFlush {
    /// Part files uploaded by this pass.
    uploaded: Vec<String>,
    /// `Some(created)` once the remote record exists (`created`: this pass
    /// put it).
    published: Option<bool>,
}

/// One pass over sharded step `(run, step)` with local parts `parts`, of
/// which `done` were uploaded earlier by this process: if the remote
/// already holds the record, record that locally; else upload the parts
/// not uploaded yet (and try the remote commit, as
/// [`Store::upload_parts`] does), or, with every local part up, commit
/// once the remote lists a part of every rank. Blocking.
fn flush_sharded_step(
    local: &Store,
    remote: &RemoteStore,
    run: &str,
    step: u64,
    parts: &[PartListing],
    done: &HashSet<String>,
) -> Result<ShardedFlush> {
    let mut out = ShardedFlush::default();
    if remote.block_on(remote.has_manifest(run, step))?? {
        out.published = Some(false);
    } else {
        let mut worlds: Vec<u32> = parts.iter().map(|p| p.world_size).collect();
        worlds.sort_unstable();
        worlds.dedup();
        for w in worlds {
            let files: Vec<&PartListing> = parts.iter().filter(|p| p.world_size == w).collect();
            let todo: Vec<&PartListing> = files
                .iter()
                .copied()
                .filter(|p| !done.contains(&p.file))
                .collect();
            let committed = if !todo.is_empty() {
                let todo_files: HashSet<&str> = todo.iter().map(|p| p.file.as_str()).collect();
                let r = local
                    .upload_parts_except(remote, run, step, w, &|f| !todo_files.contains(f))?;
                for p in &todo {
                    tracing::info!(run = %run, step, part = %p.file, "uploaded part");
                }
                out.uploaded.extend(todo.iter().map(|p| p.file.clone()));
                r.committed
            } else {
                let mut have = vec![false; w as usize];
                for (p, _) in remote.parts(run, step)? {
                    if p.world_size == w {
                        have[p.rank as usize] = true;
                    }
                }
                if have.iter().all(|&h| h) {
                    match remote.commit(run, step, w) {
                        Ok(r) => Some(r),
                        Err(Error::MissingRank { .. }) => None,
                        Err(e) => return Err(e),
                    }
                } else {
                    None
                }
            };
            if let Some(r) = committed {
                if r.created {
                    tracing::info!(
                        run = %run,
                        step,
                        world_size = w,
                        parts = r.parts,
                        "published remote record"
                    );
                }
                out.published = Some(r.created);
                break;
            }
        }
    }
    if out.published.is_some() {
        local.mark_uploaded(run, step, remote.url())?;
    }
    Ok(out)
}
