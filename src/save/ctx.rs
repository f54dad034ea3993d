//! Per-save shared state: which chunk each staged buffer became, counters,
//! the first error, and the plan of the manifest to commit.

use super::handle::SaveReport;
use crate::chunk_id::ChunkId;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::manifest::ShardInfo;
use crate::layout::Layout;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A chunk being written by some save; others that need the same chunk
/// wait for it before they commit.
pub(crate) struct Inflight {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Inflight {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Inflight {
            state: Mutex::new(None),
            cv: Condvar::new(),
        })
    }

    pub(crate) fn complete(&self, ok: bool) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
        self.cv.notify_all();
    }

    /// Wait for the writer; true if the chunk is durable.
    pub(crate) fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ok) = *s {
                return ok;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A tensor or blob as staged: its chunk slices refer to staging sequence
/// numbers until the pipeline has hashed them.
pub(crate) struct PlannedEntry {
    pub name: String,
    /// `None` for blobs.
    pub tensor: Option<(DType, Vec<u64>, Option<ShardInfo>)>,
    pub len: u64,
    /// `(seq, offset, len)`.
    pub slices: Vec<(usize, u64, u64)>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub chunks: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_written_uncompressed: AtomicU64,
    pub bytes_deduped: AtomicU64,
    pub hash_ns: AtomicU64,
    pub encode_ns: AtomicU64,
    pub write_ns: AtomicU64,
    pub sync_ns: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub fn add_time(c: &AtomicU64, since: Instant) {
        c.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

pub(crate) struct SaveCtx {
    pub layout: Layout,
    pub run: String,
    pub step: u64,
    pub chunk_size: u64,
    pub metadata: serde_json::Value,
    pub started: Instant,
    pub logical_bytes: u64,
    /// seq -> (id, uncompressed length).
    ids: Mutex<Vec<Option<(ChunkId, u64)>>>,
    pub plan: Mutex<Vec<PlannedEntry>>,
    /// Outstanding work items, plus one while staging is still running.
    pending: AtomicUsize,
    error: Mutex<Option<Error>>,
    pub deps: Mutex<Vec<Arc<Inflight>>>,
    touched: Mutex<[bool; 256]>,
    pub counters: Counters,
    pub stall: Mutex<Duration>,
    /// Shared collection lock, held until the save commits or fails.
    pub gc_lock: Mutex<Option<crate::local::GcLock>>,
    done: Mutex<Option<oneshot::Sender<Result<SaveReport>>>>,
}

impl SaveCtx {
    pub fn new(
        layout: Layout,
        run: String,
        step: u64,
        chunk_size: u64,
        metadata: serde_json::Value,
        logical_bytes: u64,
        done: oneshot::Sender<Result<SaveReport>>,
    ) -> Self {
        SaveCtx {
            layout,
            run,
            step,
            chunk_size,
            metadata,
            started: Instant::now(),
            logical_bytes,
            ids: Mutex::new(Vec::new()),
            plan: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(1),
            error: Mutex::new(None),
            deps: Mutex::new(Vec::new()),
            touched: Mutex::new([false; 256]),
            counters: Counters::default(),
            stall: Mutex::new(Duration::ZERO),
            gc_lock: Mutex::new(None),
            done: Mutex::new(Some(done)),
        }
    }

    /// Reserve a sequence number for a staged buffer.
    pub fn next_seq(&self) -> usize {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.push(None);
        ids.len() - 1
    }

    /// Count one more work item in flight.
    pub fn add_pending(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    pub fn set_id(&self, seq: usize, id: ChunkId, len: u64) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())[seq] = Some((id, len));
    }

    pub fn id_of(&self, seq: usize) -> Option<(ChunkId, u64)> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())[seq]
    }

    pub fn touch(&self, id: &ChunkId) {
        self.touched.lock().unwrap_or_else(|p| p.into_inner())[id.0[0] as usize] = true;
    }

    pub fn touched_prefixes(&self) -> Vec<u8> {
        let t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        (0..=255u8).filter(|&p| t[p as usize]).collect()
    }

    pub fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Mark one work item done; true if it was the last, and the save is
    /// ready to commit.
    pub fn finish_one(&self) -> bool {
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn resolve(&self, r: Result<SaveReport>) {
        self.gc_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(r);
        }
    }
}
